"""Token buckets keyed by a source address or a pre-auth key id, in a bounded table.

``RateLimiter(rate, burst, max_entries)``: each key may take ``burst`` at once and
``rate`` per second after; the table keeps the ``max_entries`` most recently used keys
(an evicted key starts again with a full bucket, so the table cannot be grown by a
flood of distinct keys, and the eviction only ever forgets the oldest ones).
"""

from __future__ import annotations

from collections import OrderedDict


class RateLimiter:
    def __init__(self, rate: float, burst: float, max_entries: int = 10_000) -> None:
        if rate <= 0 or burst < 1 or max_entries < 1:
            raise ValueError("rate > 0, burst >= 1 and max_entries >= 1")
        self.rate = rate
        self.burst = burst
        self.max_entries = max_entries
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> float:
        """Take one token for ``key``: 0.0 if allowed, else the seconds until one is free."""
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
        while len(self._buckets) > self.max_entries:
            self._buckets.popitem(last=False)
        return wait
