"""The device's DERP path: WireGuard (and disco) datagrams to and from RelayEndpoints.

One ``DerpRelayClient`` per region: the home region's from ``start``, another region's
when a peer's RelayEndpoint first names it (at most ``max_regions``). Each client keeps
itself connected (backoff, the server's Restarting hint). The device hands datagrams for
a RelayEndpoint to ``send`` from any thread (the data-path threads too) without blocking;
they cross to the event loop through one bounded queue and are written there. Every
datagram not written is counted by reason:

- ``queue_full``: the queue to the event loop is full (the loop is behind);
- ``not_connected``: the region's client is not connected and its backlog of
  ``connecting_backlog`` datagrams (kept for the connection in progress, so that the
  first handshake initiation is not lost) is full;
- ``backed_up``: the TCP connection has ``max_buffered`` bytes unsent (or the server's
  rate limit said no);
- ``unknown_region``: no such region in the map (or ``max_regions`` clients already);
- ``too_large``: more than a DERP packet holds; ``closed``: the relay is not running.

Datagrams the clients receive go to ``on_receive(data, RelayEndpoint(region, src))``, the
device's ``relay_received``: its one inbound demux (disco handlers, the engine). The region
is the one the datagram came in by, so WireGuard's roaming answers a peer in the region
it sent from (where it is connected, having sent there), whatever its home region.
Regions are not closed when idle (at most ``max_regions`` stay connected).

Node key: the device's WireGuard static key is its DERP node key, as in Tailscale. A
peer's RelayEndpoint is then (region, the peer's WireGuard public key): nothing new to
hand out or to tie together, a ``--verify-clients`` allowlist is the set of WireGuard keys
the coordinator knows, and an inbound datagram whose source node key is no peer's is
dropped before the engine sees it. The cost: the key is also used for DERP's NaCl box
handshake (a second protocol on one X25519 key: Tailscale's choice too), and a rotated
WireGuard key needs a new relay (a DeviceRelay keeps the node key it was made with):
:mod:`pywg.device.relay_keys` runs one per key the device accepts during a rotation.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pywg.derp import MAX_PACKET_SIZE, Connected, DerpMap, NodePrivateKey, NodePublicKey
from pywg.derp.client import Event
from pywg.protocol.endpoint import RelayEndpoint

from .derp_client import DerpRelayClient, DialTarget

log = logging.getLogger(__name__)

QUEUE_SIZE = 2048  # datagrams crossing to the event loop, at most
CONNECTING_BACKLOG = 32  # per region, kept while its client connects
MAX_BUFFERED = 1 << 20  # bytes unsent on a region's connection before sends are dropped
MAX_REGIONS = 8

ReceiveCallback = Callable[[bytes, RelayEndpoint], None]


@dataclass
class _Region:
    region: int
    client: DerpRelayClient
    backlog: deque[tuple[NodePublicKey, bytes]] = field(default_factory=deque)


class DeviceRelay:
    """The RelayPath a Device sends RelayEndpoint datagrams to (``attach``)."""

    def __init__(self, node_key: NodePrivateKey, regions: Mapping[int, Sequence[DialTarget]], *, home: int,
                 on_receive: ReceiveCallback | None = None, queue_size: int = QUEUE_SIZE,
                 connecting_backlog: int = CONNECTING_BACKLOG, max_buffered: int = MAX_BUFFERED,
                 max_regions: int = MAX_REGIONS, client_options: dict[str, Any] | None = None) -> None:
        if home not in regions:
            raise ValueError(f"home region {home}: not among the regions ({sorted(regions)})")
        self.node_key = node_key
        self.public_key = node_key.public
        self.home = home
        self.on_receive = on_receive
        self.queue_size, self.connecting_backlog = queue_size, connecting_backlog
        self.max_buffered, self.max_regions = max_buffered, max_regions
        self._targets = {rid: list(targets) for rid, targets in regions.items()}
        self._client_options = dict(client_options or {})
        self._regions: dict[int, _Region] = {}
        self.drops: Counter[str] = Counter()  # guarded by _lock
        self.sent = 0
        self.received = 0
        self._lock = threading.Lock()
        self._outbox: deque[tuple[int, bytes, bytes]] = deque()
        self._flush_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    def __repr__(self) -> str:
        return f"DeviceRelay({self.public_key.short()}, home={self.home}, regions={sorted(self._regions)})"

    @classmethod
    def from_derp_map(cls, node_key: NodePrivateKey, derp_map: DerpMap, *, home: int, plain_http: bool = False,
                      **options: Any) -> DeviceRelay:
        """A relay over a DERP map's regions (their relaying nodes in map order)."""
        regions = {rid: [t for node in region.derp_nodes for t in DialTarget.for_node(node, plain_http=plain_http)]
                   for rid, region in derp_map.regions.items()}
        return cls(node_key, {rid: targets for rid, targets in regions.items() if targets}, home=home, **options)

    # --- life ---------------------------------------------------------------------------

    def attach(self, device: Any) -> None:
        """Become ``device``'s relay path: its RelayEndpoint datagrams come here, and what
        arrives goes to its ``relay_received``."""
        device.set_relay(self)
        self.on_receive = device.relay_received

    def start(self) -> None:
        """Connect to the home region (event-loop thread)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._region(self.home)

    async def close(self) -> None:
        self._loop = None
        regions, self._regions = list(self._regions.values()), {}
        for region in regions:
            await region.client.close()
        with self._lock:
            self._outbox.clear()

    async def set_home(self, home: int) -> None:
        """Move home to region ``home`` (event-loop thread): its client connects (if it did
        not yet) and tells the server it is our home (NotePreferred); the old home's client
        stays, not preferred, for peers that still send there."""
        if home not in self._targets:
            raise ValueError(f"home region {home}: not among the regions ({sorted(self._targets)})")
        old, self.home = self.home, home
        if old == home:
            return
        region = self._region(home)  # made now: preferred
        if region is not None and not region.client.preferred:
            await region.client.note_preferred(True)
        previous = self._regions.get(old)
        if previous is not None:
            await previous.client.note_preferred(False)

    @property
    def connected(self) -> bool:
        """The home region's client is connected."""
        region = self._regions.get(self.home)
        return region is not None and region.client.connected

    async def wait_connected(self, timeout: float) -> None:
        region = self._regions.get(self.home)
        if region is None:
            raise RuntimeError("the relay is not started")
        await region.client.wait_connected(timeout)

    def client(self, region: int) -> DerpRelayClient | None:
        entry = self._regions.get(region)
        return entry.client if entry is not None else None

    # --- sending (any thread) -----------------------------------------------------------

    def send(self, region: int, node_key: bytes, data: bytes) -> bool:
        """Queue ``data`` for ``node_key`` in ``region``; False (counted) when dropped now."""
        loop = self._loop
        with self._lock:
            if loop is None:
                self.drops["closed"] += 1
                return False
            if len(data) > MAX_PACKET_SIZE:
                self.drops["too_large"] += 1
                return False
            if len(self._outbox) >= self.queue_size:
                self.drops["queue_full"] += 1
                return False
            self._outbox.append((region, node_key, bytes(data)))
            wake = not self._flush_pending
            self._flush_pending = True
        if wake:
            if threading.get_ident() == self._loop_thread:
                loop.call_soon(self._flush)
            else:
                try:
                    loop.call_soon_threadsafe(self._flush)
                except RuntimeError:  # the loop closed meanwhile
                    with self._lock:
                        self.drops["closed"] += 1
                    return False
        return True

    def _flush(self) -> None:
        with self._lock:
            batch = list(self._outbox)
            self._outbox.clear()
            self._flush_pending = False
        if self._loop is None:
            return
        written: dict[int, _Region] = {}
        for region_id, node_key, data in batch:
            region = written.get(region_id) or self._region(region_id)
            if region is None:
                self._drop("unknown_region")
                continue
            key = NodePublicKey(node_key)
            if not region.client.connected:
                if len(region.backlog) >= self.connecting_backlog:
                    self._drop("not_connected")
                else:
                    region.backlog.append((key, data))
                continue
            self._write(region, key, data, write=False)
            written[region_id] = region
        for region in written.values():  # one system call a region for the batch
            region.client.write_pending()

    def _write(self, region: _Region, key: NodePublicKey, data: bytes, write: bool = True) -> None:
        if region.client.send_nowait(key, data, self.max_buffered, write=write):
            self.sent += 1
        else:
            self._drop("backed_up" if region.client.connected else "not_connected")

    def _drop(self, reason: str) -> None:
        with self._lock:
            self.drops[reason] += 1

    def _region(self, region_id: int) -> _Region | None:
        """The region's client, made and started on first use (event-loop thread)."""
        region = self._regions.get(region_id)
        if region is not None:
            return region
        targets = self._targets.get(region_id)
        if not targets or len(self._regions) >= self.max_regions:
            return None
        client = DerpRelayClient(self.node_key, targets=targets, preferred=region_id == self.home,
                                 on_packet=lambda src, data: self._received(region_id, src, data),
                                 on_event=lambda event: self._on_event(region_id, event), **self._client_options)
        region = self._regions[region_id] = _Region(region_id, client)
        client.start()
        return region

    def _on_event(self, region_id: int, event: Event) -> None:
        region = self._regions.get(region_id)
        if region is None or not isinstance(event, Connected):
            return
        while region.backlog and region.client.connected:  # what waited for this connection
            key, data = region.backlog.popleft()
            self._write(region, key, data)

    # --- receiving (event loop) -------------------------------------------------------------

    def _received(self, region_id: int, src: NodePublicKey, data: bytes) -> None:
        self.received += 1
        if self.on_receive is None:
            self._drop("no_receiver")
            return
        self.on_receive(data, RelayEndpoint(region_id, bytes(src)))

    # --- monitoring -----------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        """Counters (no secrets): drops by reason, and each region's client."""
        with self._lock:
            drops = dict(sorted(self.drops.items()))
            queued = len(self._outbox)
        return {
            "node_key": str(self.public_key), "home": self.home, "sent": self.sent, "received": self.received,
            "queued": queued, "drops": drops,
            "regions": {rid: {"connected": r.client.connected, "backlog": len(r.backlog),
                              "server": r.client.host_header, **_dialed(r.client), **asdict(r.client.stats)}
                        for rid, r in sorted(self._regions.items())},
        }


def _dialed(client: DerpRelayClient) -> dict[str, object]:
    """The node a region's client connected to last (a region of several fails over)."""
    target = client.target
    if target is None:
        return {"node": None, "address": None, "tls": None}
    return {"node": target.node_name or None, "address": f"{target.host}:{target.port}", "tls": target.ssl is not None}
