"""The per-source handshake rate limiter: buckets, /64 grouping, the bounded table, and
its place in the engine (after mac2, only under load)."""

from __future__ import annotations

import tracemalloc

import pytest
from engine_pair import ENDPOINT_A, Pair
from hypothesis import given
from hypothesis import strategies as st

from pywg.protocol.actions import DropReason, SendDatagram
from pywg.protocol.messages import MESSAGE_COOKIE_REPLY, MESSAGE_RESPONSE, message_type
from pywg.protocol.ratelimiter import HANDSHAKE_BURST, HANDSHAKES_PER_SECOND, RateLimiter, source_key


def test_a_burst_then_the_steady_rate() -> None:
    limiter = RateLimiter()
    assert [limiter.allow("198.51.100.7", 0.0) for _ in range(HANDSHAKE_BURST + 1)] == [True] * 5 + [False]
    # 20 per second: one new token every 50 ms, never more than the burst.
    assert limiter.allow("198.51.100.7", 0.049) is False
    assert limiter.allow("198.51.100.7", 0.051) is True
    allowed = sum(limiter.allow("198.51.100.7", 1.0 + i / 1000) for i in range(1000))
    assert allowed == pytest.approx(HANDSHAKE_BURST + HANDSHAKES_PER_SECOND, abs=1)


def test_sources_are_independent() -> None:
    limiter = RateLimiter()
    for _ in range(HANDSHAKE_BURST):
        assert limiter.allow("198.51.100.7", 0.0)
    assert not limiter.allow("198.51.100.7", 0.0)
    assert limiter.allow("198.51.100.8", 0.0)


def test_ipv6_sources_share_their_64_and_mapped_ipv4_is_ipv4() -> None:
    assert source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:ffff::9")
    assert source_key("2001:db8:1:2::1") != source_key("2001:db8:1:3::1")
    assert source_key("::ffff:198.51.100.7") == source_key("198.51.100.7")
    assert source_key("fe80::1%eth0") == source_key("fe80::2")
    limiter = RateLimiter()
    for i in range(HANDSHAKE_BURST):
        assert limiter.allow(f"2001:db8:1:2::{i + 1:x}", 0.0)
    assert not limiter.allow("2001:db8:1:2::abcd", 0.0)  # another address of the same /64
    assert limiter.allow("2001:db8:1:3::1", 0.0)


def test_something_that_is_not_an_address_is_refused() -> None:
    assert RateLimiter().allow("not-an-address", 0.0) is False


def test_the_table_is_bounded_and_forgets_idle_sources() -> None:
    limiter = RateLimiter(capacity=100)
    for i in range(100):
        assert limiter.allow(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limiter) == 100
    # Full of live buckets: a new source is refused (and counted), the table does not grow.
    assert not limiter.allow("10.9.9.9", 0.01)
    assert len(limiter) == 100 and limiter.refused == 1
    # Once the oldest buckets have refilled they carry no information and make room.
    assert limiter.allow("10.9.9.9", 1.0)
    assert len(limiter) == 100
    limiter.expire(1.0)
    assert len(limiter) == 1  # only the bucket just used is live


def test_a_million_spoofed_sources_keep_memory_bounded() -> None:
    limiter = RateLimiter()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(1_000_000):
            # 100,000 sources a second, each seen once
            limiter.allow(f"{10 + (i >> 24)}.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", i / 100_000)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert len(limiter) <= limiter.capacity
    assert grown < 8 * 1024 * 1024  # the table, not the flood: well under 50 MB
    limiter.expire(1_000_000 / 100_000 + 1.0)
    assert len(limiter) == 0  # it returns when the flood stops


@given(st.lists(st.tuples(st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8:0:1::1"]),
                          st.floats(min_value=0, max_value=0.2)), max_size=200))
def test_never_more_than_burst_plus_rate_per_source(events: list[tuple[str, float]]) -> None:
    limiter = RateLimiter()
    now = 0.0
    allowed: dict[str, int] = {}
    for host, step in events:
        now += step
        if limiter.allow(host, now):
            allowed[host] = allowed.get(host, 0) + 1
    for count in allowed.values():
        assert count <= HANDSHAKE_BURST + now * HANDSHAKES_PER_SECOND + 1e-9


def fresh_initiation_with_mac2(pair: Pair, now: float) -> bytes:
    """An initiation from A carrying a valid mac2 for B (A has B's cookie)."""
    pair.peer_a.last_initiation_sent = None
    return next(a.data for a in pair.peer_a.initiate(now, retry=False) if isinstance(a, SendDatagram))


def test_under_load_the_limiter_applies_after_mac2() -> None:
    pair = Pair()
    pair.b.under_load = True
    init = fresh_initiation_with_mac2(pair, 0.0)
    cookie = pair.b.datagram_received(init, ENDPOINT_A, 0.0)
    assert [message_type(a.data) for a in cookie if isinstance(a, SendDatagram)] == [MESSAGE_COOKIE_REPLY]
    # Cookie replies cost no DH and no bucket: a spoofed flood never reaches the limiter.
    assert len(pair.b.rate_limiter) == 0
    pair.a.datagram_received(cookie[0].data, ("192.0.2.2", 51821), 0.0)
    answered = limited = 0
    for i in range(40):  # 40 genuine initiations with mac2 within one second
        now = 0.025 * (i + 1)
        out = pair.b.datagram_received(fresh_initiation_with_mac2(pair, now), ENDPOINT_A, now)
        sent = [message_type(a.data) for a in out if isinstance(a, SendDatagram)]
        answered += sent == [MESSAGE_RESPONSE]
        limited += any(getattr(a, "reason", None) is DropReason.RATE_LIMITED for a in out)
    assert limited > 0 and pair.b.drops[DropReason.RATE_LIMITED] == limited
    assert answered + limited + pair.b.drops[DropReason.INITIATION_FLOOD] == 40
    assert answered <= HANDSHAKE_BURST + HANDSHAKES_PER_SECOND


def test_not_under_load_no_limit() -> None:
    pair = Pair()
    for i in range(40):
        now = 0.025 * (i + 1)
        pair.b.datagram_received(fresh_initiation_with_mac2(pair, now), ENDPOINT_A, now)
    assert pair.b.drops[DropReason.RATE_LIMITED] == 0
