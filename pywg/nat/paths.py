"""Per-peer path selection over disco, sans-I/O (the behaviour of Tailscale's magicsock endpoint).

One ``PeerPaths`` per peer. It knows the peer's candidate endpoints (advertised local and
STUN-reflexive ones from the coordinator, the ones a CallMeMaybe lists, and peer-reflexive ones
learnt from the source of the peer's pings), pings them, measures an RTT per path from the
pongs, and picks the best confirmed path by Tailscale's ``betterAddr`` rules. That path is the
peer's WireGuard endpoint; it is *trusted* for ``TRUST_UDP_ADDR_DURATION`` after each pong and
re-probed every ``HEARTBEAT_INTERVAL`` while the session is active. Without a trusted path the
data goes via DERP (``route``); a discovery round that gets no pong within
``DISCOVERY_TIMEOUT`` reports ``NoDirectPath`` with the reason.

Hole punching: a discovery round pings every candidate at once and retries each one on a
backoff schedule (``PROBE_SCHEDULE``) until it answers or the round ends, so that when both sides
start a round together (the coordinator pushed candidates to both, or one side's CallMeMaybe
arrived via DERP) each NAT sees outbound traffic before the other side's packets arrive.

Nothing here does I/O or reads a clock: every method takes ``now`` (seconds, any monotonic
origin) and returns actions for the caller to carry out; ``next_deadline()`` says when to call
``tick(now)`` next. Randomness (TxIDs, nonces) comes from the injected ``random(n)``.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from .disco import (
    TXID_LENGTH,
    CallMeMaybe,
    DiscoError,
    DiscoMessageError,
    DiscoPacketError,
    DiscoSession,
    DiscoUnknownTypeError,
    Endpoint,
    Ping,
    Pong,
    Random,
    normalize_endpoint,
)

__all__ = [
    "DERP_MAGIC_IP", "DISCOVERY_TIMEOUT", "DISCO_PING_INTERVAL", "GOOD_ENOUGH_LATENCY", "HEARTBEAT_INTERVAL",
    "PING_TIMEOUT", "PROBE_SCHEDULE", "SESSION_ACTIVE_TIMEOUT", "TRUST_UDP_ADDR_DURATION",
    "UPGRADE_UDP_DIRECT_INTERVAL", "Action", "CandidateStatus", "Endpoint", "NoDirectPath", "PathLost",
    "PathStatus", "PeerPaths", "Route", "SendDisco", "SetWireGuardEndpoint", "Source", "better_path",
]

# Tailscale's constants (wgengine/magicsock), in seconds.
HEARTBEAT_INTERVAL = 3.0  # heartbeatInterval: ping the best path while active
TRUST_UDP_ADDR_DURATION = 6.5  # trustUDPAddrDuration: a pong makes the path trusted this long
DISCO_PING_INTERVAL = 5.0  # discoPingInterval: least gap between rounds' pings to one endpoint
PING_TIMEOUT = 5.0  # pingTimeoutDuration: a ping unanswered this long is forgotten
SESSION_ACTIVE_TIMEOUT = 45.0  # sessionActiveTimeout: idle; heartbeats stop; learnt endpoints expire
UPGRADE_UDP_DIRECT_INTERVAL = 60.0  # upgradeUDPDirectInterval: full re-probe despite a direct path
GOOD_ENOUGH_LATENCY = 0.005  # goodEnoughLatency: no search for better paths below this
PONG_HISTORY = 64  # pongHistoryCount
# Ours: the offsets (from a round's start) of the pings to each candidate, and the round's bound.
PROBE_SCHEDULE = (0.0, 0.25, 0.75, 1.75, 3.75)
DISCOVERY_TIMEOUT = 5.0
STALE_HEARTBEATS = 1.5  # a best path unanswered this many heartbeat intervals yields to a fresher one
# What a pong answering a ping that came via DERP carries as the source (tailcfg.DerpMagicIP).
DERP_MAGIC_IP = "127.3.3.40"


class Source(str, Enum):
    """Where a candidate endpoint of the peer came from."""

    LOCAL = "local"  # the peer's own interface address (advertised as such)
    STUN = "stun"  # the peer's STUN-reflexive address (advertised as such)
    ADVERTISED = "advertised"  # advertised by the coordinator, which does not say whether local or STUN
    CALL_ME_MAYBE = "call-me-maybe"  # listed in the peer's CallMeMaybe
    PEER_REFLEXIVE = "peer-reflexive"  # the source of a ping the peer sent us


_ADVERTISED = frozenset({Source.LOCAL, Source.STUN, Source.ADVERTISED})  # what a coordinator's push labels


# --- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendDisco:
    """Send ``packet`` (a sealed disco packet) from the WireGuard socket to ``to``; None: via DERP."""

    packet: bytes
    to: Endpoint | None

    @property
    def via_derp(self) -> bool:
        return self.to is None


@dataclass(frozen=True)
class SetWireGuardEndpoint:
    """The peer's direct path is (now) ``endpoint``: point WireGuard at it; data goes direct."""

    endpoint: Endpoint
    rtt: float


@dataclass(frozen=True)
class PathLost:
    """The direct path stopped answering (or was reset): data goes via DERP while rediscovering."""

    endpoint: Endpoint
    reason: str


@dataclass(frozen=True)
class NoDirectPath:
    """A discovery round found no path; ``reason`` says why (the peer's path is "none" / DERP)."""

    reason: str


Action = SendDisco | SetWireGuardEndpoint | PathLost | NoDirectPath


@dataclass(frozen=True)
class Route:
    """Where data for the peer goes now: ``udp`` (if any) and/or DERP."""

    udp: Endpoint | None
    derp: bool


@dataclass(frozen=True)
class CandidateStatus:
    endpoint: Endpoint
    sources: tuple[str, ...]
    pings_sent: int
    pongs: int
    rtt: float | None


@dataclass(frozen=True)
class PathStatus:
    """The per-peer view ``pywg agent status`` shows (the agent turns "none" into "derp" if relayed)."""

    path: str  # "direct" or "none"
    endpoint: Endpoint | None
    rtt: float | None
    reason: str | None
    candidates: tuple[CandidateStatus, ...]

    def to_json(self) -> dict:
        """The shape for ``pywg agent status --json`` (endpoints as "host:port", RTT in ms)."""
        return {
            "path": self.path,
            "endpoint": _fmt(self.endpoint) if self.endpoint else None,
            "rtt_ms": round(self.rtt * 1000, 3) if self.rtt is not None else None,
            "reason": self.reason,
            "candidates": [{"endpoint": _fmt(c.endpoint), "sources": list(c.sources), "pings_sent": c.pings_sent,
                            "pongs": c.pongs, "rtt_ms": round(c.rtt * 1000, 3) if c.rtt is not None else None}
                           for c in self.candidates],
        }


# --- betterAddr --------------------------------------------------------------------------------

_PRIVATE = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
_LINK_LOCAL = tuple(ipaddress.ip_network(n) for n in ("169.254.0.0/16", "fe80::/10"))


def _address_points(endpoint: Endpoint) -> int:
    ip = ipaddress.ip_address(endpoint[0])
    points = 0
    if ip.is_loopback:
        points += 50
    elif any(ip in net for net in _LINK_LOCAL if net.version == ip.version):
        points += 30
    elif any(ip in net for net in _PRIVATE if net.version == ip.version):
        points += 20
    if ip.version == 6:
        points += 10
    return points


def better_path(a: Endpoint, a_rtt: float, b: Endpoint | None, b_rtt: float) -> bool:
    """Whether path ``a`` beats path ``b`` (Tailscale's ``betterAddr``, without MTU or relays).

    Each side scores the percentage by which it is faster than the slower one (integer, on
    nanoseconds as Go's durations), +50 loopback, +30 link-local, +20 private, +10 IPv6; ``a``
    wins only with more points, and a gain of at most 1 point against 0 does not count.
    """
    if a == b:
        return False
    if b is None:
        return True
    a_ns, b_ns = round(a_rtt * 1e9), round(b_rtt * 1e9)
    a_points = b_points = 0
    if a_ns > b_ns and a_ns > 0:
        b_points = 100 - (b_ns * 100) // a_ns
    elif b_ns > 0:
        a_points = 100 - (a_ns * 100) // b_ns
    a_points += _address_points(a)
    b_points += _address_points(b)
    if a_points <= 1 and b_points == 0:
        return False
    return a_points > b_points


# --- state -------------------------------------------------------------------------------------


@dataclass
class _Candidate:
    endpoint: Endpoint
    sources: set[Source] = field(default_factory=set)
    last_ping_sent: float | None = None  # by a discovery round (the DISCO_PING_INTERVAL gate)
    last_ping_received: float | None = None  # for peer-reflexive expiry
    last_rx_txid: bytes | None = None  # duplicate-ping detection
    pings_sent: int = 0
    pongs: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=PONG_HISTORY))

    @property
    def rtt(self) -> float | None:
        return self.pongs[-1][1] if self.pongs else None


@dataclass
class _SentPing:
    to: Endpoint | None  # None: via DERP
    at: float
    purpose: str  # "discovery" or "heartbeat"


@dataclass
class _Round:
    started: float
    # per candidate: the index of its next attempt in the schedule, when it is due, its first ping
    next_ping: dict[Endpoint, tuple[int, float, float]] = field(default_factory=dict)
    answered: set[Endpoint] = field(default_factory=set)
    pings: int = 0
    sent_call_me_maybe: bool = False


class PeerPaths:
    """Path state for one peer (see the module docstring). Public methods return ``list[Action]``."""

    def __init__(self, session: DiscoSession, node_key: bytes, random: Random, *, derp: bool = True,
                 derp_region: int = 0, probe_schedule: tuple[float, ...] = PROBE_SCHEDULE,
                 discovery_timeout: float = DISCOVERY_TIMEOUT,
                 heartbeat_interval: float = HEARTBEAT_INTERVAL) -> None:
        if not 0 < heartbeat_interval < TRUST_UDP_ADDR_DURATION:
            raise ValueError("heartbeat_interval must be positive and shorter than the trust")
        if not probe_schedule or probe_schedule[0] != 0.0 or list(probe_schedule) != sorted(probe_schedule):
            raise ValueError("probe_schedule must start at 0.0 and be ascending")
        if probe_schedule[-1] >= discovery_timeout:
            raise ValueError("probe_schedule must end before discovery_timeout")
        self.session = session
        self.node_key = node_key  # our WireGuard public key, carried in our pings
        self._random = random
        self._derp = derp
        self._derp_region = derp_region
        self._schedule = probe_schedule
        self._discovery_timeout = discovery_timeout
        self.heartbeat_interval = heartbeat_interval  # ping the best path this often while active
        # The best path is *stale* once its last pong is this old (a heartbeat went unanswered):
        # a candidate that answered since then takes over (the peer roamed to it).
        self.stale_after = STALE_HEARTBEATS * heartbeat_interval
        self._best_pong_at: float | None = None
        self._candidates: dict[Endpoint, _Candidate] = {}
        self._own_endpoints: tuple[Endpoint, ...] = ()
        self._sent: dict[bytes, _SentPing] = {}
        self._round: _Round | None = None
        self._best: Endpoint | None = None
        self._best_rtt = 0.0
        self._trust_until: float | None = None  # set while the best path is trusted
        self._last_full_ping: float | None = None
        self._last_send: float | None = None
        self._next_heartbeat: float | None = None
        self._reason: str | None = "no discovery yet"
        self._announced_none = False
        self._probe_deadline: float | None = None  # a probe of the trusted path (``probe``) awaits its pong
        self._probe_timeout = 0.0
        self.drops: Counter[str] = Counter()  # dropped / ignored input, by reason
        self.seen_as: Endpoint | None = None  # where the peer saw our last answered direct ping come from

    # --- inputs from the agent ---

    def set_candidates(self, candidates: Iterable[tuple[Endpoint, Source]], now: float) -> list[Action]:
        """The coordinator's push of the peer's advertised endpoints: replaces the advertised set
        and starts punching at once (the peer received our endpoints in the same push)."""
        advertised = {(normalize_endpoint(ep), Source(src)) for ep, src in candidates}
        wrong = {src for _, src in advertised} - _ADVERTISED
        if wrong:
            raise ValueError(f"advertised candidates are local, stun or advertised, not "
                             f"{sorted(w.value for w in wrong)}")
        for cand in self._candidates.values():
            cand.sources -= _ADVERTISED
        for ep, src in advertised:
            self._candidate(ep).sources.add(src)
        self._gc(now)
        return self._discover(now, call_me_maybe=False, reset=True)

    def set_own_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """Our own current endpoints (local + STUN-reflexive), listed in the CallMeMaybe we send."""
        self._own_endpoints = tuple(normalize_endpoint(e) for e in endpoints)

    def note_send(self, now: float) -> list[Action]:
        """Outbound data for the peer: the session is active; without a trusted path, discover."""
        self._last_send = now
        actions: list[Action] = []
        if self._next_heartbeat is None:
            self._next_heartbeat = now + self.heartbeat_interval
        if not self._trusted(now):
            if self._round is None:
                actions += self._discover(now, call_me_maybe=True, reset=False)
            elif not self._round.sent_call_me_maybe and self._round.pings:
                # a round the coordinator's push started: tell the peer too, in case it lacks ours
                actions += self._call_me_maybe()
        return actions

    def set_derp(self, enabled: bool, region: int = 0) -> None:
        """Whether a DERP path to the peer exists now (our relay runs and the peer has a home
        region): CallMeMaybe goes via DERP, and our DERP pongs name ``region``."""
        self._derp, self._derp_region = enabled, region

    def probe(self, now: float, timeout: float) -> list[Action]:
        """The trusted path may have stopped (data went out, none came back): ping it now; no
        pong within ``timeout`` and the path is lost (``PathLost``: data goes via DERP), well
        before its trust would run out. Nothing while a probe is out or no path is trusted."""
        if self._best is None or not self._trusted(now) or self._probe_deadline is not None:
            return []
        self._probe_deadline, self._probe_timeout = now + timeout, timeout
        return [self._ping(self._best, now, "probe")]

    @property
    def probing(self) -> bool:
        """A probe of the trusted path awaits its pong."""
        return self._probe_deadline is not None

    def punch(self, now: float) -> list[Action]:
        """Our reflexive address changed (the NAT re-mapped us, its WAN address changed): ping
        every candidate at once from the new mapping, keeping the best path until it fails, so
        that our NAT lets the peer's answer in (the peer learns the new address from the
        coordinator's push or from our pings' source)."""
        return self._discover(now, call_me_maybe=True, reset=True)

    def reset(self, now: float, reason: str) -> list[Action]:
        """Our network changed (roaming): forget the best path and rediscover at once."""
        actions: list[Action] = []
        if self._best is not None:
            actions.append(PathLost(self._best, reason))
        self._best, self._trust_until, self._best_pong_at = None, None, None
        self._probe_deadline = None
        self._reason = reason
        self._announced_none = False
        self._round = None
        return actions + self._discover(now, call_me_maybe=True, reset=True)

    def receive(self, packet: bytes, src: Endpoint | None, now: float) -> list[Action]:
        """A disco packet from the peer, from ``src`` over UDP or via DERP (``src`` None).

        Packets that do not open are dropped and counted; messages that opened but do not parse,
        or that this node does not act on, are ignored and counted (as tailscaled does)."""
        try:
            message = self.session.open(packet)
        except DiscoUnknownTypeError:
            self.drops["unknown-type"] += 1
            return []
        except DiscoMessageError:
            self.drops["malformed-message"] += 1
            return []
        except DiscoPacketError:
            self.drops["not-disco"] += 1
            return []
        except DiscoError:
            self.drops["box-not-opened"] += 1
            return []
        if src is not None:
            try:
                src = normalize_endpoint(src)
            except ValueError:
                self.drops["bad-source"] += 1
                return []
        if isinstance(message, Ping):
            return self._on_ping(message, src, now)
        if isinstance(message, Pong):
            return self._on_pong(message, src, now)
        if isinstance(message, CallMeMaybe):
            return self._on_call_me_maybe(message, src, now)
        self.drops["unsupported-message"] += 1
        return []

    # --- time ---

    def next_deadline(self) -> float | None:
        times: list[float] = [p.at + PING_TIMEOUT for p in self._sent.values()]
        if self._round is not None:
            times.append(self._round.started + self._discovery_timeout)
            times += [when for _, when, _ in self._round.next_ping.values()]
        if self._trust_until is not None:
            times.append(self._trust_until)
        if self._probe_deadline is not None:
            times.append(self._probe_deadline)
        if self._next_heartbeat is not None:
            times.append(self._next_heartbeat)
        if self._trust_until is not None and self._best_pong_at is not None:
            stale = self._best_pong_at + self.stale_after
            if stale < self._trust_until and self._fresher() is not None:
                times.append(stale)
        times += [c.last_ping_received + SESSION_ACTIVE_TIMEOUT for c in self._candidates.values()
                  if c.last_ping_received is not None and Source.PEER_REFLEXIVE in c.sources]
        return min(times) if times else None

    def tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for txid in [t for t, p in self._sent.items() if now >= p.at + PING_TIMEOUT]:
            del self._sent[txid]
        self._gc(now)
        probe_failed = self._probe_deadline is not None and now >= self._probe_deadline
        if probe_failed:
            self._probe_deadline = None
        if self._trust_until is not None and (now >= self._trust_until or probe_failed):
            assert self._best is not None
            self._trust_until = None
            self._reason = (f"no pong from {_fmt(self._best)} within {self._probe_timeout:g} s of a probe"
                            if probe_failed else f"no pong from {_fmt(self._best)} for {TRUST_UDP_ADDR_DURATION} s")
            self._announced_none = False
            actions.append(PathLost(self._best, self._reason))
            if self._active(now):
                actions += self._discover(now, call_me_maybe=True, reset=False)
        if self._stale(now):
            actions += self._take_fresher(now)
        if self._round is not None:
            actions += self._run_round(now)
        if self._next_heartbeat is not None and now >= self._next_heartbeat:
            actions += self._heartbeat(now)
        return actions

    # --- queries ---

    def route(self, now: float) -> Route:
        """Tailscale's send rule: a trusted path alone; otherwise the best path (if any) and DERP."""
        if self._trusted(now):
            return Route(self._best, False)
        return Route(self._best, self._derp)

    @property
    def trusted_until(self) -> float | None:
        """When the best path's trust ends (its last pong + TRUST_UDP_ADDR_DURATION), None if untrusted."""
        return self._trust_until

    def status(self, now: float) -> PathStatus:
        trusted = self._trusted(now)
        return PathStatus(
            path="direct" if trusted else "none",
            endpoint=self._best if trusted else None,
            rtt=self._best_rtt if trusted else None,
            reason=None if trusted else self._reason,
            candidates=tuple(CandidateStatus(c.endpoint, tuple(sorted(s.value for s in c.sources)), c.pings_sent,
                                             len(c.pongs), c.rtt) for c in self._candidates.values()),
        )

    # --- internals ---

    def _trusted(self, now: float) -> bool:
        return self._trust_until is not None and now < self._trust_until

    def _stale(self, now: float) -> bool:
        return (self._trusted(now) and self._best_pong_at is not None
                and now - self._best_pong_at >= self.stale_after)

    def _fresher(self) -> _Candidate | None:
        """The candidate (not the best) that answered last, if it answered after the best did."""
        since = self._best_pong_at if self._best_pong_at is not None else float("-inf")
        others = [c for ep, c in self._candidates.items() if ep != self._best and c.pongs and c.pongs[-1][0] > since]
        return max(others, key=lambda c: c.pongs[-1][0], default=None)

    def _take_fresher(self, now: float) -> list[Action]:
        """The best path is stale and another one answered since: it becomes the best path,
        trusted from its last pong (the peer roamed; waiting out the old trust would leave the
        data on a dead path for up to TRUST_UDP_ADDR_DURATION)."""
        cand = self._fresher()
        if cand is None:
            return []
        at, rtt = cand.pongs[-1]
        self._best, self._best_rtt, self._best_pong_at = cand.endpoint, rtt, at
        self._trust_until = at + TRUST_UDP_ADDR_DURATION
        self._reason, self._announced_none = None, False
        if not self._trusted(now):
            return []
        return [SetWireGuardEndpoint(cand.endpoint, rtt)]

    def _active(self, now: float) -> bool:
        return self._last_send is not None and now - self._last_send <= SESSION_ACTIVE_TIMEOUT

    def _candidate(self, endpoint: Endpoint) -> _Candidate:
        cand = self._candidates.get(endpoint)
        if cand is None:
            cand = self._candidates[endpoint] = _Candidate(endpoint)
        return cand

    def _gc(self, now: float) -> None:
        for ep, cand in list(self._candidates.items()):
            if (Source.PEER_REFLEXIVE in cand.sources and cand.last_ping_received is not None
                    and now >= cand.last_ping_received + SESSION_ACTIVE_TIMEOUT):
                cand.sources.discard(Source.PEER_REFLEXIVE)
            if not cand.sources and not (ep == self._best and self._trusted(now)):
                del self._candidates[ep]
                if self._round is not None:
                    self._round.next_ping.pop(ep, None)
                if ep == self._best:
                    self._best = None

    def _ping(self, to: Endpoint | None, now: float, purpose: str) -> SendDisco:
        txid = self._random(TXID_LENGTH)
        while txid in self._sent:
            txid = self._random(TXID_LENGTH)
        self._sent[txid] = _SentPing(to, now, purpose)
        if to is not None and to in self._candidates:
            self._candidates[to].pings_sent += 1
        return SendDisco(self.session.seal(Ping(txid, self.node_key), self._random), to)

    def _discover(self, now: float, *, call_me_maybe: bool, reset: bool) -> list[Action]:
        """Start (or extend) a discovery round over every candidate due a ping; with ``reset`` the
        DISCO_PING_INTERVAL gate is bypassed (a CallMeMaybe, a coordinator push, a roam)."""
        rnd = self._round if self._round is not None else _Round(now)
        added = False
        for ep, cand in self._candidates.items():
            if ep in rnd.next_ping:
                continue  # still being probed in this round
            if not reset and (ep in rnd.answered or (
                    cand.last_ping_sent is not None and now - cand.last_ping_sent < DISCO_PING_INTERVAL)):
                continue
            rnd.next_ping[ep] = (0, now, now)
            rnd.answered.discard(ep)
            added = True
        if not added:
            if self._round is None and not self._candidates:
                self._round = rnd
                return self._end_round(now)
            return []
        if reset:
            rnd.started = now
        self._round = rnd
        self._last_full_ping = now
        actions = self._run_round(now)
        if call_me_maybe:
            actions += self._call_me_maybe()
        return actions

    def _call_me_maybe(self) -> list[Action]:
        if not self._derp:
            return []
        if self._round is not None:
            self._round.sent_call_me_maybe = True
        return [SendDisco(self.session.seal(CallMeMaybe(self._own_endpoints), self._random), None)]

    def _run_round(self, now: float) -> list[Action]:
        rnd = self._round
        assert rnd is not None
        actions: list[Action] = []
        for ep, (attempt, when, first) in list(rnd.next_ping.items()):
            if when > now:
                continue
            actions.append(self._ping(ep, now, "discovery"))
            self._candidates[ep].last_ping_sent = now
            rnd.pings += 1
            if attempt + 1 < len(self._schedule):
                rnd.next_ping[ep] = (attempt + 1, first + self._schedule[attempt + 1], first)
            else:
                del rnd.next_ping[ep]
        if now >= rnd.started + self._discovery_timeout or (not rnd.next_ping and rnd.answered):
            actions += self._end_round(now)
        return actions

    def _end_round(self, now: float) -> list[Action]:
        rnd = self._round
        assert rnd is not None
        self._round = None
        if rnd.answered or self._trusted(now):
            return []
        if not self._candidates:
            reason = "no candidate endpoints for the peer"
        else:
            reason = f"no pong from any of {len(self._candidates)} candidates within {self._discovery_timeout:g} s"
        if self._announced_none and reason == self._reason:
            return []
        self._reason, self._announced_none = reason, True
        return [NoDirectPath(reason)]

    def _heartbeat(self, now: float) -> list[Action]:
        if not self._active(now):
            self._next_heartbeat = None  # idle: heartbeats stop until the next send
            return []
        self._next_heartbeat = now + self.heartbeat_interval
        actions: list[Action] = []
        if self._best is not None:
            actions.append(self._ping(self._best, now, "heartbeat"))
        if self._round is None and self._want_full_ping(now):
            actions += self._discover(now, call_me_maybe=True, reset=False)
        return actions

    def _want_full_ping(self, now: float) -> bool:
        if self._best is None or self._last_full_ping is None or not self._trusted(now):
            return True
        if self._best_rtt <= GOOD_ENOUGH_LATENCY:
            return False
        return now - self._last_full_ping >= UPGRADE_UDP_DIRECT_INTERVAL

    def _on_ping(self, ping: Ping, src: Endpoint | None, now: float) -> list[Action]:
        if src is None:  # via DERP: answer via DERP, learn nothing about UDP paths
            pong = Pong(ping.txid, (DERP_MAGIC_IP, self._derp_region))
            return [SendDisco(self.session.seal(pong, self._random), None)]
        cand = self._candidates.get(src)
        if cand is not None and cand.last_rx_txid == ping.txid:
            self.drops["duplicate-ping"] += 1
            return []
        new = cand is None
        cand = self._candidate(src)
        cand.sources.add(Source.PEER_REFLEXIVE)
        cand.last_rx_txid = ping.txid
        cand.last_ping_received = now
        actions: list[Action] = [SendDisco(self.session.seal(Pong(ping.txid, src), self._random), src)]
        if new and self._round is not None:  # a mapping we did not know: probe it in this round
            self._round.next_ping[src] = (0, now, now)
            actions += self._run_round(now)
        return actions

    def _on_pong(self, pong: Pong, src: Endpoint | None, now: float) -> list[Action]:
        sent = self._sent.pop(pong.txid, None)
        if sent is None:
            self.drops["unmatched-pong"] += 1
            return []
        if src is None or sent.to is None:
            return []  # a DERP ping's answer: liveness only
        rtt = now - sent.at
        self.seen_as = normalize_endpoint(pong.src)
        cand = self._candidates.get(sent.to)
        if cand is None:
            return []  # no longer a candidate we care about
        cand.pongs.append((now, rtt))
        if self._round is not None:
            self._round.answered.add(sent.to)
            self._round.next_ping.pop(sent.to, None)
        actions: list[Action] = []
        was_trusted = self._trusted(now)
        if better_path(sent.to, rtt, self._best, self._best_rtt) or not was_trusted or self._stale(now):
            changed = sent.to != self._best
            self._best = sent.to
            if changed or not was_trusted:
                actions.append(SetWireGuardEndpoint(sent.to, rtt))
        if self._best == sent.to:
            self._probe_deadline = None
            self._best_rtt, self._best_pong_at = rtt, now
            self._trust_until = now + TRUST_UDP_ADDR_DURATION
            self._reason, self._announced_none = None, False
        if self._round is not None and not self._round.next_ping:
            actions += self._end_round(now)
        return actions

    def _on_call_me_maybe(self, cmm: CallMeMaybe, src: Endpoint | None, now: float) -> list[Action]:
        if src is not None:
            self.drops["call-me-maybe-not-via-derp"] += 1
            return []
        listed = {ep for ep in cmm.endpoints if not ipaddress.ip_address(ep[0]).is_link_local}
        for ep, cand in self._candidates.items():
            if ep not in listed:
                cand.sources.discard(Source.CALL_ME_MAYBE)
        for ep in listed:
            self._candidate(ep).sources.add(Source.CALL_ME_MAYBE)
        self._gc(now)
        return self._discover(now, call_me_maybe=False, reset=True)


def _fmt(endpoint: Endpoint) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
