"""A WireGuard interface: TUN + UDP + the engine + cryptokey routing.

Outbound: TUN read -> allowed-IPs lookup of the destination -> peer -> engine (seal or
stage behind a handshake) -> UDP. Inbound: UDP -> engine -> the packet's source must be
in the sending peer's allowed IPs -> TUN write. Every drop is counted by reason: the
engine's in ``dispatcher.drops``, the device's own (no route, source not allowed, TUN full,
send errors) in ``drops``, both DropReason, both under ``lock`` (the data-path threads
count there too).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping

from pywg import fastpath
from pywg.protocol.actions import Action, DeliverPacket, DropReason, Endpoint, EndpointChanged, UdpAddress
from pywg.protocol.allowedips import AllowedIPs
from pywg.protocol.constants import TRANSPORT_MIN_SIZE
from pywg.protocol.crypto import dh_pubkey, is_low_order
from pywg.protocol.demux import TRANSPORT_TYPE
from pywg.protocol.dispatcher import Dispatcher
from pywg.protocol.endpoint import RelayEndpoint
from pywg.protocol.inner import inner_length
from pywg.protocol.noise import ZERO_PSK
from pywg.protocol.peer import Peer
from pywg.protocol.timers import Timer
from pywg.uapi.protocol import (
    IPC_ERROR_INVALID,
    IPC_ERROR_PORT_IN_USE,
    UNCHANGED,
    DeviceSnapshot,
    PeerChanges,
    PeerSnapshot,
    SetRequest,
    UapiError,
    format_endpoint,
    format_prefix,
)

from . import metrics, offload
from .bind import Bind, Buffer, RelayBind, RelayPath, UdpBind, messages
from .datapath import DataPathOptions, ThreadedDataPath
from .metrics import Direction
from .packet_filter import PacketFilter, PeerFilters
from .runner import Runner
from .tun import Tun, write_failure_is_gone

log = logging.getLogger(__name__)

BATCH = 128  # packets read per wake-up, before yielding to the loop
MTU_RECHECK = 1.0  # seconds between reads of the interface MTU (for padding)


def crypto_backend() -> dict[str, object]:
    """Which ChaCha20-Poly1305 seals and opens transport messages (``pywg stats``)."""
    return {
        "backend": fastpath.BACKEND,  # openssl, portable (pywg's C) or python (cryptography)
        "native_extensions": fastpath.NATIVE_AVAILABLE,
        "pure_python_requested": os.environ.get("PYWG_PUREPYTHON", "") not in ("", "0"),
        "openssl_library": fastpath.OPENSSL_LIBRARY,
    }

class Device(Runner):
    def __init__(self, tun: Tun, options: DataPathOptions | None = None) -> None:
        loop = asyncio.get_running_loop()
        dispatcher = Dispatcher(None, wall_offset=time.time() - time.monotonic(), mtu=tun.mtu)
        super().__init__(dispatcher)
        self.tun = tun
        self.name = tun.name
        self.options = options if options is not None else DataPathOptions.from_environment()
        self.allowed_ips: AllowedIPs[Peer] = AllowedIPs()
        self.bind: UdpBind | None = None  # the UDP sockets (replace_bind)
        self.open_bind: Callable[[int, int], UdpBind] = UdpBind.open  # (port, fwmark): the sockets to use
        self.listen_port = 0  # as configured (0: any)
        self.fwmark = 0
        self.drops: Counter[DropReason] = Counter()  # the device's drops (no route, ...); under lock
        self.on_gone: Callable[[], None] | None = None
        self.datapath: ThreadedDataPath | None = None
        self.relay_bind: RelayBind | None = None  # sends to RelayEndpoints (set_relay)
        self.filters = PeerFilters()  # per-peer packet filters (set_filter); under lock
        self._running = False
        self._mtu_checked = float("-inf")
        self._splitter = offload.Splitter() if tun.vnet_hdr else None
        del loop

    def __repr__(self) -> str:
        return f"Device({self.name!r}, peers={len(self.dispatcher.peers)})"

    # --- life ---------------------------------------------------------------------------

    def start(self) -> None:
        """Open the UDP sockets and start moving packets (threads, or the event loop)."""
        self._running = True
        if self.bind is None:
            self.replace_bind(self.open_bind(self.listen_port, self.fwmark))
        if self.options.threads:
            os.set_blocking(self.tun.fileno(), False)
            self.datapath = ThreadedDataPath(self, self.options)
            self.datapath.start()
            self.loop.call_later(MTU_RECHECK, self._recheck_mtu)
        else:
            self.loop.add_reader(self.tun.fileno(), self._on_tun_readable)
        now = self.now()
        actions: list[Action] = []
        with self.lock:
            for peer in self.dispatcher.peers.values():
                if peer.persistent_keepalive:
                    actions += self.dispatcher.send_keepalive(peer.public_key, now)
        self.carry(actions)

    def replace_bind(self, bind: UdpBind) -> None:
        """Swap in new sockets (already bound: a failure to bind leaves the old ones)."""
        bind.on_drop = self.count_drop
        old, self.bind = self.bind, bind
        if self.datapath is not None:
            self.datapath.sockets_changed()
        elif old is not None:
            for sock in old.sockets:
                self.loop.remove_reader(sock.fileno())
        if old is not None:
            old.close()
        if self.datapath is None and not self.options.threads:
            for sock in bind.sockets:
                self.loop.add_reader(sock.fileno(), self._on_udp_readable, bind, sock)

    def close(self) -> None:
        self._running = False
        self.cancel_timer()
        if self.datapath is not None:
            self.datapath.stop()
            self.datapath = None
        if self.bind is not None:
            for sock in self.bind.sockets:
                self.loop.remove_reader(sock.fileno())
            self.bind.close()
            self.bind = None
        self.loop.remove_reader(self.tun.fileno())
        self.tun.close()
        with self.lock:
            for public_key in list(self.dispatcher.peers):
                self.dispatcher.remove_peer(public_key)

    def set_relay(self, relay: RelayPath | None) -> None:
        """Send datagrams for RelayEndpoint peers through ``relay`` (None: drop them, counted
        as relay_missing). What the relay receives comes back through ``relay_received``."""
        old, self.relay_bind = self.relay_bind, None
        if relay is not None:
            bind = RelayBind(relay)
            bind.on_drop = self.count_drop
            self.relay_bind = bind
        if old is not None:
            old.close()

    @property
    def relay(self) -> RelayPath | None:
        """The relay (set_relay) that RelayEndpoint peers are reached through."""
        return self.relay_bind.relay if self.relay_bind is not None else None

    def set_filter(self, public_key: bytes, packet_filter: PacketFilter | None) -> None:
        """Filter the packets to and from the peer ``public_key`` (pywg.device.packet_filter;
        None: no filter). From now on the C hop carries none of its packets (any thread)."""
        if not isinstance(public_key, bytes) or len(public_key) != 32:
            raise ValueError("a peer's public key is 32 bytes")
        with self.lock:
            self.filters.set(public_key, packet_filter)
            self.engine_changing()  # what the hop was armed with for the peer is withdrawn

    def set_endpoint(self, public_key: bytes, endpoint: Endpoint | None) -> bool:
        """Point a peer at a UDP address or a RelayEndpoint (as a UAPI ``endpoint=`` would;
        the session stays). False if there is no such peer."""
        with self.lock:
            peer = self.dispatcher.peers.get(public_key)
            if peer is None:
                return False
            self.engine_changing()
            moved = endpoint is not None and endpoint != peer.endpoint
            peer.endpoint = endpoint
        if moved:
            assert endpoint is not None
            self.loop.call_soon_threadsafe(self.emit, EndpointChanged(public_key, endpoint))
        return True

    def engine_changing(self) -> None:
        if self.datapath is not None:
            self.datapath.engine_changing()

    def gone(self, reason: str) -> None:
        """The interface went away (deleted): stop reading and tell the owner (loop thread)."""
        if not self._running:
            return
        log.info("interface %s: %s; closing", self.name, reason)
        self._running = False
        self.loop.remove_reader(self.tun.fileno())
        if self.on_gone is not None:
            self.on_gone()

    def _recheck_mtu(self) -> None:
        if not self._running:
            return
        mtu = self.tun.mtu  # `ip link set mtu` (wg-quick does) may change it
        if mtu:
            self.dispatcher.mtu = mtu
        self.loop.call_later(MTU_RECHECK, self._recheck_mtu)

    # --- outbound (event-loop data path) -----------------------------------------------------

    def _on_tun_readable(self) -> None:
        now = self.now()
        if now - self._mtu_checked > MTU_RECHECK:  # `ip link set mtu` (wg-quick does) may change it
            self._mtu_checked = now
            mtu = self.tun.mtu
            if mtu:
                self.dispatcher.mtu = mtu
        actions: list[Action] = []
        failure: OSError | None = None
        with self.lock:
            for _ in range(BATCH):
                try:
                    frame = self.tun.read()
                except OSError as exc:
                    failure = exc
                    break
                if frame is None:
                    break
                for packet in self._packets_of(frame):
                    if inner_length(packet) is None:
                        self.drops[DropReason.INVALID_TUN_PACKET] += 1
                        continue
                    peer = self.allowed_ips.lookup_packet_destination(packet)
                    if peer is None:
                        self.drops[DropReason.NO_ROUTE] += 1
                        continue
                    if self.filters.by_peer and not self.filters.passes(peer.public_key, Direction.OUTBOUND, packet,
                                                                self.drops):
                        continue
                    actions += self.dispatcher.send_packet(peer.public_key, packet, now)
        self.carry(actions)
        if failure is not None:
            self.gone(f"TUN read failed ({failure.strerror})")

    def _packets_of(self, frame: bytes) -> list[bytes]:
        if self._splitter is None:
            return [frame]
        try:
            return [bytes(p) for p in self._splitter.split(frame)]
        except offload.OffloadError:
            self.drops[DropReason.INVALID_TUN_FRAME] += 1
            return []

    def invalid_inner(self, packet: bytes | memoryview) -> bool:
        return inner_length(packet) is None

    def route(self, endpoint: UdpAddress) -> tuple[socket.socket | None, UdpAddress]:
        """The UDP socket to reach ``endpoint`` and the address to give it (the C hop sends
        on it itself); None when the device has no socket of its family."""
        bind = self.bind
        return bind.route(endpoint) if bind is not None else (None, endpoint)

    def bind_for(self, endpoint: Endpoint) -> Bind | None:
        """The bind that reaches ``endpoint``: the relay for a RelayEndpoint, else UDP."""
        return self.relay_bind if isinstance(endpoint, RelayEndpoint) else self.bind

    def send_datagram(self, data: bytes, endpoint: Endpoint) -> None:
        """Send one datagram (any thread, without the lock: it is taken to count a drop)."""
        self.send_run(data, endpoint)

    def send_run(self, data: Buffer, endpoint: Endpoint, stride: int = 0) -> int:
        """Send ``data`` through the bind for ``endpoint`` (``stride``: messages of that
        size back to back, each its own datagram; see Bind.send); the system sends made."""
        bind = self.relay_bind if isinstance(endpoint, RelayEndpoint) else self.bind
        if bind is None:
            self.count_drop(DropReason.RELAY_MISSING if isinstance(endpoint, RelayEndpoint)
                            else DropReason.NO_SOCKET_FOR_ENDPOINT, messages(data, stride))
            return 0
        return bind.send(data, endpoint, stride)

    def count_drop(self, reason: DropReason, n: int = 1) -> None:
        """Count a device drop from code that does not hold the lock (any thread)."""
        with self.lock:
            self.drops[reason] += n

    # --- inbound (event-loop data path) ------------------------------------------------------

    def _on_udp_readable(self, bind: UdpBind, sock: socket.socket) -> None:
        actions: list[Action] = []
        now = self.now()
        with self.lock:
            for data, _, source in bind.receive(sock, BATCH):
                if (data[:4] != TRANSPORT_TYPE or len(data) < TRANSPORT_MIN_SIZE) and self.demux_other(data, source):
                    continue  # STUN, disco or unknown: not the engine's (the threads' test, the screen's order)
                actions += self.dispatcher.datagram_received(data, source, now)
        self.carry(actions)

    def relay_received(self, data: bytes, source: RelayEndpoint) -> None:
        """A datagram the relay received from ``source`` (event-loop thread): into the one
        inbound demux, as a UDP datagram would go, with the RelayEndpoint as its source.
        The node key must be a peer's public key (the WireGuard key is the node key)."""
        with self.lock:
            if source.node_key not in self.dispatcher.peers:
                self.drops[DropReason.RELAY_UNKNOWN_SOURCE] += 1
                return
        if not self._running:
            return
        if self.datapath is not None:
            self.datapath.relay_received(data, source)
            return
        now = self.now()
        with self.lock:
            if data[:1] == b"\x04" or not self.demux_other(data, source):
                actions = self.dispatcher.datagram_received(data, source, now)
            else:
                actions = []  # disco (or unknown: counted)
        self.carry(actions)

    def deliver(self, delivered: DeliverPacket) -> None:
        """Write a decrypted packet to the TUN if its source is the peer's (any thread)."""
        with self.lock:
            peer = self.dispatcher.peers.get(delivered.peer)
            allowed = peer is not None and self.allowed_ips.lookup_packet_source(delivered.packet) is peer
            if not allowed:
                self.drops[DropReason.SOURCE_NOT_ALLOWED] += 1
            elif self.filters.by_peer:
                allowed = self.filters.passes(delivered.peer, Direction.INBOUND, delivered.packet, self.drops)
        if not allowed:
            return
        try:
            if not self.tun.write(delivered.packet):
                self.count_drop(DropReason.TUN_FULL)
        except OSError as exc:
            self.tun_write_failed(exc.errno)

    def tun_write_failed(self, err: int | None, lost: int = 1) -> bool:
        """A TUN write failed with ``err`` (any thread): the interface is gone (the device
        stops; True), or only those ``lost`` packets are (counted, as wireguard-go; False)."""
        if write_failure_is_gone(err):
            reason = os.strerror(err) if err else "no error number"
            self.loop.call_soon_threadsafe(self.gone, f"TUN write failed ({reason})")
            return True
        self.count_drop(DropReason.TUN_WRITE_FAILED, lost)
        return False

    # --- monitoring ----------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        """Counters for monitoring (no secrets): device drops, engine drops, per-peer figures,
        and the relay's (when it has stats)."""
        with self.lock:
            stats = self._stats()
        relay_stats = getattr(self.relay, "stats", None)
        if callable(relay_stats):
            stats["relay"] = relay_stats()
        return stats

    def metrics(self) -> metrics.DeviceMetrics:
        """The typed snapshot of every counter (any thread; one hold of the lock)."""
        with self.lock:
            return metrics.collect(self)

    def _stats(self) -> dict[str, object]:
        snap = metrics.collect(self)

        def named(counts: Mapping[DropReason, int]) -> dict[str, int]:
            return {r.value: n for r, n in sorted(counts.items())}

        return {
            "interface": snap.interface,
            "listen_port": snap.listen_port,
            "device_drops": named(snap.device_drops),  # the hop's too
            # every drop of remote input by reason, the screen's (in C, ahead of the engine) too
            "engine_drops": named(snap.engine_drops),
            "screen_drops": named(snap.screen_drops),
            "drops": {d.value: named(counts) for d, counts in snap.drops_by_direction().items()},
            "crypto": crypto_backend(),
            "data_path": self._data_path(),
            "datapath": dict(snap.datapath, options=vars(self.datapath.options), udp_gso=self.datapath.gso)
            if self.datapath is not None and snap.datapath is not None else {"threads": False},
            "peers": [{
                "public_key": base64.b64encode(peer.public_key).decode(),
                "endpoint": _endpoint_text(peer.endpoint),
                "path": peer.path.value if peer.path is not None else None,
                "handshakes": peer.handshakes_completed,
                "handshakes_initiated": peer.handshakes_initiated,
                "handshakes_timed_out": peer.handshakes_timed_out,
                "sessions_expired": peer.sessions_expired,
                "unreachable": peer.unreachable,
                "last_handshake": peer.last_handshake,
                "rx_bytes": peer.rx_bytes, "tx_bytes": peer.tx_bytes,
                "rx_packets": peer.rx_packets, "tx_packets": peer.tx_packets,
                "staged_packets": peer.staged_packets,
            } for peer in snap.peers],
        }

    def _data_path(self) -> dict[str, object]:
        """Which data path carries packets now (switches as granted, not as asked for)."""
        threaded = self.datapath is not None
        return {
            "threads": threaded,
            "hop": threaded and self.options.hop,
            "tun_offload": bool(self.tun.vnet_hdr),
            "udp_gso": threaded and bool(self.datapath and self.datapath.gso),
            "udp_gro": threaded and self.options.udp_gro,
            "native_offload": offload.AVAILABLE,
        }

    # --- configuration (UAPI) -------------------------------------------------------------

    def snapshot(self) -> DeviceSnapshot:
        with self.lock:
            return self._snapshot()

    def _snapshot(self) -> DeviceSnapshot:
        snap = metrics.collect(self)  # the counters UAPI shows, from the one snapshot
        dispatcher = self.dispatcher
        peers = []
        for figures in snap.peers:
            peer = dispatcher.peers[figures.public_key]
            handshake_ns = int(figures.last_handshake * 1e9) if figures.last_handshake is not None else None
            peers.append(PeerSnapshot(
                public_key=peer.public_key,
                preshared_key=None if peer.preshared_key == ZERO_PSK else peer.preshared_key,
                endpoint=_without_zone(_udp(peer.endpoint)), last_handshake_ns=handshake_ns,
                tx_bytes=figures.tx_bytes, rx_bytes=figures.rx_bytes,
                persistent_keepalive=peer.persistent_keepalive,
                allowed_ips=[format_prefix(n) for n in self.allowed_ips.entries_for(peer)]))
        return DeviceSnapshot(private_key=dispatcher.static_private, listen_port=snap.listen_port,
                              fwmark=self.fwmark, peers=peers)

    def apply(self, request: SetRequest) -> None:
        """Carry out a whole set request, or (UapiError) none of it."""
        changes = request.device
        new_bind = self._prepare_bind(changes.listen_port, changes.fwmark)
        try:
            for section in request.peers:
                if section.endpoint is not None and not section.remove:
                    _check_zone(section.endpoint)
                if not section.remove and is_low_order(section.public_key):
                    raise UapiError(IPC_ERROR_INVALID, f"public_key {section.public_key.hex()[:8]}... is a "
                                    "low-order point: no handshake with it could succeed")
                if not section.remove and section.rename_to is not None and is_low_order(section.rename_to):
                    raise UapiError(IPC_ERROR_INVALID, f"pywg_rename_to {section.rename_to.hex()[:8]}... is "
                                    "a low-order point: no handshake with it could succeed")
            if request.uses_extensions or self.dispatcher.secondary_public is not None:
                with self.lock:
                    self._check_key_changes(request)
        except BaseException:
            if new_bind is not None:
                new_bind.close()
            raise
        # Nothing below fails for remote or user reasons: the request is applied whole.
        with self.lock:
            self.engine_changing()
            actions = self._apply_checked(request, new_bind)
        self.carry(actions)

    def _check_key_changes(self, request: SetRequest) -> None:
        """The pywg key-rotation extensions (and plain peers while a secondary key is held):
        follow the request as ``_apply_checked`` will carry it out, with the own keys and
        the set of peer keys it leaves at each step, and refuse (-22) what the engine would
        refuse, before anything changes."""
        dispatcher, changes = self.dispatcher, request.device
        primary, secondary = dispatcher.static_public, dispatcher.secondary_public
        gone: set[bytes] = set()  # peers removed by the request (or by replace_peers: all)
        added: set[bytes] = set()
        if changes.private_key is not UNCHANGED and changes.private_key != dispatcher.static_private:
            primary = dh_pubkey(changes.private_key) if changes.private_key is not None else None
            secondary = None  # a new private key ends any overlap
            if primary is not None:
                gone.add(primary)  # the peer holding it goes, as in wireguard-go

        def present(key: bytes) -> bool:
            return key in added or (key in dispatcher.peers and key not in gone and not changes.replace_peers)

        if changes.secondary_private_key is not UNCHANGED:
            if changes.secondary_private_key is None:
                secondary = None
            else:
                if primary is None:
                    raise UapiError(IPC_ERROR_INVALID, "pywg_secondary_private_key: the device has no "
                                    "private_key; set one first")
                wanted = dh_pubkey(changes.secondary_private_key)
                if wanted == primary:
                    raise UapiError(IPC_ERROR_INVALID, "pywg_secondary_private_key: it is the device's "
                                    "private_key already")
                if wanted in dispatcher.peers and wanted not in gone:  # before replace_peers applies
                    raise UapiError(IPC_ERROR_INVALID, "pywg_secondary_private_key: a peer has its public "
                                    "key; remove that peer first")
                secondary = wanted
        if changes.promote_secondary:
            if secondary is None:
                raise UapiError(IPC_ERROR_INVALID, "pywg_promote_secondary: the device has no secondary "
                                "key (set pywg_secondary_private_key first)")
            primary, secondary = secondary, primary
        for section in request.peers:
            key = section.public_key
            if key == primary:
                continue  # ignored, as wireguard-go ignores a peer that is the device itself
            if section.remove:
                added.discard(key)
                gone.add(key)
                continue
            if key == secondary:
                raise UapiError(IPC_ERROR_INVALID, f"public_key {key.hex()[:8]}... is this device's "
                                "secondary public key, not a peer's")
            if not present(key):
                if section.update_only:
                    continue
                added.add(key)
            new = section.rename_to
            if new is None or new == key:
                continue
            if new in (primary, secondary):
                raise UapiError(IPC_ERROR_INVALID, f"pywg_rename_to {new.hex()[:8]}... is one of this "
                                "device's own public keys")
            if present(new):
                raise UapiError(IPC_ERROR_INVALID, f"pywg_rename_to {new.hex()[:8]}...: another peer has "
                                "that public key")
            added.discard(key)
            gone.add(key)
            added.add(new)

    def _apply_checked(self, request: SetRequest, new_bind: UdpBind | None) -> list[Action]:
        changes, dispatcher, now = request.device, self.dispatcher, self.now()
        if changes.private_key is not UNCHANGED:
            if changes.private_key is not None:  # a peer holding our new public key goes
                self._forget_routes(dh_pubkey(changes.private_key))
            dispatcher.set_private_key(changes.private_key)
        if changes.secondary_private_key is not UNCHANGED:  # pywg extensions (key rotation)
            if changes.secondary_private_key is None:
                dispatcher.drop_secondary_key()
            else:
                dispatcher.add_static_key(changes.secondary_private_key, now)
        if changes.promote_secondary:
            dispatcher.promote_static_key(now)
        if changes.listen_port is not None:
            self.listen_port = changes.listen_port
        if new_bind is not None:
            self.replace_bind(new_bind)
        if changes.fwmark is not None and changes.fwmark != self.fwmark:
            self.fwmark = changes.fwmark
            if self.bind is not None and new_bind is None:
                self.bind.set_fwmark(self.fwmark)
        if changes.replace_peers:
            for public_key in list(dispatcher.peers):
                self._remove_peer(public_key)
        actions: list[Action] = []
        for section in request.peers:
            actions += self._apply_peer(section, now)
        return actions

    def _prepare_bind(self, listen_port: int | None, fwmark: int | None) -> UdpBind | None:
        """New sockets when the port changes on a running device (bound before anything
        changes, so a port in use leaves the device as it was)."""
        if not self._running or listen_port is None:
            return None
        if self.bind is not None and listen_port == self.bind.port:
            return None  # as wireguard-go: 0 always asks for a new random port
        mark = self.fwmark if fwmark is None else fwmark
        try:
            return self.open_bind(listen_port, mark)
        except OSError as exc:
            raise UapiError(IPC_ERROR_PORT_IN_USE, f"cannot bind UDP port {listen_port}: "
                            f"{exc.strerror or exc}") from exc

    def _apply_peer(self, section: PeerChanges, now: float) -> list[Action]:
        dispatcher = self.dispatcher
        if section.public_key == dispatcher.static_public:
            return []  # wireguard-go ignores a peer that is this device itself
        peer = dispatcher.peers.get(section.public_key)
        if section.remove:
            if peer is not None:
                self._remove_peer(section.public_key)
            return []
        if peer is None:
            if section.update_only:
                return []
            peer = dispatcher.add_peer(section.public_key)
        if section.preshared_key is not UNCHANGED:
            peer.preshared_key = section.preshared_key or ZERO_PSK
        if section.endpoint is not None:
            peer.endpoint = section.endpoint
        actions: list[Action] = []
        if section.persistent_keepalive is not None:
            was_off = peer.persistent_keepalive == 0
            peer.persistent_keepalive = section.persistent_keepalive
            if not peer.persistent_keepalive:
                peer.timers.clear(Timer.PERSISTENT_KEEPALIVE)
            elif was_off and self._running:
                actions = dispatcher.send_keepalive(peer.public_key, now)
        if section.replace_allowed_ips:
            self.allowed_ips.remove_peer(peer)
        for change in section.allowed_ips:
            if change.remove:
                self.allowed_ips.remove(change.network, peer)
            else:
                self.allowed_ips.insert(change.network, peer)
        if section.rename_to is not None:  # the allowed IPs point at the Peer: they follow it
            dispatcher.rename_peer(peer.public_key, section.rename_to)
        if section.rekey and self._running:
            actions += dispatcher.force_handshake(peer.public_key, now)
        return actions

    def _remove_peer(self, public_key: bytes) -> None:
        self._forget_routes(public_key)
        self.dispatcher.remove_peer(public_key)

    def _forget_routes(self, public_key: bytes) -> None:
        peer = self.dispatcher.peers.get(public_key)
        if peer is not None:
            self.allowed_ips.remove_peer(peer)


def _udp(endpoint: Endpoint | None) -> UdpAddress | None:
    """The UDP endpoint UAPI shows: none for a relayed peer (wireguard-go prints its bind's
    DstToString, which for DERP is no IP:port that wg could parse back)."""
    return None if isinstance(endpoint, RelayEndpoint) else endpoint


def _endpoint_text(endpoint: Endpoint | None) -> str | None:
    """How ``pywg stats`` shows an endpoint: IP:port, or derp:REGION/KEYPREFIX."""
    if endpoint is None:
        return None
    return str(endpoint) if isinstance(endpoint, RelayEndpoint) else format_endpoint(endpoint)


def _without_zone(endpoint: tuple[str, int] | None) -> tuple[str, int] | None:
    """wireguard-go shows an endpoint without its IPv6 zone."""
    if endpoint is None or "%" not in endpoint[0]:
        return endpoint
    return endpoint[0].split("%", 1)[0], endpoint[1]


def _check_zone(endpoint: tuple[str, int]) -> None:
    """An IPv6 zone must name (or number) an interface of this namespace."""
    host = endpoint[0]
    if "%" not in host:
        return
    zone = host.split("%", 1)[1]
    try:
        if zone.isdigit():
            socket.if_indextoname(int(zone))
        else:
            socket.if_nametoindex(zone)
    except OSError:
        raise UapiError(IPC_ERROR_INVALID, f"endpoint: no interface {zone!r} for the IPv6 zone") from None
