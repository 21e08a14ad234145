"""The relay's per-client limits, without I/O: a token bucket and the limits' settings.

``TokenBucket`` meters bytes (or connections) against a rate and a burst. It never refuses:
``consume`` takes the tokens and returns how long the caller must wait before reading more
(zero while within the burst), which is how derper limits a client's received bytes, by delaying
reads so that TCP pushes back on the sender. ``allow`` is the all-or-nothing form (for accepts).
Time comes in as ``now`` (seconds, any monotonic origin).
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_RATE_BURST = 64 << 10 | 32  # derper raises a receive burst to at least one whole packet frame
DEFAULT_CLIENT_RATE = 128 << 20  # bytes/s one client may send the relay (1 Gbit/s; above what one pair reaches here)
DEFAULT_CLIENT_BURST = 8 << 20
DEFAULT_QUEUE_BYTES = 1 << 20  # packet bytes queued for one backed-up receiver
DEFAULT_MAX_CLIENTS = 10_000
DEFAULT_MAX_CONNECTIONS = 12_000  # TCP connections at once, HTTP and not yet handshaken included
DEFAULT_ACCEPT_RATE = 1000.0  # connections per second
DEFAULT_ACCEPT_BURST = 2000
DEFAULT_WRITE_TIMEOUT = 2.0  # seconds a write to a client may stall before it is closed (derper's)
MESH_WRITE_TIMEOUT = 30.0  # the same for mesh peers
HANDSHAKE_TIMEOUT = 10.0  # seconds from the upgrade to ClientInfo


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; starts full. A rate of 0 means no limit."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate < 0 or burst < 0:
            raise ValueError("rate and burst must not be negative")
        self.rate = float(rate)
        self.burst = float(max(burst, 1.0))
        self.tokens = self.burst
        self.last = now

    def _refill(self, now: float) -> None:
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = max(self.last, now)

    def consume(self, amount: float, now: float) -> float:
        """Take ``amount`` tokens (going into debt if need be); seconds to wait before the next."""
        if self.rate == 0:
            return 0.0
        self._refill(now)
        self.tokens -= amount
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def allow(self, now: float, amount: float = 1.0) -> bool:
        """Take ``amount`` tokens if there are that many; False (nothing taken) otherwise."""
        if self.rate == 0:
            return True
        self._refill(now)
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True


@dataclass(frozen=True, slots=True)
class RelayLimits:
    """Every bound of ``pywg derp serve``; 0 for a rate means unlimited.

    ``client_rate``/``client_burst``: bytes per second a client may send (reads are delayed
    beyond it; mesh peers are exempt). ``queue_bytes``/``queue_packets``: what waits for a
    receiver whose socket is backed up (the oldest packets are dropped and counted beyond
    it). ``max_clients``: handshaken clients; ``max_connections``: TCP connections of any kind;
    ``accept_rate``/``accept_burst``: new connections per second (excess ones are closed at
    once, as derper does). ``write_timeout``: a client whose socket takes nothing for this
    long is closed (0: never).
    """

    client_rate: int = DEFAULT_CLIENT_RATE
    client_burst: int = DEFAULT_CLIENT_BURST
    queue_bytes: int = DEFAULT_QUEUE_BYTES
    queue_packets: int = 32
    max_clients: int = DEFAULT_MAX_CLIENTS
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    accept_rate: float = DEFAULT_ACCEPT_RATE
    accept_burst: int = DEFAULT_ACCEPT_BURST
    write_timeout: float = DEFAULT_WRITE_TIMEOUT
    handshake_timeout: float = HANDSHAKE_TIMEOUT

    def __post_init__(self) -> None:
        for name in ("client_rate", "client_burst", "queue_bytes", "queue_packets", "max_clients",
                     "max_connections", "accept_rate", "accept_burst", "write_timeout",
                     "handshake_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must not be negative")
        for name in ("queue_packets", "max_clients", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")

    def client_bucket(self, now: float) -> TokenBucket:
        return TokenBucket(self.client_rate, max(self.client_burst, MIN_RATE_BURST), now)

    def accept_bucket(self, now: float) -> TokenBucket:
        return TokenBucket(self.accept_rate, max(self.accept_burst, 1), now)
