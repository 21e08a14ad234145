"""The lone-packet hop (native/hop.c) in-process: its replay filter against the kernel's
vectors and ReplayFilter, and each of its decisions with real sockets. The TUN is stood in
for by a datagram socketpair (one read, one packet, as a TUN), the UDP sockets are real.
Its use by the daemon is tested in test_daemon.py (the data-path matrix)."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pywg import fastpath
from pywg.device import hop as hop_module
from pywg.device import offload
from pywg.nat.stun import binding_request
from pywg.protocol.allowedips import AllowedIPs
from pywg.protocol.inner import inner_length
from pywg.protocol.replay import ReplayFilter
from pywg.testing.icmp import internet_checksum
from vectors import load

if not hop_module.AVAILABLE:
    if os.environ.get("CI"):
        raise RuntimeError("pywg._fastpath with the hop is not built: the C path must be tested under CI")
    pytest.skip("pywg._fastpath (the hop) is not built", allow_module_level=True)

ffi, lib = hop_module._ffi, hop_module._lib
REPLAY = load("replay_counter_kernel")
WORDS = hop_module.WORDS
KEY_AB, KEY_BA = bytes(range(32)), bytes(range(32, 64))
FAR = 1 << 62  # a deadline far in the future (ns)


class CFilter:
    """The C replay filter behind ReplayFilter's interface."""

    def __init__(self) -> None:
        self.greatest = ffi.new("uint64_t *")
        self.bitmap = ffi.new("uint64_t[]", WORDS)

    def validate(self, counter: int) -> bool:
        return bool(lib.pywg_hop_replay_validate(self.greatest, self.bitmap, counter))

    def state(self) -> tuple[int, list[int]]:
        return self.greatest[0], list(self.bitmap)


def test_c_replay_filter_kernel_selftest() -> None:
    steps, mismatches = 0, []
    c_filter = CFilter()
    for group in REPLAY["groups"]:
        if group["reset_before"]:
            c_filter = CFilter()
        for n, step in enumerate(group["steps"]):
            steps += 1
            if c_filter.validate(step["counter"]) != step["expected_accept"]:
                mismatches.append((group["name"], step.get("test_no", n), step["counter"]))
    assert steps == 48813
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:5]}"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 30_000), min_size=1, max_size=60), st.integers(0, 59))
def test_replay_state_handed_over_and_back(counters: list[int], split: int) -> None:
    """Python validates some counters, the C filter carries on from its state, Python takes
    it back: every answer and the final state are those of one Python filter."""
    reference, python = ReplayFilter(), ReplayFilter()
    expected = [reference.validate(c) for c in counters]
    first, second = counters[:split], counters[split:]
    got = [python.validate(c) for c in first]
    c_filter = CFilter()
    greatest, bitmap = python.export_state()
    c_filter.greatest[0] = greatest
    c_filter.bitmap[0:WORDS] = bitmap
    got += [c_filter.validate(c) for c in second]
    python.import_state(*c_filter.state())
    assert got == expected
    assert python.export_state() == reference.export_state()


def test_import_state_checks_its_size() -> None:
    with pytest.raises(ValueError, match="128 words"):
        ReplayFilter().import_state(0, [0] * 3)


# --- the hop with sockets -----------------------------------------------------------------


def ipv4_packet(source: str, destination: str, payload: bytes = b"x" * 28) -> bytes:
    total = 20 + len(payload)
    return (struct.pack("!BBHHHBBH", 0x45, 0, total, 0, 0, 64, 17, 0) + socket.inet_aton(source)
            + socket.inet_aton(destination) + payload)


def seal(key: bytes, index: int, counter: int, packet: bytes) -> bytes:
    padded = packet + bytes(fastpath.padded_len(len(packet)) - len(packet))
    header = struct.pack("<IIQ", 4, index, counter)
    return header + fastpath.aead_seal(key, bytes(4) + header[8:], padded)


class Bed:
    """A hop between a fake TUN (socketpair) and a UDP socket talking to a 'peer' socket."""

    def __init__(self, vnet: bool) -> None:
        code = {"openssl": lib.PYWG_FP_OPENSSL, "portable": lib.PYWG_FP_PORTABLE}[fastpath.BACKEND]
        self.vnet = vnet
        self.hop = ffi.gc(lib.pywg_hop_new(code, int(vnet)), lib.pywg_hop_free)
        self.kernel, self.tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.tun.setblocking(False)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind(("127.0.0.1", 0))
        self.peer.settimeout(2)
        self.buf = ffi.new("uint8_t[]", lib.PYWG_HOP_BUFFER)
        self.turn_buf = ffi.new("uint8_t[]", lib.PYWG_HOP_BUFFER)
        self.result = ffi.new("pywg_hop_result *")
        # 10.0.0.0/24 is the peer's (slot 3), the rest nobody's.
        starts = b"".join(socket.inet_aton(a) for a in ("0.0.0.0", "10.0.0.0", "10.0.1.0"))
        assert lib.pywg_hop_set_routes(self.hop, 4, 3, starts, ffi.new("int32_t[]", [-1, 3, -1])) == 0
        assert lib.pywg_hop_set_routes(self.hop, 6, 1, bytes(16), ffi.new("int32_t[]", [-1])) == 0

    def close(self) -> None:
        for sock in (self.kernel, self.tun, self.udp, self.peer):
            sock.close()

    def frame(self, packet: bytes, header: bytes | None = None) -> bytes:
        return ((header if header is not None else bytes(10)) + packet) if self.vnet else packet

    def arm_send(self, first: int = 100, count: int = 2, until: int = FAR) -> None:
        address = hop_module.sockaddr(self.peer.getsockname())
        assert lib.pywg_hop_arm_send(self.hop, 3, KEY_AB, 0xAABBCCDD, first, count, until, self.udp.fileno(),
                                     address, len(address)) == 0

    def arm_receive(self, greatest: int = 0, until: int = FAR) -> None:
        address = hop_module.sockaddr(self.peer.getsockname())
        bitmap = ffi.new("uint64_t[]", WORDS)
        assert lib.pywg_hop_arm_receive(self.hop, 3, 7, KEY_BA, until, greatest, bitmap, address,
                                        len(address)) == 0

    def out(self, most: int = 1, lock: int = lib.PYWG_HOP_LOCK_WAIT) -> int:
        return lib.pywg_hop_pump(self.hop, self.tun.fileno(), self.buf, len(self.buf), lock, most, self.result)

    def receive(self, turn: bool = True, most: int = 1) -> int:
        return lib.pywg_hop_in(self.hop, self.udp.fileno(), self.tun.fileno(), self.buf, len(self.buf),
                               self.turn_buf, len(self.turn_buf), int(turn), most, self.result)

    def delivered(self) -> list[tuple[int, int, int, int, int, int]]:
        """(slot, index, datagrams, wire, carried, frames) of each session in the result."""
        r = self.result
        return [(g.slot, g.index, g.datagrams, g.wire, g.carried, g.frames)
                for g in (r.received[i] for i in range(r.nreceived))]

    def to_hop(self, datagram: bytes) -> None:
        self.peer.sendto(datagram, self.udp.getsockname())

    def tun_got(self) -> bytes:
        self.kernel.settimeout(2)
        return self.kernel.recv(70000)


@pytest.fixture(params=[False, True], ids=["plain-tun", "vnet-tun"])
def bed(request: Any) -> Iterator[Bed]:
    b = Bed(request.param)
    yield b
    b.close()


def open_datagram(datagram: bytes, key: bytes = KEY_AB) -> tuple[int, int, bytes]:
    kind, index, counter = struct.unpack_from("<IIQ", datagram)
    assert kind == 4
    plaintext = fastpath.aead_open(key, bytes(4) + datagram[8:16], datagram[16:])
    assert plaintext is not None, "the hop's datagram did not authenticate"
    return index, counter, plaintext


def test_out_seals_a_routed_packet_with_the_reserved_counters(bed: Bed) -> None:
    bed.arm_send(first=100, count=2)
    packet = ipv4_packet("10.9.0.1", "10.0.0.5")
    for counter in (100, 101):
        bed.kernel.send(bed.frame(packet))
        assert bed.out() == lib.PYWG_HOP_HANDLED  # one frame, as asked
        r = bed.result
        datagram, _ = bed.peer.recvfrom(70000)
        assert r.nsent == 1
        group = r.sent[0]
        assert (group.slot, group.index, group.packets, group.wire, group.err) == (3, 0xAABBCCDD, 1,
                                                                                   len(datagram), 0)
        index, got_counter, plaintext = open_datagram(datagram)
        assert (index, got_counter) == (0xAABBCCDD, counter)
        assert plaintext == packet + bytes(len(plaintext) - len(packet))  # padded to 16
        assert len(plaintext) % 16 == 0
    # The block is used up: the next one is Python's, the TUN lock still held.
    assert lib.pywg_hop_send_left(bed.hop, 3) == 0
    bed.kernel.send(bed.frame(packet))
    assert bed.out() == lib.PYWG_HOP_PYTHON
    assert bed.result.nsent == 0
    assert bytes(ffi.buffer(bed.buf, bed.result.length)) == bed.frame(packet)
    assert lib.pywg_hop_tun_lock(bed.hop, 0) == 0  # held
    lib.pywg_hop_tun_unlock(bed.hop)
    assert bed.out() == lib.PYWG_HOP_EMPTY
    assert lib.pywg_hop_tun_lock(bed.hop, 0) == 1  # released
    lib.pywg_hop_tun_unlock(bed.hop)


@pytest.mark.parametrize("case", ["unrouted", "revoked", "disabled", "expired", "invalid-ip"])
def test_out_leaves_to_python_what_it_cannot_send(bed: Bed, case: str) -> None:
    check_left_to_python(bed, case)


def test_out_leaves_offload_frames_to_python() -> None:
    """A super-packet or a packet whose checksum the kernel left to finish is split by Python."""
    bed = Bed(vnet=True)
    try:
        check_left_to_python(bed, "offload-header")
    finally:
        bed.close()


def check_left_to_python(bed: Bed, case: str) -> None:
    bed.arm_send(until=1 if case == "expired" else FAR)
    packet = ipv4_packet("10.9.0.1", "10.0.1.5" if case == "unrouted" else "10.0.0.5")
    if case == "revoked":
        lib.pywg_hop_revoke_send(bed.hop, 3)
    if case == "disabled":
        lib.pywg_hop_disable(bed.hop)
    if case == "invalid-ip":
        packet = packet[:2] + struct.pack("!H", 999) + packet[4:]  # claims more than it has
    header = bytes([1, 1]) + bytes(8) if case == "offload-header" else None
    bed.kernel.send(bed.frame(packet, header))
    assert bed.out() == lib.PYWG_HOP_PYTHON
    lib.pywg_hop_tun_unlock(bed.hop)
    with pytest.raises(BlockingIOError):
        bed.peer.setblocking(False)
        bed.peer.recv(70000)


def test_out_sends_a_run_of_lone_packets_and_stops_at_pythons(bed: Bed) -> None:
    """Lone packets queued together go out in one call, accounted by session; the first
    frame it cannot send stops it, in order."""
    bed.arm_send(first=0, count=10)
    packets = [ipv4_packet("10.9.0.1", f"10.0.0.{i}", bytes([i]) * 30) for i in range(1, 5)]
    unrouted = ipv4_packet("10.9.0.1", "10.0.1.1")
    for packet in [*packets, unrouted, packets[0]]:
        bed.kernel.send(bed.frame(packet))
    assert bed.out(most=64) == lib.PYWG_HOP_PYTHON
    r = bed.result
    assert r.nsent == 1 and r.sent[0].packets == 4
    assert bytes(ffi.buffer(bed.buf, r.length)) == bed.frame(unrouted)
    got = [open_datagram(bed.peer.recvfrom(70000)[0]) for _ in packets]
    assert [counter for _, counter, _ in got] == [0, 1, 2, 3]
    assert [plaintext[:len(p)] for (_, _, plaintext), p in zip(got, packets, strict=True)] == packets
    assert r.sent[0].wire == sum(32 + fastpath.padded_len(len(p)) for p in packets)
    # The caller holds the lock; it pumps on without waiting for it.
    assert bed.out(most=64, lock=lib.PYWG_HOP_LOCK_HELD) == lib.PYWG_HOP_EMPTY
    assert bed.result.nsent == 1 and bed.result.sent[0].packets == 1
    assert lib.pywg_hop_tun_lock(bed.hop, 0) == 0  # still the caller's
    lib.pywg_hop_tun_unlock(bed.hop)
    assert bed.out(lock=lib.PYWG_HOP_LOCK_TRY) == lib.PYWG_HOP_EMPTY
    assert lib.pywg_hop_tun_lock(bed.hop, 1) == 1
    assert bed.out(lock=lib.PYWG_HOP_LOCK_TRY) == lib.PYWG_HOP_BUSY
    lib.pywg_hop_tun_unlock(bed.hop)


def udp_needing_checksum(destination: str) -> tuple[bytes, bytes]:
    """An IPv4/UDP packet as a TUN with offloads gives it (the checksum field holding the
    pseudo-header sum) and its virtio-net header asking us to finish the checksum."""
    payload = b"checksum me" * 7
    length = 8 + len(payload)
    src, dst = socket.inet_aton("10.9.0.1"), socket.inet_aton(destination)
    pseudo = 0xFFFF ^ internet_checksum(src + dst + struct.pack("!BBH", 0, 17, length))  # the sum, not folded
    udp = struct.pack("!HHHH", 5353, 53, length, pseudo) + payload
    ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + length, 0, 0, 64, 17, 0) + src + dst
    header = struct.pack("<BBHHHH", 1, 0, 0, 0, 20, 6)  # NEEDS_CSUM, start 20, offset 6
    return header, ip + udp


def test_out_finishes_the_checksum_the_kernel_left() -> None:
    bed = Bed(vnet=True)
    try:
        bed.arm_send(first=0, count=4)
        header, packet = udp_needing_checksum("10.0.0.5")
        bed.kernel.send(header + packet)
        assert bed.out() == lib.PYWG_HOP_HANDLED
        _, _, plaintext = open_datagram(bed.peer.recvfrom(70000)[0])
        sent = plaintext[:len(packet)]
        assert sent[:26] == packet[:26] and sent[28:] == packet[28:]  # only the checksum changed
        pseudo = sent[12:20] + struct.pack("!BBH", 0, 17, len(packet) - 20)
        assert internet_checksum(pseudo + sent[20:]) == 0, "UDP checksum does not verify"
        # A frame left to Python is left as the kernel wrote it (Python finishes it).
        header, packet = udp_needing_checksum("10.0.1.5")
        bed.kernel.send(header + packet)
        assert bed.out() == lib.PYWG_HOP_PYTHON
        assert bytes(ffi.buffer(bed.buf, bed.result.length)) == header + packet
        lib.pywg_hop_tun_unlock(bed.hop)
        # A checksum position beyond the packet: Python's (which counts it as invalid).
        bed.kernel.send(struct.pack("<BBHHHH", 1, 0, 0, 0, 20, 600) + packet)
        assert bed.out() == lib.PYWG_HOP_PYTHON
        lib.pywg_hop_tun_unlock(bed.hop)
    finally:
        bed.close()


@pytest.mark.parametrize("gso", [True, False])
def test_out_sends_packets_read_together_in_one_gso_send(bed: Bed, gso: bool) -> None:
    """Packets to one peer read in one call leave in one UDP GSO send (the peer, reading with
    UDP_GRO on loopback, gets them as one run), in order, the shorter last one included."""
    lib.pywg_hop_set_gso(bed.hop, int(gso))
    bed.peer.setsockopt(socket.SOL_UDP, offload.UDP_GRO, 1)
    bed.arm_send(first=0, count=100)
    packets = [ipv4_packet("10.9.0.1", "10.0.0.5", bytes([i]) * 200) for i in range(5)]
    packets.append(ipv4_packet("10.9.0.1", "10.0.0.5", b"short"))
    for packet in packets:
        bed.kernel.send(bed.frame(packet))
    assert bed.out(most=64) == lib.PYWG_HOP_EMPTY
    assert bed.result.nsent == 1 and bed.result.sent[0].packets == 6 and bed.result.sent[0].err == 0
    reads = []
    bed.peer.settimeout(1)
    while sum(len(r[0]) for r in reads) < bed.result.sent[0].wire:
        data, ancdata, _, _ = bed.peer.recvmsg(70000, socket.CMSG_SPACE(2))
        reads.append((data, offload.gro_segment_size(ancdata)))
    stride = 32 + fastpath.padded_len(len(packets[0]))
    if gso:
        assert len(reads) == 1 and reads[0][1] == stride
        datagrams = [reads[0][0][i:i + stride] for i in range(0, len(reads[0][0]), stride)]
    else:
        assert len(reads) == 6
        datagrams = [data for data, _ in reads]
    opened = [open_datagram(d) for d in datagrams]
    assert [counter for _, counter, _ in opened] == list(range(6))
    assert [plaintext[:len(p)] for (_, _, plaintext), p in zip(opened, packets, strict=True)] == packets


def test_in_delivers_a_lone_message_once(bed: Bed) -> None:
    bed.arm_receive()
    packet = ipv4_packet("10.0.0.9", "10.9.0.1")
    datagram = seal(KEY_BA, 7, 5, packet)
    bed.to_hop(datagram)
    assert bed.receive(turn=False) == lib.PYWG_HOP_HANDLED
    r = bed.result
    assert bed.delivered() == [(3, 7, 1, len(datagram), 1, 1)]
    assert (r.err, r.turn, r.reads) == (0, lib.PYWG_HOP_NONE, 1)
    assert hop_module.endpoint_of(bytes(ffi.buffer(r.source, r.source_len))) == bed.peer.getsockname()
    assert bed.tun_got() == bed.frame(packet)
    # The same datagram again: replayed, left to Python (which counts it), nothing written.
    bed.to_hop(datagram)
    assert bed.receive() == lib.PYWG_HOP_PYTHON
    assert bytes(ffi.buffer(bed.buf, bed.result.length)) == datagram
    # The filter comes back to Python with counter 5 in it.
    greatest, bitmap = ffi.new("uint64_t *"), ffi.new("uint64_t[]", WORDS)
    assert lib.pywg_hop_reclaim(bed.hop, 7, greatest, bitmap) == 1
    python = ReplayFilter()
    python.import_state(greatest[0], list(bitmap))
    assert not python.validate(5) and python.validate(4) and python.validate(6)
    assert lib.pywg_hop_reclaim(bed.hop, 7, greatest, bitmap) == 0


def test_in_carries_many_lone_messages_a_call_and_stops_at_pythons(bed: Bed) -> None:
    """Datagrams a peer sent one by one (wireguard-go, the kernel) cross many a call,
    accounted per session; the first one for Python (here a STUN message) stops the call,
    in order."""
    bed.arm_receive()
    packets = [ipv4_packet("10.0.0.9", "10.9.0.1", bytes([i]) * 40) for i in range(5)]
    datagrams = [seal(KEY_BA, 7, 20 + i, p) for i, p in enumerate(packets)]
    _, stun_message = binding_request(bytes)
    for datagram in [*datagrams[:3], stun_message, *datagrams[3:]]:
        bed.to_hop(datagram)
    assert bed.receive(turn=False, most=64) == lib.PYWG_HOP_PYTHON
    assert bed.delivered() == [(3, 7, 3, sum(map(len, datagrams[:3])), 1, 3)]
    assert bytes(ffi.buffer(bed.buf, bed.result.length)) == stun_message and bed.result.reads == 4
    assert [bed.tun_got() for _ in range(3)] == [bed.frame(p) for p in packets[:3]]
    assert bed.receive(turn=False, most=64) == lib.PYWG_HOP_HANDLED
    assert bed.delivered() == [(3, 7, 2, sum(map(len, datagrams[3:])), 1, 2)]
    assert bed.receive(turn=False, most=64) == lib.PYWG_HOP_EMPTY


def backlog_take(bed: Bed) -> tuple[bytes, tuple[str, int]] | None:
    buf, source, source_len = ffi.new("uint8_t[]", 148), ffi.new("uint8_t[]", 28), ffi.new("uint32_t *")
    length = lib.pywg_hop_backlog_take(bed.hop, buf, 148, source, source_len)
    if length < 0:
        return None
    return bytes(ffi.buffer(buf, length)), hop_module.endpoint_of(bytes(ffi.buffer(source, source_len[0])))


def test_in_queues_handshake_messages_and_reads_on(bed: Bed) -> None:
    """A handshake message (an initiation, a response, a cookie reply, at its size) goes to
    the backlog and the call goes on reading: transport packets behind it are on the TUN
    in the same call; the inbound thread takes the messages later, in order, with their
    sources. Wrong sizes are not handshakes: Python's (the screen's) to judge."""
    bed.arm_receive()
    packets = [ipv4_packet("10.0.0.9", "10.9.0.1", bytes([i]) * 40) for i in range(4)]
    datagrams = [seal(KEY_BA, 7, 20 + i, p) for i, p in enumerate(packets)]
    initiation, response, cookie = b"\x01\0\0\0" + bytes(144), b"\x02\0\0\0" + bytes(88), b"\x03\0\0\0" + bytes(60)
    for datagram in [datagrams[0], initiation, datagrams[1], response, cookie, *datagrams[2:]]:
        bed.to_hop(datagram)
    assert bed.receive(turn=False, most=64) == lib.PYWG_HOP_HANDLED
    assert bed.result.reads == 7 and [bed.tun_got() for _ in range(4)] == [bed.frame(p) for p in packets]
    assert lib.pywg_hop_backlog_count(bed.hop) == 3
    source = bed.peer.getsockname()
    assert [backlog_take(bed) for _ in range(4)] == [(initiation, source), (response, source), (cookie, source), None]
    assert lib.pywg_hop_backlog_count(bed.hop) == 0
    bed.to_hop(b"\x01\0\0\0" + bytes(143))  # one byte short of an initiation
    assert bed.receive(turn=False, most=64) == lib.PYWG_HOP_PYTHON
    assert lib.pywg_hop_backlog_count(bed.hop) == 0


def test_a_full_backlog_drops_and_counts_but_takes_a_known_peer_first(bed: Bed) -> None:
    """A flood from another address fills the backlog; what does not fit is dropped and
    counted, transport still crosses, and an initiation from the address of the peer the
    hop is armed for (one that lost its session) gets in all the same, and is taken first."""
    bed.udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    bed.arm_receive()
    flooder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flooder.bind(("127.0.0.1", 0))
    flood_source = flooder.getsockname()
    initiation = b"\x01\0\0\0" + bytes(144)
    extra = 7
    try:
        for n in range(0, lib.PYWG_HOP_BACKLOG + extra, 256):
            for _ in range(min(256, lib.PYWG_HOP_BACKLOG + extra - n)):
                flooder.sendto(initiation, bed.udp.getsockname())
            while bed.receive(turn=False, most=64) != lib.PYWG_HOP_EMPTY:
                pass
    finally:
        flooder.close()
    assert lib.pywg_hop_backlog_count(bed.hop) == lib.PYWG_HOP_BACKLOG
    assert lib.pywg_hop_backlog_full(bed.hop) == extra
    packet = ipv4_packet("10.0.0.9", "10.9.0.1", b"through")
    bed.to_hop(seal(KEY_BA, 7, 1, packet))
    assert bed.receive(turn=False, most=64) == lib.PYWG_HOP_HANDLED
    assert bed.tun_got() == bed.frame(packet)
    mine = b"\x01\0\0\0" + b"\x01" * 144
    bed.to_hop(mine)  # from the armed peer's address
    while bed.receive(turn=False, most=64) != lib.PYWG_HOP_EMPTY:
        pass
    assert lib.pywg_hop_backlog_count(bed.hop) == lib.PYWG_HOP_BACKLOG + 1
    assert lib.pywg_hop_backlog_full(bed.hop) == extra
    assert backlog_take(bed) == (mine, bed.peer.getsockname())
    assert backlog_take(bed) == (initiation, flood_source)


def test_in_keepalive_is_accounted_not_written(bed: Bed) -> None:
    bed.arm_receive()
    bed.to_hop(seal(KEY_BA, 7, 0, b""))
    assert bed.receive() == lib.PYWG_HOP_HANDLED
    assert bed.delivered() == [(3, 7, 1, 32, 0, 0)]
    bed.kernel.setblocking(False)
    with pytest.raises(BlockingIOError):
        bed.kernel.recv(100)


@pytest.mark.parametrize("case", ["bad-tag", "unknown-index", "other-source", "source-not-allowed", "not-ip",
                                  "disabled", "expired", "handshake", "short"])
def test_in_leaves_to_python_what_it_cannot_deliver(bed: Bed, case: str) -> None:
    bed.arm_receive(until=1 if case == "expired" else FAR)
    source = "10.0.1.9" if case == "source-not-allowed" else "10.0.0.9"
    packet = ipv4_packet(source, "10.9.0.1")
    if case == "not-ip":
        packet = b"\x00" * 40
    datagram = seal(KEY_BA, 99 if case == "unknown-index" else 7, 5, packet)
    if case == "bad-tag":
        datagram = datagram[:-1] + bytes([datagram[-1] ^ 1])
    if case == "handshake":
        datagram = b"\x01\x00\x00\x00" + datagram[4:]
    if case == "short":
        datagram = datagram[:31]
    if case == "disabled":
        lib.pywg_hop_disable(bed.hop)
    sender = bed.peer
    if case == "other-source":
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.bind(("127.0.0.1", 0))
    sender.sendto(datagram, bed.udp.getsockname())
    assert bed.receive() == lib.PYWG_HOP_PYTHON
    assert bytes(ffi.buffer(bed.buf, bed.result.length)) == datagram  # untouched
    bed.kernel.setblocking(False)
    with pytest.raises(BlockingIOError):
        bed.kernel.recv(100)
    # Nothing was recorded: counter 5 is still fresh for Python.
    greatest, bitmap = ffi.new("uint64_t *"), ffi.new("uint64_t[]", WORDS)
    assert lib.pywg_hop_reclaim(bed.hop, 7, greatest, bitmap) == 1
    assert greatest[0] == 0
    if sender is not bed.peer:
        sender.close()


def test_in_takes_a_turn_at_the_tun(bed: Bed) -> None:
    """The answer the kernel queued (here, queued beforehand) leaves in the same call."""
    bed.arm_receive()
    bed.arm_send(first=40)
    answer = ipv4_packet("10.9.0.1", "10.0.0.9", b"pong" * 10)
    bed.kernel.send(bed.frame(answer))
    bed.to_hop(seal(KEY_BA, 7, 1, ipv4_packet("10.0.0.9", "10.9.0.1")))
    assert bed.receive(turn=True) == lib.PYWG_HOP_HANDLED
    r = bed.result
    assert (r.turn, r.turn_err, r.nsent) == (lib.PYWG_HOP_EMPTY, 0, 1)
    datagram, _ = bed.peer.recvfrom(70000)
    assert (r.sent[0].slot, r.sent[0].index, r.sent[0].packets, r.sent[0].wire) == (3, 0xAABBCCDD, 1, len(datagram))
    index, counter, plaintext = open_datagram(datagram)
    assert index == 0xAABBCCDD and counter == 40 and plaintext[:len(answer)] == answer
    # A turn it cannot send is Python's, with the TUN lock held.
    bed.kernel.send(bed.frame(ipv4_packet("10.9.0.1", "10.0.1.1")))  # unrouted
    bed.to_hop(seal(KEY_BA, 7, 2, ipv4_packet("10.0.0.9", "10.9.0.1")))
    assert bed.receive(turn=True) == lib.PYWG_HOP_HANDLED
    assert bed.result.turn == lib.PYWG_HOP_PYTHON
    assert bytes(ffi.buffer(bed.turn_buf, bed.result.turn_length)) == bed.frame(ipv4_packet("10.9.0.1", "10.0.1.1"))
    assert lib.pywg_hop_tun_lock(bed.hop, 0) == 0
    lib.pywg_hop_tun_unlock(bed.hop)
    # No turn while another thread holds the TUN.
    assert lib.pywg_hop_tun_lock(bed.hop, 1) == 1
    bed.to_hop(seal(KEY_BA, 7, 3, ipv4_packet("10.0.0.9", "10.9.0.1")))
    assert bed.receive(turn=True) == lib.PYWG_HOP_HANDLED
    assert bed.result.turn == lib.PYWG_HOP_BUSY
    lib.pywg_hop_tun_unlock(bed.hop)


def test_routes_must_ascend(bed: Bed) -> None:
    starts = socket.inet_aton("10.0.0.0") + socket.inet_aton("0.0.0.0")
    assert lib.pywg_hop_set_routes(bed.hop, 4, 2, starts, ffi.new("int32_t[]", [1, 2])) == -1
    assert lib.pywg_hop_set_routes(bed.hop, 5, 1, bytes(4), ffi.new("int32_t[]", [1])) == -1


def test_sockaddr_round_trip() -> None:
    for endpoint in (("192.0.2.1", 51820), ("2001:db8::1", 1), ("::ffff:192.0.2.1", 65535)):
        assert hop_module.endpoint_of(hop_module.sockaddr(endpoint)) == endpoint


# --- runs (UDP_GRO reads) -----------------------------------------------------------------


def gro_bed() -> Bed:
    bed = Bed(vnet=True)
    bed.udp.setsockopt(socket.SOL_UDP, offload.UDP_GRO, 1)
    return bed


def send_run(bed: Bed, messages: list[bytes]) -> None:
    """One UDP GSO send: the hop's socket reads it back as one UDP_GRO run."""
    segment = len(messages[0])
    bed.peer.sendmsg([b"".join(messages)], offload.gso_cmsg(segment), 0, bed.udp.getsockname())


def run_of(first: int, count: int, source: str = "10.0.0.9") -> tuple[list[bytes], list[bytes]]:
    packets = [ipv4_packet(source, "10.9.0.1", bytes([i]) * 60) for i in range(count)]
    return packets, [seal(KEY_BA, 7, first + i, p) for i, p in enumerate(packets)]


def test_in_carries_a_whole_run() -> None:
    bed = gro_bed()
    try:
        bed.arm_receive()
        packets, messages = run_of(10, 12)
        send_run(bed, messages)
        assert bed.receive(turn=False) == lib.PYWG_HOP_HANDLED
        assert bed.delivered() == [(3, 7, 12, sum(map(len, messages)), 1, 12)]
        assert (bed.result.err, bed.result.reads) == (0, 1)
        # UDP packets are not merged: one frame each, in order, with an empty vnet header
        assert [bed.tun_got() for _ in packets] == [bytes(10) + p for p in packets]
        # The same run again is replayed: Python's, untouched
        send_run(bed, messages)
        assert bed.receive() == lib.PYWG_HOP_PYTHON
        assert bed.result.segment == len(messages[0])
        assert bytes(ffi.buffer(bed.buf, bed.result.length)) == b"".join(messages)
        greatest, bitmap = ffi.new("uint64_t *"), ffi.new("uint64_t[]", WORDS)
        assert lib.pywg_hop_reclaim(bed.hop, 7, greatest, bitmap) == 1
        python = ReplayFilter()
        python.import_state(greatest[0], list(bitmap))
        assert [python.validate(c) for c in (9, 10, 21, 22)] == [True, False, False, True]
    finally:
        bed.close()


@pytest.mark.parametrize("case", ["gap", "forged", "other-session", "source-not-allowed", "not-fresh",
                                  "mixed-sources"])
def test_in_leaves_an_unusual_run_to_python(case: str) -> None:
    bed = gro_bed()
    try:
        bed.arm_receive(greatest=50 if case == "not-fresh" else 0)
        packets, messages = run_of(40, 6, "10.0.1.9" if case == "source-not-allowed" else "10.0.0.9")
        if case == "gap":
            messages[3] = seal(KEY_BA, 7, 99, packets[3])
        if case == "forged":
            messages[4] = messages[4][:-1] + bytes([messages[4][-1] ^ 1])
        if case == "other-session":
            messages[2] = b"\x04\x00\x00\x00" + struct.pack("<I", 8) + messages[2][8:]
        if case == "mixed-sources":
            messages[5] = seal(KEY_BA, 7, 45, ipv4_packet("10.0.0.10", "10.9.0.1", bytes([5]) * 60))
        send_run(bed, messages)
        assert bed.receive() == lib.PYWG_HOP_PYTHON
        assert bytes(ffi.buffer(bed.buf, bed.result.length)) == b"".join(messages)  # untouched
        bed.kernel.setblocking(False)
        with pytest.raises(BlockingIOError):
            bed.kernel.recv(100)
        greatest, bitmap = ffi.new("uint64_t *"), ffi.new("uint64_t[]", WORDS)
        assert lib.pywg_hop_reclaim(bed.hop, 7, greatest, bitmap) == 1
        assert greatest[0] == (50 if case == "not-fresh" else 0)  # the filter as it was
    finally:
        bed.close()


def test_in_leaves_runs_to_python_without_a_vnet_tun() -> None:
    """Coalescing needs the TUN's virtio-net header: without it a run is Python's."""
    bed = Bed(vnet=False)
    try:
        bed.udp.setsockopt(socket.SOL_UDP, offload.UDP_GRO, 1)
        bed.arm_receive()
        _, messages = run_of(0, 4)
        send_run(bed, messages)
        assert bed.receive() == lib.PYWG_HOP_PYTHON
        assert bed.result.segment == len(messages[0])
    finally:
        bed.close()


# --- hostile input ------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=5), st.booleans())
def test_hostile_datagrams_never_reach_the_tun(payloads: list[bytes], transport_header: bool) -> None:
    """Whatever arrives (lone or as a GRO run, with a plausible header for the armed
    session or not), nothing that did not authenticate is written or recorded."""
    bed = gro_bed()
    try:
        bed.arm_receive()
        if transport_header:
            payloads = [struct.pack("<IIQ", 4, 7, i) + p for i, p in enumerate(payloads)]
        if len(payloads) > 1 and len({len(p) for p in payloads[:-1]}) == 1 and payloads[0] \
                and 0 < len(payloads[-1]) <= len(payloads[0]):
            send_run(bed, payloads)
        else:
            for p in payloads:
                bed.peer.sendto(p, bed.udp.getsockname())
        while (kind := bed.receive()) != lib.PYWG_HOP_EMPTY:
            assert kind == lib.PYWG_HOP_PYTHON
        bed.kernel.setblocking(False)
        with pytest.raises(BlockingIOError):
            bed.kernel.recv(100)
        greatest, bitmap = ffi.new("uint64_t *"), ffi.new("uint64_t[]", WORDS)
        assert lib.pywg_hop_reclaim(bed.hop, 7, greatest, bitmap) == 1 and greatest[0] == 0
    finally:
        bed.close()


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=200), st.binary(min_size=10, max_size=10))
def test_hostile_tun_frames_are_sent_only_when_sound(packet: bytes, header: bytes) -> None:
    """A frame the hop sends is a valid IP packet to the armed peer with a header asking
    nothing but a checksum; everything else is Python's (which counts it)."""
    bed = Bed(vnet=True)
    try:
        bed.arm_send(first=0, count=1000)
        bed.kernel.send(header + packet)
        kind = bed.out()
        if kind == lib.PYWG_HOP_PYTHON:
            assert bytes(ffi.buffer(bed.buf, bed.result.length)) == header + packet
            lib.pywg_hop_tun_unlock(bed.hop)
        else:
            assert kind == lib.PYWG_HOP_HANDLED
            assert header[1] == 0 and header[0] in (0, 1)
            assert packet[0] >> 4 in (4, 6) and len(packet) >= 20
            _, _, plaintext = open_datagram(bed.peer.recvfrom(70000)[0])
            assert len(plaintext) >= len(packet)
    finally:
        bed.close()


# --- waiting in C -------------------------------------------------------------------------


def test_pump_wait_sends_what_wakes_it_and_hears_the_wake_pipe(bed: Bed) -> None:
    bed.arm_send(first=0, count=10)
    wake_r, wake_w = os.pipe()
    try:
        packet = ipv4_packet("10.9.0.1", "10.0.0.5")
        timer = threading.Timer(0.05, bed.kernel.send, [bed.frame(packet)])
        timer.start()
        started = time.monotonic()
        kind = lib.pywg_hop_pump_wait(bed.hop, bed.tun.fileno(), wake_r, 2000, bed.buf, len(bed.buf), 64,
                                      bed.result)
        timer.join()
        assert kind == lib.PYWG_HOP_EMPTY and bed.result.nsent == 1 and bed.result.sent[0].packets == 1
        assert time.monotonic() - started < 1.5
        assert open_datagram(bed.peer.recvfrom(70000)[0])[2][:len(packet)] == packet
        os.write(wake_w, b"x")
        assert lib.pywg_hop_pump_wait(bed.hop, bed.tun.fileno(), wake_r, 2000, bed.buf, len(bed.buf), 64,
                                      bed.result) == lib.PYWG_HOP_EMPTY
        assert bed.result.woken == 1 and bed.result.nsent == 0
        os.read(wake_r, 1)
        started = time.monotonic()
        assert lib.pywg_hop_pump_wait(bed.hop, bed.tun.fileno(), wake_r, 50, bed.buf, len(bed.buf), 64,
                                      bed.result) == lib.PYWG_HOP_EMPTY
        assert bed.result.woken == 0 and time.monotonic() - started >= 0.04  # the timeout
    finally:
        os.close(wake_r)
        os.close(wake_w)


def test_in_wait_carries_what_wakes_it_from_any_socket(bed: Bed) -> None:
    bed.arm_receive()
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.1", 0))
    wake_r, wake_w = os.pipe()
    try:
        fds = ffi.new("int[]", [other.fileno(), bed.udp.fileno()])
        packet = ipv4_packet("10.0.0.9", "10.9.0.1")
        timer = threading.Timer(0.05, bed.to_hop, [seal(KEY_BA, 7, 3, packet)])
        timer.start()
        kind = lib.pywg_hop_in_wait(bed.hop, fds, 2, wake_r, 2000, bed.tun.fileno(), bed.buf, len(bed.buf),
                                    bed.turn_buf, len(bed.turn_buf), 0, 64, bed.result)
        timer.join()
        assert kind == lib.PYWG_HOP_HANDLED and bed.result.sock == 1 and bed.result.woken == 0
        assert bed.delivered()[0][:3] == (3, 7, 1)
        assert bed.tun_got() == bed.frame(packet)
        os.write(wake_w, b"x")
        assert lib.pywg_hop_in_wait(bed.hop, fds, 2, wake_r, 2000, bed.tun.fileno(), bed.buf, len(bed.buf),
                                    bed.turn_buf, len(bed.turn_buf), 0, 64, bed.result) == lib.PYWG_HOP_EMPTY
        assert bed.result.woken == 1
        too_many = ffi.new("int[]", [other.fileno()] * 5)
        assert lib.pywg_hop_in_wait(bed.hop, too_many, 5, wake_r, 10, bed.tun.fileno(), bed.buf, len(bed.buf),
                                    bed.turn_buf, len(bed.turn_buf), 0, 64, bed.result) == lib.PYWG_HOP_EMPTY
    finally:
        other.close()
        os.close(wake_r)
        os.close(wake_w)


# --- differential: the hop's routes and inner lengths against the engine's -----------------------

PEERS = [f"peer{i}" for i in range(5)]
prefixes4 = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32))
prefixes6 = st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128))


def network(version: int, value: int, length: int) -> str:
    """The prefix of ``length`` bits of ``value`` (host bits cleared)."""
    width = 32 if version == 4 else 128
    masked = value >> (width - length) << (width - length)
    return str(ipaddress.IPv4Network((masked, length)) if version == 4 else ipaddress.IPv6Network((masked, length)))


def hop_with_routes(table: Any) -> Any:
    """A hop given the table's runs as the device gives them (peer i: slot i)."""
    code = {"openssl": lib.PYWG_FP_OPENSSL, "portable": lib.PYWG_FP_PORTABLE}[fastpath.BACKEND]
    hop = ffi.gc(lib.pywg_hop_new(code, 0), lib.pywg_hop_free)
    for version, width in ((4, 4), (6, 16)):
        starts, peers = table.runs(version)
        packed = b"".join(start.to_bytes(width, "big") for start in starts)
        slots = ffi.new("int32_t[]", [-1 if p is None else PEERS.index(p) for p in peers])
        assert lib.pywg_hop_set_routes(hop, version, len(starts), packed, slots) == 0
    return hop


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(PEERS), st.one_of(prefixes4.map(lambda p: (4, *p)),
                                                            prefixes6.map(lambda p: (6, *p)))), max_size=24),
       st.lists(st.integers(0, 23), max_size=6),
       st.lists(st.one_of(st.integers(0, 2**32 - 1).map(lambda v: (4, v)),
                          st.integers(0, 2**128 - 1).map(lambda v: (6, v))), max_size=16))
def test_the_hop_routes_every_address_to_the_peer_the_engine_does(
        inserts: list[tuple[str, tuple[int, int, int]]], removals: list[int], probes: list[tuple[int, int]]) -> None:
    """Random allowed-IPs tables (inserts taking prefixes from other peers, removals), then
    addresses at every run boundary, next to each, and random ones: the hop's route lookup (C,
    on the runs the device hands it) names the same peer as AllowedIPs.lookup."""
    table: AllowedIPs[str] = AllowedIPs()
    made = []
    for peer, (version, value, length) in inserts:
        net = network(version, value, length)
        table.insert(net, peer)
        made.append((net, peer))
    for k in removals:
        if k < len(made):
            table.remove(*made[k])
    hop = hop_with_routes(table)
    addresses = list(probes)
    for version in (4, 6):
        top = 2**(32 if version == 4 else 128) - 1
        for start in table.runs(version)[0]:
            addresses += [(version, a) for a in (start - 1, start, start + 1) if 0 <= a <= top]
        addresses += [(version, 0), (version, top)]
    for version, value in addresses:
        packed = value.to_bytes(4 if version == 4 else 16, "big")
        slot = lib.pywg_hop_route_lookup(hop, version, packed)
        engine = table.lookup(packed)
        assert (PEERS[slot] if slot >= 0 else None) == engine, (version, value, slot, engine)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=80),
                 st.tuples(st.sampled_from([0x45, 0x46, 0x4F, 0x60, 0x6A, 0x50, 0x00]), st.integers(0, 0xFFFF),
                           st.binary(min_size=0, max_size=120)).map(
                     lambda t: bytes([t[0], 0]) + t[1].to_bytes(2, "big") + t[1].to_bytes(2, "big") + t[2])))
def test_the_hop_accepts_the_inner_packets_the_engine_does(packet: bytes) -> None:
    """The length the hop reads from an IPv4/IPv6 header (what it carries, what it leaves)
    is pywg.protocol.inner.inner_length's, on random and on header-shaped bytes."""
    expected = inner_length(packet)
    assert lib.pywg_hop_inner_length(packet, len(packet)) == (-1 if expected is None else expected), packet.hex()
