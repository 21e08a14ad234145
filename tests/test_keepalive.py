"""MappingLifetimeSearch against NATs of known idle timeouts, on a fake clock (the trials are
simulated: a mapping idle for t seconds survives iff t < timeout)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pywg.nat.keepalive import DEFAULT_KEEPALIVE, MappingLifetimeSearch, keepalive_for


def search_against(timeout: float, search: MappingLifetimeSearch) -> tuple[float | None, float]:
    clock = 0.0
    while not search.done:
        idle = search.probe()
        clock += idle  # the fake clock: each trial costs its idle time
        search.record(idle, idle < timeout)
    return search.keepalive_interval(), clock


@pytest.mark.parametrize("timeout", [2.0, 10.0, 30.0, 120.0])
def test_interval_is_inside_the_lifetime(timeout: float) -> None:
    search = MappingLifetimeSearch(low=1.0, high=180.0, resolution=1.0)
    interval, _ = search_against(timeout, search)
    assert interval is not None and interval < timeout
    assert interval <= DEFAULT_KEEPALIVE
    assert search.survived is not None and timeout - 1.0 - 1e-9 <= search.survived < timeout
    assert search.trials <= 10


@given(st.floats(min_value=1.5, max_value=179.0))
def test_any_timeout_gets_a_safe_interval(timeout: float) -> None:
    interval, _ = search_against(timeout, MappingLifetimeSearch(low=1.0, high=180.0, resolution=0.5))
    assert interval is not None and 1.0 <= interval < timeout


def test_a_mapping_outliving_the_range_gets_the_default() -> None:
    search = MappingLifetimeSearch(low=1.0, high=60.0)
    interval, clock = search_against(1000.0, search)
    assert search.trials == 1 and clock == 60.0 and interval == DEFAULT_KEEPALIVE


def test_a_mapping_dying_below_low_gets_the_floor() -> None:
    search = MappingLifetimeSearch(low=1.0, high=60.0)
    interval, _ = search_against(0.5, search)
    assert interval == 1.0 and search.done


def test_a_changed_timeout_is_followed() -> None:
    search = MappingLifetimeSearch(low=1.0, high=64.0, resolution=1.0)
    search_against(30.0, search)
    search.record(10.0, False)  # the NAT now forgets after 8 s
    assert search.survived is None and search.died == 10.0
    interval, _ = search_against(8.0, search)
    assert interval is not None and interval < 8.0


def test_no_nat_no_keepalive() -> None:
    assert keepalive_for(False, None) is None
    assert keepalive_for(True, None) == DEFAULT_KEEPALIVE
    search = MappingLifetimeSearch(low=1.0, high=64.0)
    search_against(30.0, search)
    assert keepalive_for(True, search) == search.keepalive_interval() < 30.0


@pytest.mark.parametrize("low, high, resolution", [(0, 1, 1), (2, 1, 1), (1, 2, 0)])
def test_bad_bounds_are_refused(low: float, high: float, resolution: float) -> None:
    with pytest.raises(ValueError):
        MappingLifetimeSearch(low, high, resolution)
