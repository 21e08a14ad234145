"""The agent learns its NAT mapping's idle lifetime from the coordinator's observer
(pywg.mesh.nat_observer) and keeps the mapping alive just inside it (pywg.nat.keepalive).

- ``ParallelSearch`` (sans-I/O) drives ``MappingLifetimeSearch`` with trials in parallel: a
  round asks several idle values at once (the first a spread over ``LOW..HIGH``; later ones
  split the bracket left), so learning takes about the lifetime, not a sum of trials. A
  trial that died makes every longer one of its round moot: they are cancelled and the next
  round starts. Lifetimes above ``HIGH`` (32 s) need not be told apart: the interval is
  capped at 25 s anyway.
- ``Learner`` runs the trials, one side UDP socket each (never the WireGuard port: a trial
  must not disturb the tunnel; the NAT's UDP timeout applies to every flow of the host), at
  most ``MAX_SOCKETS`` at once and ``MAX_LEARNING`` seconds in all. A trial sends one request
  and survives if the observer's authentic reply comes within ``idle + GRACE`` seconds.
  ``relearn(nat)`` starts over when the NAT changed (its WAN addresses: a roam), and until it
  is learnt the interval is the default. An observer that answers not even the shortest
  trial teaches nothing (it is unreachable): the default stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from pywg.mesh import nat_observer
from pywg.nat.keepalive import MappingLifetimeSearch

log = logging.getLogger(__name__)

LOW, HIGH = 1, 32  # seconds: above 32 s the interval is 25 s whatever the lifetime
FIRST_ROUND = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
MAX_SOCKETS = 10
GRACE = 1.5  # seconds past the idle time a reply may take (round trip, timers)
MAX_LEARNING = 150.0  # seconds in all; after that the default stays


class ParallelSearch:
    """Rounds of parallel trials over a ``MappingLifetimeSearch`` (see the module docstring)."""

    def __init__(self, max_parallel: int = MAX_SOCKETS) -> None:
        self.search = MappingLifetimeSearch(low=LOW, high=HIGH, resolution=1.0)
        self.max_parallel = max_parallel
        self.rounds = 0

    @property
    def done(self) -> bool:
        return self.search.done

    def next_round(self) -> list[int]:
        """The idle values (whole seconds) to try at once now; [] when done."""
        if self.done:
            return []
        self.rounds += 1
        s = self.search
        lo = int(s.survived) if s.survived is not None else 0
        hi = math.ceil(s.died) if s.died is not None else HIGH + 1
        if s.survived is None and s.died is None:
            return list(FIRST_ROUND[: self.max_parallel])
        values = list(range(max(LOW, lo + 1), min(HIGH, hi - 1) + 1))
        if len(values) > self.max_parallel:
            step = len(values) / self.max_parallel
            values = sorted({values[int(i * step)] for i in range(self.max_parallel)})
        return values or [max(LOW, min(HIGH, lo + 1))]

    def record(self, idle: int, survived: bool) -> None:
        self.search.record(float(idle), survived)

    def moot(self, idle: int) -> bool:
        """A pending trial of ``idle`` tells nothing new (a shorter one died already)."""
        died = self.search.died
        return died is not None and idle > died


@dataclass(frozen=True)
class Learnt:
    """A finished search: the interval and what it came from."""

    survived: float
    died: float | None
    interval: float | None

    def describe(self) -> str:
        died = "" if self.died is None else f", died at {self.died:g} s"
        return f"learnt: mapping survived {self.survived:g} s{died}"


Credential = Callable[[], "tuple[str, str] | None"]  # (node id, node token) once registered


class Learner:
    """Learns the lifetime behind the current NAT (see the module docstring)."""

    def __init__(self, credential: Credential, on_change: Callable[[], None], *,
                 random: Callable[[int], bytes] = os.urandom, grace: float = GRACE,
                 max_learning: float = MAX_LEARNING) -> None:
        self.credential = credential
        self.on_change = on_change
        self.random = random
        self.grace = grace
        self.max_learning = max_learning
        self.observer: tuple[str, int] | None = None
        self.learnt: Learnt | None = None
        self.state = "idle"  # idle | learning | learnt | failed: REASON
        self.trials = 0
        self.drops = 0  # datagrams on a trial socket that were not its authentic reply
        self._nat: Hashable | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def interval(self) -> float | None:
        return None if self.learnt is None else self.learnt.interval

    def set_observer(self, observer: tuple[str, int] | None) -> None:
        if observer != self.observer:
            self.observer = observer
            if self._nat is not None:
                nat, self._nat = self._nat, None
                self.relearn(nat)

    def relearn(self, nat: Hashable | None) -> None:
        """The NAT is ``nat`` (its WAN addresses; None: no NAT): learn again if it changed."""
        if nat == self._nat and (self._task is not None or self.learnt is not None):
            return
        self._nat = nat
        self._stop_task()
        had = self.learnt
        self.learnt = None
        if nat is None:
            self.state = "idle"
        elif self.observer is None:
            self.state = "failed: no NAT observer (coordinator serve --nat-observer)"
        else:
            self.state = "learning"
            self._task = asyncio.get_running_loop().create_task(self._learn(self.observer))
        if had is not None:
            self.on_change()

    def _stop_task(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _learn(self, observer: tuple[str, int]) -> None:
        started = time.monotonic()
        search = ParallelSearch()
        try:
            async with asyncio.timeout(self.max_learning):
                while not search.done:
                    await self._round(observer, search, search.next_round())
        except TimeoutError:
            self.state = f"failed: not learnt within {self.max_learning:g} s"
            log.warning("keepalive: %s", self.state)
            self._task = None
            return
        except _NoCredential:
            self.state = "failed: not registered yet"
            self._task = None
            return
        s = search.search
        if s.survived is None:  # not even the shortest came back: the observer is unreachable
            self.state = f"failed: no answer from the NAT observer {observer[0]}:{observer[1]}"
            log.warning("keepalive: %s; keeping the default", self.state)
            self._task = None
            return
        self.learnt = Learnt(s.survived, s.died, s.keepalive_interval())
        self.state = "learnt"
        self._task = None
        log.info("keepalive: %s (%d trials in %.1f s): every %s s", self.learnt.describe(), s.trials,
                 time.monotonic() - started, self.learnt.interval)
        self.on_change()

    async def _round(self, observer: tuple[str, int], search: ParallelSearch, idles: list[int]) -> None:
        trials = {asyncio.ensure_future(self._trial(observer, idle)): idle for idle in idles}
        try:
            pending = set(trials)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    search.record(trials[task], task.result())
                for task in [t for t in pending if search.moot(trials[t])]:
                    task.cancel()
                    pending.discard(task)
        finally:
            for task in trials:
                task.cancel()
            await asyncio.gather(*trials, return_exceptions=True)

    async def _trial(self, observer: tuple[str, int], idle: int) -> bool:
        """One request from a side socket; True if the reply came through the NAT."""
        cred = self.credential()
        if cred is None:
            raise _NoCredential
        node_id, token = cred
        key = nat_observer.key_from_token(token)
        nonce = self.random(nat_observer.NONCE_LENGTH)
        request = nat_observer.encode_request(key, node_id, idle, nonce, int(time.time()))
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in observer[0] else socket.AF_INET
        got: asyncio.Future[None] = loop.create_future()
        learner = self

        class Trial(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                reply = nat_observer.parse_reply(key, data)
                if reply is not None and reply[0] == nonce and not got.done():
                    got.set_result(None)
                else:
                    learner.drops += 1

        transport, _ = await loop.create_datagram_endpoint(Trial, family=family,
                                                           local_addr=("::" if family == socket.AF_INET6
                                                                       else "0.0.0.0", 0))
        try:
            self.trials += 1
            transport.sendto(request, observer)
            try:
                await asyncio.wait_for(got, idle + self.grace)
            except TimeoutError:
                return False
            return True
        finally:
            transport.close()


class _NoCredential(Exception):
    pass
