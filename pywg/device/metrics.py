"""A device's metrics as one typed, consistent snapshot: the one source for ``pywg stats``,
UAPI ``get`` and the Prometheus collector (pywg.device.prometheus).

The data path keeps plain integers (the engine's Peer counters, ``dispatcher.drops``,
``device.drops``, the threads' batching figures, the C hop's screen and TUN counters);
``collect`` reads them all with the device lock held, the lock under which every one of
them is written, so a snapshot never shows half of an update and no increment is lost.
Nothing here runs per packet.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pywg.protocol.actions import DropReason
from pywg.protocol.actions import Endpoint as AnyEndpoint
from pywg.protocol.endpoint import Endpoint, RelayEndpoint

if TYPE_CHECKING:
    from .device import Device


class Path(str, enum.Enum):
    """How a peer is reached now: direct UDP, or through a DERP relay."""

    UDP = "udp"
    RELAY = "relay"


class Direction(str, enum.Enum):
    """Where a dropped packet was going: in from the network (to the TUN) or out to it."""

    INBOUND = "inbound"
    OUTBOUND = "outbound"


# Drops of packets on their way out (from the TUN, or a datagram being sent); every other
# reason is of remote input. NO_PRIVATE_KEY counts inbound: it is counted both for a
# handshake message that arrives before the device has a key and for an initiation that
# could not be made, and the first is the one an outsider can cause.
OUTBOUND_REASONS = frozenset({
    DropReason.NO_ENDPOINT, DropReason.STAGED_QUEUE_FULL, DropReason.HANDSHAKE_GAVE_UP,
    DropReason.NO_ROUTE, DropReason.INVALID_TUN_PACKET, DropReason.INVALID_TUN_FRAME,
    DropReason.NO_SOCKET_FOR_ENDPOINT, DropReason.UDP_SEND_FULL, DropReason.UDP_SEND_ERROR,
    DropReason.RELAY_MISSING, DropReason.RELAY_SEND_DROPPED, DropReason.FILTERED_OUTBOUND,
})


def direction_of(reason: DropReason) -> Direction:
    """The direction a drop of ``reason`` counts in."""
    return Direction.OUTBOUND if reason in OUTBOUND_REASONS else Direction.INBOUND


@dataclass(frozen=True, slots=True)
class PeerMetrics:
    """One peer's counters. Bytes and packets are of authenticated transport messages on
    the wire (keepalives included), as UAPI's ``rx_bytes``/``tx_bytes``."""

    public_key: bytes
    endpoint: Endpoint | RelayEndpoint | None
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0
    handshakes_initiated: int = 0  # initiations sent, retries included
    handshakes_completed: int = 0
    handshakes_timed_out: int = 0  # initiations unanswered after REKEY_TIMEOUT
    sessions_expired: int = 0  # session keys forgotten (KEY_ZEROING_TIME without a handshake)
    unreachable: int = 0  # handshakes given up after MAX_TIMER_HANDSHAKES retries
    last_handshake: float | None = None  # UNIX time (seconds) of the last completed handshake
    staged_packets: int = 0

    @property
    def path(self) -> Path | None:
        """UDP or relay (None: no endpoint known)."""
        if self.endpoint is None:
            return None
        return Path.RELAY if isinstance(self.endpoint, RelayEndpoint) else Path.UDP

    def __repr__(self) -> str:
        return (f"PeerMetrics({self.public_key.hex()[:16]}..., {self.endpoint}, rx={self.rx_packets}/"
                f"{self.rx_bytes} B, tx={self.tx_packets}/{self.tx_bytes} B, "
                f"handshakes={self.handshakes_completed})")


@dataclass(frozen=True, slots=True)
class DeviceMetrics:
    """The device's counters at one instant (one hold of the device lock)."""

    interface: str
    listen_port: int
    peers: tuple[PeerMetrics, ...]
    engine_drops: Mapping[DropReason, int]  # remote input: the engine's and the screen's
    device_drops: Mapping[DropReason, int]  # around the engine: routes, TUN, sockets, relay
    screen_drops: Mapping[DropReason, int] = field(default_factory=dict)  # the C hop's share of engine_drops
    datapath: Mapping[str, int] | None = None  # the threads' batching figures (None: event loop)

    @property
    def drops(self) -> dict[tuple[DropReason, Direction], int]:
        """Every drop by (reason, direction)."""
        total: Counter[DropReason] = Counter(self.engine_drops)
        total.update(self.device_drops)
        return {(reason, direction_of(reason)): n for reason, n in sorted(total.items()) if n}

    def drops_by_direction(self) -> dict[Direction, dict[DropReason, int]]:
        out: dict[Direction, dict[DropReason, int]] = {d: {} for d in Direction}
        for (reason, direction), n in self.drops.items():
            out[direction][reason] = n
        return out

    def peer(self, public_key: bytes) -> PeerMetrics | None:
        return next((p for p in self.peers if p.public_key == public_key), None)


def typed_endpoint(endpoint: AnyEndpoint | None) -> Endpoint | RelayEndpoint | None:
    """The peer's endpoint as a value of pywg.protocol.endpoint (a socket's tuple becomes an
    Endpoint, unchanged)."""
    if endpoint is None or isinstance(endpoint, (Endpoint, RelayEndpoint)):
        return endpoint
    return Endpoint(endpoint[0], endpoint[1])


def collect(device: Device) -> DeviceMetrics:
    """The snapshot; the caller holds ``device.lock``."""
    dispatcher = device.dispatcher
    datapath = device.datapath
    hop = datapath.hop if datapath is not None else None
    screen: Counter[DropReason] = Counter(hop.screen.drops()) if hop is not None else Counter()
    device_drops = Counter(device.drops)
    if hop is not None:
        device_drops[DropReason.TUN_FULL] += hop.tun_full()
        device_drops[DropReason.HANDSHAKE_BACKLOG_FULL] += hop.backlog_full()
    wall = dispatcher.wall_offset
    peers = tuple(PeerMetrics(
        public_key=peer.public_key, endpoint=typed_endpoint(peer.endpoint),
        rx_bytes=peer.rx_bytes, tx_bytes=peer.tx_bytes, rx_packets=peer.rx_packets, tx_packets=peer.tx_packets,
        handshakes_initiated=peer.handshakes_initiated, handshakes_completed=peer.handshakes_completed,
        handshakes_timed_out=peer.handshakes_timed_out, sessions_expired=peer.sessions_expired,
        unreachable=peer.unreachable,
        last_handshake=None if peer.last_handshake is None else peer.last_handshake + wall,
        staged_packets=len(peer.staged),
    ) for peer in dispatcher.peers.values())
    return DeviceMetrics(
        interface=device.name,
        listen_port=device.bind.port if device.bind is not None else device.listen_port,
        peers=peers,
        engine_drops={r: n for r, n in (dispatcher.drops + screen).items() if n},
        device_drops={r: n for r, n in device_drops.items() if n},
        screen_drops={r: n for r, n in screen.items() if n},
        datapath=datapath.figures_now() if datapath is not None else None,
    )
