"""The lone-packet hop (native/hop.h) and its bookkeeping with the engine.

A lone packet (a ping, an ACK) crosses the daemon in one C call: TUN read, route, seal,
sendto; or recvmsg, open, replay check, checks of the inner packet, TUN write, and a turn
at the TUN for the answer. No Python runs between the packet's arrival and its departure:
a Python thread that wakes after a few idle milliseconds spends 60-110 us of cold caches
per hop before a packet moves, C a few.

The engine stays the authority. Python *arms* the hop with what it needs and *accounts*
for each packet right after the call, once the packet has left:

- sending, per peer (a slot): the current session's key and a block of counters the engine
  reserved (``Peer.reserve_counters``); every packet the hop sends is reported with
  ``Peer.sent`` (timers, byte counts, the rekey a sender owes), and the block is topped up
  or moved to a newer session there. Python's own sends revoke the block first, so the
  hop's counters never fall behind the replay window of the other side.
- receiving, per session: the key and the replay filter itself, handed over
  (``ReplayFilter.export_state``); every packet is reported with ``Peer.accept_run``.
  Before Python touches that session's counters it takes the filter back (``reclaim``).
- routes: a copy of the allowed-IPs runs, refreshed when the table's version moves.
- time: each session's result says when its last packet went (CLOCK_MONOTONIC, read by C
  anyway); the engine's timers take the packets as sent or received then, not when a
  thread got round to accounting for them (``engine_time``): the outbound thread may
  account for a ping after the inbound thread accounted for its reply.

Anything unusual is the engine's: a change of configuration, a timer, a handshake
(``disable``), a session the hop does not know, a source that roamed, a packet that fails
a check. The hop hands those back untouched and Python's data path handles them as before.
Which thread calls what: ``out`` from the outbound thread; ``receive``/``reclaim`` and
receive arming from the inbound thread only (the replay filters are its); ``disable``
from any thread.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from typing import TYPE_CHECKING, Any

from pywg import fastpath
from pywg.device.screen import Screen
from pywg.protocol.actions import DropReason, Endpoint
from pywg.protocol.constants import REJECT_AFTER_TIME
from pywg.protocol.endpoint import RelayEndpoint
from pywg.protocol.keypair import Keypair
from pywg.protocol.peer import Peer

if TYPE_CHECKING:
    from .device import Device

log = logging.getLogger(__name__)

try:
    from pywg._fastpath import ffi as _ffi  # type: ignore[import-not-found]
    from pywg._fastpath import lib as _lib  # type: ignore[import-not-found]

    # It seals with the C backend the fast path chose (not when the python one is forced).
    AVAILABLE = fastpath.BACKEND in ("openssl", "portable") and hasattr(_lib, "pywg_hop_new")
except ImportError:  # pragma: no cover - the fallback build
    _ffi = _lib = None
    AVAILABLE = False

MAX_SOCKETS = _lib.PYWG_HOP_MAX_SOCKETS if AVAILABLE else 0
BLOCK = 256  # counters given to the hop at once
REFILL = 64  # topped up when fewer are left
WORDS = 128  # replay window words (PYWG_HOP_REPLAY_WORDS)
_PORT = struct.Struct("!H")


def sockaddr(endpoint: tuple[str, int]) -> bytes:
    """A struct sockaddr_in/in6 for (host, port), as the kernel lays it out."""
    host, port = endpoint
    if ":" in host:
        return (struct.pack("=H", socket.AF_INET6) + _PORT.pack(port) + bytes(4)
                + socket.inet_pton(socket.AF_INET6, host.split("%")[0]) + bytes(4))
    return struct.pack("=H", socket.AF_INET) + _PORT.pack(port) + socket.inet_aton(host) + bytes(8)


def endpoint_of(raw: bytes) -> tuple[str, int]:
    """(host, port) of a struct sockaddr_in/in6."""
    family = struct.unpack_from("=H", raw)[0]
    port = _PORT.unpack_from(raw, 2)[0]
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


class Hop:
    def __init__(self, device: Device, vnet_hdr: bool) -> None:
        if not AVAILABLE:
            raise RuntimeError("the lone-packet hop needs pywg._fastpath")
        self.device = device
        code = {"openssl": _lib.PYWG_FP_OPENSSL, "portable": _lib.PYWG_FP_PORTABLE}[fastpath.BACKEND]
        self._hop = _ffi.gc(_lib.pywg_hop_new(code, int(vnet_hdr)), _lib.pywg_hop_free)
        if self._hop == _ffi.NULL:
            raise MemoryError("pywg_hop_new")
        # What the hop would hand back but the engine would only drop is dropped in C.
        self.screen = Screen()
        self.screen.follow(device.dispatcher)
        _lib.pywg_hop_set_screen(self._hop, self.screen.handle)
        size = _lib.PYWG_HOP_BUFFER
        self.out_buf = _ffi.new("uint8_t[]", size)
        self.in_buf = _ffi.new("uint8_t[]", size)
        self.turn_buf = _ffi.new("uint8_t[]", size)
        self._out = _ffi.new("pywg_hop_result *")
        self._in = _ffi.new("pywg_hop_result *")
        self._turn = _ffi.new("pywg_hop_result *")
        self._greatest = _ffi.new("uint64_t *")
        self._bitmap = _ffi.new("uint64_t[]", WORDS)
        self._backlog_buf = _ffi.new("uint8_t[]", _lib.PYWG_HOP_BACKLOG_MESSAGE)
        self._backlog_source = _ffi.new("uint8_t[]", _lib.PYWG_HOP_SOCKADDR)
        self._backlog_source_len = _ffi.new("uint32_t *")
        # Engine objects behind the hop's numbers (guarded by the device lock).
        self._slots: dict[int, int] = {}  # id(peer) -> slot
        self._slot_peers: list[Peer | None] = []
        self._send_keypairs: dict[int, Keypair] = {}  # slot -> the session its block is on
        self._send_endpoints: dict[int, Endpoint] = {}  # slot -> where its block sends
        self._receiving: dict[int, tuple[Peer, Keypair, Endpoint]] = {}  # our index -> session handed over, its source
        self._routes_version = -1
        self._mtu = -1
        self._sockaddrs: dict[tuple[str, int], bytes] = {}  # endpoint -> struct sockaddr
        self.reclaim_all = False  # set by disable(): the inbound thread takes the filters back

    # --- the TUN lock ---------------------------------------------------------------------

    def acquire(self, blocking: bool = True) -> bool:
        return bool(_lib.pywg_hop_tun_lock(self._hop, int(blocking)))

    def release(self) -> None:
        _lib.pywg_hop_tun_unlock(self._hop)

    # --- the calls --------------------------------------------------------------------------

    def turn(self, tun_fd: int, lock: int, most: int) -> tuple[int, Any]:
        """The inbound thread's turn at the TUN into turn_buf: TUN reads, lone packets sent;
        (kind, result). PYWG_HOP_PYTHON leaves the TUN lock held."""
        r = self._turn
        return _lib.pywg_hop_pump(self._hop, tun_fd, self.turn_buf, len(self.turn_buf), lock, most, r), r

    def receive(self, sock_fd: int, tun_fd: int, turn: bool, most: int) -> tuple[int, Any]:
        """Up to ``most`` UDP reads: (kind, result). A turn of kind PYWG_HOP_PYTHON leaves the
        TUN lock held."""
        r = self._in
        return _lib.pywg_hop_in(self._hop, sock_fd, tun_fd, self.in_buf, len(self.in_buf), self.turn_buf,
                                len(self.turn_buf), int(turn), most, r), r

    def pump_wait(self, tun_fd: int, wake_fd: int, timeout_ms: int, most: int) -> tuple[int, Any]:
        """pump (waiting for the TUN lock) into out_buf, and when the TUN is empty a wait of up
        to ``timeout_ms`` for it or ``wake_fd`` in C, so that a packet that wakes the thread
        leaves before any Python runs."""
        r = self._out
        return _lib.pywg_hop_pump_wait(self._hop, tun_fd, wake_fd, timeout_ms, self.out_buf, len(self.out_buf),
                                       most, r), r

    def receive_wait(self, socks: Any, nsocks: int, wake_fd: int, timeout_ms: int, tun_fd: int, turn: bool,
                     most: int) -> tuple[int, Any]:
        """receive, after a wait in C of up to ``timeout_ms`` for one of the sockets (a cffi
        int[] of ``nsocks`` <= MAX_SOCKETS descriptors) or ``wake_fd``."""
        r = self._in
        return _lib.pywg_hop_in_wait(self._hop, socks, nsocks, wake_fd, timeout_ms, tun_fd, self.in_buf,
                                     len(self.in_buf), self.turn_buf, len(self.turn_buf), int(turn), most, r), r

    def tun_full(self) -> int:
        """Packets the hop lost to a full TUN queue (DropReason.TUN_FULL), so far. Any thread."""
        return int(_lib.pywg_hop_tun_full(self._hop))

    # --- the handshake backlog (native/hop.h): the inbound thread's ------------------------

    def backlog_count(self) -> int:
        """Handshake messages the receives queued and nobody has taken yet."""
        return int(_lib.pywg_hop_backlog_count(self._hop))

    def backlog_take(self) -> tuple[bytes, tuple[str, int]] | None:
        """The oldest queued handshake message and its source; None when there is none."""
        length = _lib.pywg_hop_backlog_take(self._hop, self._backlog_buf, len(self._backlog_buf),
                                            self._backlog_source, self._backlog_source_len)
        if length < 0:
            return None
        source = bytes(_ffi.buffer(self._backlog_source, self._backlog_source_len[0]))
        return bytes(_ffi.buffer(self._backlog_buf, length)), endpoint_of(source)

    def backlog_full(self) -> int:
        """Handshake messages dropped for a full backlog (HANDSHAKE_BACKLOG_FULL), so far.
        Any thread."""
        return int(_lib.pywg_hop_backlog_full(self._hop))

    def set_gso(self, on: bool) -> None:
        """Packets sent together to one address leave in one UDP GSO send."""
        _lib.pywg_hop_set_gso(self._hop, int(on))

    def disable(self) -> None:
        """The engine changed (configuration, a timer, a handshake): nothing armed is used
        until Python arms it again. Any thread."""
        _lib.pywg_hop_disable(self._hop)
        self.reclaim_all = True

    # --- sending ----------------------------------------------------------------------------

    def _slot(self, peer: Peer) -> int | None:
        slot = self._slots.get(id(peer))
        if slot is not None and self._slot_peers[slot] is peer:
            return slot
        if len(self._slot_peers) >= _lib.PYWG_HOP_MAX_SLOTS:
            live = {id(p) for p in self.device.dispatcher.peers.values()}
            free = [i for i, p in enumerate(self._slot_peers) if p is None or id(p) not in live]
            if not free:
                return None
            slot = free[0]
            self._slot_peers[slot] = peer
        else:
            slot = len(self._slot_peers)
            self._slot_peers.append(peer)
        self._slots[id(peer)] = slot
        self._routes_version = -1  # the copy names slots: make it again
        return slot

    def _refresh_routes(self) -> None:
        table = self.device.allowed_ips
        if table.version == self._routes_version:
            return
        for version, width in ((4, 4), (6, 16)):
            starts, peers = table.runs(version)
            slots = []
            for peer in peers:
                slot = self._slot(peer) if peer is not None else None
                slots.append(-1 if slot is None else slot)
            packed = b"".join(start.to_bytes(width, "big") for start in starts)
            if _lib.pywg_hop_set_routes(self._hop, version, len(starts), packed,
                                        _ffi.new("int32_t[]", slots)) != 0:
                raise MemoryError("pywg_hop_set_routes")
        self._routes_version = table.version

    def engine_time(self, at_ns: int, now: float) -> float:
        """A time the hop read (CLOCK_MONOTONIC, ns) on the engine's clock, no later than
        ``now``."""
        return min(now, at_ns * 1e-9 + self.device.clock_skew)

    def _until_ns(self, keypair: Keypair) -> int:
        # The engine's clock is CLOCK_MONOTONIC plus the device's skew (tests move it).
        return int((keypair.created + REJECT_AFTER_TIME - self.device.clock_skew) * 1e9)

    def arm_send(self, peer: Peer, now: float) -> None:
        """Give the hop a block of counters on the peer's current session (caller holds the
        device lock)."""
        slot = self._slot(peer)
        if slot is None:
            return
        self._refresh_routes()
        mtu = self.device.dispatcher.mtu or 0
        if mtu != self._mtu:
            _lib.pywg_hop_set_mtu(self._hop, mtu)
            self._mtu = mtu
        if isinstance(peer.endpoint, RelayEndpoint) or peer.public_key in self.device.filters.by_peer:
            _lib.pywg_hop_revoke_send(self._hop, slot)  # Python hands it to the relay, or filters it
            return
        reservation = peer.reserve_counters(BLOCK, now)
        keypair = peer.keypairs.current
        if reservation is None or keypair is None or isinstance(reservation.endpoint, RelayEndpoint):
            _lib.pywg_hop_revoke_send(self._hop, slot)
            return
        sock, endpoint = self.device.route(reservation.endpoint)
        if sock is None:
            _lib.pywg_hop_revoke_send(self._hop, slot)
            return
        address = self._sockaddrs.get(endpoint)
        if address is None:
            if len(self._sockaddrs) > 4 * _lib.PYWG_HOP_MAX_SLOTS:
                self._sockaddrs.clear()
            address = self._sockaddrs[endpoint] = sockaddr(endpoint)
        self._send_keypairs[slot] = keypair
        self._send_endpoints[slot] = reservation.endpoint
        _lib.pywg_hop_arm_send(self._hop, slot, reservation.send_key, reservation.remote_index,
                               reservation.first_counter, BLOCK, self._until_ns(keypair), sock.fileno(),
                               address, len(address))

    def follow_endpoint(self, peer: Peer) -> None:
        """After Python accepted packets from ``peer``: if it roamed, the hop's block (which
        sends to the old address) is withdrawn (caller holds the device lock)."""
        slot = self._slots.get(id(peer))
        if slot is not None and self._send_endpoints.get(slot) != peer.endpoint:
            _lib.pywg_hop_revoke_send(self._hop, slot)

    def revoke_send(self, peer: Peer) -> None:
        """Python sends on this peer's session now: the hop's block is withdrawn."""
        slot = self._slots.get(id(peer))
        if slot is not None:
            _lib.pywg_hop_revoke_send(self._hop, slot)

    def sent(self, result: Any, now: float, figures: dict[str, int]) -> list[Any]:
        """Account for the packets the hop sent, by session (caller holds the device lock)."""
        actions: list[Any] = []
        for i in range(result.nsent):
            group = result.sent[i]
            slot, packets = group.slot, group.packets
            if not packets:  # (a seal that failed: nothing left)
                continue
            for figure in ("tun_reads", "packets_sealed", "udp_sends", "hop_sends"):
                figures[figure] += packets
            peer: Peer | None = self._slot_peers[slot] if slot < len(self._slot_peers) else None
            keypair = self._send_keypairs.get(slot)
            if peer is None or keypair is None or keypair.remote_index != group.index:
                continue
            if self.device.dispatcher.peers.get(peer.public_key) is not peer:
                continue
            if group.err:
                self.device.drops[DropReason.UDP_SEND_FULL if group.err == errno.EAGAIN
                                  else DropReason.UDP_SEND_ERROR] += 1
            actions += peer.sent(keypair, group.wire, now, packets, self.engine_time(group.at_ns, now))
            if peer.keypairs.current is not keypair or _lib.pywg_hop_send_left(self._hop, slot) < REFILL:
                self.arm_send(peer, now)
        return actions

    # --- receiving ----------------------------------------------------------------------------

    def arm_receive(self, peer: Peer, keypair: Keypair) -> None:
        """Hand the session's replay filter to the hop (inbound thread, device lock held)."""
        if (keypair is peer.keypairs.next or peer.endpoint is None or isinstance(peer.endpoint, RelayEndpoint)
                or keypair.local_index in self._receiving or peer.public_key in self.device.filters.by_peer):
            return  # (a relayed peer's packets come from the relay, never from the hop's sockets;
            # a filtered peer's are filtered in Python)
        slot = self._slot(peer)
        if slot is None:
            return
        self._refresh_routes()
        greatest, bitmap = keypair.replay.export_state()
        address = sockaddr(peer.endpoint)
        self._bitmap[0:WORDS] = bitmap
        if _lib.pywg_hop_arm_receive(self._hop, slot, keypair.local_index, keypair.receive_key,
                                     self._until_ns(keypair), greatest, self._bitmap, address,
                                     len(address)) == 0:
            self._receiving[keypair.local_index] = (peer, keypair, peer.endpoint)

    def reclaim(self, index: int) -> None:
        """Take the session's replay filter back before Python checks counters on it
        (inbound thread, device lock held)."""
        held = self._receiving.pop(index, None)
        if held is not None and _lib.pywg_hop_reclaim(self._hop, index, self._greatest, self._bitmap):
            held[1].replay.import_state(self._greatest[0], list(self._bitmap))

    def reclaim_every(self) -> None:
        self.reclaim_all = False
        for index in list(self._receiving):
            self.reclaim(index)

    def received(self, result: Any, now: float, figures: dict[str, int]) -> list[Any]:
        """Account for what the hop delivered, by session (caller holds the device lock)."""
        actions: list[Any] = []
        for i in range(result.nreceived):
            group = result.received[i]
            if not group.datagrams:  # (begun for a message that failed a check: Python's)
                continue
            figures["datagrams_opened"] += group.datagrams
            figures["hop_receives"] += group.datagrams
            figures["tun_writes"] += group.frames
            held = self._receiving.get(group.index)
            if held is None:
                continue
            peer, keypair, source = held
            if self.device.dispatcher.peers.get(peer.public_key) is not peer:
                continue
            actions += peer.accept_run(keypair, group.wire, bool(group.carried), source, now, group.datagrams,
                                       self.engine_time(group.at_ns, now))
        return actions
