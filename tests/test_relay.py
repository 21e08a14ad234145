"""WireGuard over DERP in the device, without root: two Devices (pywg.testing.memory) whose
peers are RelayEndpoints, each with a DeviceRelay (its WireGuard key as DERP node key) on
a real pywg DERP server in this process on 127.0.0.1. On the event-loop path their UDP
network drops everything; on the threaded paths (real loopback UDP, with and without the
C hop) nothing is sent over UDP at all while relayed, and the figures show it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pywg.derp import NodePrivateKey, parse_derp_map
from pywg.derp.derpmap import DerpMap
from pywg.device.datapath import DataPathOptions
from pywg.device.derp_client import DerpRelayClient, DialTarget
from pywg.device.derp_server import DerpRelayServer
from pywg.device.relay import DeviceRelay
from pywg.protocol.actions import DropReason
from pywg.protocol.demux import DISCO_MAGIC, Protocol
from pywg.protocol.endpoint import RelayEndpoint
from pywg.testing.memory import MemoryNetwork, Pair, Side, device_pair, ipv4_packet, wait_until
from pywg.uapi.protocol import format_get, parse_get

REGION = 7
EVENT_LOOP = DataPathOptions(threads=False, tun_offload=False, udp_gso=False, udp_gro=False, hop=False)
PATHS = {
    "event-loop": (EVENT_LOOP, True),
    "threads": (DataPathOptions(threads=True, tun_offload=False, hop=False), False),
    "threads-hop": (DataPathOptions(threads=True, tun_offload=False, hop=True), False),
    "threads-hop-vnet": (DataPathOptions(threads=True, tun_offload=True, hop=True), False),
}


@dataclass
class Bed:
    pair: Pair
    server: DerpRelayServer
    relays: dict[str, DeviceRelay]
    network: MemoryNetwork | None
    udp_open: list[bool]  # the in-memory network carries datagrams only while this is [True]

    def relay_of(self, side: Side) -> RelayEndpoint:
        return RelayEndpoint.of(REGION, side.public_key)

    def to_relay(self) -> None:
        a, b = self.pair.a, self.pair.b
        assert a.device.set_endpoint(b.public_key, self.relay_of(b))
        assert b.device.set_endpoint(a.public_key, self.relay_of(a))


def run(body: Callable[[Bed], Awaitable[None]], path: str = "event-loop") -> None:
    options, in_memory = PATHS[path]

    async def main() -> None:
        server = DerpRelayServer(NodePrivateKey.generate(), "127.0.0.1", 0)
        await server.start()
        network = MemoryNetwork() if in_memory else None
        udp_open = [False]
        if network is not None:
            network.tap = lambda datagram: udp_open[0]
        pair = await device_pair(options, network=network, in_memory=in_memory)
        relays = {}
        target = DialTarget.make("127.0.0.1", server.port)
        for name, side in (("a", pair.a), ("b", pair.b)):
            relay = DeviceRelay(NodePrivateKey(side.private_key), {REGION: [target]}, home=REGION,
                                client_options={"expected_server_key": server.public_key})
            relay.attach(side.device)
            relay.start()
            relays[name] = relay
        bed = Bed(pair, server, relays, network, udp_open)
        try:
            for relay in relays.values():
                await relay.wait_connected(5)
            bed.to_relay()
            await body(bed)
        finally:
            for relay in relays.values():
                await relay.close()
            pair.close()
            await server.close()

    asyncio.run(asyncio.wait_for(main(), 30))


async def exchange(pair: Pair, tag: bytes = b"") -> None:
    """Packets both ways, each arriving exactly as sent."""
    a, b = pair.a, pair.b
    for n in range(3):
        there = ipv4_packet(a.address4, b.address4, b"there%d" % n + tag)
        a.tun.send(there)
        assert await b.tun.receive(3) == there
        back = ipv4_packet(b.address4, a.address4, b"back%d" % n + tag)
        b.tun.send(back)
        assert await a.tun.receive(3) == back


def peer(side: Side) -> dict[str, object]:
    peers = side.device.stats()["peers"]
    assert isinstance(peers, list) and len(peers) == 1
    return peers[0]  # type: ignore[no-any-return]


def udp_receives(side: Side) -> int:
    figures = side.device.stats()["datapath"]
    return int(figures.get("udp_receives", 0))  # type: ignore[union-attr]


@pytest.mark.parametrize("path", list(PATHS))
def test_handshake_and_packets_both_ways_over_the_relay(path: str) -> None:
    async def body(bed: Bed) -> None:
        a, b = bed.pair.a, bed.pair.b
        await exchange(bed.pair)
        for side, other in ((a, b), (b, a)):
            assert peer(side)["handshakes"] == 1
            assert peer(side)["endpoint"] == str(bed.relay_of(other))
            assert side.device.stats()["device_drops"] == {}
            assert side.device.stats()["engine_drops"] == {}
            assert udp_receives(side) == 0
        if bed.network is not None:
            assert bed.network.wire == []  # the devices never even tried UDP
        if path.startswith("threads-hop"):  # the hop is never armed for a relayed peer
            for side in (a, b):
                figures = side.device.stats()["datapath"]
                assert figures["hop_sends"] == 0 and figures["hop_receives"] == 0  # type: ignore[index]
        stats = bed.relays["a"].stats()
        assert a.device.stats()["relay"]["node_key"] == stats["node_key"]  # type: ignore[index]  # pywg stats
        assert stats["drops"] == {} and int(stats["sent"]) >= 4 and int(stats["received"]) >= 4  # type: ignore[call-overload]
        # wg show: no endpoint for a relayed peer (the UAPI has no text for a DERP path)
        text = format_get(a.device.snapshot())
        assert "endpoint=" not in text
        assert parse_get(text).peers[0].endpoint is None

    run(body, path)


@pytest.mark.parametrize("path", list(PATHS))
def test_moving_between_relay_and_udp_keeps_the_session(path: str) -> None:
    async def body(bed: Bed) -> None:
        a, b = bed.pair.a, bed.pair.b
        await exchange(bed.pair, b"relay")
        bed.udp_open[0] = True
        for me, other in ((a, b), (b, a)):  # a UAPI set of an IP endpoint: back to UDP
            me.set(f"public_key={other.public_key.hex()}", f"endpoint={other.endpoint[0]}:{other.endpoint[1]}")
        relayed_before = bed.relays["a"].sent + bed.relays["b"].sent
        await exchange(bed.pair, b"udp")
        for side, other in ((a, b), (b, a)):
            assert peer(side)["endpoint"] == f"{other.endpoint[0]}:{other.endpoint[1]}"
            assert peer(side)["handshakes"] == 1  # the same session
            assert udp_receives(side) > 0 or bed.network is not None
            assert f"endpoint={other.endpoint[0]}:{other.endpoint[1]}" in format_get(side.device.snapshot())
        assert bed.relays["a"].sent + bed.relays["b"].sent == relayed_before
        if bed.network is not None:
            assert any(d.data[:1] == b"\x04" for d in bed.network.wire)
        bed.udp_open[0] = False
        bed.to_relay()
        await exchange(bed.pair, b"relay again")
        for side, other in ((a, b), (b, a)):
            assert peer(side)["endpoint"] == str(bed.relay_of(other))
            assert peer(side)["handshakes"] == 1
            assert side.device.stats()["device_drops"] == {}

    run(body, path)


@pytest.mark.parametrize("path", ["event-loop", "threads-hop"])
def test_the_endpoint_follows_a_peer_that_moves_to_the_relay(path: str) -> None:
    """Roaming: A sends over the relay while B still has A's UDP address; B's endpoint for A
    becomes A's RelayEndpoint (the last authenticated source), and B answers over DERP."""
    async def body(bed: Bed) -> None:
        a, b = bed.pair.a, bed.pair.b
        await exchange(bed.pair)
        b.set(f"public_key={a.public_key.hex()}", f"endpoint={a.endpoint[0]}:{a.endpoint[1]}")
        assert peer(b)["endpoint"] == f"{a.endpoint[0]}:{a.endpoint[1]}"
        packet = ipv4_packet(a.address4, b.address4, b"roam")
        a.tun.send(packet)
        assert await b.tun.receive(3) == packet
        assert peer(b)["endpoint"] == str(bed.relay_of(a))
        reply = ipv4_packet(b.address4, a.address4, b"answer")
        b.tun.send(reply)
        assert await a.tun.receive(3) == reply
        assert udp_receives(a) == 0

    run(body, path)


@pytest.mark.parametrize("path", ["event-loop", "threads-hop"])
def test_bad_relay_input_is_dropped_and_counted_and_the_tunnel_carries_on(path: str) -> None:
    async def body(bed: Bed) -> None:
        a, b = bed.pair.a, bed.pair.b
        await exchange(bed.pair)
        stranger = DerpRelayClient(NodePrivateKey.generate(), "127.0.0.1", bed.server.port)
        stranger.start()
        try:
            await stranger.wait_connected(5)
            assert stranger.send_nowait(NodePrivateKey(a.private_key).public, b"\x01\x00\x00\x00" + bytes(144))
            await wait_until(lambda: a.device.stats()["device_drops"].get("relay_unknown_source") == 1)  # type: ignore[union-attr]
        finally:
            await stranger.close()
        # A known node key (B's relay), hostile bytes: garbage, truncated WireGuard messages, nothing.
        relay_b = bed.relays["b"]
        key_a = a.public_key
        for data in (b"\xff" * 40, b"\x04\x00\x00\x00" + bytes(12), b"\x01\x00\x00\x00" + bytes(50),
                     b"\x02\x00\x00\x00", bytes(200), b""):
            assert relay_b.send(REGION, key_a, data)

        def dropped() -> int:
            return sum(a.device.stats()["engine_drops"].values())  # type: ignore[attr-defined]
        await wait_until(lambda: dropped() == 6)
        engine = a.device.stats()["engine_drops"]
        assert engine.get(DropReason.UNKNOWN_PROTOCOL.value, 0) == 3  # type: ignore[union-attr]  # the empty one too
        assert peer(a)["endpoint"] == str(bed.relay_of(b))
        await exchange(bed.pair, b"after")

    run(body, path)


def test_a_disco_packet_over_derp_reaches_the_disco_handler_with_the_relay_endpoint() -> None:
    async def body(bed: Bed) -> None:
        a, b = bed.pair.a, bed.pair.b
        got: list[tuple[bytes, object]] = []
        a.device.register_handler(Protocol.DISCO, lambda data, source: got.append((data, source)))
        disco = DISCO_MAGIC + bytes(32) + bytes(24) + b"sealed"
        assert bed.relays["b"].send(REGION, a.public_key, disco)
        await wait_until(lambda: got)
        assert got == [(disco, bed.relay_of(b))]
        # and an answer sent to that source goes back over DERP to B's disco handler
        answers: list[tuple[bytes, object]] = []
        b.device.register_handler(Protocol.DISCO, lambda data, source: answers.append((data, source)))
        pong = DISCO_MAGIC + bytes(56) + b"pong"
        a.device.send_datagram(pong, got[0][1])  # type: ignore[arg-type]
        await wait_until(lambda: answers)
        assert answers == [(pong, bed.relay_of(a))]

    run(body)


def test_sends_while_the_relay_is_down_are_dropped_and_counted() -> None:
    async def body(bed: Bed) -> None:
        a, b = bed.pair.a, bed.pair.b
        await exchange(bed.pair)
        relay_a = bed.relays["a"]
        await bed.server.close()
        await wait_until(lambda: not relay_a.connected)
        for n in range(relay_a.connecting_backlog + 5):
            a.tun.send(ipv4_packet(a.address4, b.address4, b"lost%d" % n))
        await wait_until(lambda: relay_a.stats()["drops"].get("not_connected") == 5)  # type: ignore[attr-defined]
        assert relay_a.stats()["regions"][REGION]["backlog"] == relay_a.connecting_backlog  # type: ignore[index]
        # a relay to a region outside the map: dropped, counted
        assert a.device.set_endpoint(b.public_key, RelayEndpoint.of(99, b.public_key))
        a.tun.send(ipv4_packet(a.address4, b.address4, b"nowhere"))
        await wait_until(lambda: relay_a.stats()["drops"].get("unknown_region") == 1)  # type: ignore[attr-defined]

    run(body)


def test_a_device_without_relay_counts_relayed_sends() -> None:
    async def body(bed: Bed) -> None:
        a, b = bed.pair.a, bed.pair.b
        a.device.set_relay(None)
        a.tun.send(ipv4_packet(a.address4, b.address4, b"x"))
        await wait_until(lambda: a.device.stats()["device_drops"].get("relay_missing", 0) >= 1)  # type: ignore[union-attr]

    run(body)


def test_relay_rejects_a_home_region_outside_its_map() -> None:
    with pytest.raises(ValueError, match="home region 3"):
        DeviceRelay(NodePrivateKey.generate(), {1: [DialTarget.make("127.0.0.1", 1)]}, home=3)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_burst_of_packets_over_the_relay_all_arrive(path: str) -> None:
    """Many datagrams queued at once (each thread's wake-up is shared by several): none is
    left behind in a queue."""
    async def body(bed: Bed) -> None:
        a, b = bed.pair.a, bed.pair.b
        await exchange(bed.pair)
        for burst in range(5):
            packets = [ipv4_packet(a.address4, b.address4, b"burst%d-%d" % (burst, n)) for n in range(100)]
            for packet in packets:
                a.tun.send(packet)
            got = [await b.tun.receive(3) for _ in packets]
            assert sorted(got) == sorted(packets)
            await asyncio.sleep(0.01 * burst)

    run(body, path)


async def two_regions() -> tuple[list[DerpRelayServer], DerpMap]:
    """Two started in-process DERP servers (not meshed) and a map: region 1 the first, 2 the second."""
    servers = [DerpRelayServer(NodePrivateKey.generate(), "127.0.0.1", 0) for _ in range(2)]
    for server in servers:
        await server.start()
    derp_map = parse_derp_map({"Regions": {str(n): {
        "RegionID": n, "RegionCode": f"r{n}",
        "Nodes": [{"Name": f"{n}a", "RegionID": n, "HostName": "localhost", "IPv4": "127.0.0.1",
                   "IPv6": "none", "DERPPort": server.port}]} for n, server in ((1, servers[0]), (2, servers[1]))}})
    return servers, derp_map


def test_each_peer_reached_at_its_own_home_region_of_a_derp_map() -> None:
    """A's home is region 1, B's region 2 (two servers, not meshed); A's peer is B at B's
    home region, B's is A at A's: A's relay dials region 2 when B first needs it. With
    max_regions=1, a second region is refused and counted."""
    async def main() -> None:
        servers, derp_map = await two_regions()
        pair = await device_pair(EVENT_LOOP, network=MemoryNetwork())
        assert pair.network is not None
        pair.network.tap = lambda datagram: False  # no UDP at all
        a, b = pair.a, pair.b
        relays = [DeviceRelay.from_derp_map(NodePrivateKey(side.private_key), derp_map, home=home, plain_http=True)
                  for side, home in ((a, 1), (b, 2))]
        try:
            for relay, side in zip(relays, (a, b), strict=True):
                relay.attach(side.device)
                relay.start()
                await relay.wait_connected(5)
            assert a.device.set_endpoint(b.public_key, RelayEndpoint.of(2, b.public_key))
            assert b.device.set_endpoint(a.public_key, RelayEndpoint.of(1, a.public_key))
            await exchange(pair)
            # A dialled region 2 for B. B's endpoint for A followed A's packets to region 2
            # (roaming), where A is connected: B answers there and never needs region 1.
            regions_a, regions_b = (relay.stats()["regions"] for relay in relays)
            assert sorted(regions_a) == [1, 2] and sorted(regions_b) == [2]  # type: ignore[call-overload]
            assert all(r["connected"] for r in regions_a.values())  # type: ignore[attr-defined]
            assert peer(b)["endpoint"] == str(RelayEndpoint(2, a.public_key))
            assert peer(a)["endpoint"] == str(RelayEndpoint(2, b.public_key))
            assert all(relay.stats()["drops"] == {} for relay in relays)
            lone = DeviceRelay.from_derp_map(NodePrivateKey.generate(), derp_map, home=1, plain_http=True,
                                             max_regions=1)
            lone.start()
            try:
                assert lone.send(2, b.public_key, b"\x04" + bytes(40))
                await wait_until(lambda: lone.stats()["drops"] == {"unknown_region": 1})
            finally:
                await lone.close()
        finally:
            for relay in relays:
                await relay.close()
            pair.close()
            for server in servers:
                await server.close()

    asyncio.run(asyncio.wait_for(main(), 30))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.binary(max_size=200) | st.builds(lambda t, rest: bytes([t, 0, 0, 0]) + rest,
                                                    st.integers(1, 4), st.binary(max_size=160)),
                min_size=1, max_size=12))
def test_fuzzed_relay_input_is_each_dropped_and_counted_once(datagrams: list[bytes]) -> None:
    """Whatever a peer's node key sends over DERP: no exception, each datagram counted as
    one drop (engine, demux or device), the tunnel unharmed."""
    async def main() -> None:
        pair = await device_pair(EVENT_LOOP, network=MemoryNetwork())
        a, b = pair.a, pair.b
        try:
            source = RelayEndpoint.of(REGION, b.public_key)

            def dropped() -> int:
                stats = a.device.stats()
                return sum(stats["engine_drops"].values()) + sum(stats["device_drops"].values())  # type: ignore[attr-defined]
            before = dropped()
            for data in datagrams:
                a.device.relay_received(data, source)
            await wait_until(lambda: dropped() == before + len(datagrams))
            await exchange(pair)
        finally:
            pair.close()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_the_relay_queue_is_bounded_and_sends_before_start_are_refused() -> None:
    async def main() -> None:
        relay = DeviceRelay(NodePrivateKey.generate(), {1: [DialTarget.make("127.0.0.1", 9)]}, home=1, queue_size=2)
        key = NodePrivateKey.generate().public.raw
        assert not relay.send(1, key, b"early")
        relay.start()
        try:
            results = [relay.send(1, key, b"x") for _ in range(3)]  # the loop has not run: all queued
            assert results == [True, True, False]
            assert not relay.send(1, key, bytes(64 * 1024 + 1))
            assert relay.stats()["drops"] == {"closed": 1, "queue_full": 1, "too_large": 1}
            assert relay.stats()["queued"] == 2
            await asyncio.sleep(0)
            assert relay.stats()["queued"] == 0  # on to the region's backlog (it is not connected)
            assert relay.stats()["regions"][1]["backlog"] == 2  # type: ignore[index]
        finally:
            await relay.close()

    asyncio.run(main())


def test_the_home_region_moves_the_new_home_is_preferred_and_the_old_one_stays_connected() -> None:
    """DeviceRelay.set_home: the new home's client connects and says NotePreferred(1) (its
    server counts it among its home clients); the old home's stays connected, now
    NotePreferred(0); packets still arrive by either; a region outside the map is refused."""
    async def main() -> None:
        servers, derp_map = await two_regions()
        key = NodePrivateKey.generate()
        relay = DeviceRelay.from_derp_map(key, derp_map, home=1, plain_http=True)
        received: list[tuple[bytes, RelayEndpoint]] = []
        relay.on_receive = lambda data, source: received.append((data, source))
        relay.start()
        senders = [DerpRelayClient(NodePrivateKey.generate(), "127.0.0.1", s.port) for s in servers]
        try:
            await relay.wait_connected(5)
            await wait_until(lambda: servers[0].state.is_home_of(key.public))
            with pytest.raises(ValueError, match="home region 3"):
                await relay.set_home(3)
            await relay.set_home(2)
            assert relay.home == 2
            await relay.wait_connected(5)
            await wait_until(lambda: servers[1].state.is_home_of(key.public) and not servers[0].state.is_home_of(
                key.public))
            assert servers[0].state.is_connected(key.public)  # the old home's client stays
            assert (servers[0].state.home_clients, servers[1].state.home_clients) == (0, 1)
            for n, sender in enumerate(senders, start=1):
                async with sender:
                    await sender.wait_connected(5)
                    assert await sender.send(key.public, b"by region %d" % n)
                    await wait_until(lambda n=n: any(source.region == n for _, source in received))
            assert sorted(data for data, _ in received) == [b"by region 1", b"by region 2"]
        finally:
            await relay.close()
            for server in servers:
                await server.close()

    asyncio.run(asyncio.wait_for(main(), 30))
