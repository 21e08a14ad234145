"""The agent's replica list: parsing ``--coordinator`` and the order and pauses of retries."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pywg.mesh.failover import BadCoordinatorList, Replicas, parse_urls


def test_a_comma_list_parses_and_bad_entries_are_named() -> None:
    assert parse_urls("http://10.0.0.1:80/, https://b:443") == ("http://10.0.0.1:80", "https://b:443")
    with pytest.raises(BadCoordinatorList, match="'ftp://x'"):
        parse_urls("http://a:1,ftp://x")
    with pytest.raises(BadCoordinatorList, match="''"):
        parse_urls("http://a:1,")
    with pytest.raises(BadCoordinatorList, match="twice"):
        parse_urls("http://a:1,http://a:1/")


@given(st.text(max_size=60))
def test_parse_urls_either_parses_or_raises_its_own_error(text: str) -> None:
    try:
        urls = parse_urls(text)
    except BadCoordinatorList:
        return
    assert urls and all(u.startswith(("http://", "https://")) for u in urls)


def test_a_failure_moves_to_the_next_replica_at_once_and_a_full_round_backs_off() -> None:
    r = Replicas(("http://a:1", "http://b:1"), backoff_min=0.2, backoff_max=5.0, rng=random.Random(1))
    assert r.current == "http://a:1"
    first = r.failed()
    assert r.current == "http://b:1" and first <= 0.15  # the other replica: soon
    pauses = [r.failed() for _ in range(12)]
    assert r.current == "http://b:1"  # 13 failures, 2 replicas: round and round
    assert 0.1 <= pauses[0] <= 0.3  # both failed once: the base backoff
    assert pauses[-1] <= 7.5 and pauses[-1] >= 2.5  # capped at backoff_max, with jitter
    r.succeeded()
    assert r.failed() <= 0.15  # after a good connection the next move is immediate again


def test_one_url_backs_off_in_place() -> None:
    r = Replicas(("http://a:1",), rng=random.Random(2))
    pauses = [r.failed() for _ in range(8)]
    assert r.current == "http://a:1" and r.moves == 0
    assert pauses[0] < pauses[-1] <= 7.5
