"""Cryptokey routing: the allowed-IPs table that maps inner addresses to peers.

One table holds the prefixes of every peer, IPv4 and IPv6 kept apart, and answers
longest-prefix-match questions in both directions (WireGuard paper section 2):

- outbound, the destination of a packet read from the TUN device picks the peer to
  encrypt it for (``lookup_packet_destination``);
- inbound, the source of a decrypted packet must route back to the peer it came from,
  or the packet is dropped (``lookup_packet_source``).

Semantics follow the kernel's ``allowedips.c``: host bits beyond the prefix length are
masked off on insert (``10.0.0.1/24`` means ``10.0.0.0/24``), inserting a prefix that is
already present moves it to the new peer, and a peer's prefixes are listed in the order
they were (last) inserted. Peers are opaque objects compared by identity.

Layout. Every prefix owns a contiguous range of the address space, and prefixes either
nest or are disjoint, so the longest-prefix-match answer is constant on runs of
addresses. Each family keeps those runs as two parallel lists: ``starts`` (the first
address of each run, ascending, beginning at 0) and ``peers`` (the peer answering for
that run, or None). A lookup is one ``int.from_bytes`` and one ``bisect`` in C, whatever
the prefix lengths, with no Python-level loop: a fraction of a microsecond for tables of
thousands of prefixes. The lists stay canonical (no two neighbouring runs with the same
owning prefix), and insert/remove update them in place, touching only the runs inside
the prefix concerned.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_left, bisect_right
from typing import Generic, TypeVar

T = TypeVar("T")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Addresses and packets may arrive as any of these (a receive buffer is often a memoryview).
BytesLike = bytes | bytearray | memoryview

IPV4_HEADER_LEN = 20
IPV6_HEADER_LEN = 40


class _Prefix(Generic[T]):
    """One allowed-IPs entry: a masked prefix and the peer that owns it (hashed by identity)."""

    __slots__ = ("length", "network", "peer", "start")

    def __init__(self, network: Network, peer: T) -> None:
        self.network = network
        self.start = int(network.network_address)
        self.length = network.prefixlen
        self.peer = peer


class _Family(Generic[T]):
    """The prefixes of one address family and the runs derived from them."""

    __slots__ = ("bits", "lengths", "owners", "peers", "prefixes", "size", "starts")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.size = 1 << bits
        # (prefix length, masked address) -> entry: the authoritative set.
        self.prefixes: dict[tuple[int, int], _Prefix[T]] = {}
        # prefix length -> how many prefixes have it (to find a prefix's parent quickly).
        self.lengths: dict[int, int] = {}
        # The runs: run k covers starts[k] .. starts[k + 1] - 1 and is answered by owners[k].
        # These lists are only ever mutated in place: AllowedIPs.lookup holds references.
        self.starts: list[int] = [0]
        self.owners: list[_Prefix[T] | None] = [None]
        self.peers: list[T | None] = [None]

    def clear(self) -> None:
        self.prefixes.clear()
        self.lengths.clear()
        self.starts[:] = [0]
        self.owners[:] = [None]
        self.peers[:] = [None]

    def _span(self, entry: _Prefix[T]) -> tuple[int, int]:
        """Indexes [i, j) of the runs that exactly tile ``entry``'s range (it must be present)."""
        starts = self.starts
        end = entry.start + (1 << (self.bits - entry.length))
        i = bisect_left(starts, entry.start)
        j = bisect_left(starts, end, i)
        return i, j

    def _split(self, address: int) -> int:
        """Make ``address`` the start of a run; return that run's index."""
        starts = self.starts
        k = bisect_right(starts, address) - 1
        if starts[k] != address:
            k += 1
            starts.insert(k, address)
            self.owners.insert(k, self.owners[k - 1])
            self.peers.insert(k, self.peers[k - 1])
        return k

    def _merge(self, k: int) -> None:
        """Join run ``k`` into run ``k - 1`` when the same prefix owns both."""
        if 0 < k < len(self.starts) and self.owners[k] is self.owners[k - 1]:
            del self.starts[k]
            del self.owners[k]
            del self.peers[k]

    def _parent(self, entry: _Prefix[T]) -> _Prefix[T] | None:
        """The longest present prefix strictly containing ``entry``, if any."""
        lengths, prefixes, bits, start = self.lengths, self.prefixes, self.bits, entry.start
        for length in range(entry.length - 1, -1, -1):
            if length in lengths:
                shift = bits - length
                parent = prefixes.get((length, start >> shift << shift))
                if parent is not None:
                    return parent
        return None

    def insert(self, entry: _Prefix[T]) -> None:
        """Add a prefix that is not present yet."""
        self.prefixes[entry.length, entry.start] = entry
        self.lengths[entry.length] = self.lengths.get(entry.length, 0) + 1
        end = entry.start + (1 << (self.bits - entry.length))
        i = self._split(entry.start)
        j = self._split(end) if end < self.size else len(self.starts)
        # Inside the new prefix, every run is owned either by a prefix nested in it (longer:
        # it keeps the run) or by the one longest prefix containing it, or nobody (shorter:
        # the new prefix takes the run over). Runs of the latter kind are never neighbours,
        # and the runs just outside are owned by something else, so the lists stay canonical.
        owners, peers, length, peer = self.owners, self.peers, entry.length, entry.peer
        for k in range(i, j):
            owner = owners[k]
            if owner is None or owner.length < length:
                owners[k] = entry
                peers[k] = peer

    def reassign(self, entry: _Prefix[T], peer: T) -> None:
        """Give a present prefix to another peer."""
        entry.peer = peer
        i, j = self._span(entry)
        owners, peers = self.owners, self.peers
        for k in range(i, j):
            if owners[k] is entry:
                peers[k] = peer

    def remove(self, entry: _Prefix[T]) -> None:
        """Drop a present prefix; its runs fall back to the prefix containing it."""
        i, j = self._span(entry)
        del self.prefixes[entry.length, entry.start]
        count = self.lengths[entry.length] - 1
        if count:
            self.lengths[entry.length] = count
        else:
            del self.lengths[entry.length]
        parent = self._parent(entry)
        parent_peer = None if parent is None else parent.peer
        owners, peers = self.owners, self.peers
        for k in range(i, j):
            if owners[k] is entry:
                owners[k] = parent
                peers[k] = parent_peer
        # Only the runs at either edge can now meet a neighbour owned by the parent: runs
        # inside that belonged to the removed prefix are separated by nested prefixes' runs.
        self._merge(j)
        self._merge(i)


class AllowedIPs(Generic[T]):
    """Longest-prefix-match table from IPv4/IPv6 prefixes to peers (cryptokey routing).

    ``lookup`` takes a packed address (4 or 16 bytes); the packet helpers read it from an
    IP header. Peers are compared by identity. Not thread-safe: mutate and look up from
    one thread (the event loop).
    """

    __slots__ = ("_by_peer", "_peers4", "_peers6", "_starts4", "_starts6", "_v4", "_v6", "version")

    def __init__(self) -> None:
        self._v4: _Family[T] = _Family(32)
        self._v6: _Family[T] = _Family(128)
        # Direct references for the lookup fast path (the lists are mutated in place only).
        self._starts4 = self._v4.starts
        self._peers4 = self._v4.peers
        self._starts6 = self._v6.starts
        self._peers6 = self._v6.peers
        # id(peer) -> that peer's entries in insertion order. Keyed by id() because peers
        # are compared by identity and need not be hashable; every entry holds a reference
        # to its peer, so the id stays valid as long as the key exists.
        self._by_peer: dict[int, dict[_Prefix[T], None]] = {}
        self.version = 0  # counts changes (a copy elsewhere knows when it is stale)

    # --- lookups (hot path) ---------------------------------------------------------

    def lookup(self, address: BytesLike) -> T | None:
        """The peer whose longest matching prefix contains ``address`` (4 or 16 packed bytes).

        Returns None when no prefix matches or the address is neither 4 nor 16 bytes long.
        """
        n = len(address)
        if n == 4:
            return self._peers4[bisect_right(self._starts4, int.from_bytes(address)) - 1]
        if n == 16:
            return self._peers6[bisect_right(self._starts6, int.from_bytes(address)) - 1]
        return None

    def lookup_packet_destination(self, packet: BytesLike) -> T | None:
        """The peer to send an outbound IP packet to (by destination address), or None.

        Only the header fields needed are checked: IP version, for IPv4 a header length of
        at least 20 bytes, and that the packet holds the whole header. Anything else (empty,
        truncated, not IP) gives None; nothing raises.
        """
        if not packet:
            return None
        first = packet[0]
        if 0x45 <= first <= 0x4F:
            if len(packet) >= (first & 0x0F) << 2:
                return self._peers4[bisect_right(self._starts4, int.from_bytes(packet[16:20])) - 1]
        elif first >> 4 == 6 and len(packet) >= IPV6_HEADER_LEN:
            return self._peers6[bisect_right(self._starts6, int.from_bytes(packet[24:40])) - 1]
        return None

    def lookup_packet_source(self, packet: BytesLike) -> T | None:
        """The peer allowed to send an inbound IP packet (by source address), or None.

        Checks as ``lookup_packet_destination``; a decrypted packet is accepted only if
        this returns the peer whose session decrypted it.
        """
        if not packet:
            return None
        first = packet[0]
        if 0x45 <= first <= 0x4F:
            if len(packet) >= (first & 0x0F) << 2:
                return self._peers4[bisect_right(self._starts4, int.from_bytes(packet[12:16])) - 1]
        elif first >> 4 == 6 and len(packet) >= IPV6_HEADER_LEN:
            return self._peers6[bisect_right(self._starts6, int.from_bytes(packet[8:24])) - 1]
        return None

    # --- mutation -------------------------------------------------------------------

    def insert(self, network: str | Network, peer: T) -> None:
        """Route ``network`` to ``peer``; host bits beyond the prefix length are ignored.

        A prefix already present is taken from its previous owner (as the kernel does)
        and moves to the end of ``peer``'s entries. Raises ValueError for a string that is
        not an IPv4/IPv6 address or prefix, TypeError for other types.
        """
        net = parse_network(network)
        family = self._family(net)
        self.version += 1
        entry = family.prefixes.get((net.prefixlen, int(net.network_address)))
        if entry is None:
            entry = _Prefix(net, peer)
            family.insert(entry)
        else:
            self._unlink(entry)
            if entry.peer is not peer:
                family.reassign(entry, peer)
        self._by_peer.setdefault(id(peer), {})[entry] = None

    def remove(self, network: str | Network, peer: T) -> bool:
        """Remove the prefix ``network`` (host bits ignored) if ``peer`` owns it.

        Returns whether something was removed. Raises as ``insert`` for invalid input.
        """
        net = parse_network(network)
        family = self._family(net)
        entry = family.prefixes.get((net.prefixlen, int(net.network_address)))
        if entry is None or entry.peer is not peer:
            return False
        self.version += 1
        self._unlink(entry)
        family.remove(entry)
        return True

    def remove_peer(self, peer: T) -> None:
        """Remove every prefix ``peer`` owns."""
        entries = self._by_peer.pop(id(peer), None)
        if entries is None:
            return
        self.version += 1
        for entry in entries:
            self._family(entry.network).remove(entry)

    def clear(self) -> None:
        """Remove every prefix of every peer."""
        self.version += 1
        self._v4.clear()
        self._v6.clear()
        self._by_peer.clear()

    # --- inspection -----------------------------------------------------------------

    def entries_for(self, peer: T) -> list[Network]:
        """``peer``'s prefixes (masked), in the order they were last inserted."""
        entries = self._by_peer.get(id(peer))
        return [] if entries is None else [entry.network for entry in entries]

    def runs(self, version: int) -> tuple[list[int], list[T | None]]:
        """The table as runs for one IP version (4 or 6): the first address of each run,
        ascending from 0, and the peer answering for it (copies)."""
        family = self._v4 if version == 4 else self._v6
        return list(family.starts), list(family.peers)

    def __len__(self) -> int:
        return len(self._v4.prefixes) + len(self._v6.prefixes)

    def __repr__(self) -> str:
        return (f"<AllowedIPs {len(self._v4.prefixes)} IPv4 + {len(self._v6.prefixes)} IPv6 prefixes, "
                f"{len(self._by_peer)} peers>")

    # --- internals ------------------------------------------------------------------

    def _family(self, net: Network) -> _Family[T]:
        return self._v4 if net.version == 4 else self._v6

    def _unlink(self, entry: _Prefix[T]) -> None:
        """Take ``entry`` off its current peer's list."""
        key = id(entry.peer)
        entries = self._by_peer[key]
        del entries[entry]
        if not entries:
            del self._by_peer[key]


def parse_network(network: str | Network) -> Network:
    """An IPv4Network/IPv6Network from a prefix string or network, host bits masked off.

    A bare address means a full-length prefix (/32 or /128), as with ``wg``.
    """
    if isinstance(network, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return network  # network objects never carry host bits
    if not isinstance(network, str):
        raise TypeError(f"allowed IP must be a str or an IPv4Network/IPv6Network, not {type(network).__name__}")
    text = network.strip()
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            f"invalid allowed IP {network!r}: expected an IPv4 or IPv6 address with an optional "
            f"/prefix-length, such as 10.0.0.0/24 or fd00::/64"
        ) from None
