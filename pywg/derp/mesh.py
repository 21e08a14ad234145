"""Which mesh peer reaches which node key: the relay's forwarding table, without I/O.

Servers of one region mesh: each runs a mesh client to every other one, with the shared mesh
key and WatchConns, and hears a PeerPresent for every client there (then one per connect and
a PeerGone per disconnect). Each such link is a ``Forwarder``: a packet for a key that is not
connected here goes to the first link that announced it, as a ForwardPacket, one hop only.
The table is bounded (``max_keys``); announcements beyond it are dropped and counted.
"""

from __future__ import annotations

from typing import Protocol

from .keys import NodePublicKey

MAX_FORWARDED_KEYS = 100_000


class Forwarder(Protocol):
    """A mesh link that can carry a packet to the server that has ``dst``."""

    def forward_packet(self, src: NodePublicKey, dst: NodePublicKey, packet: bytes) -> bool:
        """Queue the ForwardPacket; False when the link cannot take it now (dropped)."""
        ...


class ForwarderTable:
    """Node key -> the mesh links that announced it, earliest first."""

    def __init__(self, max_keys: int = MAX_FORWARDED_KEYS) -> None:
        self.max_keys = max_keys
        self.refused = 0  # announcements dropped because the table was full
        self._by_key: dict[NodePublicKey, list[Forwarder]] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def lookup(self, key: NodePublicKey) -> Forwarder | None:
        links = self._by_key.get(key)
        return links[0] if links else None

    def add(self, key: NodePublicKey, link: Forwarder) -> bool:
        """``link`` reaches ``key``; False when the table is full (nothing added)."""
        links = self._by_key.get(key)
        if links is None:
            if len(self._by_key) >= self.max_keys:
                self.refused += 1
                return False
            self._by_key[key] = [link]
        elif link not in links:
            links.append(link)
        return True

    def remove(self, key: NodePublicKey, link: Forwarder) -> bool:
        """``link`` no longer reaches ``key``; True when no link reaches it any more."""
        links = self._by_key.get(key)
        if links is None:
            return False
        if link in links:
            links.remove(link)
        if links:
            return False
        del self._by_key[key]
        return True

    def remove_link(self, link: Forwarder) -> list[NodePublicKey]:
        """The link broke: forget what it announced; the keys nothing reaches any more."""
        gone = []
        for key in [k for k, links in self._by_key.items() if link in links]:
            if self.remove(key, link):
                gone.append(key)
        return gone
