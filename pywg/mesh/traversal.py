"""The agent's NAT traversal, on the WireGuard port of its in-process device.

``Traversal`` runs the sans-I/O pieces of ``pywg.nat`` over a device: it registers the
STUN and disco handlers of the device's demux and sends with ``device.send_datagram``, so
every STUN Binding leaves from the WireGuard port and the reflexive address it learns is
that port's mapping; disco pings leave from the same port, so a punched path is the path
WireGuard's own packets take.

- **Candidates**: our local addresses (``local()``, the agent's interface addresses with the
  listen port) and the STUN-reflexive ones, gathered at start, every ``STUN_REFRESH``, when
  a trusted path's heartbeat goes unanswered (``HEARTBEAT_MISSED``: 0.5 s after a missed
  pong) and when a path is lost (the NAT may have re-mapped, the router roamed). When the
  reflexive address moves, every peer is punched again at once from the new mapping. With two
  or more servers ``classify_mapping`` tells the mapping behaviour; ``behind_nat`` is whether
  a reflexive address differs from every local one. A changed list goes to ``on_candidates``
  (the agent PUTs it to the coordinator, which pushes it to the peers).
- **Peers**: one ``PeerPaths`` per peer with a disco key, fed by :meth:`set_peers` with the
  peer's advertised endpoints (the coordinator's push: a changed list starts a punching round
  at once, on both sides, since both got the push together). They are labelled "advertised":
  the coordinator does not say which are local and which STUN-reflexive, and the address
  class cannot tell (a CGNAT's or the lab's reflexive addresses are private).
- **Timers**: :meth:`run` keeps one task for every peer's ``next_deadline``/``tick`` and the
  STUN retransmissions. A peer is *active* (``note_send``) while its WireGuard tx counter
  grows by data (``activity()``, read every ``ACTIVITY_INTERVAL``): Tailscale's rule,
  heartbeats while data flows and none on an idle tunnel (SESSION_ACTIVE_TIMEOUT), every
  ``ACTIVE_HEARTBEAT`` (1 s, not Tailscale's 3 s, so a roam is noticed within 1.5 s: a ping
  and a pong a second per active peer). Growth that is only a keepalive or handshake
  messages is not data (:func:`carries_data`), so an idle tunnel behind a NAT is kept open
  by WireGuard's keepalive alone, at the interval this module tunes, and not by disco
  heartbeats. (In the agent the health echoes are data: they keep the paths probed while
  they run.)
- **The endpoint**: :meth:`endpoint` is the peer's last confirmed direct path (kept after a
  loss until a new one is confirmed, WireGuard's roaming may still use it); the agent's
  reconcile makes it the peer's WireGuard endpoint, the one place that writes the device.
  ``on_change`` says when an endpoint or the keepalive changed.
- **Keepalive**: behind a NAT (or not known yet) ``DEFAULT_KEEPALIVE`` (25 s) until a learnt
  interval comes (:meth:`set_learnt_keepalive`: pywg.mesh.keepalive_learning asks the
  coordinator's observer how long the mapping survives idle); with no NAT found, 0. Every
  finished gathering goes to ``on_mapping`` (the learner re-learns when the NAT changed).
- **DERP**: with ``relay(peer_node_key, packet)`` (the agent's, over the device's DeviceRelay;
  None: disco via DERP is counted, not carried) a peer with a home region (``PeerInfo.region``)
  has a DERP path: while no direct path is trusted its endpoint is ``RelayEndpoint(region,
  its node key)``, its CallMeMaybe and DERP pings go there, and disco arriving via DERP (the
  demux's handler with a RelayEndpoint source, or :meth:`receive_relayed`) is taken as such.
  A trusted direct path whose peer sent nothing back over ``ACTIVITY_INTERVAL_DERP`` while we
  sent (``received()``: the WireGuard rx counters) is probed at once; no pong within
  ``PROBE_TIMEOUT`` and it is lost: the endpoint is the relay again within about 2 s.

Network input that is not for us (unknown disco senders, unmatched STUN) is dropped and
counted in ``drops``; the device keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pywg.nat.disco import DiscoError, DiscoKey, Endpoint, normalize_endpoint, sender_key
from pywg.nat.keepalive import keepalive_for
from pywg.nat.paths import (
    TRUST_UDP_ADDR_DURATION,
    Action,
    NoDirectPath,
    PathLost,
    PeerPaths,
    SendDisco,
    SetWireGuardEndpoint,
    Source,
)
from pywg.nat.stun import TransportAddress
from pywg.nat.stun_client import (
    BindingResult,
    MappingBehavior,
    MappingReport,
    Outcome,
    RetransmitPolicy,
    StunClient,
    classify_mapping,
)
from pywg.protocol.actions import Endpoint as AnyEndpoint
from pywg.protocol.demux import Protocol as Demux
from pywg.protocol.endpoint import RelayEndpoint

log = logging.getLogger(__name__)

# Sends at 0, 0.25, 0.75, 1.75, 3.75 s, failure at 5.75 s: a gathering ends within 6 s.
STUN_POLICY = RetransmitPolicy(rto=0.25, max_transmissions=5, last_wait_factor=8)
STUN_REFRESH = 30.0  # seconds between gatherings while nothing is lost (a re-map shows up)
REGATHER_GAP = 1.0  # at least this long between gatherings a lost path asks for
ACTIVITY_INTERVAL = 1.0  # how often the WireGuard tx counters are read
ACTIVITY_INTERVAL_DERP = 0.5  # with a relay: how often tx and rx are read (a dead direct path shows)
PROBE_TIMEOUT = 0.75  # a probe of a direct path that seems dead: no pong this long and it is lost

# Wire sizes of the WireGuard messages that carry no data: a keepalive (an empty transport
# message) and the handshake messages. A data message is 32 bytes plus its padded packet
# (a multiple of 16, at least 32 for any IP packet), so at least 64 bytes.
KEEPALIVE_SIZE, INITIATION_SIZE, RESPONSE_SIZE = 32, 148, 92
NOT_DATA = frozenset(
    k * KEEPALIVE_SIZE + i * INITIATION_SIZE + r * RESPONSE_SIZE
    for k in (0, 1) for i in (0, 1, 2) for r in (0, 1, 2)
    # a sum that is a multiple of 16 (beyond one keepalive) may as well be data messages
    if k + i + r and (k * KEEPALIVE_SIZE + i * INITIATION_SIZE + r * RESPONSE_SIZE == KEEPALIVE_SIZE
                      or (i * INITIATION_SIZE + r * RESPONSE_SIZE) % 16))


def carries_data(growth: int) -> bool:
    """Whether a peer's tx counter, grown by ``growth`` bytes over one ACTIVITY_INTERVAL,
    sent data: not when the growth is one keepalive and/or a few handshake messages."""
    return growth > 0 and growth not in NOT_DATA
MAX_WAIT = 5.0  # the timer task wakes at least this often
MAX_CANDIDATES = 16  # our own, as the coordinator takes them (wire.MAX_ENDPOINTS)
# While a peer's session is active its best path is pinged this often (Tailscale's 3 s would
# leave a roam unnoticed for up to 3.5 s): one ping and one pong a second per active peer.
ACTIVE_HEARTBEAT = 1.0
# A trusted path whose heartbeat went unanswered this long after the last pong: gather again
# at once (a roam or a re-map shows in the reflexive address well before the trust runs out).
HEARTBEAT_MISS_MARGIN = 0.5
HEARTBEAT_MISSED = ACTIVE_HEARTBEAT + HEARTBEAT_MISS_MARGIN

Handler = Callable[[bytes, AnyEndpoint], None]  # the device's demux: a UDP source or a relay


class DatagramPort(Protocol):
    """What the traversal needs of a device: its demux's handlers and its sending."""

    def register_handler(self, protocol: Demux, handler: Handler | None) -> None: ...

    def send_datagram(self, data: bytes, endpoint: tuple[str, int]) -> None: ...


@dataclass(frozen=True)
class PeerInfo:
    """A peer as the coordinator advertises it: its disco public key and endpoints."""

    disco_key: bytes
    endpoints: tuple[Endpoint, ...]
    region: int | None = None  # the peer's DERP home region (None: it has none)


def endpoint_text(endpoint: Endpoint) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class _Peer:
    node_key: bytes
    info: PeerInfo
    paths: PeerPaths
    endpoint: Endpoint | None = None  # the last confirmed direct path
    tx_bytes: int | None = None
    rx_bytes: int | None = None
    reassert: bool = False  # the device roamed to DERP while the direct path is ours: probe, then re-apply
    missed_for: float | None = None  # the trust (its end) a missed heartbeat already gathered for


class Traversal:
    """NAT traversal over ``port`` for this node (see the module docstring)."""

    def __init__(self, port: DatagramPort, key: DiscoKey, node_key: bytes, *,
                 stun_servers: Iterable[TransportAddress] = (),
                 local: Callable[[], list[Endpoint]] = list,
                 activity: Callable[[], Mapping[bytes, int]] | None = None,
                 on_candidates: Callable[[list[str]], None] | None = None,
                 on_change: Callable[[], None] | None = None,
                 on_status: Callable[[], None] | None = None,
                 on_mapping: Callable[[MappingReport], None] | None = None,
                 relay: Callable[[bytes, bytes], None] | None = None,
                 received: Callable[[], Mapping[bytes, tuple[int, bool]]] | None = None,
                 clock: Callable[[], float] | None = None,
                 random: Callable[[int], bytes] = os.urandom,
                 stun_policy: RetransmitPolicy = STUN_POLICY,
                 probe_schedule: tuple[float, ...] | None = None,
                 discovery_timeout: float | None = None, stun_refresh: float = STUN_REFRESH,
                 heartbeat_interval: float = ACTIVE_HEARTBEAT) -> None:
        self.port = port
        self.key = key
        self.node_key = node_key
        self.stun_servers = tuple(stun_servers)
        self.local = local
        self.activity = activity
        self.on_candidates = on_candidates
        self.on_change = on_change
        self.on_status = on_status  # a peer's path state changed (found, lost, none): status is stale
        self.on_mapping = on_mapping
        self.learnt_keepalive: float | None = None  # the learnt interval behind this NAT
        self.relay = relay
        self.received = received
        self.clock = clock or asyncio.get_running_loop().time
        self.random = random
        self.stun_refresh = stun_refresh  # seconds between gatherings (a re-map or a roam shows up)
        self.stun = StunClient(random, stun_policy)
        self._paths_options: dict[str, Any] = {"heartbeat_interval": heartbeat_interval}
        self.heartbeat_missed = heartbeat_interval + HEARTBEAT_MISS_MARGIN
        if probe_schedule is not None:
            self._paths_options["probe_schedule"] = probe_schedule
        if discovery_timeout is not None:
            self._paths_options["discovery_timeout"] = discovery_timeout
        self.peers: dict[bytes, _Peer] = {}  # by node (WireGuard public) key
        self._by_disco: dict[bytes, bytes] = {}  # disco public key -> node key
        self.local_endpoints: list[Endpoint] = []
        self.reflexive: list[Endpoint] = []
        self.mapping: MappingReport | None = None
        self.gatherings = 0
        self._gathering: list[Outcome] | None = None  # outcomes of the gathering under way
        self._gather_started: float | None = None
        self._next_gather: float | None = None
        self._next_activity: float | None = None
        self._published: list[str] | None = None
        self.drops: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # --- life ---------------------------------------------------------------------------

    def start(self) -> None:
        """Take the STUN and disco datagrams of the port, gather, and run the timers."""
        self.port.register_handler(Demux.STUN, self._on_stun)
        self.port.register_handler(Demux.DISCO, self._on_disco)
        self.local_endpoints = self._local()
        self.gather()
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def close(self) -> None:
        self.port.register_handler(Demux.STUN, None)
        self.port.register_handler(Demux.DISCO, None)
        self._closed = True  # wait_for on 3.11 may swallow a cancel that meets a wake-up
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def wake(self) -> None:
        """Run what is due now (after a clock jump in tests, or new input)."""
        self._wake.set()

    async def run(self) -> None:
        """The timer task: carry out what is due, sleep until the next deadline."""
        while not self._closed:
            now = self.clock()
            try:
                self.due(now)
            except Exception:
                log.exception("NAT traversal timers failed")
                self.counters["timer-failed"] += 1
            deadline = self.next_deadline()
            wait = MAX_WAIT if deadline is None else min(MAX_WAIT, max(0.0, deadline - self.clock()))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass

    # --- candidates -----------------------------------------------------------------------

    @property
    def candidates(self) -> list[tuple[Endpoint, Source]]:
        """Ours: local addresses first, then the STUN-reflexive ones (at most MAX_CANDIDATES)."""
        out = [(ep, Source.LOCAL) for ep in self.local_endpoints]
        out += [(ep, Source.STUN) for ep in self.reflexive if ep not in self.local_endpoints]
        return out[:MAX_CANDIDATES]

    @property
    def behind_nat(self) -> bool | None:
        return self.mapping.behind_nat if self.mapping is not None else None

    @property
    def keepalive(self) -> int:
        """The persistent keepalive for every peer: with no NAT 0; behind one the learnt
        interval (whole seconds, rounded down: inside the lifetime), else 25 s."""
        if self.behind_nat is False:
            return 0
        interval = keepalive_for(self.behind_nat, None) if self.learnt_keepalive is None else self.learnt_keepalive
        return 0 if interval is None else max(1, math.floor(interval))

    def set_learnt_keepalive(self, interval: float | None) -> None:
        """The interval learnt behind the current NAT (None: not learnt, the default)."""
        before = self.keepalive
        self.learnt_keepalive = interval
        if self.keepalive != before:
            self._changed()

    def set_stun_servers(self, servers: Iterable[TransportAddress]) -> None:
        """The coordinator's (or the operator's) STUN servers; a changed list gathers again."""
        servers = tuple(servers)
        if servers != self.stun_servers:
            self.stun_servers = servers
            self.gather()

    def gather(self) -> None:
        """Re-read the local addresses and start a Binding to every STUN server (on demand)."""
        now = self.clock()
        self._next_gather = now + self.stun_refresh
        self.local_endpoints = self._local()
        if not self.stun_servers:
            self._publish()
            return
        if self._gathering is not None:
            return  # one at a time; its outcomes are as fresh
        self._gathering = []
        self._gather_started = now
        self.gatherings += 1
        for server in self.stun_servers:
            transmit = self.stun.start(server, now)
            self._send(transmit.datagram, transmit.destination.as_tuple())
        self.wake()  # published as the answers come (a local-only list would go out first)

    def _local(self) -> list[Endpoint]:
        try:
            return [normalize_endpoint(ep) for ep in self.local()][:MAX_CANDIDATES]
        except (OSError, ValueError) as exc:
            log.warning("cannot read the local addresses: %s", exc)
            return self.local_endpoints

    def _on_stun(self, data: bytes, source: AnyEndpoint) -> None:
        if isinstance(source, RelayEndpoint):  # STUN answers come over UDP only
            self.drops["stun-via-relay"] += 1
            return
        if self.stun.receive(data, source, self.clock()) is None:
            return  # dropped and counted by the client
        self._gathered(self.stun.take_completed())

    def _gathered(self, outcomes: list[Outcome]) -> None:
        if self._gathering is None or not outcomes:
            return
        self._gathering += outcomes
        results = [o for o in self._gathering if isinstance(o, BindingResult)]
        done = not len(self.stun)
        if results:  # every reflexive address seen in this gathering (more than one: symmetric)
            seen: list[Endpoint] = []
            for r in results:
                ep = r.reflexive.as_tuple()
                if ep not in seen:
                    seen.append(ep)
            moved = bool(self.reflexive) and not set(seen) & set(self.reflexive)
            self.reflexive = seen
            if moved:
                self._punch_all()
        if done:
            local = [TransportAddress.of(*ep) for ep in self.local_endpoints]
            report = classify_mapping(self._gathering, local)
            before = self.keepalive
            self.mapping = report
            if self.keepalive != before:
                self._changed()
            self._gathering = None
            if self.on_mapping is not None:
                self.on_mapping(report)
            log.info("NAT: %s (behind a NAT: %s); candidates %s", report.reason, report.behind_nat,
                     ", ".join(endpoint_text(ep) for ep, _ in self.candidates))
        self._publish()

    def _publish(self) -> None:
        """Our candidates to every peer's CallMeMaybe and, if changed, to the coordinator."""
        endpoints = [ep for ep, _ in self.candidates]
        for peer in self.peers.values():
            peer.paths.set_own_endpoints(endpoints)
        text = [endpoint_text(ep) for ep in endpoints]
        if text != self._published:
            if self._published is not None:
                self.counters["candidates-changed"] += 1
            self._published = text
            if self.on_candidates is not None:
                self.on_candidates(text)

    def set_relay(self, relay: Callable[[bytes, bytes], None] | None,
                  received: Callable[[], Mapping[bytes, tuple[int, bool]]] | None = None) -> None:
        """The DERP path came (or went): peers with a home region may be reached through it."""
        self.relay, self.received = relay, received
        for peer in self.peers.values():
            self._derp_of(peer)
        self._changed()
        self.wake()

    def _derp_of(self, peer: _Peer) -> None:
        region = peer.info.region
        peer.paths.set_derp(self.relay is not None and region is not None, region or 0)

    def relayed(self, node_key: bytes) -> RelayEndpoint | None:
        """The peer's DERP path when data to it goes via DERP now (no trusted direct path)."""
        peer = self.peers.get(node_key)
        if peer is None or self.relay is None or peer.info.region is None:
            return None
        trusted = peer.paths.trusted_until
        if trusted is not None and self.clock() < trusted and peer.endpoint is not None:
            return None
        return RelayEndpoint(peer.info.region, node_key)

    @property
    def published(self) -> list[str]:
        """Our candidates as last handed to ``on_candidates``."""
        return list(self._published or [])

    # --- peers ----------------------------------------------------------------------------

    def set_peers(self, peers: Mapping[bytes, PeerInfo]) -> None:
        """The peers with disco keys, as the coordinator last pushed them: new ones and ones
        whose endpoints changed start a punching round now; gone ones are forgotten."""
        now = self.clock()
        going = {self.peers[k].info.disco_key: k for k in self.peers if k not in peers}
        for node_key, info in peers.items():
            old = going.pop(info.disco_key, None)
            if old is not None and node_key not in self.peers:  # the peer rotated its node key: paths kept
                moved = self.peers[node_key] = self.peers.pop(old)
                moved.node_key = node_key
                moved.tx_bytes = None
                self._by_disco[info.disco_key] = node_key
        for node_key in going.values():
            self._forget(node_key)
        for node_key, info in peers.items():
            peer = self.peers.get(node_key)
            if peer is not None and peer.info.disco_key != info.disco_key:
                self._forget(node_key)  # a new disco key (the peer restarted): a new session
                peer = None
            if peer is None:
                if info.disco_key in self._by_disco:
                    self.drops["disco-key-of-two-peers"] += 1
                    continue
                paths = PeerPaths(self.key.session(info.disco_key), self.node_key, self.random,
                                  derp=self.relay is not None, **self._paths_options)
                paths.set_own_endpoints(ep for ep, _ in self.candidates)
                peer = self.peers[node_key] = _Peer(node_key, info, paths)
                self._by_disco[info.disco_key] = node_key
            elif peer.info == info:
                continue
            peer.info = info
            self._derp_of(peer)
            # The coordinator's endpoints carry no source: labelled "advertised", not guessed
            # from the address (a STUN-reflexive one may well be private, a CGNAT's or a lab's).
            candidates = [(ep, Source.ADVERTISED) for ep in info.endpoints]
            self._carry(peer, peer.paths.set_candidates(candidates, now))
        self.wake()

    def _forget(self, node_key: bytes) -> None:
        peer = self.peers.pop(node_key)
        self._by_disco.pop(peer.info.disco_key, None)

    def endpoint(self, node_key: bytes) -> Endpoint | RelayEndpoint | None:
        """The peer's WireGuard endpoint: its DERP path while no direct path is trusted (see
        :meth:`relayed`), else its last confirmed direct path (None: never one)."""
        peer = self.peers.get(node_key)
        if peer is None:
            return None
        return self.relayed(node_key) or peer.endpoint

    def _on_disco(self, data: bytes, source: AnyEndpoint) -> None:
        if isinstance(source, RelayEndpoint):  # via DERP, through the device's demux
            self._receive_disco(data, None, source.node_key)
            return
        self._receive_disco(data, source)

    def receive_relayed(self, data: bytes) -> None:
        """A disco packet that came via DERP (the relay's seam)."""
        self._receive_disco(data, None)

    def _receive_disco(self, data: bytes, source: tuple[str, int] | None, relayed_by: bytes | None = None) -> None:
        try:
            node_key = self._by_disco.get(sender_key(data))
        except DiscoError:
            self.drops["not-disco"] += 1
            return
        if node_key is None:
            self.drops["unknown-disco-sender"] += 1
            return
        if relayed_by is not None and relayed_by != node_key:
            self.drops["disco-relayed-by-another-node"] += 1  # a peer's disco key from another DERP node
            return
        peer = self.peers[node_key]
        self._carry(peer, peer.paths.receive(data, source, self.clock()))
        if peer.reassert and not peer.paths.probing:
            peer.reassert = False
            if self.relayed(node_key) is None:
                self._changed()  # the direct path answered: the reconcile puts it back
        if source is not None and peer.paths.seen_as is not None:
            self._note_seen_as(peer.paths.seen_as)
        self.wake()

    def _note_seen_as(self, seen: Endpoint) -> None:
        """A pong says where the peer saw us: an address none of our candidates has means the
        NAT re-mapped us or its WAN address changed (nothing on this host changed): gather
        again, so the coordinator gets the new reflexive candidate. Behind an endpoint-
        dependent mapping every peer sees another port: only a new IP address counts there."""
        ours = [ep for ep, _ in self.candidates]
        if not ours or seen in ours:
            return
        if self.mapping is not None and self.mapping.reflexive is None and seen[0] in {ep[0] for ep in ours}:
            return
        self._regather()

    # --- time -----------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        times = [t for t in (self.stun.next_deadline(), self._next_gather) if t is not None]
        if self.activity is not None and self.peers:
            times.append(self._next_activity if self._next_activity is not None else self.clock())
        times += [d for p in self.peers.values() if (d := p.paths.next_deadline()) is not None]
        times += [t - TRUST_UDP_ADDR_DURATION + self.heartbeat_missed for p in self.peers.values()
                  if (t := p.paths.trusted_until) is not None and p.missed_for != t]
        return min(times) if times else None

    def due(self, now: float) -> None:
        """Carry out everything due at ``now``."""
        for transmit in self.stun.tick(now):
            self._send(transmit.datagram, transmit.destination.as_tuple())
        self._gathered(self.stun.take_completed())
        if self._next_gather is not None and now >= self._next_gather:
            self.gather()
        if self.activity is not None and self.peers and (self._next_activity is None or now >= self._next_activity):
            self._next_activity = now + (ACTIVITY_INTERVAL_DERP if self.received is not None else ACTIVITY_INTERVAL)
            self._note_activity(now)
        for peer in list(self.peers.values()):
            self._carry(peer, peer.paths.tick(now))
            trusted = peer.paths.trusted_until
            if (trusted is not None and peer.missed_for != trusted
                    and now - (trusted - TRUST_UDP_ADDR_DURATION) >= self.heartbeat_missed):
                peer.missed_for = trusted
                self.counters["heartbeats-missed"] += 1
                self._regather()

    def _note_activity(self, now: float) -> None:
        assert self.activity is not None
        try:
            tx = self.activity()
        except Exception:
            log.exception("reading the WireGuard counters failed")
            return
        rx: Mapping[bytes, tuple[int, bool]] = {}
        if self.received is not None:
            try:
                rx = self.received()
            except Exception:
                log.exception("reading the WireGuard counters failed")
        for peer in self.peers.values():
            count = tx.get(peer.node_key)
            if count is None:
                continue
            sent = peer.tx_bytes is not None and carries_data(count - peer.tx_bytes)
            if sent:
                self._carry(peer, peer.paths.note_send(now))
            peer.tx_bytes = count
            got = rx.get(peer.node_key)
            if got is None:
                continue
            count, roamed = got  # rx bytes; the device's endpoint is a relay one now
            direct = self.relay is not None and peer.info.region is not None and self.relayed(peer.node_key) is None
            if direct and (roamed or (sent and count == peer.rx_bytes)):
                # we sent and nothing came back, or the peer came via DERP (WireGuard roamed to
                # it): the direct path may be dead; a pong re-applies it, none loses it
                probe = peer.paths.probe(now, PROBE_TIMEOUT)
                if probe:
                    self.counters["direct-path-probes"] += 1
                peer.reassert = peer.reassert or roamed
                self._carry(peer, probe)
            peer.rx_bytes = count

    # --- actions --------------------------------------------------------------------------

    def _carry(self, peer: _Peer, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendDisco):
                if action.to is not None:
                    self._send(action.packet, action.to)
                elif self.relay is not None and peer.info.region is not None:
                    self.relay(peer.node_key, action.packet)
                else:
                    self.counters["disco-via-derp-not-carried"] += 1
            elif isinstance(action, SetWireGuardEndpoint):
                log.info("direct path to %s: %s (%.1f ms)", _short(peer.node_key),
                         endpoint_text(action.endpoint), action.rtt * 1000)
                if action.endpoint != peer.endpoint or self.relay is not None:  # from DERP, too
                    peer.endpoint = action.endpoint
                    self._changed()
                else:
                    self._status_changed()
            elif isinstance(action, PathLost):
                log.info("path to %s lost: %s", _short(peer.node_key), action.reason)
                self.counters["paths-lost"] += 1
                if self.relayed(peer.node_key) is not None:
                    self._changed()  # back to DERP
                else:
                    self._status_changed()
                self._regather()
            elif isinstance(action, NoDirectPath):
                log.info("no direct path to %s: %s", _short(peer.node_key), action.reason)
                self._status_changed()

    def _punch_all(self) -> None:
        """Our reflexive address moved (a roam, a re-map): every peer is pinged from the new
        mapping now, so our NAT lets the answers in; the peer learns the new address from the
        coordinator's push (or from our pings' source, where its NAT lets them in)."""
        self.counters["reflexive-moved"] += 1
        now = self.clock()
        log.info("our reflexive address moved to %s: punching to every peer again",
                 ", ".join(endpoint_text(ep) for ep in self.reflexive))
        for peer in list(self.peers.values()):
            self._carry(peer, peer.paths.punch(now))

    def _regather(self) -> None:
        """A path was lost: gather again soon (our mapping may have changed)."""
        if self._gathering is not None or not self.stun_servers:
            return
        now = self.clock()
        soonest = (self._gather_started or -REGATHER_GAP) + REGATHER_GAP
        self._next_gather = max(now, soonest) if self._next_gather is None else min(self._next_gather,
                                                                                     max(now, soonest))
        self.wake()

    def _send(self, data: bytes, to: tuple[str, int]) -> None:
        try:
            self.port.send_datagram(data, to)
            self.counters["sent"] += 1
        except OSError:
            self.counters["send-failed"] += 1

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _status_changed(self) -> None:
        """Only what ``pywg agent status`` shows changed (the device's endpoint did not)."""
        if self.on_status is not None:
            self.on_status()

    # --- status ---------------------------------------------------------------------------

    def own_status(self) -> dict[str, Any]:
        mapping = self.mapping
        return {
            "candidates": [{"endpoint": endpoint_text(ep), "source": src.value} for ep, src in self.candidates],
            "mapping": mapping.behavior.value if mapping else MappingBehavior.UNKNOWN.value,
            "mappingReason": mapping.reason if mapping else ("no STUN servers" if not self.stun_servers
                                                              else "STUN not answered yet"),
            "behindNat": self.behind_nat,
            "keepalive": self.keepalive,
            "stunServers": [str(s) for s in self.stun_servers],
            "stun": mapping.to_json()["servers"] if mapping else [],
            "drops": dict(self.drops + self.stun.drops),
        }

    def peer_status(self, node_key: bytes) -> dict[str, Any] | None:
        """``path``, ``endpoint``, ``rttMs``, ``reason`` and the ``candidates`` tried."""
        peer = self.peers.get(node_key)
        if peer is None:
            return None
        status = peer.paths.status(self.clock())

        def ms(seconds: float | None) -> float | None:
            return None if seconds is None else round(seconds * 1000, 3)

        relayed = self.relayed(node_key)
        return {
            "path": "derp" if relayed is not None else status.path,
            **({"region": relayed.region} if relayed is not None else {}),
            "endpoint": endpoint_text(status.endpoint) if status.endpoint else None,
            "rttMs": ms(status.rtt),
            "reason": status.reason,
            "candidates": [{"endpoint": endpoint_text(c.endpoint), "sources": list(c.sources),
                            "pingsSent": c.pings_sent, "pongs": c.pongs, "rttMs": ms(c.rtt)}
                           for c in status.candidates],
        }


def _short(node_key: bytes) -> str:
    """A peer's WireGuard key as the agent's log names it (the first 8 base64 characters)."""
    return base64.b64encode(node_key).decode()[:8]
