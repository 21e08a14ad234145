"""TUN offload helpers on crafted super-packets: segmentation (TSO/USO, partial checksums)
and coalescing (GRO), every checksum verified independently of the code under test."""

from __future__ import annotations

import ipaddress
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pywg.device import offload

if not offload.AVAILABLE:
    if os.environ.get("CI") == "true" and os.environ.get("PYWG_PUREPYTHON") != "1":
        pytest.fail("pywg._offload did not build: the native offload module is required under CI=true",
                    pytrace=False)
    pytest.skip("native offload module not built", allow_module_level=True)

TCP_FIN, TCP_PSH, TCP_ACK, TCP_CWR = 0x01, 0x08, 0x10, 0x80


def ref_checksum(data: bytes) -> int:
    """RFC 1071, written plainly (the reference the native code is checked against)."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo(packet: bytes, proto: int, length: int) -> bytes:
    if packet[0] >> 4 == 4:
        return packet[12:20] + struct.pack("!BBH", 0, proto, length)
    return packet[8:40] + struct.pack("!IxxxB", length, proto)


def ip_tcp(payload: bytes, *, v6: bool = False, seq: int = 1000, flags: int = TCP_ACK | TCP_PSH,
           options: bytes = b"\x01\x01\x08\x0a" + bytes(range(8)), src: str = "10.0.0.1",
           dst: str = "10.0.0.2", sport: int = 40000, ack: int = 7, ident: int = 100) -> bytes:
    """A TCP/IP packet with valid checksums."""
    tcp = struct.pack("!HHIIBBHHH", sport, 5201, seq, ack, (20 + len(options)) // 4 << 4, flags, 502, 0, 0)
    tcp += options + payload
    if v6:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, ipaddress.IPv6Address("fd00::1").packed,
                         ipaddress.IPv6Address("fd00::2").packed)
    else:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), ident, 0x4000, 64, 6, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
        ip = ip[:10] + struct.pack("!H", ref_checksum(ip)) + ip[12:]
    check = ref_checksum(pseudo(ip, 6, len(tcp)) + tcp)
    return ip + tcp[:16] + struct.pack("!H", check) + tcp[18:]


def ip_udp(payload: bytes, *, v6: bool = False) -> bytes:
    udp = struct.pack("!HHHH", 5000, 6000, 8 + len(payload), 0) + payload
    if v6:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(udp), 17, 64, ipaddress.IPv6Address("fd00::1").packed,
                         ipaddress.IPv6Address("fd00::2").packed)
    else:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                         bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
        ip = ip[:10] + struct.pack("!H", ref_checksum(ip)) + ip[12:]
    check = ref_checksum(pseudo(ip, 17, len(udp)) + udp) or 0xFFFF
    return ip + udp[:6] + struct.pack("!H", check) + udp[8:]


def vnet(flags: int = 0, gso_type: int = 0, hdr_len: int = 0, gso_size: int = 0, start: int = 0,
         offset: int = 0) -> bytes:
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, start, offset)


def as_tso(packet: bytes, mss: int) -> bytes:
    """The frame the kernel writes for a TSO super-packet: partial pseudo-header checksum."""
    v6 = packet[0] >> 4 == 6
    ihl = 40 if v6 else 20
    hdr = ihl + (packet[ihl + 12] >> 4) * 4
    partial = (~ref_checksum(pseudo(packet, 6, len(packet) - ihl))) & 0xFFFF
    body = packet[:ihl + 16] + struct.pack("!H", partial) + packet[ihl + 18:]
    return vnet(1, 4 if v6 else 1, hdr, mss, ihl, 16) + body


def assert_valid(packet: bytes) -> None:
    """Every checksum in an IPv4/IPv6 TCP or UDP packet verifies, lengths agree."""
    v6 = packet[0] >> 4 == 6
    if v6:
        ihl, proto = 40, packet[6]
        assert struct.unpack_from("!H", packet, 4)[0] + 40 == len(packet)
    else:
        ihl, proto = (packet[0] & 15) * 4, packet[9]
        assert struct.unpack_from("!H", packet, 2)[0] == len(packet)
        assert ref_checksum(packet[:ihl]) == 0
    assert ref_checksum(pseudo(packet, proto, len(packet) - ihl) + packet[ihl:]) == 0


def tcp_fields(packet: bytes) -> tuple[int, int, bytes]:
    ihl = 40 if packet[0] >> 4 == 6 else 20
    seq = struct.unpack_from("!I", packet, ihl + 4)[0]
    hdr = ihl + (packet[ihl + 12] >> 4) * 4
    return seq, packet[ihl + 13], packet[hdr:]


@pytest.mark.parametrize("v6", [False, True], ids=["tcp4", "tcp6"])
@pytest.mark.parametrize("size", [1, 1379, 1380, 1381, 10_000, 64_000 - 80])
def test_tso_split(v6: bool, size: int) -> None:
    payload = os.urandom(size)
    packet = ip_tcp(payload, v6=v6, flags=TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR)
    segments = offload.Splitter().split(as_tso(packet, 1380))
    assert len(segments) == -(-size // 1380)
    got = b""
    for i, segment in enumerate(segments):
        assert_valid(segment)
        seq, flags, data = tcp_fields(segment)
        assert seq == 1000 + len(got)
        last = i == len(segments) - 1
        assert bool(flags & TCP_PSH) == last and bool(flags & TCP_FIN) == last
        assert bool(flags & TCP_CWR) == (i == 0)
        assert len(data) == (1380 if not last else size - 1380 * i)
        got += data
    assert got == payload


@pytest.mark.parametrize("v6", [False, True], ids=["udp4", "udp6"])
def test_uso_split(v6: bool) -> None:
    payload = os.urandom(5000)
    packet = ip_udp(payload, v6=v6)
    segments = offload.Splitter().split(vnet(1, 5, 28, 1200, 40 if v6 else 20, 6) + packet)
    assert [len(s) - (48 if v6 else 28) for s in segments] == [1200, 1200, 1200, 1200, 200]
    for segment in segments:
        assert_valid(segment)
    assert b"".join(s[48 if v6 else 28:] for s in segments) == payload


@pytest.mark.parametrize("make", [ip_tcp, ip_udp], ids=["tcp", "udp"])
def test_partial_checksum_completed(make) -> None:  # type: ignore[no-untyped-def]
    packet = make(os.urandom(333))
    proto = packet[9]
    offset = 16 if proto == 6 else 6
    partial = (~ref_checksum(pseudo(packet, proto, len(packet) - 20))) & 0xFFFF
    frame = packet[:20 + offset] + struct.pack("!H", partial) + packet[22 + offset:]
    [segment] = offload.Splitter().split(vnet(1, 0, 0, 0, 20, offset) + frame)
    assert segment == packet


def test_plain_frame_passes_through() -> None:
    packet = ip_tcp(b"hello")
    assert offload.Splitter().split(offload.plain_frame(packet)) == [packet]


@pytest.mark.parametrize("frame", [
    b"", b"\x00" * 9, vnet(0, 1, 0, 1380) + b"\x45" + bytes(10), vnet(0, 1, 0, 0) + ip_tcp(b"x" * 3000),
    vnet(0, 1, 0, 1) + ip_tcp(b"x" * 3000),  # more than 64 segments
    vnet(0, 1, 0, 1380) + ip_udp(b"x" * 3000),  # TSO type on UDP
    vnet(1, 0, 0, 0, 2000, 16) + ip_tcp(b"x"),  # checksum offset beyond the packet
], ids=["empty", "short", "truncated-ip", "gso0", "too-many", "tso-udp", "csum-oob"])
def test_malformed_frames_are_refused(frame: bytes) -> None:
    with pytest.raises(offload.OffloadError):
        offload.Splitter().split(frame)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=3000))
def test_split_never_crashes(frame: bytes) -> None:
    try:
        segments = offload.Splitter().split(frame)
    except offload.OffloadError:
        return
    assert sum(len(s) for s in segments) <= 64 * 200 + len(frame)


# --- coalescing ------------------------------------------------------------------------


def segments_of(payload: bytes, *, v6: bool = False, mss: int = 1380, **kwargs: object) -> list[bytes]:
    return offload.Splitter().split(as_tso(ip_tcp(payload, v6=v6, **kwargs), mss))  # type: ignore[arg-type]


@pytest.mark.parametrize("v6", [False, True], ids=["tcp4", "tcp6"])
def test_coalesce_then_split_round_trips(v6: bool) -> None:
    payload = os.urandom(40_000)
    segments = segments_of(payload, v6=v6)
    [frame] = offload.Coalescer().coalesce(segments)
    flags, gso_type, hdr_len, gso_size, start, offset = struct.unpack_from("<BBHHHH", frame)
    assert (flags, gso_type, gso_size, offset) == (1, 4 if v6 else 1, 1380, 16)
    assert start == (40 if v6 else 20) and hdr_len == start + 32
    merged = frame[10:]
    assert tcp_fields(merged)[2] == payload
    assert offload.Splitter().split(frame) == segments  # the kernel would cut it back the same


def test_coalesce_keeps_other_packets_and_flows_apart() -> None:
    a = segments_of(os.urandom(5000), sport=1)
    b = segments_of(os.urandom(5000), sport=2)
    udp = ip_udp(b"dns?")
    mixed = [a[0], b[0], udp, a[1], b[1], a[2], a[3], b[2], b[3]]
    frames = offload.Coalescer().coalesce(mixed)
    assert len(frames) == 3
    assert frames[2] == offload.plain_frame(udp)
    assert tcp_fields(frames[0][10:])[2] == b"".join(tcp_fields(s)[2] for s in a)
    assert tcp_fields(frames[1][10:])[2] == b"".join(tcp_fields(s)[2] for s in b)


def test_coalesce_refuses_bad_checksums_gaps_and_syn() -> None:
    segs = segments_of(os.urandom(6000))
    corrupt = bytearray(segs[2])
    corrupt[-1] ^= 1
    frames = offload.Coalescer().coalesce([segs[0], segs[1], bytes(corrupt), segs[3]])
    assert [len(f) for f in frames] == [10 + 52 + 2 * 1380, 10 + len(corrupt), 10 + len(segs[3])]
    assert frames[1][10:] == bytes(corrupt)  # passed on untouched: the kernel will drop it
    gap = offload.Coalescer().coalesce([segs[0], segs[2]])  # a missing segment between them
    assert [f[10:] for f in gap] == [segs[0], segs[2]]
    syn = ip_tcp(b"", flags=0x02)
    assert offload.Coalescer().coalesce([syn]) == [offload.plain_frame(syn)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=200), st.sampled_from(segments_of(bytes(8000)))), max_size=40))
def test_coalesce_never_loses_or_crashes(packets: list[bytes]) -> None:
    frames = offload.Coalescer().coalesce(packets)
    total_in = sum(len(p) for p in packets)
    total_out = sum(len(f) - 10 for f in frames)
    assert total_out <= total_in  # merged headers only shrink the total
    assert len(frames) <= len(packets)


def test_checksum_matches_reference() -> None:
    for size in range(300):
        data = os.urandom(size)
        assert offload.checksum(data) == ref_checksum(data)
