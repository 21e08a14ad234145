"""The home DERP region rule (pywg.mesh.home_region.choose_home), without I/O: Tailscale's
netcheck hysteresis, HomeParams.RegionScore, NoMeasureNoHome/Avoid; and the measurement
against real listening sockets."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from pywg.derp import parse_derp_map
from pywg.derp.derpmap import DerpMap
from pywg.mesh.home_region import choose_home, measure, pick_home_region

MS = 0.001


def derp_map(*regions: int, score: dict[int, float] | None = None, flags: dict[int, dict[str, Any]] | None = None,
             ports: dict[int, int] | None = None) -> DerpMap:
    data: dict[str, Any] = {"Regions": {str(n): {
        "RegionID": n, "RegionCode": f"r{n}", **(flags or {}).get(n, {}),
        "Nodes": [{"Name": f"{n}a", "RegionID": n, "HostName": "localhost", "IPv4": "127.0.0.1", "IPv6": "none",
                   "DERPPort": (ports or {}).get(n, 443)}]} for n in regions}}
    if score is not None:
        data["HomeParams"] = {"RegionScore": {str(k): v for k, v in score.items()}}
    return parse_derp_map(data)


@pytest.mark.parametrize(("times_ms", "current", "expected", "why"), [
    ({1: 30, 2: 10}, None, 2, "no home yet: the fastest"),
    ({1: 30, 2: 10}, 1, 2, "20 ms faster and under 2/3 of the home's: move"),
    ({1: 30, 2: 25}, 1, 1, "5 ms faster: not enough"),
    ({1: 100, 2: 80}, 1, 1, "20 ms faster but 80% of the home's: stay"),
    ({1: 100, 2: 60}, 1, 2, "40 ms faster and 60% of the home's: move"),
    ({1: 12, 2: 1}, 1, 2, "11 ms faster and under 2/3: move"),
    ({1: 8, 2: 1}, 1, 1, "7 ms faster (under 10 ms) though 1/8: stay"),
    ({2: 50}, 1, 2, "the home did not answer: leave it"),
    ({}, 1, 1, "nothing answered: keep the home"),
    ({}, None, None, "nothing answered and no home: none"),
    ({1: 20, 2: 20}, None, 1, "a tie: the lowest region"),
])
def test_the_home_moves_only_to_a_clearly_better_region(times_ms: dict[int, float], current: int | None,
                                                          expected: int | None, why: str) -> None:
    times = {r: t * MS for r, t in times_ms.items()}
    assert choose_home(derp_map(1, 2), times, current) == expected, why


def test_region_scores_scale_latency_and_flagged_regions_are_never_home() -> None:
    times = {1: 20 * MS, 2: 30 * MS, 3: 1 * MS}
    flags = {3: {"NoMeasureNoHome": True}}
    assert choose_home(derp_map(1, 2, 3, flags=flags), times, None) == 1
    assert choose_home(derp_map(1, 2, 3, flags=flags, score={2: 0.5}), times, None) == 2  # 15 ms scaled
    assert choose_home(derp_map(1, 2, 3, flags={3: {"Avoid": True}}), times, None) == 1
    assert choose_home(derp_map(1, 2, score={1: 3.0}), times, 1) == 2  # 60 ms scaled vs 30: move
    # a home no longer in the map is not kept, even when nothing answered
    assert choose_home(derp_map(2), {}, 1) is None


def test_measuring_connects_to_each_homeable_region_and_a_closed_port_is_absent() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    try:
        ports = {1: listener.getsockname()[1], 2: closed_port, 3: listener.getsockname()[1]}
        derp = derp_map(1, 2, 3, ports=ports, flags={3: {"NoMeasureNoHome": True}})
        times = asyncio.run(measure(derp, timeout=1.0))
        assert set(times) == {1} and 0 <= times[1] < 1.0, times
        home, measured = asyncio.run(pick_home_region(derp, timeout=1.0, current=2))
        assert home == 1 and set(measured) == {1}  # the home that no longer answers is left
        assert asyncio.run(pick_home_region(derp_map(2, 3, ports=ports), timeout=1.0))[0] == 3
        nothing = derp_map(2, 4, ports={2: closed_port, 4: closed_port})
        assert asyncio.run(pick_home_region(nothing, timeout=1.0)) == (2, {})  # none answered: the lowest
    finally:
        listener.close()
