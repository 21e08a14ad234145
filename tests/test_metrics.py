"""The typed metrics snapshot (pywg.device.metrics), its events and its Prometheus collector,
without root: two Devices back to back (pywg.testing.memory) on every data-path variant."""

from __future__ import annotations

import asyncio
import base64
import threading

import pytest
import test_device_memory as tdm
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pywg.device.metrics import Direction, Path
from pywg.device.prometheus import DeviceCollector
from pywg.protocol.actions import (
    DropReason,
    EndpointChanged,
    Event,
    HandshakeCompleted,
    PeerUnreachable,
    SessionExpired,
)
from pywg.protocol.constants import KEY_ZEROING_TIME, MAX_TIMER_HANDSHAKES, REKEY_TIMEOUT
from pywg.testing.memory import Pair, Side, ipv4_packet, settle, wait_until
from pywg.uapi.protocol import format_get, parse_get

N = 25
PAYLOAD = b"x" * 40  # a 60-byte IPv4 packet: padded to 64, so 16 + 64 + 16 = 96 bytes on the wire
WIRE = 96


def observe(pair: Pair) -> tuple[list[Event], list[Event]]:
    seen: tuple[list[Event], list[Event]] = ([], [])
    pair.a.device.add_observer(seen[0].append)
    pair.b.device.add_observer(seen[1].append)
    return seen


@pytest.mark.parametrize("path", list(tdm.PATHS))
def test_the_snapshot_counts_exactly_what_a_known_exchange_produced(path: str) -> None:
    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        events_a, events_b = observe(pair)
        for i in range(N):  # the first waits for the handshake, staged; the rest go at once
            packet = ipv4_packet(a.address4, b.address4, PAYLOAD[:-2] + i.to_bytes(2, "big"))
            a.tun.send(packet)
            assert await b.tun.receive() == packet

        def counted() -> bool:
            sent, got = a.device.metrics().peer(b.public_key), b.device.metrics().peer(a.public_key)
            return sent is not None and got is not None and sent.tx_packets >= N and got.rx_packets >= N

        # the C hop accounts for what it sent, and for what it wrote to the TUN, a moment later
        await wait_until(counted)
        await settle()
        ma, mb = a.device.metrics(), b.device.metrics()
        pa, pb = ma.peer(b.public_key), mb.peer(a.public_key)
        assert pa is not None and pb is not None
        assert (pa.tx_packets, pa.tx_bytes, pa.rx_packets, pa.rx_bytes) == (N, N * WIRE, 0, 0)
        assert (pb.rx_packets, pb.rx_bytes, pb.tx_packets, pb.tx_bytes) == (N, N * WIRE, 0, 0)
        assert (pa.handshakes_initiated, pa.handshakes_completed, pa.handshakes_timed_out) == (1, 1, 0)
        assert (pb.handshakes_initiated, pb.handshakes_completed, pb.handshakes_timed_out) == (0, 1, 0)
        assert pa.sessions_expired == pb.sessions_expired == pa.unreachable == pb.unreachable == 0
        assert pa.path is Path.UDP and pa.endpoint == b.endpoint and pb.endpoint == a.endpoint
        assert pa.last_handshake is not None and pb.last_handshake is not None
        assert ma.drops == {} and mb.drops == {}
        # one source: pywg stats and UAPI get show the same figures
        stats = a.device.stats()["peers"][0]  # type: ignore[index]
        assert (stats["tx_packets"], stats["tx_bytes"], stats["handshakes"], stats["path"]) == (N, N * WIRE, 1, "udp")
        got = parse_get(format_get(a.device.snapshot())).peers[0]
        assert (got.tx_bytes, got.rx_bytes) == (N * WIRE, 0)
        assert got.last_handshake_ns == int(pa.last_handshake * 1e9)
        await settle()
        assert [type(e) for e in events_a] == [HandshakeCompleted]  # once each, nothing else
        assert [type(e) for e in events_b] == [HandshakeCompleted]
        assert events_a[0] == HandshakeCompleted(b.public_key, initiator=True)

    tdm.run(body, path)


def test_drops_are_counted_by_reason_and_direction() -> None:
    async def body(pair: Pair) -> None:
        a = pair.a
        a.tun.send(ipv4_packet(a.address4, "10.9.9.9"))  # no route: outbound
        pair.network.send(("192.0.2.77", 4000), a.endpoint, b"\x16\x03\x01 not wireguard")  # type: ignore[union-attr]
        await wait_until(lambda: len(a.device.metrics().drops) == 2)
        m = a.device.metrics()
        assert m.drops == {(DropReason.NO_ROUTE, Direction.OUTBOUND): 1,
                           (DropReason.UNKNOWN_PROTOCOL, Direction.INBOUND): 1}
        assert a.device.stats()["drops"] == {"inbound": {"unknown_protocol": 1}, "outbound": {"no_route": 1}}

    tdm.run(body)


def test_peer_unreachable_and_timed_out_handshakes_once_each() -> None:
    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        events_a, _ = observe(pair)
        b.set(f"public_key={a.public_key.hex()}", "remove=true")  # B no longer answers A
        a.tun.send(ipv4_packet(a.address4, b.address4))
        await wait_until(lambda: a.device.metrics().peer(b.public_key).handshakes_initiated == 1)  # type: ignore[union-attr]
        await pair.clock.advance((MAX_TIMER_HANDSHAKES + 3) * (REKEY_TIMEOUT + 1), step=1.0)  # 1 s steps: 6 s apart
        await settle()
        peer = a.device.metrics().peer(b.public_key)
        assert peer is not None
        assert peer.unreachable == 1 and peer.handshakes_completed == 0
        assert peer.handshakes_initiated == MAX_TIMER_HANDSHAKES + 2  # the first, then every retry
        assert peer.handshakes_timed_out == MAX_TIMER_HANDSHAKES + 2  # each went unanswered
        assert events_a == [PeerUnreachable(b.public_key)]
        assert a.device.metrics().drops == {(DropReason.HANDSHAKE_GAVE_UP, Direction.OUTBOUND): 1}

    tdm.run(body)


def test_session_expired_fires_once_on_each_side() -> None:
    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        events_a, events_b = observe(pair)
        packet = ipv4_packet(a.address4, b.address4)
        a.tun.send(packet)
        assert await b.tun.receive() == packet
        await pair.clock.advance(KEY_ZEROING_TIME + 30, step=10.0)
        for side, other, events in ((a, b, events_a), (b, a, events_b)):
            peer = side.device.metrics().peer(other.public_key)
            assert peer is not None and peer.sessions_expired == 1
            assert [e for e in events if isinstance(e, SessionExpired)] == [SessionExpired(other.public_key)]
            assert [type(e) for e in events] == [HandshakeCompleted, SessionExpired]

    tdm.run(body)


def test_a_roamed_peer_and_set_endpoint_fire_endpoint_changed() -> None:
    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        events_a, _ = observe(pair)
        await tdm.exchange(pair)
        a.device.set_endpoint(b.public_key, ("192.0.2.99", 4444))
        a.device.set_endpoint(b.public_key, ("192.0.2.99", 4444))  # unchanged: no event
        await settle()
        b.tun.send(ipv4_packet(b.address4, a.address4, b"roam back"))  # authenticated from B's real address
        await a.tun.receive()
        await settle()
        moves = [e for e in events_a if isinstance(e, EndpointChanged)]
        assert moves == [EndpointChanged(b.public_key, ("192.0.2.99", 4444)),
                         EndpointChanged(b.public_key, b.endpoint)]
        assert a.device.metrics().peer(b.public_key).endpoint == b.endpoint  # type: ignore[union-attr]

    tdm.run(body)


def test_an_observer_that_raises_does_not_stop_the_data_path() -> None:
    async def body(pair: Pair) -> None:
        def broken(event: Event) -> None:
            raise RuntimeError("observer bug")

        pair.a.device.add_observer(broken)
        events_a, _ = observe(pair)
        await tdm.exchange(pair)
        assert [type(e) for e in events_a] == [HandshakeCompleted]

    tdm.run(body)


def test_counts_from_two_threads_are_never_lost() -> None:
    async def body(pair: Pair) -> None:
        device = pair.a.device
        per_thread = 20000
        reads: list[int] = []

        def count(reason: DropReason) -> None:
            for _ in range(per_thread):
                device.count_drop(reason)

        def read() -> None:  # snapshots taken meanwhile: never a count that goes back
            while len(reads) < 200:
                m = device.metrics()
                reads.append(sum(m.device_drops.values()))

        threads = [threading.Thread(target=count, args=(DropReason.UDP_SEND_FULL,)),
                   threading.Thread(target=count, args=(DropReason.UDP_SEND_FULL,)),
                   threading.Thread(target=read)]
        for t in threads:
            t.start()
        await asyncio.to_thread(lambda: [t.join(30) for t in threads])
        assert device.metrics().device_drops == {DropReason.UDP_SEND_FULL: 2 * per_thread}
        assert reads == sorted(reads)

    tdm.run(body)


def test_both_directions_at_once_on_the_threads_count_every_packet() -> None:
    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        await tdm.exchange(pair)  # 2 packets each way: sessions up
        rounds, burst = 10, 20

        async def send(side: Side, other: Side) -> None:
            for r in range(rounds):
                for i in range(burst):
                    side.tun.send(ipv4_packet(side.address4, other.address4, PAYLOAD[:-2] + bytes((r, i))))
                for _ in range(burst):
                    await other.tun.receive()

        await asyncio.gather(send(a, b), send(b, a))
        want = 2 + rounds * burst

        def done() -> bool:
            pa, pb = a.device.metrics().peer(b.public_key), b.device.metrics().peer(a.public_key)
            return pa is not None and pb is not None and pa.tx_packets >= want and pb.tx_packets >= want

        await wait_until(done)
        for side, other in ((a, b), (b, a)):
            peer = side.device.metrics().peer(other.public_key)
            assert peer is not None and (peer.tx_packets, peer.rx_packets) == (want, want)

    tdm.run(body, "threads")


def test_the_prometheus_collector_reads_the_snapshot() -> None:
    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        await tdm.exchange(pair)
        a.tun.send(ipv4_packet(a.address4, "10.9.9.9"))
        await wait_until(lambda: a.device.metrics().drops)
        registry = CollectorRegistry()
        registry.register(DeviceCollector(a.device.metrics))
        text = generate_latest(registry).decode()
        assert b.public_key.hex() not in text and "private" not in text
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        peer = a.device.metrics().peer(b.public_key)
        assert peer is not None
        key = base64.b64encode(b.public_key).decode()
        labels = (("interface", "mem1"), ("peer", key))
        assert samples[("pywg_peer_tx_packets_total", labels)] == peer.tx_packets == 2
        assert samples[("pywg_peer_rx_bytes_total", labels)] == peer.rx_bytes
        assert samples[("pywg_peer_handshakes_completed_total", labels)] == 1
        assert samples[("pywg_peer_last_handshake_seconds", labels)] == pytest.approx(peer.last_handshake)
        assert samples[("pywg_drops_total", (("direction", "outbound"), ("interface", "mem1"),
                                             ("reason", "no_route")))] == 1

    tdm.run(body)
