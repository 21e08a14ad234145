"""An asyncio driver for one peer's path selection (pywg.nat.paths) on a UDP socket.

``PathDriver`` owns a bound, non-blocking UDP socket. ``gather_candidates`` runs STUN Binding
transactions from that socket (so the reflexive address is the socket's own mapping) and
returns our candidates: the socket's local address and the STUN-reflexive one. The caller
passes them to the peer (``on_candidates``; the coordinator's push in the agent) and hands
the peer's candidates to ``set_peer_candidates``, which starts a punching round. ``run``
carries out ``PeerPaths``' actions with the event loop's clock: disco packets (sealed with the
disco keys) go out of the socket, replies come in and are told apart from STUN, and the
chosen path (``SetWireGuardEndpoint``) or the lack of one (``NoDirectPath``, with its reason)
is recorded and reported through ``on_path``. Sends via DERP are counted, not carried (the
relay is another layer's).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from pywg.nat.disco import DiscoKey, Endpoint, looks_like_disco
from pywg.nat.paths import (
    Action,
    NoDirectPath,
    PathLost,
    PathStatus,
    PeerPaths,
    SendDisco,
    SetWireGuardEndpoint,
    Source,
)
from pywg.nat.stun import TransportAddress, looks_like_stun
from pywg.nat.stun_client import BindingResult, RetransmitPolicy, StunClient

Candidates = list[tuple[Endpoint, Source]]
PathEvent = SetWireGuardEndpoint | NoDirectPath | PathLost


class PathDriver:
    """Path selection towards one peer over ``sock`` (see the module docstring)."""

    def __init__(self, sock: socket.socket, key: DiscoKey, peer_disco_public: bytes, node_key: bytes, *,
                 stun_servers: Sequence[TransportAddress] = (), stun_policy: RetransmitPolicy | None = None,
                 on_path: Callable[[PathEvent], None] | None = None,
                 on_candidates: Callable[[Candidates], None] | None = None, active_interval: float | None = 1.0,
                 derp: bool = True) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.paths = PeerPaths(key.session(peer_disco_public), node_key, os.urandom, derp=derp)
        self.stun = StunClient(os.urandom, stun_policy)
        self.stun_servers = tuple(stun_servers)
        self.on_path = on_path
        self.on_candidates = on_candidates
        self.candidates: Candidates = []
        self._regathering: asyncio.Task[None] | None = None
        self.active_interval = active_interval  # stands in for WireGuard data: note_send this often
        self.events: list[tuple[float, PathEvent]] = []
        self.counters: Counter[str] = Counter()
        self.changed = asyncio.Event()
        self._stun_progress = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def now(self) -> float:
        return self._loop.time()

    # --- candidates ---

    async def gather_candidates(self) -> Candidates:
        """Our local address and the STUN-reflexive one of this socket (STUN answered by ``run``)."""
        host, port = self.sock.getsockname()[:2]
        candidates: Candidates = [((host, port), Source.LOCAL)]
        for server in self.stun_servers:
            self._send(self.stun.start(server, self.now()).datagram, server.as_tuple())
        while len(self.stun):
            await self._stun_progress.wait()
            self._stun_progress.clear()
        for outcome in self.stun.take_completed():
            if isinstance(outcome, BindingResult):
                reflexive = outcome.reflexive.as_tuple()
                if (reflexive, Source.STUN) not in candidates and reflexive != (host, port):
                    candidates.append((reflexive, Source.STUN))
        self.paths.set_own_endpoints(ep for ep, _ in candidates)
        self.candidates = candidates
        return candidates

    async def _regather(self) -> None:
        """The path was lost: re-run STUN; a changed reflexive address (the NAT re-mapped or
        the router roamed) goes to ``on_candidates`` (the coordinator, which pushes it to the peer)."""
        before = self.candidates
        after = await self.gather_candidates()
        if after != before:
            self.counters["candidates-changed"] += 1
            if self.on_candidates is not None:
                self.on_candidates(after)

    def set_peer_candidates(self, candidates: Iterable[tuple[Endpoint, Source]]) -> None:
        """The peer's advertised candidates: a punching round starts at once."""
        self._apply(self.paths.set_candidates(candidates, self.now()))

    def reset(self, reason: str) -> None:
        """Our network changed: rediscover at once."""
        self._apply(self.paths.reset(self.now(), reason))

    def status(self) -> PathStatus:
        return self.paths.status(self.now())

    # --- the loop ---

    async def run(self) -> None:
        """Receive, tick and keep the session active until cancelled."""
        next_active = self.now()
        while True:
            now = self.now()
            if self.active_interval is not None and now >= next_active:
                self._apply(self.paths.note_send(now))
                next_active = now + self.active_interval
            deadlines = [d for d in (self.paths.next_deadline(), self.stun.next_deadline()) if d is not None]
            if self.active_interval is not None:
                deadlines.append(next_active)
            timeout = max(0.0, min(deadlines) - now) if deadlines else 1.0
            try:
                data, source = await asyncio.wait_for(self._loop.sock_recvfrom(self.sock, 2048), timeout)
            except TimeoutError:
                data, source = b"", None
            now = self.now()
            if source is not None:
                self._receive(data, (source[0], source[1]), now)
            self._apply(self.paths.tick(now))
            for transmit in self.stun.tick(now):
                self._send(transmit.datagram, transmit.destination.as_tuple())
            self._stun_progress.set()

    def _receive(self, data: bytes, source: Endpoint, now: float) -> None:
        if looks_like_stun(data):
            self.stun.receive(data, source, now)
            self._stun_progress.set()
        elif looks_like_disco(data):
            self._apply(self.paths.receive(data, source, now))
        else:
            self.counters["dropped-not-stun-or-disco"] += 1

    def _send(self, data: bytes, to: Endpoint) -> None:
        try:
            self.sock.sendto(data, to)
            self.counters["sent"] += 1
        except (BlockingIOError, OSError):
            self.counters["send-failed"] += 1

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendDisco):
                if action.to is None:
                    self.counters["via-derp"] += 1
                else:
                    self._send(action.packet, action.to)
            else:
                if isinstance(action, PathLost) and self.stun_servers and (
                        self._regathering is None or self._regathering.done()):
                    self._regathering = asyncio.ensure_future(self._regather())
                self.events.append((self.now(), action))
                self.changed.set()
                if self.on_path is not None:
                    self.on_path(action)
