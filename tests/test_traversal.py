"""The agent's NAT traversal (pywg.mesh.traversal) on two in-memory devices, without root:
STUN from the WireGuard port to two in-memory STUN servers, disco between the devices, the
chosen path made the WireGuard endpoint, data over it; no path when the network drops
everything; new candidates after a re-map. The traversal's clock is a fake one."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pywg.manage.types import Endpoint as WgEndpoint
from pywg.mesh import reconcile
from pywg.mesh.traversal import PeerInfo, Traversal, carries_data
from pywg.nat.disco import DiscoKey, looks_like_disco
from pywg.nat.paths import SESSION_ACTIVE_TIMEOUT
from pywg.nat.stun import TransportAddress, binding_response, looks_like_stun, parse
from pywg.testing.memory import (
    Datagram,
    MemoryNetwork,
    Pair,
    Side,
    device_pair,
    ipv4_packet,
    settle,
    wait_until,
)

Address = tuple[str, int]
SERVERS = (TransportAddress.of("198.51.100.1", 3478), TransportAddress.of("198.51.100.2", 3478))


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class StunServer:
    """A STUN Binding server on the memory network; it reports ``mapped(source)`` (a NAT's view)."""

    def __init__(self, network: MemoryNetwork, address: TransportAddress, mapped: Callable[[Address], Address]) -> None:
        self.sock = network.socket(address.as_tuple())
        self.mapped = mapped
        self.answered = 0
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        data, source = self.sock.recvfrom(2048)
        reply = binding_response(parse(data), TransportAddress.of(*self.mapped(source)))
        self.sock.sendto(reply, source)
        self.answered += 1

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


@dataclass
class Agent:
    """One side's traversal, and what it told the coordinator."""

    side: Side
    other: Side
    traversal: Traversal
    published: list[list[str]] = field(default_factory=list)
    shown: list[str | None] = field(default_factory=list)  # the peer's path at each status notice

    def peer_info(self) -> PeerInfo:
        """This side as the coordinator pushes it to the other (its last published endpoints)."""
        endpoints = tuple((str(e.host), e.port) for e in map(WgEndpoint.parse, self.published[-1]))
        return PeerInfo(self.traversal.key.public, endpoints)


def tx_bytes(side: Side) -> dict[bytes, int]:
    import base64

    return {base64.b64decode(str(p["public_key"])): int(p["tx_bytes"])  # type: ignore[call-overload]
            for p in side.device.stats()["peers"]}  # type: ignore[union-attr]


def path_of(traversal: Traversal, other: Side) -> str | None:
    status = traversal.peer_status(other.public_key)
    return None if status is None else str(status["path"])


def make_agent(side: Side, other: Side, clock: Clock) -> Agent:
    agent: Agent

    def on_change() -> None:  # the agent's reconcile, in short: the chosen path to the device
        ep = agent.traversal.endpoint(other.public_key)
        if ep is not None:
            side.set(f"public_key={other.public_key.hex()}", f"endpoint={ep[0]}:{ep[1]}")

    traversal = Traversal(side.device, DiscoKey.generate(os.urandom), side.public_key, stun_servers=SERVERS,
                          local=lambda: [side.endpoint], activity=lambda: tx_bytes(side),
                          on_candidates=lambda eps: agent.published.append(eps), on_change=on_change,
                          on_status=lambda: agent.shown.append(path_of(agent.traversal, other)), clock=clock)
    agent = Agent(side, other, traversal)
    return agent


def run(body: Callable[[Pair, Agent, Agent, Clock, dict[str, int]], Awaitable[None]], *, no_nat: bool = False) -> None:
    """Two devices without endpoints, two STUN servers that see every source's port + ``nat["shift"]``
    on 203.0.113.(last octet) (a NAT's mapping, unreachable here: only the local candidates answer);
    ``no_nat``: they see the source itself."""

    async def main() -> None:
        pair = await device_pair(endpoints=False)
        assert pair.network is not None
        clock = Clock()
        nat = {"shift": 1000, "none": int(no_nat)}

        def mapped(source: Address) -> Address:
            if nat["none"]:
                return source
            return f"203.0.113.{source[0].rsplit('.', 1)[1]}", source[1] + nat["shift"]

        servers = [StunServer(pair.network, s, mapped) for s in SERVERS]
        a, b = make_agent(pair.a, pair.b, clock), make_agent(pair.b, pair.a, clock)
        try:
            for agent in (a, b):
                agent.traversal.start()
            await wait_until(lambda: a.traversal.mapping is not None and b.traversal.mapping is not None)
            await body(pair, a, b, clock, nat)
        finally:
            for agent in (a, b):
                await agent.traversal.close()
            for s in servers:
                s.close()
            pair.close()

    asyncio.run(main())


async def advance(clock: Clock, agents: tuple[Agent, ...], seconds: float, step: float = 0.25) -> None:
    left = seconds
    while left > 1e-9:
        clock.t += min(step, left)
        left -= step
        for agent in agents:
            agent.traversal.wake()
        await settle()


async def punch(a: Agent, b: Agent) -> None:
    a.traversal.set_peers({b.side.public_key: b.peer_info()})
    b.traversal.set_peers({a.side.public_key: a.peer_info()})


def test_candidates_come_from_the_wireguard_port_and_the_punched_path_carries_wireguard() -> None:
    async def body(pair: Pair, a: Agent, b: Agent, clock: Clock, nat: dict[str, int]) -> None:
        network = pair.network
        assert network is not None
        for agent in (a, b):
            side = agent.side
            port = side.endpoint[1]
            # the Bindings left from the WireGuard port itself, to both servers
            for server in SERVERS:
                sent = [d for d in network.sent(side.endpoint, server.as_tuple()) if looks_like_stun(d.data)]
                assert sent
            own = agent.traversal.own_status()
            assert own["candidates"] == [{"endpoint": f"{side.outer}:{port}", "source": "local"},
                                         {"endpoint": f"203.0.113.{side.outer[-1]}:{port + 1000}", "source": "stun"}]
            assert own["mapping"] == "endpoint-independent"
            assert own["behindNat"] is True and own["keepalive"] == 25
            assert agent.published[-1] == [c["endpoint"] for c in own["candidates"]]
        await punch(a, b)
        await wait_until(lambda: a.traversal.endpoint(b.side.public_key) == b.side.endpoint
                         and b.traversal.endpoint(a.side.public_key) == a.side.endpoint)
        # the WireGuard peers point at the punched path, and a packet flows over it
        assert a.side.device.stats()["peers"][0]["endpoint"] == f"{b.side.outer}:{b.side.endpoint[1]}"  # type: ignore[index]
        packet = ipv4_packet(a.side.address4, b.side.address4, b"over the punched path")
        a.side.tun.send(packet)
        assert await b.side.tun.receive() == packet
        wg = [d for d in network.sent(a.side.endpoint, b.side.endpoint) if not looks_like_disco(d.data)]
        assert wg  # WireGuard itself went that way
        status = a.traversal.peer_status(b.side.public_key)
        assert status is not None
        assert status["path"] == "direct" and status["reason"] is None
        assert status["endpoint"] == f"{b.side.outer}:{b.side.endpoint[1]}"
        assert status["rttMs"] is not None and status["rttMs"] >= 0
        tried = {c["endpoint"]: c for c in status["candidates"]}
        assert tried[status["endpoint"]]["pongs"] >= 1 and "advertised" in tried[status["endpoint"]]["sources"]
        # What the coordinator advertised is labelled so: it does not say local or STUN (a
        # private address may be a STUN one, a public one local), so nothing is guessed.
        assert all("local" not in c["sources"] and "stun" not in c["sources"] for c in status["candidates"])
        unreachable = tried[f"203.0.113.2:{b.side.endpoint[1] + 1000}"]
        assert unreachable["pingsSent"] >= 1 and unreachable["pongs"] == 0
        # while WireGuard carries traffic, heartbeats keep the path trusted past the trust window
        for _ in range(10):
            a.side.tun.send(packet)
            await b.side.tun.receive()
            await advance(clock, (a, b), 1.0)
        status = a.traversal.peer_status(b.side.public_key)
        assert status is not None and status["path"] == "direct"

    run(body)


def test_no_direct_path_when_the_network_drops_everything_is_reported_with_its_reason() -> None:
    async def body(pair: Pair, a: Agent, b: Agent, clock: Clock, nat: dict[str, int]) -> None:
        network = pair.network
        assert network is not None
        dropped: list[Datagram] = []
        network.tap = lambda d: bool(dropped.append(d))  # everything is lost from now on
        await punch(a, b)
        await advance(clock, (a, b), 6.0)
        for agent, other in ((a, b), (b, a)):
            status = agent.traversal.peer_status(other.side.public_key)
            assert status is not None
            assert status["path"] == "none" and status["endpoint"] is None and status["rttMs"] is None
            assert status["reason"] == "no pong from any of 2 candidates within 5 s"
            assert all(c["pingsSent"] >= 3 and c["pongs"] == 0 for c in status["candidates"])
            assert agent.traversal.endpoint(other.side.public_key) is None
            assert agent.side.device.stats()["peers"][0]["endpoint"] is None  # type: ignore[index]
        assert any(looks_like_disco(d.data) for d in dropped)

    run(body)


def test_a_remapped_nat_is_found_after_the_path_is_lost_and_the_new_candidates_are_reported() -> None:
    async def body(pair: Pair, a: Agent, b: Agent, clock: Clock, nat: dict[str, int]) -> None:
        network = pair.network
        assert network is not None
        await punch(a, b)
        await wait_until(lambda: a.traversal.endpoint(b.side.public_key) is not None)
        before = list(a.published[-1])
        # the NAT re-maps (new ports) and, for a while, disco between the two is lost
        nat["shift"] = 2000
        network.tap = lambda d: not looks_like_disco(d.data)
        for _ in range(5):
            a.side.tun.send(ipv4_packet(a.side.address4, b.side.address4))  # the session is in use
            await advance(clock, (a, b), 1.0)
        # a heartbeat went unanswered: STUN again at once, before the path's trust runs out
        assert a.traversal.counters["heartbeats-missed"] == 1 and a.traversal.counters["paths-lost"] == 0
        await wait_until(lambda: a.published[-1] != before)
        port = a.side.endpoint[1]
        assert a.published[-1] == [f"192.0.2.1:{port}", f"203.0.113.1:{port + 2000}"]
        for _ in range(3):
            a.side.tun.send(ipv4_packet(a.side.address4, b.side.address4))
            await advance(clock, (a, b), 1.0)
        assert a.traversal.counters["paths-lost"] == 1  # then the trust ran out
        # the coordinator pushes them; the path comes back once disco flows again
        network.tap = None
        b.traversal.set_peers({a.side.public_key: a.peer_info()})
        await advance(clock, (a, b), 1.0)
        await wait_until(lambda: (s := b.traversal.peer_status(a.side.public_key)) is not None
                         and s["path"] == "direct")

    run(body)


def test_disco_from_strangers_and_garbage_are_dropped_counted_and_the_tunnel_keeps_working() -> None:
    async def body(pair: Pair, a: Agent, b: Agent, clock: Clock, nat: dict[str, int]) -> None:
        network = pair.network
        assert network is not None
        await punch(a, b)
        await wait_until(lambda: a.traversal.endpoint(b.side.public_key) is not None)
        stranger = DiscoKey.generate(os.urandom).session(a.traversal.key.public)
        from pywg.nat.disco import Ping

        network.send(("198.51.100.77", 41641), a.side.endpoint, stranger.seal(Ping(os.urandom(12), bytes(32)),
                                                                            os.urandom))
        forged = bytearray(b.traversal.key.public)  # b's key, a box that does not open
        network.send(("198.51.100.77", 41641), a.side.endpoint, b"TS\xf0\x9f\x92\xac" + bytes(forged) + os.urandom(80))
        await settle()
        assert a.traversal.drops["unknown-disco-sender"] == 1
        assert a.traversal.peers[b.side.public_key].paths.drops["box-not-opened"] == 1
        packet = ipv4_packet(b.side.address4, a.side.address4, b"still fine")
        b.side.tun.send(packet)
        assert await a.side.tun.receive() == packet

    run(body)


def test_the_reconcile_takes_the_traversals_endpoint_and_keepalive() -> None:
    view = reconcile.MeshView(nodes={
        "n1": {"id": "n1", "publicKey": "A" * 43 + "=", "internalIp": "100.64.0.1", "endpoints": ["192.0.2.1:1"]},
        "n2": {"id": "n2", "publicKey": "B" * 43 + "=", "internalIp": "100.64.0.2", "endpoints": ["192.0.2.2:2"]},
        "n3": {"id": "n3", "publicKey": "C" * 43 + "=", "internalIp": "100.64.0.3", "endpoints": ["192.0.2.3:3"]},
    })
    desired = reconcile.desired_peers(view, "n0", "Z" * 43 + "=", keepalive=0,
                                      endpoints={"A" * 43 + "=": "203.0.113.9:4000", "B" * 43 + "=": None})
    assert desired["A" * 43 + "="].endpoint == "203.0.113.9:4000"  # the confirmed path
    assert desired["B" * 43 + "="].endpoint is None  # traversal runs, nothing confirmed yet
    assert desired["C" * 43 + "="].endpoint == "192.0.2.3:3"  # no traversal for it: the first candidate
    assert {p.persistent_keepalive for p in desired.values()} == {0}


def test_without_a_nat_the_only_candidate_is_local_and_no_keepalive_is_sent() -> None:
    async def body(pair: Pair, a: Agent, b: Agent, clock: Clock, nat: dict[str, int]) -> None:
        for agent in (a, b):
            own = agent.traversal.own_status()
            assert own["behindNat"] is False and own["keepalive"] == 0
            assert own["candidates"] == [{"endpoint": f"{agent.side.outer}:{agent.side.endpoint[1]}",
                                          "source": "local"}]
            assert [s["reflexive"] for s in own["stun"]] == [own["candidates"][0]["endpoint"]] * 2
        await punch(a, b)
        await wait_until(lambda: a.traversal.endpoint(b.side.public_key) == b.side.endpoint)

    run(body, no_nat=True)


def test_a_peer_that_rotated_its_node_key_keeps_its_confirmed_path() -> None:
    async def body(pair: Pair, a: Agent, b: Agent, clock: Clock, nat: dict[str, int]) -> None:
        await punch(a, b)
        await wait_until(lambda: a.traversal.endpoint(b.side.public_key) == b.side.endpoint)
        new_key = bytes(range(32))
        a.traversal.set_peers({new_key: b.peer_info()})  # same disco key, new node key
        assert a.traversal.endpoint(new_key) == b.side.endpoint
        assert a.traversal.endpoint(b.side.public_key) is None and list(a.traversal.peers) == [new_key]
        a.traversal.set_peers({})
        assert a.traversal.peers == {} and a.traversal.endpoint(new_key) is None

    run(body)


def test_datagrams_the_device_relay_brings_go_to_disco_and_never_to_stun() -> None:
    from pywg.nat.disco import MAGIC
    from pywg.protocol.demux import Protocol as Demux
    from pywg.protocol.endpoint import RelayEndpoint

    handlers: dict[Demux, Callable[[bytes, object], None]] = {}

    class Port:
        def register_handler(self, protocol: Demux, handler: Callable[[bytes, object], None] | None) -> None:
            if handler is not None:
                handlers[protocol] = handler

        def send_datagram(self, data: bytes, endpoint: tuple[str, int]) -> None:
            pass

    async def main() -> None:
        t = Traversal(Port(), DiscoKey.generate(os.urandom), b"k" * 32, clock=lambda: 0.0)
        t.start()
        try:
            relay = RelayEndpoint.of(1, b"p" * 32)
            handlers[Demux.STUN](b"\x00\x01" + b"\x00" * 18, relay)
            handlers[Demux.DISCO](MAGIC + b"s" * 32 + b"x" * 40, relay)  # a sender we do not know
            assert t.drops["stun-via-relay"] == 1 and t.drops["unknown-disco-sender"] == 1
        finally:
            await t.close()

    asyncio.run(main())


def test_keepalives_and_handshakes_are_not_data_but_any_data_message_is() -> None:
    for growth in (0, 32, 92, 148, 32 + 148, 32 + 92, 2 * 148, 148 + 2 * 92):
        assert not carries_data(growth), growth
    for growth in (64, 96, 128, 32 + 96, 1420 + 32, 148 + 92, 148 + 128, 20 * 1452):
        assert carries_data(growth), growth


def test_an_idle_tunnel_that_sends_only_keepalives_stops_heartbeating_and_data_resumes_them() -> None:
    async def body(pair: Pair, a: Agent, b: Agent, clock: Clock, nat: dict[str, int]) -> None:
        network = pair.network
        assert network is not None
        await punch(a, b)
        await wait_until(lambda: a.traversal.endpoint(b.side.public_key) == b.side.endpoint)
        sent = {b.side.public_key: 0}
        a.traversal.activity = lambda: dict(sent)

        def disco_a_to_b() -> int:
            return sum(looks_like_disco(d.data) for d in network.sent(a.side.endpoint, b.side.endpoint))

        async def idle(step_bytes: int, seconds: float) -> int:
            before = disco_a_to_b()
            for _ in range(int(seconds)):
                sent[b.side.public_key] += step_bytes
                await advance(clock, (a, b), 1.0)
            return disco_a_to_b() - before

        assert await idle(128, 10) >= 2  # data: heartbeats every few seconds
        await idle(32, SESSION_ACTIVE_TIMEOUT + 5)  # only keepalives: the session goes idle ...
        assert await idle(32, 20) == 0  # ... and no heartbeat leaves any more
        assert await idle(128, 10) >= 2  # data again: the path is probed again

    run(body)


def test_every_change_of_an_idle_peers_path_is_notified_so_the_status_never_lags() -> None:
    """An idle peer's path (no data: no heartbeats) is trusted for 6.5 s after its last pong,
    then shows "none"; each change, whether or not the device's endpoint moved, is notified
    (the agent writes status.json on it: with a long health interval nothing else would)."""
    async def body(pair: Pair, a: Agent, b: Agent, clock: Clock, nat: dict[str, int]) -> None:
        await punch(a, b)
        await wait_until(lambda: path_of(a.traversal, b.side) == "direct" and path_of(b.traversal, a.side) == "direct")
        await advance(clock, (a, b), 7.0)  # nobody sends: the trust runs out on both sides
        for agent, other in ((a, b), (b, a)):
            status = agent.traversal.peer_status(other.side.public_key)
            assert status is not None and status["path"] == "none", status
            assert str(status["reason"]).startswith("no pong from "), status
            assert agent.shown and agent.shown[-1] == "none", agent.shown
        # data again: the same endpoint is found again (the device's did not move), a notice too
        before = len(a.shown)
        a.side.tun.send(ipv4_packet(a.side.address4, b.side.address4, b"wake up"))
        await b.side.tun.receive()
        await advance(clock, (a, b), 1.0)
        await wait_until(lambda: path_of(a.traversal, b.side) == "direct")
        await settle()
        assert "direct" in a.shown[before:], a.shown

    run(body)
