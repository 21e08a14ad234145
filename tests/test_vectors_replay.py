"""The kernel's nonce-counter self-test (selftest/counter.c) against pywg's ReplayFilter."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pywg.protocol import constants as C
from pywg.protocol.replay import ReplayFilter
from vectors import load

REPLAY = load("replay_counter_kernel")


def test_parameters_match_pywg() -> None:
    params = REPLAY["parameters"]
    assert params["COUNTER_BITS_TOTAL"] == C.REPLAY_BITS_TOTAL
    assert params["COUNTER_WINDOW_SIZE"] == C.REPLAY_WINDOW_SIZE
    assert params["REJECT_AFTER_MESSAGES"] == C.REJECT_AFTER_MESSAGES


def test_kernel_counter_selftest() -> None:
    replay = ReplayFilter()
    steps = 0
    mismatches = []
    for group in REPLAY["groups"]:
        if group["reset_before"]:
            replay.reset()
        for n, step in enumerate(group["steps"]):
            steps += 1
            accepted = replay.validate(step["counter"])
            if accepted != step["expected_accept"]:
                where = step.get("test_no", n)
                mismatches.append((group["name"], where, step["counter"], step["expected_accept"]))
    assert steps == 48813
    assert len(REPLAY["groups"]) == 7
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:5]}"


def test_fresh_filter_equals_reset_filter() -> None:
    """reset_before means T_INIT: a freshly built filter must behave the same as a reset one."""
    group = REPLAY["groups"][0]
    fresh = ReplayFilter()
    got = [fresh.validate(step["counter"]) for step in group["steps"]]
    assert got == [step["expected_accept"] for step in group["steps"]]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20_000), st.integers(1, 70)), min_size=1, max_size=30))
def test_validate_run_equals_validate_one_by_one(runs: list[tuple[int, int]]) -> None:
    """The batch fast path leaves the filter exactly as per-counter validation does."""
    fast, slow = ReplayFilter(), ReplayFilter()
    base = 0
    for offset, count in runs:
        first = base + offset - 100  # some runs overlap or fall behind: the fast path declines
        if first < 0:
            first = offset
        expected = [slow.validate(c) for c in range(first, first + count)]
        if fast.validate_run(first, count):
            assert all(expected)
        else:
            assert [fast.validate(c) for c in range(first, first + count)] == expected
        assert fast._bitmap == slow._bitmap and fast._greatest == slow._greatest
        base = first + count
