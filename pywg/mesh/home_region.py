"""The agent's home DERP region: measured, chosen, and measured again.

Latency to a region is the time of a TCP connect to its first reachable relaying node (the
agent has no STUN path to every region, and a connect is what the relay client pays). The
choice follows Tailscale's netcheck: regions flagged NoMeasureNoHome (or the deprecated
Avoid) are never measured nor chosen; each latency is scaled by the map's
``HomeParams.RegionScore`` (below 1 favours a region, above 1 penalises it); and, to keep
the home from flapping, the current home stays unless the best region is both at least
``HYSTERESIS_GAIN`` faster and faster than ``HYSTERESIS_RATIO`` of the home's latency. A
home that did not answer this round is left at once for the best one that did.

``choose_home`` is the rule, without I/O; ``measure`` and ``pick_home_region`` measure.
The agent measures again every ``REMEASURE_INTERVAL`` and when the DERP map changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping

from pywg.derp.derpmap import DerpMap

__all__ = ["HOME_PROBE_TIMEOUT", "HYSTERESIS_GAIN", "HYSTERESIS_RATIO", "REMEASURE_INTERVAL", "choose_home",
           "measure", "pick_home_region"]

HOME_PROBE_TIMEOUT = 2.0  # seconds for a TCP connect to a region's node
REMEASURE_INTERVAL = 60.0  # seconds between measurements while the relay runs
HYSTERESIS_GAIN = 0.010  # a new home is at least 10 ms faster ...
HYSTERESIS_RATIO = 2 / 3  # ... and faster than 2/3 of the current home's latency


def homeable(derp_map: DerpMap) -> list[int]:
    """The regions that may be measured and chosen as home, ascending."""
    return sorted(rid for rid, region in derp_map.regions.items()
                  if region.derp_nodes and not (region.no_measure_no_home or region.avoid))


def choose_home(derp_map: DerpMap, times: Mapping[int, float], current: int | None) -> int | None:
    """The home region for these measured ``times`` (seconds by region; a region that did not
    answer is absent), given the ``current`` home (None: none yet). None when no region
    answered and there is no current home to keep."""
    candidates = set(homeable(derp_map))
    scores = derp_map.region_score or {}
    scaled = {rid: t * scores.get(rid, 1.0) for rid, t in times.items() if rid in candidates}
    if not scaled:
        return current if current in derp_map.regions else None
    best = min(scaled, key=lambda rid: (scaled[rid], rid))
    if current is None or current == best or current not in scaled:
        return best  # (a home that no longer answers, or left the map, is left)
    old, new = scaled[current], scaled[best]
    if old - new >= HYSTERESIS_GAIN and new < old * HYSTERESIS_RATIO:
        return best
    return current


async def _connect_time(host: str, port: int, timeout: float) -> float | None:
    started = time.monotonic()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return None
    elapsed = time.monotonic() - started
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return elapsed


async def measure(derp_map: DerpMap, timeout: float = HOME_PROBE_TIMEOUT) -> dict[int, float]:
    """Each homeable region's latency (all regions at once, each within ``timeout``); the
    regions none of whose nodes answered are absent."""
    async def region_time(region_id: int) -> tuple[int, float | None]:
        for node in derp_map.regions[region_id].derp_nodes:
            for address in node.dial_addresses():
                elapsed = await _connect_time(address, node.port, timeout)
                if elapsed is not None:
                    return region_id, elapsed
        return region_id, None

    found = await asyncio.gather(*(region_time(r) for r in homeable(derp_map)))
    return {r: t for r, t in found if t is not None}


async def pick_home_region(derp_map: DerpMap, timeout: float = HOME_PROBE_TIMEOUT,
                           current: int | None = None) -> tuple[int, dict[int, float]]:
    """The home region (``choose_home`` on a fresh measurement) and the times measured; when
    nothing answered and there is no current home: the lowest homeable region (or the lowest
    region, if the map flags them all)."""
    times = await measure(derp_map, timeout)
    home = choose_home(derp_map, times, current)
    if home is None:
        home = min(homeable(derp_map) or derp_map.regions)
    return home, times
