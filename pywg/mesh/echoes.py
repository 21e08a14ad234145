"""Echoes in flight and the round trips they measured, per peer (sans-I/O: the caller
hands in the time and what its sockets received; :mod:`pywg.mesh.probe` does the I/O).

Every echo this agent sends carries its identifier, a sequence number and a random
cookie; a reply counts only if all three match an echo still outstanding, from the
address it was sent to, within :data:`ECHO_TIMEOUT_S`. The table of outstanding echoes
only grows by what this agent sends and holds at most ``max_outstanding`` (the oldest
goes first), so no reply, however many, can grow it; whatever does not match is counted
and dropped.

A peer's round trip is the median (the lower one of an even count) of its last
:data:`SAMPLES` answered echoes. One echo per interval gives few samples (one every 10 s
by default), too few for a TCP-like SRTT (gain 1/8) to follow a change within a minute
or two; the median follows a real change within three samples and ignores a lone
outlier (an echo that waited for a handshake, a scheduling hiccup). A peer silent for
``stale_after`` seconds has no round trip (None), and its old samples are dropped when it
answers again.
"""

from __future__ import annotations

import ipaddress
import statistics
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from pywg.mesh import icmp
from pywg.protocol.constants import REKEY_TIMEOUT

SAMPLES = 5
# An echo that finds no session waits for the handshake: one retry after REKEY_TIMEOUT
# (and up to 1/3 s jitter) if the first initiation was lost, then the round trip itself.
ECHO_TIMEOUT_S = REKEY_TIMEOUT + 1.0
MAX_OUTSTANDING = 16384  # well below the 65,536 sequence numbers, so each is unique in it

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class _Sent:
    key: str
    address: Address
    at: float


@dataclass
class _Peer:
    samples: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    answered: float | None = None


class Echoes:
    """This agent's echoes: ``identifier`` (16 bits) and ``cookie`` (the payload) are its
    own; times are seconds of one monotonic clock."""

    def __init__(self, *, identifier: int, cookie: bytes, stale_after: float, timeout: float = ECHO_TIMEOUT_S,
                 max_outstanding: int = MAX_OUTSTANDING) -> None:
        if not 0 < max_outstanding < 65536:
            raise ValueError("max_outstanding: 1..65535")
        self.identifier = identifier & 0xFFFF
        self.cookie = cookie
        self.stale_after = stale_after
        self.timeout = timeout
        self.max_outstanding = max_outstanding
        self.counters: Counter[str] = Counter()  # sent, answered, timedOut, evicted, late, unmatched, malformed
        self._outstanding: OrderedDict[int, _Sent] = OrderedDict()  # by sequence, oldest first
        self._peers: dict[str, _Peer] = {}
        self._sequence = 0

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    def stats(self) -> dict[str, int]:
        """The counters and the echoes in flight, for ``status.json``."""
        names = ("sent", "answered", "timedOut", "evicted", "late", "unmatched", "malformed")
        return {**{n: self.counters[n] for n in names}, "outstanding": len(self._outstanding)}

    def request(self, key: str, address: str, now: float) -> bytes:
        """The echo request to send to peer ``key`` at ``address`` (IPv4 or IPv6) now."""
        ip = ipaddress.ip_address(address)
        self.expire(now)
        if len(self._outstanding) >= self.max_outstanding:
            self._outstanding.popitem(last=False)
            self.counters["evicted"] += 1
        while self._sequence in self._outstanding:
            self._sequence = (self._sequence + 1) & 0xFFFF
        sequence, self._sequence = self._sequence, (self._sequence + 1) & 0xFFFF
        self._outstanding[sequence] = _Sent(key, ip, now)
        self._peers.setdefault(key, _Peer())
        self.counters["sent"] += 1
        return icmp.echo_request(self.identifier, sequence, self.cookie, v6=ip.version == 6)

    def received(self, datagram: bytes, source: str, now: float, *, v6: bool) -> float | None:
        """Account for what a raw socket received from ``source``; the round trip in
        seconds if it answered one of this agent's echoes in time, else None."""
        echo = icmp.parse_reply(datagram, v6=v6)
        if isinstance(echo, icmp.Malformed):
            self.counters["malformed"] += 1
            return None
        sent = self._outstanding.get(echo.sequence)
        if (echo.identifier != self.identifier or echo.payload != self.cookie or sent is None
                or _address(source) != sent.address):
            self.counters["unmatched"] += 1  # another process's ping, a duplicate, a forgery
            return None
        del self._outstanding[echo.sequence]
        rtt = now - sent.at
        if rtt > self.timeout or rtt < 0:
            self.counters["late"] += 1
            return None
        self.counters["answered"] += 1
        peer = self._peers.get(sent.key)
        if peer is None:  # forgotten while the echo was out
            return rtt
        if peer.answered is None or now - peer.answered > self.stale_after:
            peer.samples.clear()
        peer.samples.append(rtt)
        peer.answered = now
        return rtt

    def expire(self, now: float) -> None:
        """Drop the echoes that waited longer than the timeout (counted ``timedOut``)."""
        while self._outstanding:
            sequence, sent = next(iter(self._outstanding.items()))
            if now - sent.at <= self.timeout:
                break
            del self._outstanding[sequence]
            self.counters["timedOut"] += 1

    def silent_for(self, key: str, now: float) -> float | None:
        """Seconds since peer ``key`` last answered an echo; None if it never did."""
        peer = self._peers.get(key)
        return None if peer is None or peer.answered is None else now - peer.answered

    def rtt_us(self, key: str, now: float) -> int | None:
        """Peer ``key``'s round trip in whole microseconds (at least 1), None until it
        answered an echo and once it has been silent for ``stale_after``."""
        peer = self._peers.get(key)
        if peer is None or peer.answered is None or now - peer.answered > self.stale_after:
            return None
        return max(1, round(statistics.median_low(peer.samples) * 1e6))

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the peers not in ``keep`` (their echoes in flight expire as usual)."""
        for key in self._peers.keys() - set(keep):
            del self._peers[key]


def _address(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])  # an IPv6 source may carry a scope
    except ValueError:
        return None
