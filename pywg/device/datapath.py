"""The fast data path: two threads that move packets in batches, crypto in C.

Outbound thread: TUN read (a TSO super-packet when TUN offloads are on) -> split into
MTU-sized packets (C) -> one allowed-IPs lookup -> counters reserved from the engine ->
seal the whole run (C, GIL released) -> the device's bind for the endpoint (UDP: one
sendmsg with UDP_SEGMENT, GSO; a relay: one packet per message).

Inbound thread: the UDP bind's receive (many datagrams at once with UDP_GRO) -> the run's session from
the engine -> open the run (C, GIL released) -> replay check and accounting in the
engine -> allowed-IPs check of each source -> coalesce TCP segments (C) -> TUN writes.

Latency (a lone packet: a ping, an ACK): it is sealed or opened the short way (_send_one,
_open_one: one AEAD call, no run bookkeeping), and what the kernel queues on the TUN while
the inbound thread writes (the ping's reply) is sent by the inbound thread itself, still
running, rather than by the outbound thread after its wake-up (_tun_turn; _tun_lock keeps
reads and sends of the TUN in order). A wake-up of a Python thread costs 30-100 us of cold
caches before it does anything; each one taken off a packet's round trip counts.

Handshake messages and everything else go through the engine as usual, in whichever
thread met them. The engine is shared with the event loop (UAPI, timers) under one lock,
held only for bookkeeping, never during I/O or crypto.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pywg import fastpath
from pywg.protocol.actions import Action, DeliverPacket, Drop, DropReason, HandshakeCompleted, SendDatagram
from pywg.protocol.actions import Endpoint as AnyEndpoint
from pywg.protocol.endpoint import RelayEndpoint
from pywg.protocol.inner import inner_length
from pywg.protocol.keypair import Keypair
from pywg.protocol.peer import Peer

from . import hop as hop_module
from . import offload
from .metrics import Direction
from .runner import EVENTS

if TYPE_CHECKING:
    from .bind import UdpBind
    from .device import Device

log = logging.getLogger(__name__)

POLL_MS = 250  # how often an idle thread looks at its stop flag
RECV_BATCH = 64  # datagrams read per wake-up before the batch is processed
READ_BATCH = 64  # TUN frames read per wake-up before they are sealed and sent
TRANSPORT_TYPE = b"\x04\x00\x00\x00"
NONCE_PREFIX = bytes(4)
PLAIN_VNET = bytes(2)  # virtio-net header flags and gso_type: nothing to offload
VNET_PLAIN_FRAME = bytes(offload.VNET_HDR_LEN)  # the header of a frame written as is
RELAY_BACKLOG = 1024  # relayed datagrams waiting for the inbound thread, at most (more: dropped)
# Handshake messages wait in a backlog of the inbound thread, which takes at most a budget
# of them between two reads of the sockets: a flood of them (each costs a mac1 check and a
# cookie reply, or a DH) never keeps it from reading, and transport packets behind them are
# not lost in a full socket buffer. A backlog an eighth full puts the device under load
# (cookies required), as wireguard-go's handshake queue does; a full one drops, counted.
HANDSHAKE_BACKLOG = 1024  # as PYWG_HOP_BACKLOG, the hop's own
HANDSHAKE_BUDGET = 4  # messages at most per turn ...
HANDSHAKE_TURN = 200e-6  # ... and after the first, only while a turn has taken less (a DH: 370 us)


@dataclass
class DataPathOptions:
    """Switches, each settable from the environment (1/0) for the daemon."""

    threads: bool = True  # the two-thread data path (else: everything on the event loop)
    tun_offload: bool = True  # IFF_VNET_HDR + TSO/USO/GRO on the TUN
    udp_gso: bool = True
    udp_gro: bool = True
    tun_turns: bool = True  # the inbound thread sends what its TUN writes brought back (latency)
    hop: bool = True  # lone packets cross in one C call (native/hop.c; latency)

    @classmethod
    def from_environment(cls) -> DataPathOptions:
        def flag(name: str, default: bool) -> bool:
            value = os.environ.get(name)
            return default if value is None else value.strip().lower() not in ("0", "false", "no", "off")

        # The threads pay off with the C extensions, or (pure Python) when the kernel batches
        # datagrams for us: 690 against the event loop's 567 Mbit/s TCP (bench/RESULTS.md).
        native = fastpath.NATIVE_AVAILABLE and offload.AVAILABLE
        threads = flag("PYWG_THREADS", native or offload.udp_offloads_available())
        return cls(threads=threads, tun_offload=threads and offload.AVAILABLE and flag("PYWG_TUN_OFFLOAD", True),
                   udp_gso=threads and flag("PYWG_UDP_GSO", True), udp_gro=threads and flag("PYWG_UDP_GRO", True),
                   tun_turns=flag("PYWG_TUN_TURNS", True),
                   hop=threads and hop_module.AVAILABLE and flag("PYWG_HOP", True))


class ThreadedDataPath:
    def __init__(self, device: Device, options: DataPathOptions) -> None:
        self.device = device
        self.options = options
        self.lock = device.lock
        self.running = False
        self.gso = options.udp_gso
        self.vnet = device.tun.vnet_hdr
        self._threads: list[threading.Thread] = []
        # Batching figures (each written by one thread only, or under _tun_lock): how much
        # work per system call.
        self.figures = dict.fromkeys(
            ("tun_reads", "packets_sealed", "udp_sends", "udp_receives", "datagrams_opened", "tun_writes",
             "hop_sends", "hop_receives"), 0)  # hop_*: of those, the packets the C hop carried alone
        # What the hop sent, accounted by either thread under the device lock (not _tun_lock,
        # which C released by then): kept apart so that no figure is written under two locks.
        self.hop_sent_figures = dict.fromkeys(("tun_reads", "packets_sealed", "udp_sends", "hop_sends"), 0)
        # The inbound thread's wake-up (relayed datagrams, sockets changed, stop), and the
        # outbound thread's (stop only): a byte the inbound thread has not read yet must not
        # keep the outbound thread's poll returning (it spun on it, holding the GIL for up
        # to a switch interval: milliseconds on every relayed packet).
        self._wake_r, self._wake_w = os.pipe()
        self._stop_r, self._stop_w = os.pipe()
        self.hop = hop_module.Hop(device, self.vnet) if options.hop else None
        # Held from a TUN read until what it read is sent: the inbound thread may take a turn
        # at the TUN (a reply the kernel queued while we wrote), never reordering packets.
        # With the hop, its C mutex (C takes turns too).
        self._tun_lock: Any = self.hop if self.hop is not None else threading.Lock()
        self._turn_splitter: offload.Splitter | None = None
        # Datagrams the relay received (event loop -> inbound thread), and whether the
        # inbound thread has been woken for them since it last emptied the queue.
        self._relayed: deque[tuple[bytes, RelayEndpoint]] = deque()
        self._relay_woken = False
        self._handshakes: deque[tuple[bytes, AnyEndpoint]] = deque()  # the inbound thread's own

    def start(self) -> None:
        bind = self.device.bind
        assert bind is not None
        if self.options.udp_gso and not bind.gso_supported():
            self.gso = False
        if self.hop is not None:
            self.hop.set_gso(self.gso)
        self._configure(bind)
        self.running = True
        for name, target in (("pywg-out", self._outbound), ("pywg-in", self._inbound)):
            thread = threading.Thread(target=target, name=f"{name}-{self.device.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def sockets_changed(self) -> None:
        """The device rebound its UDP sockets: the inbound thread picks them up."""
        bind = self.device.bind
        if bind is not None:
            self._configure(bind)
        os.write(self._wake_w, b"\x00")

    def _configure(self, bind: UdpBind) -> None:
        """The offloads this data path uses, on a bind of the device's."""
        bind.gso = self.gso
        if self.options.udp_gro:
            bind.enable_gro()

    def relay_received(self, data: bytes, source: RelayEndpoint) -> None:
        """A datagram from the relay (event-loop thread): the inbound thread takes it as it
        takes a UDP datagram (the replay filters and the hop's sessions are its own)."""
        if len(self._relayed) >= RELAY_BACKLOG:
            self._count(DropReason.RELAY_BACKLOG_FULL)
            return
        self._relayed.append((data, source))
        if not self._relay_woken:
            self._relay_woken = True
            try:
                os.write(self._wake_w, b"\x01")
            except OSError:  # stopped
                pass

    def _take_relayed(self, coalescer: offload.Coalescer | None) -> None:
        """The inbound thread, woken: every relayed datagram waiting, into the engine."""
        self._relay_woken = False  # before emptying: one appended from now on wakes us again
        while True:
            try:
                data, source = self._relayed.popleft()
            except IndexError:
                return
            try:
                self._receive(data, len(data) or 1, source, coalescer)
            except Exception:
                log.exception("inbound data path (relayed)")

    def engine_changing(self) -> None:
        """The engine is about to change (configuration, a timer; the device lock is held):
        what the hop was armed with is not used again until armed anew."""
        if self.hop is not None:
            self.hop.disable()

    def figures_now(self) -> dict[str, int]:
        """The batching figures (caller holds the device lock); a figure another thread is
        writing just now may be a packet behind."""
        figures = dict(self.figures)
        for name, n in self.hop_sent_figures.items():
            figures[name] += n
        return figures

    def stop(self) -> None:
        self.running = False
        os.write(self._wake_w, b"\x00")
        os.write(self._stop_w, b"\x00")
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=2)
        self._threads.clear()
        for fd in (self._wake_r, self._wake_w, self._stop_r, self._stop_w):
            os.close(fd)

    # --- shared ---------------------------------------------------------------------------

    def _carry(self, actions: list[Action]) -> None:
        """Carry out engine actions from a data-path thread (thread-safe parts only)."""
        device = self.device
        for action in actions:
            if isinstance(action, SendDatagram):
                device.send_datagram(action.data, action.endpoint)
            elif isinstance(action, DeliverPacket):
                device.deliver(action)
            elif isinstance(action, HandshakeCompleted):
                log.info("handshake completed with %s", action.peer.hex()[:8])
                device.loop.call_soon_threadsafe(device.emit, action)
            elif isinstance(action, EVENTS):
                device.loop.call_soon_threadsafe(device.emit, action)
            elif isinstance(action, Drop):
                log.debug("drop: %s", action.reason.value)
        device.timers_may_have_changed()

    def _count(self, reason: DropReason, n: int = 1) -> None:
        """Count a device drop (the lock not held: taken here)."""
        self.device.count_drop(reason, n)

    # --- outbound -------------------------------------------------------------------------

    def _outbound(self) -> None:
        device = self.device
        fd = device.tun.fileno()
        splitter = offload.Splitter() if self.vnet else None
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        read_size = offload.MAX_FRAME if self.vnet else 65535
        if self.hop is not None:
            self._outbound_hop(fd, read_size, splitter)
            return
        while self.running:
            with self._tun_lock:
                try:
                    frames = self._read_frames(fd, read_size)
                except OSError as exc:
                    if self.running:
                        device.loop.call_soon_threadsafe(device.gone, f"TUN read failed ({exc.strerror})")
                    return
                if frames:
                    self._send_read(frames, splitter)
            if not frames:
                poller.poll(POLL_MS)

    def _outbound_hop(self, fd: int, read_size: int, splitter: offload.Splitter | None) -> None:
        """The outbound loop with the hop: it waits in C and sends lone packets in C; the
        rest is read on and sent here, the TUN lock held from the first read."""
        hop = self.hop
        assert hop is not None
        lib = hop_module._lib
        while self.running:
            kind, r = hop.pump_wait(fd, self._stop_r, POLL_MS, READ_BATCH)
            if r.nsent:
                self._account_hop(sent=r)
            if kind == lib.PYWG_HOP_PYTHON:
                self._send_held(bytes(hop_module._ffi.buffer(hop.out_buf, r.length)), fd, read_size, splitter)
            elif kind == lib.PYWG_HOP_ERROR:
                if self.running:
                    self.device.loop.call_soon_threadsafe(self.device.gone,
                                                          f"TUN read failed ({os.strerror(r.err)})")
                return

    def _send_held(self, frame: bytes, fd: int, read_size: int, splitter: offload.Splitter | None,
                   release: bool = True) -> None:
        """A frame the hop read and left to Python, the TUN lock still held: it and what
        else the TUN holds now are sent, then the lock is released (unless the caller
        holds it for longer)."""
        try:
            self.figures["tun_reads"] += 1
            try:
                frames = [frame, *self._read_frames(fd, read_size, READ_BATCH - 1)]
            except OSError:  # gone: the next read says so
                frames = [frame]
            self._send_read(frames, splitter)
        finally:
            if release:
                self._tun_lock.release()

    def _account_hop(self, received: Any = None, sent: Any = None) -> None:
        """The engine's side of packets the hop carried (results with their groups):
        timers, counters, blocks topped up."""
        hop = self.hop
        assert hop is not None
        now = self.device.now()
        actions: list[Action] = []
        with self.lock:
            if received is not None:
                actions += hop.received(received, now, self.figures)
            if sent is not None:
                actions += hop.sent(sent, now, self.hop_sent_figures)
        self._carry(actions)

    def _send_read(self, frames: list[bytes], splitter: offload.Splitter | None) -> None:
        try:
            if len(frames) == 1 and (splitter is None or frames[0][:2] == PLAIN_VNET):
                self._send_one(frames[0][offload.VNET_HDR_LEN:] if splitter is not None else frames[0])
            else:
                self._send_frames(frames, splitter)
        except Exception:  # a bug must not silence the interface: log it, go on
            log.exception("outbound data path")

    def _tun_turn(self) -> None:
        """After TUN writes: what the kernel queued on the TUN meanwhile (a ping's reply, an
        ACK) is sent from this thread, already running, rather than waiting for the
        outbound thread to wake up. Skipped when the outbound thread is busy."""
        if self.hop is not None:
            self._hop_turn(hop_module._lib.PYWG_HOP_LOCK_TRY)
            return
        if not self._tun_lock.acquire(blocking=False):
            return
        try:
            self._tun_turn_locked()
        finally:
            self._tun_lock.release()

    def _hop_turn(self, lock: int) -> None:
        """_tun_turn with the hop: lone packets are sent in C, the rest here."""
        hop = self.hop
        assert hop is not None
        kind, r = hop.turn(self.device.tun.fileno(), lock, READ_BATCH)
        if r.nsent:
            self._account_hop(sent=r)
        if kind == hop_module._lib.PYWG_HOP_PYTHON:
            self._send_held(bytes(hop_module._ffi.buffer(hop.turn_buf, r.length)), self.device.tun.fileno(),
                            offload.MAX_FRAME if self.vnet else 65535, self._turn_splitter,
                            release=lock != hop_module._lib.PYWG_HOP_LOCK_HELD)

    def _tun_turn_locked(self) -> None:
        try:
            frames = self._read_frames(self.device.tun.fileno(), offload.MAX_FRAME if self.vnet else 65535)
        except OSError:  # gone: the outbound thread says so
            return
        if frames:
            self._send_read(frames, self._turn_splitter)

    def _read_frames(self, fd: int, read_size: int, batch: int = READ_BATCH) -> list[bytes]:
        """What the TUN holds now, up to a batch ([] if nothing; OSError if it is gone)."""
        if batch <= 0:
            return []
        try:
            frames = [os.read(fd, read_size)]
        except BlockingIOError:
            return []
        while len(frames) < batch:
            try:
                frames.append(os.read(fd, read_size))
            except OSError:  # empty now (or gone: the next read says so)
                break
        self.figures["tun_reads"] += len(frames)
        return frames

    def _send_frames(self, frames: list[bytes], splitter: offload.Splitter | None) -> None:
        """Super-packets go out as their own runs; single packets read together are
        gathered into runs (same size but the last, same peer) sealed and sent at once."""
        singles: list[bytes] = []
        for frame in frames:
            try:
                if splitter is not None:
                    data, size, count = splitter.split_run(frame)
                else:
                    data, size, count = memoryview(frame), len(frame), 1
            except offload.OffloadError:
                self._count(DropReason.INVALID_TUN_FRAME)
                continue
            if count > 1:
                self._send_singles(singles)
                singles = []
                self._send_run(data, size, count)
                continue
            if self.device.invalid_inner(data):
                self._count(DropReason.INVALID_TUN_PACKET)
                continue
            if singles and (len(data) > len(singles[0]) or len(singles[-1]) < len(singles[0])
                            or len(singles) >= offload.UDP_MAX_SEGMENTS):
                self._send_singles(singles)
                singles = []
            singles.append(bytes(data))
        self._send_singles(singles)

    def _send_one(self, packet: bytes) -> None:
        """A lone packet with nothing to offload (a ping, an ACK): the short way, with fewer
        steps than a run. Every step of a lone packet's trip is latency."""
        device = self.device
        if device.invalid_inner(packet):
            self._count(DropReason.INVALID_TUN_PACKET)
            return
        now = device.now()
        mtu = device.dispatcher.mtu or 0
        length = len(packet)
        padded = fastpath.padded_len(length, mtu)
        with self.lock:
            peer = device.allowed_ips.lookup_packet_destination(packet)
            if peer is None:
                device.drops[DropReason.NO_ROUTE] += 1
                return
            if device.filters.by_peer and not device.filters.passes(peer.public_key, Direction.OUTBOUND, packet,
                                                            device.drops):
                return
            if self.hop is not None:
                self.hop.revoke_send(peer)
            reservation, actions = peer.reserve_send(1, fastpath.OVERHEAD + padded, now)
            if reservation is None:  # no session yet: stage it behind a handshake
                actions = device.dispatcher.send_packet(peer.public_key, packet, now)
            elif self.hop is not None:  # the next lone packet to this peer goes the C way
                self.hop.arm_send(peer, now)
        if reservation is not None:
            counter = reservation.first_counter.to_bytes(8, "little")
            sealed = (TRANSPORT_TYPE + reservation.remote_index.to_bytes(4, "little") + counter
                      + fastpath.aead_seal(reservation.send_key, NONCE_PREFIX + counter,
                                           packet + bytes(padded - length) if padded != length else packet))
            self.figures["packets_sealed"] += 1
            self.figures["udp_sends"] += 1
            device.send_datagram(sealed, reservation.endpoint)
        self._carry(actions)

    def _send_singles(self, packets: list[bytes]) -> None:
        """Packets of one size (the last may be shorter): runs of consecutive packets to one peer."""
        if not packets:
            return
        if len(packets) == 1:
            self._send_run(memoryview(packets[0]), len(packets[0]), 1)
            return
        with self.lock:
            lookup = self.device.allowed_ips.lookup_packet_destination
            peers = [lookup(packet) for packet in packets]
        start = 0
        for i in range(1, len(packets) + 1):
            if i == len(packets) or peers[i] is not peers[start]:
                run = packets[start:i]
                self._send_run(memoryview(b"".join(run)), len(run[0]), len(run), peers[start])
                start = i

    def _send_run(self, data: memoryview, size: int, count: int, peer: Peer | None = None) -> None:
        """``count`` IP packets back to back in ``data`` (each ``size`` bytes but the last),
        all to one peer (``peer`` when the caller has routed them already)."""
        device = self.device
        now = device.now()
        mtu = device.dispatcher.mtu or 0
        with self.lock:
            if peer is None:
                peer = device.allowed_ips.lookup_packet_destination(data[:size])
            if peer is None:
                device.drops[DropReason.NO_ROUTE] += count
                return
            if peer.public_key in device.filters.by_peer:
                kept = device.filters.kept(peer.public_key, Direction.OUTBOUND,
                                           [data[i * size:(i + 1) * size] for i in range(count)], device.drops)
                if not kept:
                    return
                if len(kept) < count:  # all the size of the first but the last, still
                    data, size, count = memoryview(b"".join(kept)), len(kept[0]), len(kept)
            stride = fastpath.sealed_len(size, mtu)
            wire = stride * (count - 1) + fastpath.sealed_len(len(data) - size * (count - 1), mtu)
            if self.hop is not None:
                self.hop.revoke_send(peer)
            reservation, actions = peer.reserve_send(count, wire, now)
            if reservation is not None and self.hop is not None:
                self.hop.arm_send(peer, now)  # a block after these: lone packets (ACKs) go on in C
            if reservation is None:  # no session yet: stage them behind a handshake
                actions = []
                for i in range(count):
                    actions += device.dispatcher.send_packet(
                        peer.public_key, bytes(data[i * size:(i + 1) * size]), now)
        if reservation is not None:
            run = fastpath.seal_gso(reservation.send_key, reservation.remote_index, reservation.first_counter,
                                    data, size, mtu)
            self.figures["packets_sealed"] += count
            self._send_gso(run.data, run.stride, run.messages, reservation.endpoint)
        self._carry(actions)

    def _send_gso(self, data: memoryview, stride: int, count: int, endpoint: AnyEndpoint) -> None:
        """A sealed run out through the device's bind for ``endpoint`` (UDP: GSO batches
        when the kernel takes them; a relay: one relay packet per message)."""
        device = self.device
        self.figures["udp_sends"] += device.send_run(data, endpoint, stride if count > 1 else 0)
        bind = device.bind
        if self.gso and bind is not None and not bind.gso:  # the kernel refused GSO: the hop too
            self.gso = False
            if self.hop is not None:
                self.hop.set_gso(False)

    # --- inbound --------------------------------------------------------------------------

    def _inbound(self) -> None:
        device = self.device
        coalescer = offload.Coalescer() if self.vnet else None
        self._turn_splitter = offload.Splitter() if self.vnet else None
        figures = self.figures
        turns = self.options.tun_turns
        hop = self.hop
        while self.running:
            if hop is not None and hop.reclaim_all:
                with self.lock:
                    hop.reclaim_every()
            bind = device.bind
            sockets = bind.sockets if bind is not None else []
            if hop is not None and len(sockets) <= hop_module.MAX_SOCKETS:
                self._inbound_hop(bind, sockets, coalescer)
                continue
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            by_fd: dict[int, socket.socket] = {}
            for sock in sockets:
                poller.register(sock.fileno(), select.POLLIN)
                by_fd[sock.fileno()] = sock
            while self.running and device.bind is bind:
                ready = poller.poll(0 if self._handshakes_waiting() else POLL_MS)
                for fd, _ in ready:
                    if fd == self._wake_r:
                        os.read(self._wake_r, 64)
                        self._take_relayed(coalescer)
                        continue
                    ready_sock = by_fd.get(fd)
                    if ready_sock is not None and bind is not None:
                        written = figures["tun_writes"]
                        if hop is not None and hop.reclaim_all:
                            with self.lock:
                                hop.reclaim_every()
                        try:
                            if hop is not None:
                                self._drain_hop(ready_sock, coalescer)
                            else:
                                self._drain(bind, ready_sock, coalescer)
                        except Exception:
                            log.exception("inbound data path")
                        if figures["tun_writes"] != written and turns:
                            self._tun_turn()
                self._take_handshakes()

    def _drain(self, bind: UdpBind, sock: socket.socket, coalescer: offload.Coalescer | None) -> None:
        received = bind.receive(sock, RECV_BATCH)
        self.figures["udp_receives"] += len(received)
        for data, segment, source in received:
            self._receive(data, segment, source, coalescer)

    def _inbound_hop(self, bind: UdpBind | None, sockets: list[socket.socket], coalescer: offload.Coalescer | None) -> None:
        """The inbound loop with the hop, while ``bind`` is the device's: it waits in C and
        carries what it can in C (a datagram that wakes the thread is on the TUN before any
        Python runs); Python accounts, and takes the rest."""
        hop = self.hop
        assert hop is not None
        lib = hop_module._lib
        fds = hop_module._ffi.new("int[]", [s.fileno() for s in sockets] or [-1])
        tun_fd = self.device.tun.fileno()
        turns = self.options.tun_turns
        waiting = hop.backlog_count()  # handshake messages the hop queued (its last read said)
        while self.running and self.device.bind is bind:
            if waiting or self._handshakes:
                self._take_handshakes()  # (before the reclaim: one may disable the hop)
                waiting = hop.backlog_count()
            # Sessions are taken back (reclaim) before the wait, never between it and the
            # accounting (relayed datagrams too are taken after it): what the hop delivered
            # on a session is accounted for on it (Hop.received), even if the engine changed
            # (disable) meanwhile.
            if hop.reclaim_all:
                with self.lock:
                    hop.reclaim_every()
            kind, r = hop.receive_wait(fds, len(sockets), self._wake_r, 0 if waiting or self._handshakes else POLL_MS,
                                       tun_fd, turns, RECV_BATCH)
            if r.reads:
                waiting = r.backlog
            if r.woken:
                os.read(self._wake_r, 64)
            if kind != lib.PYWG_HOP_EMPTY or r.nreceived:
                written = self.figures["tun_writes"]
                try:
                    self._hop_received(kind, r, coalescer)  # (more waiting: the next wait returns at once)
                except Exception:
                    log.exception("inbound data path")
                if kind == lib.PYWG_HOP_PYTHON and self.figures["tun_writes"] != written and turns:
                    self._tun_turn()
            if r.woken:
                self._take_relayed(coalescer)

    def _drain_hop(self, sock: socket.socket, coalescer: offload.Coalescer | None) -> None:
        """_drain with the hop: what it can carry (lone messages and runs of armed sessions)
        goes to the TUN in C, many datagrams a call, and the answer the kernel queued goes
        out; Python accounts per session and call, and takes the rest."""
        hop = self.hop
        assert hop is not None
        sock_fd, tun_fd = sock.fileno(), self.device.tun.fileno()
        for _ in range(RECV_BATCH):
            kind, r = hop.receive(sock_fd, tun_fd, self.options.tun_turns, RECV_BATCH)
            if not self._hop_received(kind, r, coalescer):
                return

    def _hop_received(self, kind: int, r: Any, coalescer: offload.Coalescer | None) -> bool:
        """What one receive of the hop brought: accounted, and the datagram it left to Python
        taken. False when the socket had nothing more."""
        hop = self.hop
        assert hop is not None
        lib, ffi = hop_module._lib, hop_module._ffi
        if kind == lib.PYWG_HOP_EMPTY and not r.nreceived:
            return False
        if kind == lib.PYWG_HOP_ERROR:
            if r.err not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                log.debug("udp receive failed: %s", os.strerror(r.err))
            return True
        self.figures["udp_receives"] += r.reads
        if r.nreceived or r.nsent:
            self._account_hop(received=r, sent=r if r.nsent else None)
        if r.err:
            self.device.tun_write_failed(r.err)  # the rest of that run is lost with it
        if r.turn == lib.PYWG_HOP_PYTHON:
            self._send_held(bytes(ffi.buffer(hop.turn_buf, r.turn_length)), self.device.tun.fileno(),
                            offload.MAX_FRAME if self.vnet else 65535, self._turn_splitter)
        if kind == lib.PYWG_HOP_PYTHON:
            source = hop_module.endpoint_of(bytes(ffi.buffer(r.source, r.source_len)))
            # The hop's buffer itself, writable (a run is opened in place), used up before
            # the next receive: _receive keeps no reference to it.
            data = memoryview(ffi.buffer(hop.in_buf, r.length))
            self._receive(data, r.segment or len(data), source, coalescer)
            return True
        return kind == lib.PYWG_HOP_HANDLED

    def _receive(self, data: bytes | memoryview, size: int, source: AnyEndpoint,
                 coalescer: offload.Coalescer | None) -> None:
        """Datagrams (a UDP_GRO read: ``size`` bytes each, the last maybe shorter) into the
        engine. ``data`` may be a writable buffer the caller reuses: nothing here keeps it."""
        device = self.device
        if len(data) == size and size >= 32 and data[:4] == TRANSPORT_TYPE:
            self._open_one(data, source)
            return
        if not data:  # an empty datagram: the demux's, as on every path (UNKNOWN_PROTOCOL)
            with self.lock:
                device.demux_other(data, source)
            return
        count = -(-len(data) // size)
        if (coalescer is not None and size >= 32 and len(data) - size * (count - 1) >= 32
                and data[:4] == TRANSPORT_TYPE and count <= coalescer.max_batch):
            run_header = data[:8]
            if all(data[i * size:i * size + 8] == run_header for i in range(1, count)):
                self._open_gro(data, size, count, source, coalescer)
                return
        view = memoryview(data)
        datagrams = [view[i:i + size] for i in range(0, len(data), size)]
        i = 0
        while i < len(datagrams):
            datagram = datagrams[i]
            if len(datagram) < 32 or datagram[:4] != TRANSPORT_TYPE:
                with self.lock:
                    other = device.demux_other(datagram, source)  # STUN, disco or unknown
                if not other:
                    self._queue_handshake(bytes(datagram), source)
                i += 1
                continue
            header = datagram[:8]  # type and receiver index: one session, one key
            j = i + 1
            while j < len(datagrams) and len(datagrams[j]) >= 32 and datagrams[j][:8] == header:
                j += 1
            self._open_run(datagrams[i:j], int.from_bytes(header[4:8], "little"), source, coalescer)
            i = j

    def _queue_handshake(self, data: bytes, source: AnyEndpoint) -> None:
        """A handshake message (or a WireGuard type of the wrong size) for the engine: into
        the backlog, taken after the socket reads (_take_handshakes); full: dropped, counted."""
        if len(self._handshakes) >= HANDSHAKE_BACKLOG:
            self._count(DropReason.HANDSHAKE_BACKLOG_FULL)
            return
        self._handshakes.append((data, source))

    def _handshakes_waiting(self) -> int:
        """Handshake messages in the backlogs: the hop's (C) and this thread's."""
        return len(self._handshakes) + (self.hop.backlog_count() if self.hop is not None else 0)

    def _take_handshakes(self) -> None:
        """Up to HANDSHAKE_BUDGET handshake messages from the backlogs into the engine
        (inbound thread, between reads of the sockets)."""
        hop, backlog, budget = self.hop, self._handshakes, HANDSHAKE_BUDGET
        waiting = self._handshakes_waiting()
        if not waiting:
            return
        device = self.device
        now = device.now()
        actions: list[Action] = []
        try:
            deadline = time.perf_counter() + HANDSHAKE_TURN
            for n in range(min(budget, waiting)):
                if n and time.perf_counter() >= deadline:
                    break
                taken: tuple[bytes, AnyEndpoint] | None = hop.backlog_take() if hop is not None else None
                if taken is None and backlog:
                    taken = backlog.popleft()
                if taken is None:
                    break
                data, source = taken
                with self.lock:  # per message: the outbound thread gets the lock in between
                    dispatcher = device.dispatcher
                    if waiting >= HANDSHAKE_BACKLOG // 8:
                        dispatcher.note_load(now)
                    changes = dispatcher.index_changes
                    actions += dispatcher.datagram_received(data, source, now)
                    if hop is not None and dispatcher.index_changes != changes:
                        # New sessions (or one freed): what the hop was armed with is not used
                        # again until armed anew. Its receives are this thread's, so none ran
                        # meanwhile; a send on the session just replaced is still a valid one.
                        # A cookie reply, the answer to a flood, changes nothing.
                        hop.disable()
            self._carry(actions)
        except Exception:  # a bug must not stop the inbound thread
            log.exception("inbound data path (handshakes)")

    def _session(self, index: int, now: float) -> tuple[Peer, Keypair] | None:
        """The session our receiver ``index`` names, its replay filter back from the hop
        (Python is about to check counters on it); None (counted) if there is none."""
        with self.lock:
            if self.hop is not None:
                self.hop.reclaim(index)
            target = self.device.dispatcher.transport_keypair(index, now)
        return None if isinstance(target, Drop) else target

    def _accepted(self, peer: Peer, keypair: Keypair, now: float, arm: bool = True) -> None:
        """After Python accepted packets on a session (lock held): the hop follows a roamed
        peer, and (``arm``) carries the session's next packets itself."""
        if self.hop is not None:
            self.hop.follow_endpoint(peer)
            if arm and not keypair.expired(now):
                self.hop.arm_receive(peer, keypair)

    def _open_one(self, data: bytes | memoryview, source: AnyEndpoint) -> None:
        """A lone transport message: opened, checked and written the short way."""
        device = self.device
        now = device.now()
        index = int.from_bytes(data[4:8], "little")
        session = self._session(index, now)
        if session is None:
            return
        peer, keypair = session
        plaintext = fastpath.aead_open(keypair.receive_key, NONCE_PREFIX + data[8:16], data[16:])
        self.figures["datagrams_opened"] += 1
        with self.lock:
            packets, actions = peer.accept_batch(keypair, [int.from_bytes(data[8:16], "little")], [plaintext],
                                                 [len(data)], source, now)
            if packets:
                packets = self._allowed(peer, packets)
            self._accepted(peer, keypair, now)
        if packets:
            frame = VNET_PLAIN_FRAME + packets[0] if self.vnet else packets[0]
            # The TUN lock taken before the write: an answer the kernel queues during the
            # write (woken, the outbound thread would race this one for it) is ours to send.
            if self.options.tun_turns and self._tun_lock.acquire(blocking=False):
                try:
                    self._write_frames([frame])
                    if self.hop is not None:
                        self._hop_turn(hop_module._lib.PYWG_HOP_LOCK_HELD)
                    else:
                        self._tun_turn_locked()
                finally:
                    self._tun_lock.release()
            else:
                self._write_frames([frame])
        self._carry(actions)

    def _open_gro(self, data: bytes | memoryview, size: int, count: int, source: AnyEndpoint,
                  coalescer: offload.Coalescer) -> None:
        """``count`` transport messages to one session, back to back (a UDP_GRO read): opened
        in one call; when all authenticate and are fresh, accounted for as one and coalesced
        without a per-packet Python step."""
        device = self.device
        now = device.now()
        index = int.from_bytes(data[4:8], "little")
        session = self._session(index, now)
        if session is None:
            return
        peer, keypair = session
        if isinstance(data, memoryview) and not data.readonly:  # in place: plaintext i at 16 + i * size
            run = fastpath.open_gro(keypair.receive_key, data, size, out=data[16:], out_stride=size)
        else:
            run = fastpath.open_gro(keypair.receive_key, data, size)
        self.figures["datagrams_opened"] += count
        counters = run.counters
        first = counters[0]
        consecutive = counters[-1] - first == count - 1 and counters == list(range(first, first + count))
        frames: list[Any] = []
        with self.lock:
            if (consecutive and all(run.ok) and peer.public_key not in device.filters.by_peer
                    and keypair.replay.validate_run(first, count)):
                actions = peer.accept_run(keypair, len(data), any(run.lengths), source, now, count)
                packets = None
            else:
                stride = run.stride
                plaintexts = [run.data[i * stride:i * stride + run.lengths[i]] if run.ok[i] else None
                              for i in range(count)]
                sizes = [size] * (count - 1) + [len(data) - size * (count - 1)]
                packets, actions = peer.accept_batch(keypair, counters, plaintexts, sizes, source, now)
                packets = self._allowed(peer, packets)
            self._accepted(peer, keypair, now)
        if packets is None:
            frames, info = coalescer.coalesce_run(run.data, run.stride, run.lengths, run.ok)
            with self.lock:
                if info.invalid:
                    device.dispatcher.drops[DropReason.INVALID_PACKET] += info.invalid
                if info.kept and not info.same_source:  # several sources: check each
                    packets = self._allowed(peer, self._plaintexts(run))
                elif info.kept and device.allowed_ips.lookup(info.source) is not peer:
                    device.drops[DropReason.SOURCE_NOT_ALLOWED] += info.kept
                    frames = []
        if packets is not None:
            frames = coalescer.coalesce(packets) if packets else []
        self._write_frames(frames)
        self._carry(actions)

    @staticmethod
    def _plaintexts(run: fastpath.GroRun) -> list[Any]:
        """The IP packets of an opened run, padding cut (the rare, slow path)."""
        packets = []
        for i, length in enumerate(run.lengths):
            if run.ok[i] and length:
                plaintext = run.data[i * run.stride:i * run.stride + length]
                inner = inner_length(plaintext)
                if inner is not None:
                    packets.append(plaintext[:inner])
        return packets

    def _write_frames(self, frames: list[Any]) -> None:
        if not frames:
            return
        tun = self.device.tun
        full = 0
        for frame in frames:
            try:
                if not tun.write_frame(frame):
                    full += 1
            except OSError as exc:
                if self.device.tun_write_failed(exc.errno):
                    break
        self.figures["tun_writes"] += len(frames)
        if full:
            self._count(DropReason.TUN_FULL, full)

    def _open_run(self, run: Sequence[memoryview], index: int, source: AnyEndpoint,
                  coalescer: offload.Coalescer | None) -> None:
        device = self.device
        now = device.now()
        session = self._session(index, now)
        if session is None:
            return
        peer, keypair = session
        opened = fastpath.open_batch(keypair.receive_key, run)  # type: ignore[arg-type]  # buffers
        self.figures["datagrams_opened"] += len(run)
        counters = [counter for counter, _ in opened]
        plaintexts = [plaintext for _, plaintext in opened]
        with self.lock:
            packets, actions = peer.accept_batch(keypair, counters, plaintexts, [len(d) for d in run], source, now)
            allowed = self._allowed(peer, packets)
            self._accepted(peer, keypair, now, arm=False)
        if allowed:
            self._write_frames(coalescer.coalesce(allowed) if coalescer is not None else allowed)
        self._carry(actions)

    def _allowed(self, peer: Peer, packets: list[Any]) -> list[Any]:
        """Packets whose source is in the peer's allowed IPs and that the peer's filter (if
        any) accepts (caller holds the lock)."""
        device = self.device
        lookup = device.allowed_ips.lookup_packet_source
        allowed = [p for p in packets if lookup(p) is peer]
        if len(allowed) != len(packets):
            device.drops[DropReason.SOURCE_NOT_ALLOWED] += len(packets) - len(allowed)
        if device.filters.by_peer:
            return device.filters.kept(peer.public_key, Direction.INBOUND, allowed, device.drops)
        return allowed

