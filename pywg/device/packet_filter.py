"""Per-peer packet filters: a verdict on each IP packet after the TUN read (outbound, before
it is sealed for the peer) and before the TUN write (inbound, after it was opened and its
source checked against the peer's allowed IPs).

A filter is any callable ``filter(direction, packet) -> Verdict``; ``packet`` is the IP
packet (bytes or a memoryview, valid only during the call). A filter that raises drops the
packet (logged once per filter). Dropped packets are counted as ``filtered_outbound`` or
``filtered_inbound``. A peer with a filter is never carried by the C hop (its sessions are
not armed), so every one of its packets passes the filter; a device with no filter set
pays one empty-dict test per run of packets.

A filter runs on the data path (a data-path thread or the event loop) with the device's
lock held: it must be quick, and must not call back into the device (``set_filter``,
``stats``, ``apply``: the lock is not reentrant, the call would deadlock). Rules that change
are swapped in whole with ``set_filter`` from outside the filter.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TypeVar

from pywg.protocol.actions import DropReason

from .metrics import Direction

__all__ = ["PacketFilter", "PeerFilters", "Verdict"]

log = logging.getLogger(__name__)

Packet = TypeVar("Packet", bytes, memoryview)


class Verdict(enum.Enum):
    ACCEPT = "accept"
    DROP = "drop"


PacketFilter = Callable[[Direction, "bytes | memoryview"], Verdict]

_REASON = {Direction.OUTBOUND: DropReason.FILTERED_OUTBOUND, Direction.INBOUND: DropReason.FILTERED_INBOUND}


class PeerFilters:
    """The device's filters by peer public key (read and changed under the device lock). A
    filter may be set before its peer is added and stays when the peer is removed and added
    again: it goes only when set to None."""

    def __init__(self) -> None:
        # The hot paths test this dict itself (empty: no filter; a key in it: filtered), which
        # costs no Python call; change it only through ``set``.
        self.by_peer: dict[bytes, PacketFilter] = {}
        self._failed: set[int] = set()  # ids of filters whose exception was logged

    def set(self, public_key: bytes, packet_filter: PacketFilter | None) -> None:
        if packet_filter is None:
            self.by_peer.pop(public_key, None)
        elif not callable(packet_filter):
            raise TypeError(f"a packet filter must be callable, not {type(packet_filter).__name__}")
        else:
            self.by_peer[public_key] = packet_filter

    def passes(self, public_key: bytes, direction: Direction, packet: bytes | memoryview,
               drops: Counter[DropReason]) -> bool:
        """Whether the peer's filter (if any) accepts ``packet``; a drop is counted in ``drops``."""
        packet_filter = self.by_peer.get(public_key)
        if packet_filter is None:
            return True
        try:
            verdict = packet_filter(direction, packet)
        except Exception:
            if id(packet_filter) not in self._failed:
                self._failed.add(id(packet_filter))
                log.exception("the packet filter of a peer raised: its packets are dropped")
            verdict = Verdict.DROP
        if verdict is Verdict.ACCEPT:
            return True
        drops[_REASON[direction]] += 1
        return False

    def kept(self, public_key: bytes, direction: Direction, packets: Sequence[Packet],
             drops: Counter[DropReason]) -> list[Packet]:
        """The packets the peer's filter accepts (all of them without a filter)."""
        if public_key not in self.by_peer:
            return list(packets)
        return [p for p in packets if self.passes(public_key, direction, p, drops)]
