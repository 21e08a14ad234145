"""The agent's keepalive learning (pywg.mesh.keepalive_learning): the parallel search against
simulated NAT timeouts (no clock), the learner's trials on real side sockets against a real
loopback observer whose replies a "NAT" of a given timeout drops, and the traversal's
keepalive as it takes a learnt interval."""

from __future__ import annotations

import asyncio
import os

import pytest

from pywg.mesh import keepalive_learning as kl
from pywg.mesh import nat_observer as obs
from pywg.mesh.traversal import Traversal
from pywg.nat.disco import DiscoKey
from pywg.nat.keepalive import DEFAULT_KEEPALIVE
from pywg.nat.stun import TransportAddress
from pywg.nat.stun_client import MappingBehavior, MappingReport

NODE = "0123456789abcdef"
TOKEN = "pywg-node-" + "B" * 43
GRACE = 0.4


def simulate(timeout: float, grace: float = 1.5) -> tuple[kl.ParallelSearch, float, int]:
    """Learn a NAT that forgets after ``timeout`` s idle: (search, time taken, most sockets at once)."""
    search = kl.ParallelSearch()
    elapsed, widest = 0.0, 0
    while not search.done:
        idles = search.next_round()
        assert idles, "a search not done must ask something"
        widest = max(widest, len(idles))
        took = 0.0
        for idle in sorted(idles):
            if search.moot(idle):
                continue  # cancelled: a shorter one died
            survived = idle < timeout
            search.record(idle, survived)
            took = idle if survived else idle + grace
        elapsed += took
    return search, elapsed, widest


@pytest.mark.parametrize("timeout", [1.5, 2.5, 6, 6.5, 10, 20, 30, 45, 300])
def test_the_parallel_search_brackets_the_timeout_in_about_its_length(timeout: float) -> None:
    search, elapsed, widest = simulate(timeout)
    s = search.search
    interval = s.keepalive_interval()
    assert widest <= kl.MAX_SOCKETS
    assert interval is not None and interval <= DEFAULT_KEEPALIVE
    if timeout > kl.HIGH:
        assert s.survived == kl.HIGH and interval == DEFAULT_KEEPALIVE
        assert elapsed == kl.HIGH  # one round
    else:
        assert s.survived is not None and s.died is not None
        assert s.survived < timeout <= s.died and s.died - s.survived <= 1
        assert interval < timeout
        assert elapsed <= 2 * timeout + 2 * 1.5 + 8  # two or three rounds, each about the lifetime
    print(f"timeout {timeout} s: {search.rounds} rounds, {elapsed:.1f} s, keepalive {interval:.2f} s")


def test_a_nat_forgetting_below_a_second_gives_no_interval_from_a_dead_observer() -> None:
    search, _, _ = simulate(0.5)
    assert search.search.survived is None  # the learner treats this as "no answer": default kept


class ForgetfulCore(obs.ObserverCore):
    """The observer's replies for idle times the 'NAT' does not survive are lost on the way."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout
        self.idles: dict[bytes, int] = {}

    def admit(self, request: obs.Request, key: bytes | None, source: tuple[str, int], now: float,
              wall: float) -> bool:
        self.idles[request.nonce] = request.idle
        return super().admit(request, key, source, now, wall)

    def due(self, now: float) -> list[tuple[bytes, tuple[str, int]]]:
        out = []
        for reply, to in super().due(now):
            parsed = obs.parse_reply(obs.key_from_token(TOKEN), reply)
            assert parsed is not None
            if self.idles[parsed[0]] < self.timeout:
                out.append((reply, to))
        return out


async def learn(timeout: float | None) -> tuple[kl.Learner, list[float | None], obs.NatObserver | None]:
    key = obs.key_from_token(TOKEN)

    async def lookup(node_id: str) -> bytes | None:
        return key if node_id == NODE else None

    observer = None
    if timeout is not None:
        loop = asyncio.get_running_loop()
        core = ForgetfulCore(timeout)
        _, observer = await loop.create_datagram_endpoint(lambda: obs.NatObserver(lookup, core),
                                                          local_addr=("127.0.0.1", 0))
    changes: list[float | None] = []
    learner = kl.Learner(lambda: (NODE, TOKEN), lambda: changes.append(learner.interval), grace=GRACE)
    learner.set_observer(observer.address if observer else ("127.0.0.1", 9))
    return learner, changes, observer


def test_the_learner_learns_on_side_sockets_and_relearns_when_the_nat_changes() -> None:
    async def main() -> None:
        learner, changes, observer = await learn(2.5)
        assert observer is not None
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            learner.relearn(frozenset({"203.0.113.50"}))
            assert learner.state == "learning"
            while learner.state == "learning":
                assert loop.time() - started < 10
                await asyncio.sleep(0.05)
            took = loop.time() - started
            assert learner.state == "learnt" and learner.learnt is not None
            assert (learner.learnt.survived, learner.learnt.died) == (2.0, 3.0)
            assert learner.interval == pytest.approx(1.6) and changes == [pytest.approx(1.6)]
            assert learner.learnt.describe() == "learnt: mapping survived 2 s, died at 3 s"
            assert took < 3 + GRACE + 1  # the trials ran in parallel
            assert learner.trials <= len(kl.FIRST_ROUND)
            assert observer.core.drops == {}  # every request authentic, none replayed
            learner.relearn(frozenset({"203.0.113.50"}))  # the same NAT: nothing to do
            assert learner.state == "learnt"
            learner.relearn(frozenset({"198.51.100.9"}))  # roamed: the default until learnt again
            assert learner.state == "learning" and learner.interval is None and changes[-1] is None
            learner.relearn(None)  # no NAT any more
            assert learner.state == "idle"
        finally:
            await learner.close()
            await observer.close()

    asyncio.run(main())


def test_an_unreachable_observer_keeps_the_default() -> None:
    async def main() -> None:
        learner, changes, _ = await learn(None)
        try:
            learner.relearn(frozenset({"203.0.113.50"}))
            while learner.state == "learning":
                await asyncio.sleep(0.05)
            assert learner.state.startswith("failed: no answer from the NAT observer")
            assert learner.interval is None and changes == []
        finally:
            await learner.close()

    asyncio.run(main())


def test_no_observer_is_said_in_the_state() -> None:
    async def main() -> None:
        learner = kl.Learner(lambda: (NODE, TOKEN), lambda: None)
        learner.relearn(frozenset({"203.0.113.50"}))
        assert learner.state.startswith("failed: no NAT observer")
        await learner.close()

    asyncio.run(main())


class NullPort:
    def register_handler(self, protocol: object, handler: object) -> None:
        pass

    def send_datagram(self, data: bytes, endpoint: tuple[str, int]) -> None:
        pass


def test_the_traversal_keepalive_is_the_learnt_interval_inside_the_lifetime() -> None:
    changed: list[int] = []
    t = Traversal(NullPort(), DiscoKey.generate(os.urandom), b"k" * 32, clock=lambda: 0.0,
                  on_change=lambda: changed.append(t.keepalive))
    assert t.keepalive == 25  # not known yet
    t.mapping = MappingReport(MappingBehavior.ENDPOINT_INDEPENDENT, TransportAddress.of("203.0.113.5", 1), True, "")
    assert t.keepalive == 25
    t.set_learnt_keepalive(4.8)
    assert t.keepalive == 4 and changed == [4]  # rounded down: inside
    t.set_learnt_keepalive(None)
    assert t.keepalive == 25 and changed == [4, 25]
    t.set_learnt_keepalive(4.8)
    t.mapping = MappingReport(MappingBehavior.ENDPOINT_INDEPENDENT, TransportAddress.of("10.0.0.5", 1), False, "")
    assert t.keepalive == 0  # no NAT: no keepalive whatever was learnt


def test_the_agent_learns_behind_a_nat_only_and_again_when_its_wan_address_changes() -> None:
    from pywg.mesh.agent_traversal import AgentTraversal

    async def main() -> None:
        at = AgentTraversal(DiscoKey.generate(os.urandom), (), ("127.0.0.1", 9))
        at.start(NullPort(), b"k" * 32, local=list, activity=dict, on_candidates=lambda _: None,
                 on_change=lambda: None, credential=lambda: (NODE, TOKEN))
        assert at.traversal is not None and at.learner is not None
        try:
            behind = MappingReport(MappingBehavior.ENDPOINT_INDEPENDENT, TransportAddress.of("203.0.113.5", 1),
                                   True, "")
            at.traversal.reflexive = [("203.0.113.5", 1)]
            at.traversal.mapping = behind
            at._mapped(behind)
            first = at.learner._task
            assert at.learner.state == "learning" and first is not None
            status = at.own_status(25)
            assert status["keepaliveSource"] == "default" and status["keepalive"] == 25
            assert status["keepaliveLearning"] == {"state": "learning", "trials": 0, "observer": "127.0.0.1:9"}
            at.traversal.reflexive = [("203.0.113.5", 2)]  # a re-mapped port on the same NAT: nothing new
            at._mapped(behind)
            assert at.learner._task is first
            at.traversal.reflexive = [("198.51.100.9", 1)]  # roamed behind another NAT
            at._mapped(behind)
            assert at.learner._task is not first and at.learner.state == "learning"
            none = MappingReport(MappingBehavior.ENDPOINT_INDEPENDENT, TransportAddress.of("10.0.0.5", 1), False, "")
            at.traversal.mapping = none
            at._mapped(none)
            assert at.learner.state == "idle"
            assert at.own_status(0)["keepaliveSource"] == "no NAT" and at.traversal.keepalive == 0
        finally:
            await at.close()

    asyncio.run(main())
