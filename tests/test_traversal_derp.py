"""The traversal's DERP path (pywg.mesh.traversal with a relay), sans network: two
traversals on fake ports, a fake clock, datagrams handed over by the test. Before a direct
path is trusted a peer's endpoint is its RelayEndpoint and CallMeMaybe goes via the relay;
a pong makes the direct path the endpoint; data sent with nothing back gets the path probed,
and no pong within PROBE_TIMEOUT makes DERP the endpoint again, well inside 3 s; disco
arriving via DERP is taken only from the node key it belongs to."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from pywg.mesh.traversal import PROBE_TIMEOUT, PeerInfo, Traversal
from pywg.nat.disco import DiscoKey
from pywg.protocol.demux import Protocol as Demux
from pywg.protocol.endpoint import RelayEndpoint

REGION = 900
A_ADDR, B_ADDR = ("198.51.100.1", 41001), ("198.51.100.2", 41002)


class Clock:
    t = 1000.0

    def __call__(self) -> float:
        return self.t


class Port:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []
        self.handlers: dict[Demux, Callable[[bytes, Any], None] | None] = {}

    def register_handler(self, protocol: Demux, handler: Callable[[bytes, Any], None] | None) -> None:
        self.handlers[protocol] = handler

    def send_datagram(self, data: bytes, endpoint: Any) -> None:
        self.sent.append((data, endpoint))


class Side:
    def __init__(self, clock: Clock, addr: tuple[str, int]) -> None:
        self.port, self.addr = Port(), addr
        self.node_key = os.urandom(32)
        self.disco = DiscoKey.generate(os.urandom)
        self.relayed: list[tuple[bytes, bytes]] = []  # (to node key, packet)
        self.tx = self.rx = 0
        self.roamed = False
        self.changes = 0
        self.traversal = Traversal(self.port, self.disco, self.node_key, local=lambda: [addr],
                                   activity=lambda: {k: self.tx for k in self.traversal.peers},
                                   on_change=self._changed, clock=clock)

    def _changed(self) -> None:
        self.changes += 1

    def use_relay(self) -> None:
        self.traversal.set_relay(lambda key, packet: self.relayed.append((key, packet)),
                                 lambda: {k: (self.rx, self.roamed) for k in self.traversal.peers})

    def know(self, other: Side, region: int | None = REGION) -> None:
        self.traversal.set_peers({other.node_key: PeerInfo(other.disco.public, (other.addr,), region)})


def deliver(src: Side, dst: Side, *, udp: bool = True) -> int:
    """Hand ``src``'s sent disco (UDP) and relayed disco to ``dst``; how many went."""
    n = 0
    sent, src.port.sent = src.port.sent, []
    for data, to in sent:
        if udp and to == dst.addr:
            dst.traversal._on_disco(data, src.addr)
            n += 1
    relayed, src.relayed = src.relayed, []
    for key, data in relayed:
        if key == dst.node_key:
            dst.traversal._on_disco(data, RelayEndpoint(REGION, src.node_key))
            n += 1
    return n


def exchange(a: Side, b: Side, *, udp: bool = True, rounds: int = 4) -> None:
    for _ in range(rounds):
        deliver(a, b, udp=udp)
        deliver(b, a, udp=udp)


def pair() -> tuple[Clock, Side, Side]:
    clock = Clock()
    a, b = Side(clock, A_ADDR), Side(clock, B_ADDR)
    for x, y in ((a, b), (b, a)):
        x.use_relay()
        x.know(y)
    return clock, a, b


def test_relayed_until_a_pong_then_direct_then_relayed_again_after_a_failed_probe() -> None:
    async def main() -> None:
        clock, a, b = pair()
        relay = RelayEndpoint(REGION, b.node_key)
        assert a.traversal.endpoint(b.node_key) == relay
        status = a.traversal.peer_status(b.node_key)
        assert status is not None and status["path"] == "derp" and status["region"] == REGION

        exchange(a, b, udp=False)  # UDP dropped: the pings die, the endpoint stays the relay
        assert a.traversal.endpoint(b.node_key) == relay

        clock.t += 0.3
        a.traversal.due(clock.t)
        b.traversal.due(clock.t)
        exchange(a, b)  # the retries get through: pongs
        assert a.traversal.endpoint(b.node_key) == B_ADDR
        assert b.traversal.endpoint(a.node_key) == A_ADDR
        assert a.traversal.peer_status(b.node_key)["path"] == "direct"  # type: ignore[index]
        changes = a.changes

        # Data flows out, nothing comes back: probed at the next reading, lost after the timeout.
        for _ in range(2):
            clock.t += 0.5
            a.tx += 100
            a.traversal.due(clock.t)
        assert a.traversal.counters["direct-path-probes"] == 1
        probe_sent = clock.t
        a.port.sent.clear()  # the probe is lost (the direct path is dead)
        clock.t = probe_sent + PROBE_TIMEOUT
        a.traversal.due(clock.t)
        assert a.traversal.endpoint(b.node_key) == relay
        assert a.changes > changes
        assert clock.t - probe_sent < 3.0

    asyncio.run(main())


def test_call_me_maybe_goes_via_derp_and_starts_the_peers_punch() -> None:
    async def main() -> None:
        clock, a, b = pair()
        a.port.sent.clear(), b.port.sent.clear()
        a.relayed.clear(), b.relayed.clear()
        for _ in range(2):  # past the first round and its last ping's DISCO_PING_INTERVAL
            clock.t += 6.0
            a.traversal.due(clock.t)
            b.traversal.due(clock.t)
        a.relayed.clear()
        a.tx += 100
        clock.t += 0.5
        a.traversal.due(clock.t)  # data to send and no path: a round, and a CallMeMaybe via DERP
        assert a.relayed, "no CallMeMaybe via DERP"
        b.port.sent.clear()
        deliver(a, b, udp=False)
        assert any(to == A_ADDR for _, to in b.port.sent), "b did not punch towards a on the CallMeMaybe"

    asyncio.run(main())


def test_disco_via_derp_is_taken_only_from_its_own_node_key_and_peers_without_a_region_stay_off_derp() -> None:
    async def main() -> None:
        clock, a, b = pair()
        sent, b.port.sent = b.port.sent, []
        ping = next(data for data, to in sent if to == A_ADDR)
        a.traversal._on_disco(ping, RelayEndpoint(REGION, os.urandom(32)))
        assert a.traversal.drops["disco-relayed-by-another-node"] == 1
        a.relayed.clear()
        a.traversal._on_disco(ping, RelayEndpoint(REGION, b.node_key))  # a DERP ping: a DERP pong
        assert [key for key, _ in a.relayed] == [b.node_key]

        c = Side(clock, ("198.51.100.3", 41003))
        a.know(c, region=None)
        assert a.traversal.endpoint(c.node_key) is None
        assert a.traversal.peer_status(c.node_key)["path"] == "none"  # type: ignore[index]

    asyncio.run(main())
