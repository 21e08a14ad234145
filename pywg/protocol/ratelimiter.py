"""The handshake rate limiter: a token bucket per source, in a table of bounded size.

As the kernel's and wireguard-go's: each source may have HANDSHAKES_PER_SECOND handshake
messages consumed per second, with a burst of HANDSHAKE_BURST. A source is an IPv4
address, or an IPv6 address's /64 (one subscriber's prefix). The device applies it after
the mac2 check while it is under load, so the sources in the table proved that they
receive at their address (a cookie reached them): spoofed floods stop at the cookie.

The table holds at most ``capacity`` sources. A bucket that has been idle long enough to
refill completely carries no information and is forgotten; when every slot holds a live
bucket, a new source is refused until one refills (the kernel refuses likewise). Memory
is therefore bounded whatever the number of sources, and returns as a flood stops.
Sans-I/O: the caller passes ``now``.
"""

from __future__ import annotations

import ipaddress

from .endpoint import RelayEndpoint

HANDSHAKES_PER_SECOND = 20.0
HANDSHAKE_BURST = 5
TABLE_CAPACITY = 8192


def source_key(host: str | RelayEndpoint) -> bytes:
    """The bucket a source address falls in: 4 bytes for IPv4 (IPv4-mapped IPv6 too), the /64 for
    IPv6, region and node key for a DERP-relayed source (the relay checked that key's owner).

    Raises ValueError for something that is not an IP address."""
    if isinstance(host, RelayEndpoint):
        return b"derp" + host.region.to_bytes(4, "big") + host.node_key
    address = ipaddress.ip_address(host.split("%", 1)[0])  # a link-local zone is not part of the key
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is None:
            return address.packed[:8]
        address = mapped
    return address.packed


class RateLimiter:
    """Token buckets per source; ``allow`` is called once per handshake message."""

    __slots__ = ("_buckets", "burst", "capacity", "rate", "refused")

    def __init__(self, rate: float = HANDSHAKES_PER_SECOND, burst: int = HANDSHAKE_BURST,
                 capacity: int = TABLE_CAPACITY) -> None:
        if rate <= 0 or burst < 1 or capacity < 1:
            raise ValueError("rate, burst and capacity must be positive")
        self.rate = rate
        self.burst = burst
        self.capacity = capacity
        # key -> (tokens, time of last update). Insertion order is the order of last use:
        # an entry is moved to the end when touched, so the front is the longest idle.
        self._buckets: dict[bytes, tuple[float, float]] = {}
        self.refused = 0  # new sources turned away because the table was full of live buckets

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, host: str | RelayEndpoint, now: float) -> bool:
        """Take one token from the source's bucket; False when it has none (drop the message).

        A source that is not an IP address is never allowed."""
        try:
            key = source_key(host)
        except ValueError:
            return False
        buckets = self._buckets
        entry = buckets.pop(key, None)
        if entry is None:
            if len(buckets) >= self.capacity and not self._forget_idle(now):
                self.refused += 1
                return False
            tokens = float(self.burst)
        else:
            tokens, last = entry
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        buckets[key] = (tokens, now)
        return allowed

    def expire(self, now: float) -> None:
        """Forget every bucket that has refilled completely (call now and then, e.g. each second)."""
        while self._forget_idle(now):
            pass

    def _forget_idle(self, now: float) -> bool:
        """Drop the longest-idle bucket if it has refilled completely; True if one went."""
        buckets = self._buckets
        if not buckets:
            return False
        oldest = next(iter(buckets))
        tokens, last = buckets[oldest]
        if now - last < (self.burst - tokens) / self.rate:  # not refilled yet: still live
            return False
        del buckets[oldest]
        return True

    def clear(self) -> None:
        self._buckets.clear()


__all__ = ["HANDSHAKES_PER_SECOND", "HANDSHAKE_BURST", "TABLE_CAPACITY", "RateLimiter", "source_key"]
