"""The agent's ICMP echo probes without namespaces: the codec (fuzzed), the table of
echoes in flight and the round trips on a fake clock, and real raw sockets on loopback
(127.0.0.1 and ::1; root) on a running loop, beside a second prober whose replies the
first must not count."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from needs import unavailable

from pywg.mesh import icmp
from pywg.mesh.echoes import ECHO_TIMEOUT_S, Echoes
from pywg.mesh.probe import Prober
from pywg.testing.icmp import ICMP_ECHO_REPLY, Echo, build_echo

COOKIE = b"8 bytes!"
PEER, PEER6 = "100.118.0.2", "fd18:a::2"


def reply_v4(request: bytes, source: str = PEER, *, identifier: int | None = None) -> bytes:
    """The IPv4 packet a peer's kernel answers ``request`` (an ICMP message) with, built by
    the test bed's independent codec."""
    _, _, _, ident, seq = struct.unpack("!BBHHH", request[:8])
    return build_echo(Echo(ICMP_ECHO_REPLY, source, "100.118.0.1", ident if identifier is None else identifier,
                           seq, request[8:]))


def reply_v6(request: bytes) -> bytes:
    """An ICMPv6 raw socket's view of the answer: the message alone (the kernel checked its
    checksum)."""
    return bytes([icmp.ECHO_REPLY_V6]) + request[1:]


# --- the codec --------------------------------------------------------------------------------


def test_requests_are_well_formed_and_replies_parse():
    req = icmp.echo_request(0xBEEF, 7, COOKIE, v6=False)
    assert req[0] == icmp.ECHO_REQUEST_V4 and icmp.internet_checksum(req) == 0  # it verifies
    assert icmp.parse_reply(reply_v4(req), v6=False) == icmp.Echo(0xBEEF, 7, COOKIE)
    req6 = icmp.echo_request(0xBEEF, 65535, COOKIE, v6=True)
    assert req6[0] == icmp.ECHO_REQUEST_V6
    assert icmp.parse_reply(reply_v6(req6), v6=True) == icmp.Echo(0xBEEF, 65535, COOKIE)


def test_what_is_not_an_echo_reply_says_why():
    good = reply_v4(icmp.echo_request(1, 2, COOKIE, v6=False))
    assert icmp.parse_reply(good[:27], v6=False) is icmp.Malformed.SHORT  # cut inside the ICMP header
    assert icmp.parse_reply(good[:10], v6=False) is icmp.Malformed.SHORT
    assert icmp.parse_reply(good[:9] + b"\x11" + good[10:], v6=False) is icmp.Malformed.NOT_ICMP  # UDP
    assert icmp.parse_reply(b"\x65" + good[1:], v6=False) is icmp.Malformed.NOT_ICMP  # version 6
    flipped = bytearray(good)
    flipped[-1] ^= 1
    assert icmp.parse_reply(bytes(flipped), v6=False) is icmp.Malformed.CHECKSUM
    request_packet = build_echo(Echo(8, PEER, "100.118.0.1", 1, 2, COOKIE))
    assert icmp.parse_reply(request_packet, v6=False) is icmp.Malformed.NOT_A_REPLY
    assert icmp.parse_reply(b"\x81\x00\x00", v6=True) is icmp.Malformed.SHORT
    assert icmp.parse_reply(b"\x80" + bytes(7), v6=True) is icmp.Malformed.NOT_A_REPLY


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=120), st.booleans())
def test_the_reply_parser_never_raises_on_any_bytes(data, v6):
    out = icmp.parse_reply(data, v6=v6)
    assert isinstance(out, icmp.Malformed | icmp.Echo)
    if isinstance(out, icmp.Echo):
        assert 0 <= out.identifier < 65536 and 0 <= out.sequence < 65536


@settings(max_examples=2000, deadline=None)
@given(st.integers(0, 47), st.integers(1, 255), st.integers(0, 12))
def test_a_damaged_reply_is_refused_or_still_the_same_reply(at, xor, cut):
    packet = bytearray(reply_v4(icmp.echo_request(0x1234, 99, COOKIE, v6=False)))
    packet[at % len(packet)] ^= xor
    out = icmp.parse_reply(bytes(packet[:len(packet) - cut]), v6=False)
    # One flipped byte either breaks a check or (in a field no check covers: TOS, id, TTL,
    # the IP header's sum that IPv4 raw sockets do not verify for us) leaves the echo as it was.
    assert isinstance(out, icmp.Malformed) or out == icmp.Echo(0x1234, 99, COOKIE)


# --- the table and the round trips (fake clock) --------------------------------------------------


def echoes(**kw: float) -> Echoes:
    return Echoes(identifier=0xBEEF, cookie=COOKIE, stale_after=kw.pop("stale_after", 8.0), **kw)  # type: ignore[arg-type]


def test_a_reply_gives_the_round_trip_and_the_median_of_the_last_five():
    e = echoes()
    assert e.rtt_us("k", 0.0) is None and e.silent_for("k", 0.0) is None
    rtts = [0.010, 0.012, 0.500, 0.011, 0.013, 0.014, 0.015]  # one outlier (an echo that waited)
    t = 100.0
    for rtt in rtts:
        req = e.request("k", PEER, t)
        assert e.received(reply_v4(req), PEER, t + rtt, v6=False) == pytest.approx(rtt)
        t += 1
    assert e.rtt_us("k", t) == 14_000  # median of 0.5, 0.011, 0.013, 0.014, 0.015: the outlier ignored
    assert e.silent_for("k", t) == pytest.approx(1 - 0.015)
    assert (e.counters["sent"], e.counters["answered"], e.outstanding) == (7, 7, 0)
    # IPv6 echoes count for the same peer.
    req6 = e.request("k", PEER6, t)
    assert e.received(reply_v6(req6), "fd18:a:0::2", t + 0.002, v6=True) == pytest.approx(0.002)


def test_the_round_trip_follows_a_change_within_three_samples():
    e = echoes()
    for i in range(5):
        e.received(reply_v4(e.request("k", PEER, float(i))), PEER, i + 0.001, v6=False)
    for i in range(5, 8):
        e.received(reply_v4(e.request("k", PEER, float(i))), PEER, i + 0.051, v6=False)
    assert e.rtt_us("k", 8.0) == 51_000


def test_replies_that_are_not_ours_are_counted_and_dropped():
    e = echoes()
    req = e.request("k", PEER, 0.0)
    assert e.received(reply_v4(req, identifier=0x1111), PEER, 0.01, v6=False) is None  # another process's ping
    assert e.received(reply_v4(req), "100.118.0.99", 0.01, v6=False) is None  # from elsewhere
    forged = icmp.echo_request(0xBEEF, 0, b"guessed!", v6=True)
    assert e.received(reply_v6(forged), PEER, 0.01, v6=True) is None  # no cookie
    assert e.received(b"\x45junk", PEER, 0.01, v6=False) is None
    assert (e.counters["unmatched"], e.counters["malformed"], e.outstanding) == (3, 1, 1)
    assert e.received(reply_v4(req), PEER, 0.01, v6=False) == pytest.approx(0.01)
    assert e.received(reply_v4(req), PEER, 0.02, v6=False) is None  # a duplicate
    assert e.counters["unmatched"] == 4 and e.rtt_us("k", 0.02) == 10_000


def test_echoes_time_out_late_replies_do_not_count_and_the_table_is_bounded():
    e = echoes(max_outstanding=4)
    late = e.request("k", PEER, 0.0)
    assert e.received(reply_v4(late), PEER, ECHO_TIMEOUT_S + 0.1, v6=False) is None
    assert e.counters["late"] == 1 and e.rtt_us("k", 7.0) is None
    for t in range(3):
        e.request("k", PEER, float(t))
    e.expire(2 + ECHO_TIMEOUT_S - 0.5)
    assert e.outstanding == 1 and e.counters["timedOut"] == 2
    kept = [e.request("k", PEER, 10.0) for _ in range(6)]  # more than the table holds: the oldest go
    assert e.outstanding == 4 and e.counters["evicted"] == 2 and e.counters["timedOut"] == 3
    assert e.received(reply_v4(kept[0]), PEER, 10.1, v6=False) is None  # evicted
    assert e.received(reply_v4(kept[-1]), PEER, 10.1, v6=False) == pytest.approx(0.1)
    # However many replies arrive, only requests add to the table.
    for seq in range(3000):
        e.received(reply_v4(icmp.echo_request(0xBEEF, seq, COOKIE, v6=False)), PEER, 10.2, v6=False)
    assert e.outstanding <= 3


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=64), st.sampled_from([PEER, PEER6, "fe80::1%eth0", "junk", ""]),
                          st.booleans()), max_size=30))
def test_whatever_arrives_never_raises_nor_grows_the_table(arrivals):
    e = echoes()
    requests = [e.request("k", PEER, 0.0), e.request("k", PEER6, 0.0)]
    for data, source, v6 in arrivals:
        assert e.received(data, source, 0.5, v6=v6) is None  # none of them is a reply to ours
    assert e.outstanding == 2 and e.stats()["outstanding"] == 2
    assert e.stats()["unmatched"] + e.stats()["malformed"] == len(arrivals)
    assert e.received(reply_v4(requests[0]), PEER, 0.6, v6=False) == pytest.approx(0.6)


def test_sequence_numbers_wrap_without_reusing_one_in_flight():
    e = echoes(max_outstanding=3)
    seqs = [struct.unpack("!H", e.request("k", PEER, 0.0)[6:8])[0] for _ in range(70000)]
    assert len(set(seqs[-3:])) == 3 and max(seqs) == 65535 and e.outstanding == 3


def test_a_silent_peer_has_no_round_trip_and_starts_afresh_when_it_answers_again():
    e = echoes(stale_after=8.0)
    e.received(reply_v4(e.request("k", PEER, 0.0)), PEER, 0.2, v6=False)
    assert e.rtt_us("k", 8.0) == 200_000
    assert e.rtt_us("k", 8.3) is None  # silent for longer than stale_after
    e.received(reply_v4(e.request("k", PEER, 20.0)), PEER, 20.003, v6=False)
    assert e.rtt_us("k", 20.1) == 3_000  # the old 200 ms sample is gone
    e.forget(set())
    assert e.rtt_us("k", 20.1) is None and e.silent_for("k", 20.1) is None


# --- real raw sockets on loopback -------------------------------------------------------------


def test_loopback_echoes_measure_a_round_trip_and_ignore_another_probers_replies():
    if os.geteuid() != 0:
        unavailable("raw ICMP sockets need root")
    has_v6 = socket.has_ipv6 and os.path.exists("/proc/net/if_inet6")

    async def run() -> tuple[Prober, Prober]:
        mine, other = Prober(stale_after=10), Prober(stale_after=10)
        try:
            for _ in range(5):
                assert mine.send([("lo", ("127.0.0.1", "::1" if has_v6 else None))]) == (2 if has_v6 else 1)
                other.send([("lo", ("127.0.0.1",))])
                await asyncio.sleep(0.05)
        finally:
            mine.close()
            other.close()
        return mine, other

    mine, other = asyncio.run(run())
    got = mine.echoes
    assert got.counters["answered"] == got.counters["sent"] == (10 if has_v6 else 5)
    rtt = got.rtt_us("lo", mine.clock())
    assert rtt is not None and 0 < rtt < 50_000, rtt
    # Each raw socket saw the other's replies too: counted, dropped, the table untouched.
    assert got.counters["unmatched"] >= 5 and other.echoes.counters["unmatched"] >= 5
    assert got.outstanding == 0 and other.echoes.outstanding == 0
    print(f"loopback round trip {rtt} us; {dict(got.counters)}")
