"""Keepalive tuning, sans-I/O: learn how long a NAT mapping survives idle, keep it alive inside that.

``MappingLifetimeSearch`` is a binary search over idle times. Each probe is one trial the
caller carries out: make a mapping (send to an observer), stay idle ``probe()`` seconds, then
have the observer send to the mapped address; ``record(idle, survived)`` says whether it
arrived. The search keeps the longest idle seen to survive and the shortest seen to kill the
mapping, and is ``done`` when they are within ``resolution``. ``keepalive_interval`` is then a
margin inside the surviving bound, capped at WireGuard's customary 25 s; behind no NAT there
is nothing to keep alive (None). No clock is read here: the caller measures idle times.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_KEEPALIVE = 25.0  # WireGuard's customary persistent-keepalive interval, in seconds
SAFETY = 0.8  # keep alive at this fraction of the longest idle the mapping survived
MIN_KEEPALIVE = 1.0


@dataclass
class MappingLifetimeSearch:
    """Binary search for a mapping's idle lifetime in [low, high] seconds (see module docstring)."""

    low: float = 1.0
    high: float = 180.0
    resolution: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.low < self.high:
            raise ValueError(f"need 0 < low < high, got low={self.low} high={self.high}")
        if self.resolution <= 0:
            raise ValueError(f"resolution must be positive, got {self.resolution}")
        self.survived: float | None = None  # longest idle the mapping survived
        self.died: float | None = None  # shortest idle that killed it
        self.trials = 0

    @property
    def _bounds(self) -> tuple[float, float]:
        lo = self.survived if self.survived is not None else self.low
        hi = self.died if self.died is not None else self.high
        return lo, hi

    @property
    def done(self) -> bool:
        """The lifetime is known to within ``resolution``, or it outlives ``high``, or dies below ``low``."""
        lo, hi = self._bounds
        if self.survived is not None and self.survived >= self.high:
            return True
        if self.died is not None and self.died <= self.low:
            return True
        return hi - lo <= self.resolution

    def probe(self) -> float:
        """The idle time (seconds) the next trial should wait; only while not ``done``."""
        if self.done:
            raise RuntimeError("the search is done")
        lo, hi = self._bounds
        if self.survived is None and self.died is None:
            return hi  # first: does it outlive the longest we care about?
        if self.died is not None and self.survived is None and self.died > self.low and self.trials == 1:
            return self.low  # does it survive the shortest at all?
        return (lo + hi) / 2

    def record(self, idle: float, survived: bool) -> None:
        """The outcome of a trial that was idle ``idle`` seconds (the measured time, not the asked one)."""
        if idle < 0:
            raise ValueError(f"idle must be >= 0, got {idle}")
        self.trials += 1
        if survived:
            if self.died is not None and idle >= self.died:
                self.died = None  # the NAT's timeout changed (or timers are noisy): search above again
            self.survived = idle if self.survived is None else max(self.survived, idle)
        else:
            if self.survived is not None and idle <= self.survived:
                self.survived = None
            self.died = idle if self.died is None else min(self.died, idle)

    def keepalive_interval(self) -> float | None:
        """The interval to keep the mapping alive: inside the surviving bound, at most 25 s.
        None while nothing survived (the NAT forgets faster than ``low``: keep the default floor)."""
        if self.survived is None:
            return MIN_KEEPALIVE if self.died is not None else None
        return max(MIN_KEEPALIVE, min(DEFAULT_KEEPALIVE, self.survived * SAFETY))


def keepalive_for(behind_nat: bool | None, lifetime: MappingLifetimeSearch | None) -> float | None:
    """The interval to use: none where no NAT was found, the learnt one behind a NAT, the
    default 25 s behind a NAT whose lifetime is not learnt yet."""
    if behind_nat is False:
        return None
    if lifetime is None or lifetime.keepalive_interval() is None:
        return DEFAULT_KEEPALIVE
    return lifetime.keepalive_interval()
