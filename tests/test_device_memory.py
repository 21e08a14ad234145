"""The device without root: two Devices back to back on an in-memory TUN (pywg.testing.memory),
over in-memory UDP (the event-loop data path) or the loopback (the threads, with and
without the C hop), configured over UAPI, with time moved by a fake clock."""

from __future__ import annotations

import asyncio
import base64
import errno
import ipaddress
import json
import os
import select
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pywg.device import daemon
from pywg.device.bind import BindError, UdpBind
from pywg.device.datapath import DataPathOptions
from pywg.device.device import MTU_RECHECK, Device
from pywg.device.metrics import Direction
from pywg.device.packet_filter import Verdict
from pywg.device.stats_server import StatsServer, read_stats
from pywg.device.tun import Tun, TunError
from pywg.device.uapi_server import UapiServer
from pywg.manage.uapi_client import exchange as uapi_exchange
from pywg.manage.uapi_client import response_errno, socket_path
from pywg.nat import stun
from pywg.protocol.actions import DropReason
from pywg.protocol.constants import MAX_TIMER_HANDSHAKES, REKEY_AFTER_TIME
from pywg.protocol.crypto import dh_generate, dh_pubkey
from pywg.protocol.demux import Protocol
from pywg.testing.memory import (
    MemoryNetwork,
    MemorySocket,
    MemoryTun,
    Pair,
    device_pair,
    ipv4_packet,
    ipv6_packet,
    settle,
    wait_until,
)
from pywg.uapi.protocol import IPC_ERROR_INVALID, IPC_ERROR_PORT_IN_USE, UapiError, parse_get, parse_set

EVENT_LOOP = DataPathOptions(threads=False, tun_offload=False, udp_gso=False, udp_gro=False, hop=False)
PATHS = {
    "event-loop": (EVENT_LOOP, True),
    "threads": (DataPathOptions(threads=True, tun_offload=False, hop=False), False),
    "threads-hop": (DataPathOptions(threads=True, tun_offload=False, hop=True), False),
    # the TUN with a virtio-net header on every frame (TUN offloads: splitting, coalescing)
    "event-loop-vnet": (DataPathOptions(threads=False, tun_offload=True, udp_gso=False, udp_gro=False,
                                        hop=False), True),
    "threads-vnet": (DataPathOptions(threads=True, tun_offload=True, hop=False), False),
    "threads-hop-vnet": (DataPathOptions(threads=True, tun_offload=True, hop=True), False),
}
TRANSPORT = 4


def run(body: Callable[[Pair], Awaitable[None]], path: str = "event-loop", **pair_args: object) -> None:
    options, in_memory = PATHS[path]

    async def main() -> None:
        pair = await device_pair(options, in_memory=in_memory, **pair_args)  # type: ignore[arg-type]
        try:
            await body(pair)
        finally:
            pair.close()

    asyncio.run(main())


def peer_stats(pair_side: object) -> dict[str, object]:
    peers = pair_side.device.stats()["peers"]  # type: ignore[attr-defined]
    assert len(peers) == 1
    return peers[0]  # type: ignore[no-any-return]


async def exchange(pair: Pair) -> None:
    """IPv4 and IPv6 packets both ways, each arriving exactly as sent."""
    a, b = pair.a, pair.b
    for packet, to in ((ipv4_packet(a.address4, b.address4, b"four"), b),
                       (ipv6_packet(a.address6, b.address6, b"six"), b),
                       (ipv4_packet(b.address4, a.address4, b"back4"), a),
                       (ipv6_packet(b.address6, a.address6, b"back6"), a)):
        (a if to is b else b).tun.send(packet)
        assert await to.tun.receive() == packet


@pytest.mark.parametrize("path", list(PATHS))
def test_handshake_and_data_both_ways_ipv4_and_ipv6(path: str) -> None:
    async def body(pair: Pair) -> None:
        await exchange(pair)
        a, b = pair.a, pair.b
        for side, other in ((a, b), (b, a)):
            stats = side.device.stats()
            peer = peer_stats(side)
            assert peer["handshakes"] == 1
            assert peer["endpoint"] == f"{other.endpoint[0]}:{other.endpoint[1]}"
            assert peer["rx_bytes"] > 0 and peer["tx_bytes"] > 0  # type: ignore[operator]
            assert stats["device_drops"] == {} and stats["engine_drops"] == {}
            assert stats["data_path"]["threads"] is path.startswith("threads")  # type: ignore[index]
            assert stats["data_path"]["hop"] is path.startswith("threads-hop")  # type: ignore[index]
            assert stats["data_path"]["tun_offload"] is path.endswith("vnet")  # type: ignore[index]
        if path.startswith("threads"):
            figures = a.device.stats()["datapath"]
            assert figures["tun_reads"] >= 2 and figures["datagrams_opened"] >= 1  # type: ignore[index]

    run(body, path)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_source_outside_the_peers_allowed_ips_is_dropped_and_counted(path: str) -> None:
    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        await exchange(pair)
        b.tun.send(ipv4_packet("10.9.0.77", a.address4, b"spoofed"))  # B routes it; A must refuse it
        await wait_until(lambda: a.device.stats()["device_drops"].get("source_not_allowed") == 1)  # type: ignore[union-attr]
        b.tun.send(ipv4_packet(b.address4, a.address4, b"genuine"))
        assert await a.tun.receive() == ipv4_packet(b.address4, a.address4, b"genuine")
        assert a.tun.pending() == []

    run(body, path)


def test_packets_with_no_route_or_not_ip_are_counted_on_the_way_out() -> None:
    async def body(pair: Pair) -> None:
        a = pair.a
        sent = len(pair.network.wire)  # type: ignore[union-attr]
        a.tun.send(ipv4_packet(a.address4, "10.9.9.9"))
        a.tun.send(b"\x45not an ip packet")
        await wait_until(lambda: a.device.stats()["device_drops"] == {"invalid_tun_packet": 1, "no_route": 1})
        assert len(pair.network.wire) == sent  # type: ignore[union-attr]  # nothing went out

    run(body)


def transports(pair: Pair, source: object, destination: object) -> list[bytes]:
    return [d.data for d in pair.network.sent(source.endpoint, destination.endpoint, TRANSPORT)]  # type: ignore[union-attr, attr-defined]


def test_a_replayed_datagram_is_dropped_and_counted() -> None:
    async def body(pair: Pair) -> None:
        a, b, network = pair.a, pair.b, pair.network
        assert network is not None
        await exchange(pair)
        captured = transports(pair, a, b)[-1]
        network.send(a.endpoint, b.endpoint, captured)  # an attacker on the path sends it again
        await wait_until(lambda: b.device.stats()["engine_drops"].get("replayed_counter") == 1)  # type: ignore[union-attr]
        assert b.tun.pending() == []
        await exchange(pair)  # the tunnel is unharmed

    run(body)


MALFORMED = [  # (the drop every path names it with, the datagram)
    ("unknown_protocol", b"\x04\x00\x00"),  # shorter than any WireGuard header: the demux's
    ("bad_size", b"\x01\x00\x00\x00" + bytes(40)),  # an initiation is 148 bytes
    ("unknown_index", b"\x04\x00\x00\x00" + b"\xde\xad\xbe\xef" + bytes(8) + bytes(32)),
    ("unknown_protocol", b"\x17\x03\x03\x00\x10" + bytes(16)),  # a TLS record
]
MALFORMED_DROPS = {"unknown_protocol": 2, "bad_size": 1, "unknown_index": 1}


def test_malformed_datagrams_from_anywhere_are_dropped_counted_and_the_device_keeps_serving() -> None:
    async def body(pair: Pair) -> None:
        a, b, network = pair.a, pair.b, pair.network
        assert network is not None
        await exchange(pair)
        for _, data in MALFORMED:
            network.send(("198.51.100.7", 4000), b.endpoint, data)
        tampered = bytearray(transports(pair, a, b)[-1])
        tampered[-1] ^= 1  # the tag no longer matches
        network.send(a.endpoint, b.endpoint, bytes(tampered))
        expected = MALFORMED_DROPS | {"decrypt_failed": 1}
        await wait_until(lambda: b.device.stats()["engine_drops"] == expected)
        assert b.tun.pending() == []
        assert peer_stats(b)["endpoint"] == f"{a.endpoint[0]}:{a.endpoint[1]}"  # no roaming to garbage
        await exchange(pair)

    run(body)


@pytest.mark.parametrize("path", list(PATHS))
def test_the_endpoint_follows_the_peer_to_a_new_source_port(path: str) -> None:
    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        await exchange(pair)
        old = b.endpoint
        # B's sockets move (as after a NAT rebinding); on the loopback the kernel picks the
        # port (0: always a new one, as in wireguard-go), in memory a fixed one will do
        b.set(f"listen_port={51999 if pair.network is not None else 0}")
        new = b.endpoint
        assert new[0] == old[0] and new[1] != old[1]
        if pair.network is not None:
            assert new[1] == 51999 and not pair.network.in_use(old)
        b.tun.send(ipv4_packet(b.address4, a.address4, b"from the new port"))
        assert await a.tun.receive() == ipv4_packet(b.address4, a.address4, b"from the new port")
        assert peer_stats(a)["endpoint"] == f"{new[0]}:{new[1]}"
        a.tun.send(ipv6_packet(a.address6, b.address6, b"answer"))
        assert await b.tun.receive() == ipv6_packet(a.address6, b.address6, b"answer")

    run(body, path)


def test_a_port_in_use_is_refused_and_leaves_the_device_as_it_was() -> None:
    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        port = b.endpoint[1]
        taken = pair.network.host(b.outer).open_bind(0)  # type: ignore[union-attr]  # another program
        with pytest.raises(UapiError) as refused:
            b.set(f"listen_port={taken.port}", f"public_key={a.public_key.hex()}", "remove=true")
        assert refused.value.errno == IPC_ERROR_PORT_IN_USE
        assert b.endpoint[1] == port and len(b.device.snapshot().peers) == 1
        taken.close()
        await exchange(pair)

    run(body)


def test_persistent_keepalive_is_sent_every_interval_of_the_fake_clock() -> None:
    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        await exchange(pair)
        a.set(f"public_key={b.public_key.hex()}", "persistent_keepalive_interval=5")
        before = len(transports(pair, a, b))
        await pair.clock.advance(25)
        keepalives = [d for d in transports(pair, a, b)[before:] if len(d) == 32]  # header + tag, no data
        assert len(keepalives) in (4, 5)  # every 5 s
        assert b.tun.pending() == []  # keepalives carry nothing to the TUN
        assert b.device.stats()["engine_drops"] == {}

    run(body)


def test_after_rekey_after_time_the_next_packet_starts_a_new_handshake() -> None:
    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        await exchange(pair)
        await pair.clock.advance(REKEY_AFTER_TIME + 1, step=REKEY_AFTER_TIME + 1)
        a.tun.send(ipv4_packet(a.address4, b.address4, b"rekey"))
        assert await b.tun.receive() == ipv4_packet(a.address4, b.address4, b"rekey")
        await wait_until(lambda: peer_stats(a)["handshakes"] == 2)
        await exchange(pair)

    run(body)


def test_without_replies_the_initiator_retries_every_rekey_timeout_then_gives_up() -> None:
    async def body(pair: Pair) -> None:
        a, b, network = pair.a, pair.b, pair.network
        assert network is not None
        network.tap = lambda d: d.destination != b.endpoint  # B is unreachable
        a.tun.send(ipv4_packet(a.address4, b.address4, b"lost"))
        await settle()
        assert peer_stats(a)["staged_packets"] == 1
        await pair.clock.advance(110, step=0.25)
        initiations = network.sent(a.endpoint, b.endpoint, 1)
        # the first, then a retry every REKEY_TIMEOUT (+ jitter) while the attempts so far are
        # not over MAX_TIMER_HANDSHAKES (wireguard-go's timers.go: 19 retries)
        assert len(initiations) == 1 + MAX_TIMER_HANDSHAKES + 1
        assert peer_stats(a)["staged_packets"] == 0 and peer_stats(a)["handshakes"] == 0
        assert a.device.stats()["engine_drops"].get("handshake_gave_up", 0) >= 1  # type: ignore[union-attr]

    run(body)


def test_uapi_set_and_get_round_trip_over_the_socket(tmp_path: Path) -> None:
    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        await exchange(pair)
        server = await UapiServer.start(a.device.name, a.device, tmp_path)
        stats = await StatsServer.start(a.device.name, a.device.stats, tmp_path)
        try:
            path = socket_path(a.device.name, tmp_path)
            other = dh_pubkey(dh_generate())
            set_reply = await uapi_exchange(path, "set=1\nfwmark=7\n"
                                            f"public_key={other.hex()}\nendpoint=[2001:db8::9]:4500\n"
                                            "allowed_ip=10.9.5.0/24\npersistent_keepalive_interval=0\n\n")
            assert response_errno(set_reply) == 0
            snapshot = parse_get(await uapi_exchange(path, "get=1\n\n"))
            assert snapshot.private_key == a.private_key and snapshot.fwmark == 7
            assert snapshot.listen_port == a.endpoint[1]
            peers = {p.public_key: p for p in snapshot.peers}
            assert peers[other].endpoint == ("2001:db8::9", 4500) and peers[other].allowed_ips == ["10.9.5.0/24"]
            assert peers[b.public_key].allowed_ips == [f"{b.address4}/32", f"{b.address6}/128"]
            assert peers[b.public_key].last_handshake_ns and peers[b.public_key].rx_bytes > 0
            assert a.device.bind is not None and all(s.fwmark == 7 for s in a.device.bind.sockets)  # type: ignore[attr-defined]
            bad = await uapi_exchange(path, f"set=1\npublic_key={other.hex()}\nremove=true\n"
                                      "public_key=not-a-key\n\n")
            assert response_errno(bad) == IPC_ERROR_INVALID
            assert len(a.device.snapshot().peers) == 2  # nothing of the bad request was applied
            published = await asyncio.to_thread(read_stats, a.device.name, tmp_path)
            assert published == json.loads(json.dumps(a.device.stats()))
            assert a.private_key.hex() not in json.dumps(published) + repr(pair) + repr(a.device)
            assert base64.b64encode(a.private_key).decode() not in json.dumps(published)
            await exchange(pair)
        finally:
            await server.close()
            await stats.close()

    run(body)


@pytest.mark.parametrize("path", list(PATHS))
def test_removing_the_peer_ends_its_session(path: str) -> None:
    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        await exchange(pair)
        a.set(f"public_key={b.public_key.hex()}", "remove=true")
        assert a.device.stats()["peers"] == []
        a.tun.send(ipv4_packet(a.address4, b.address4, b"to nobody"))
        b.tun.send(ipv4_packet(b.address4, a.address4, b"to a stranger"))
        await wait_until(lambda: a.device.stats()["device_drops"].get("no_route") == 1  # type: ignore[union-attr]
                         and a.device.stats()["engine_drops"].get("unknown_index") == 1)  # type: ignore[union-attr]
        assert a.tun.pending() == [] and b.tun.pending() == []

    run(body, path)


def test_a_deleted_interface_stops_the_device_and_tells_its_owner() -> None:
    async def body(pair: Pair) -> None:
        a = pair.a
        gone = asyncio.Event()
        a.device.on_gone = gone.set
        a.tun.delete()
        await asyncio.wait_for(gone.wait(), 2)
        a.device.on_gone = None
        a.device.gone("again")  # only once

    run(body)


def test_the_device_follows_the_interface_mtu() -> None:
    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        await exchange(pair)
        a.tun.mtu = 1280
        await pair.clock.advance(2)
        a.tun.send(ipv4_packet(a.address4, b.address4, b"x" * 3))
        assert await b.tun.receive() == ipv4_packet(a.address4, b.address4, b"x" * 3)
        assert a.device.dispatcher.mtu == 1280

    run(body)


def test_stun_on_the_wireguard_port_reaches_its_handler() -> None:
    async def body(pair: Pair) -> None:
        a, network = pair.a, pair.network
        assert network is not None
        heard: list[tuple[bytes, tuple[str, int]]] = []
        a.device.register_handler(Protocol.STUN, lambda data, source: heard.append((data, source)))
        _, request = stun.binding_request(os.urandom)
        reply = stun.binding_response(stun.parse(request), stun.TransportAddress.of("203.0.113.5", 4242))
        network.send(("198.51.100.1", 3478), a.endpoint, reply)
        await wait_until(lambda: heard)
        assert heard == [(reply, ("198.51.100.1", 3478))]
        await exchange(pair)

    run(body)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=200), st.sampled_from([1, 2, 3, 4])), max_size=6))
def test_any_datagrams_from_anywhere_never_reach_the_tun(datagrams: list[tuple[bytes, int]]) -> None:
    async def body(pair: Pair) -> None:
        b, network = pair.b, pair.network
        assert network is not None
        await exchange(pair)
        for data, kind in datagrams:
            network.send(("198.51.100.9", 1000 + kind), b.endpoint, bytes([kind]) + b"\0\0\0" + data)
        await settle()
        assert b.tun.pending() == []
        await exchange(pair)

    run(body)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_burst_arrives_whole_and_in_order_and_spoofed_ones_in_it_are_dropped(path: str) -> None:
    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        await exchange(pair)
        for sender, receiver in ((a, b), (b, a)):
            burst = [ipv4_packet(sender.address4, receiver.address4, i.to_bytes(2, "big") * 600)
                     for i in range(60)] + [ipv6_packet(sender.address6, receiver.address6, b"tail")]
            for packet in burst:
                sender.tun.send(packet)
            assert [await receiver.tun.receive() for _ in burst] == burst
        spoofed = [ipv4_packet("10.9.0.66", a.address4, bytes(1200)) for _ in range(20)]
        for packet in spoofed:
            b.tun.send(packet)
        await wait_until(lambda: a.device.stats()["device_drops"].get("source_not_allowed") == len(spoofed))  # type: ignore[union-attr]
        assert a.tun.pending() == []
        sealed = b.device.stats()["datapath"].get("packets_sealed", 0)  # type: ignore[union-attr]
        assert path.startswith("event-loop") or sealed >= len(burst) + len(spoofed)  # type: ignore[operator]

    run(body, path)


def test_an_ipv4_mapped_endpoint_is_reached_over_ipv4() -> None:
    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        a.set(f"public_key={b.public_key.hex()}", f"endpoint=[::ffff:{b.outer}]:{b.endpoint[1]}")
        await exchange(pair)
        assert pair.network.sent(a.endpoint, b.endpoint, 1)  # type: ignore[union-attr]  # the initiation, over IPv4

    run(body)


def test_the_tunnel_runs_over_the_outer_ipv6_addresses() -> None:
    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        for me, other in ((a, b), (b, a)):
            me.set(f"public_key={other.public_key.hex()}", f"endpoint=[2001:db8::{other.outer[-1]}]:{other.endpoint[1]}")
        await exchange(pair)
        assert peer_stats(a)["endpoint"] == f"[2001:db8::2]:{b.endpoint[1]}"

    run(body)


def test_a_send_the_network_refuses_is_counted() -> None:
    async def body(pair: Pair) -> None:
        a, b, network = pair.a, pair.b, pair.network
        assert network is not None
        network.unreachable.add(b.outer)
        a.tun.send(ipv4_packet(a.address4, b.address4, b"no route to the peer"))
        await settle()
        assert a.device.stats()["device_drops"] == {"udp_send_error": 1}
        network.unreachable.clear()
        await pair.clock.advance(6)  # the handshake is retried
        assert await b.tun.receive() == ipv4_packet(a.address4, b.address4, b"no route to the peer")

    run(body)


def test_a_failed_tun_write_stops_the_device() -> None:
    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        await exchange(pair)
        gone = asyncio.Event()
        b.device.on_gone = gone.set
        b.tun.delete(wake=False)
        a.tun.send(ipv4_packet(a.address4, b.address4, b"into a deleted interface"))
        await asyncio.wait_for(gone.wait(), 2)

    run(body)


@pytest.mark.parametrize("path", ["event-loop", "threads", "event-loop-vnet"])
def test_a_tun_write_refused_loses_that_packet_only(path: str) -> None:
    """EIO (the interface is down) or EINVAL: as wireguard-go, the packet is lost and counted;
    the device keeps running and the next packet arrives."""
    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        await exchange(pair)
        b.tun.failing_writes = [errno.EIO, errno.EINVAL]
        for n in range(2):
            a.tun.send(ipv4_packet(a.address4, b.address4, b"refused %d" % n))
        await wait_until(lambda: b.device.metrics().drops.get((DropReason.TUN_WRITE_FAILED, Direction.INBOUND)) == 2)
        a.tun.send(ipv4_packet(a.address4, b.address4, b"after the refusals"))
        assert await b.tun.receive() == ipv4_packet(a.address4, b.address4, b"after the refusals")
        assert b.device.stats()["device_drops"].get("tun_write_failed") == 2  # type: ignore[union-attr]

    run(body, path)


@pytest.mark.parametrize("path", ["threads", "threads-hop"])
def test_the_threaded_device_follows_the_interface_mtu(path: str) -> None:
    async def body(pair: Pair) -> None:
        a = pair.a
        await exchange(pair)
        a.tun.mtu = 1280
        await wait_until(lambda: a.device.dispatcher.mtu == 1280, timeout=MTU_RECHECK * 3)
        await exchange(pair)

    run(body, path)


def test_the_data_path_switches_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYWG_THREADS", "0")
    off = DataPathOptions.from_environment()
    assert not (off.threads or off.tun_offload or off.udp_gso or off.udp_gro or off.hop)
    monkeypatch.setenv("PYWG_THREADS", "1")
    monkeypatch.setenv("PYWG_UDP_GSO", "off")
    monkeypatch.setenv("PYWG_HOP", "no")
    on = DataPathOptions.from_environment()
    assert on.threads and not on.udp_gso and not on.hop and on.udp_gro


def test_an_ipv6_zone_must_name_an_interface_and_get_shows_the_endpoint_without_it() -> None:
    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        a.set(f"public_key={b.public_key.hex()}", "endpoint=[fe80::1%lo]:51820")
        (peer,) = a.device.snapshot().peers
        assert peer.endpoint == ("fe80::1", 51820)
        with pytest.raises(UapiError, match="endpoint: no interface 'nosuch0'") as refused:
            a.set(f"public_key={b.public_key.hex()}", "endpoint=[fe80::1%nosuch0]:51820")
        assert refused.value.errno == IPC_ERROR_INVALID
        assert a.device.snapshot().peers[0].endpoint == ("fe80::1", 51820)

    run(body)


def test_a_keepalive_peer_configured_before_start_is_contacted_at_start() -> None:
    async def main() -> None:
        network = MemoryNetwork()
        listener = network.socket(("192.0.2.9", 51820))  # the peer, played by the test
        device = Device(MemoryTun("mem9"), PATHS["event-loop"][0])
        device.open_bind = network.host("192.0.2.8").open_bind
        try:
            device.apply(parse_set([f"private_key={dh_generate().hex()}",
                                    f"public_key={dh_pubkey(dh_generate()).hex()}",
                                    "endpoint=192.0.2.9:51820", "persistent_keepalive_interval=25"]))
            assert network.wire == []  # nothing before start
            device.start()
            loop = asyncio.get_running_loop()
            data, source = await asyncio.wait_for(loop.run_in_executor(None, _recv_blocking, listener), 2)
            assert data[:1] == b"\x01" and len(data) == 148 and source[0] == "192.0.2.8"
            assert repr(device) == "Device('mem9', peers=1)"
        finally:
            device.close()
            listener.close()

    asyncio.run(main())


def _recv_blocking(sock: MemorySocket) -> tuple[bytes, tuple[str, int]]:
    select.select([sock], [], [], 2)
    return sock.recvfrom(65535)


@pytest.mark.parametrize("path", [p for p in PATHS if p.startswith("threads")])
def test_malformed_datagrams_on_the_threaded_paths_are_dropped_and_counted(path: str) -> None:
    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        await exchange(pair)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
            attacker.bind(("127.0.0.1", 0))
            for _, data in MALFORMED:
                attacker.sendto(data, b.endpoint)
            # each counted once, under the name the event loop gives it (and the C screen)
            await wait_until(lambda: b.device.stats()["engine_drops"] == MALFORMED_DROPS)
        assert b.tun.pending() == []
        assert peer_stats(b)["endpoint"] == f"{a.endpoint[0]}:{a.endpoint[1]}"
        await exchange(pair)

    run(body, path)


def test_handlers_for_stun_that_fail_or_are_missing_are_counted() -> None:
    async def body(pair: Pair) -> None:
        a, network = pair.a, pair.network
        assert network is not None

        def broken(data: bytes, source: tuple[str, int]) -> None:
            raise RuntimeError("handler bug")

        with pytest.raises(ValueError, match="only STUN and disco"):
            a.device.register_handler(Protocol.WIREGUARD, broken)
        _, request = stun.binding_request(os.urandom)
        reply = stun.binding_response(stun.parse(request), stun.TransportAddress.of("203.0.113.5", 4242))
        a.device.register_handler(Protocol.STUN, broken)
        network.send(("198.51.100.1", 3478), a.endpoint, reply)
        await wait_until(lambda: a.device.stats()["engine_drops"] == {"handler_failed": 1})
        a.device.register_handler(Protocol.STUN, None)
        network.send(("198.51.100.1", 3478), a.endpoint, reply)
        await wait_until(lambda: a.device.stats()["engine_drops"] == {"handler_failed": 1, "no_handler": 1})
        await exchange(pair)

    run(body)


def test_a_second_uapi_server_for_the_interface_is_refused_and_a_stale_socket_replaced(tmp_path: Path) -> None:
    async def body(pair: Pair) -> None:
        device = pair.a.device
        stale = socket_path(device.name, tmp_path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left_behind:
            left_behind.bind(str(stale))  # a crashed daemon's socket: nobody answers
        server = await UapiServer.start(device.name, device, tmp_path)
        try:
            with pytest.raises(OSError, match="already running"):
                await UapiServer.start(device.name, device, tmp_path)
            reply = await uapi_exchange(stale, "get=1\n\nbogus=1\n\n")  # a request, then an unknown operation
            assert parse_get(reply.split("errno=0\n\n")[0] + "errno=0\n\n").private_key == pair.a.private_key
        finally:
            await server.close()
        assert not stale.exists()

    run(body)


@pytest.mark.parametrize("name", ["", "a" * 16, "a/b", ".", ".."])
def test_an_invalid_interface_name_is_refused(name: str) -> None:
    with pytest.raises(TunError, match="invalid interface name"):
        Tun(name)


def test_a_listen_port_taken_on_ipv6_only_is_refused() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as other:
        other.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        other.bind(("::", 0))
        port = other.getsockname()[1]
        with pytest.raises(BindError, match=f"UDP port {port} is in use \\(IPv6\\)"):
            UdpBind.open(port)
        bind = UdpBind.open(0)  # 0: a port free on both
        try:
            assert bind.port not in (0, port) and len(bind.sockets) == 2
        finally:
            bind.close()


def test_the_daemon_serves_uapi_and_stats_and_ends_when_its_interface_is_deleted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_LEVEL", "error")  # else a detached daemon lets go of stderr
    monkeypatch.setenv("PYWG_THREADS", "0")  # MemoryTun.delete() is seen by reads through Tun.read
    tuns: list[MemoryTun] = []

    def open_tun(name: str, *, vnet_hdr: bool) -> MemoryTun:
        tuns.append(MemoryTun(name, vnet_hdr=vnet_hdr))
        return tuns[-1]

    async def main() -> None:
        ready_r, ready_w = os.pipe()
        served = asyncio.create_task(daemon.serve("memd0", ready_w, open_tun=open_tun, uapi_dir=tmp_path,
                                                  stats_dir=tmp_path))
        loop = asyncio.get_running_loop()
        assert await asyncio.wait_for(loop.run_in_executor(None, os.read, ready_r, 1), 5) == b"\x01"
        os.close(ready_r)
        path = socket_path("memd0", tmp_path)
        private = dh_generate()
        assert response_errno(await uapi_exchange(path, f"set=1\nprivate_key={private.hex()}\n\n")) == 0
        assert parse_get(await uapi_exchange(path, "get=1\n\n")).private_key == private
        stats = await asyncio.to_thread(read_stats, "memd0", tmp_path)
        assert stats["interface"] == "memd0" and stats["listen_port"]
        tuns[0].delete()
        assert await asyncio.wait_for(served, 5) == 0
        assert not path.exists()

    asyncio.run(main())


def test_the_daemon_says_why_it_cannot_start(capsys: pytest.CaptureFixture[str]) -> None:
    assert daemon.run("no/slash", foreground=True) == 1
    assert "pywg: no/slash: invalid interface name" in capsys.readouterr().err


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=2000), st.ip_addresses(), st.integers(1, 65535))
def test_the_memory_network_carries_any_datagram_from_any_address_unchanged(
        data: bytes, host: object, port: int) -> None:
    network = MemoryNetwork()
    receiver = network.socket(("192.0.2.50", 51820))
    try:
        network.send((str(host), port), ("192.0.2.50", 51820), data)
        got, source = receiver.recvfrom(65535)
        address = ipaddress.ip_address(str(host))
        mapped = getattr(address, "ipv4_mapped", None)  # an IPv4-mapped source is IPv4, as for the device
        assert got == data and source == ((mapped or address).compressed, port)
        network.send((str(host), port), ("192.0.2.51", 51820), data)  # nobody there
        assert network.lost == 1 and len(network.wire) == 2
    finally:
        receiver.close()
    assert not network.in_use(("192.0.2.50", 51820))


@pytest.mark.parametrize("path", list(PATHS))
def test_a_peers_packet_filter_drops_both_ways_counted_and_the_hop_carries_none_of_its_packets(path: str) -> None:
    """A filter on B's peer A: B sends nothing A's filter refuses (outbound, after the TUN
    read) and writes nothing it refuses from A (inbound, before the TUN write); each drop is
    counted by direction. While it is set the C hop carries none of the peer's packets; once
    cleared, everything flows (and the hop carries them again)."""
    seen: list[tuple[Direction, bytes]] = []

    def refuse_secrets(direction: Direction, packet: bytes | memoryview) -> Verdict:
        seen.append((direction, bytes(packet)))
        return Verdict.DROP if b"secret" in bytes(packet) else Verdict.ACCEPT

    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        await exchange(pair)
        b.device.set_filter(a.public_key, refuse_secrets)
        hop_before = dict(b.device.stats()["datapath"])  # type: ignore[call-overload]

        def dropped(reason: DropReason, direction: Direction) -> int:
            return b.device.metrics().drops.get((reason, direction), 0)

        b.tun.send(ipv4_packet(b.address4, a.address4, b"a lone secret"))  # alone: the short way
        await wait_until(lambda: dropped(DropReason.FILTERED_OUTBOUND, Direction.OUTBOUND) == 1)
        a.tun.send(ipv4_packet(a.address4, b.address4, b"a lone secret back"))
        await wait_until(lambda: dropped(DropReason.FILTERED_INBOUND, Direction.INBOUND) == 1)
        for n in range(3):  # out of B: the refused packet never leaves, the next one arrives
            b.tun.send(ipv4_packet(b.address4, a.address4, b"secret out %d" % n))
            b.tun.send(ipv4_packet(b.address4, a.address4, b"plain out %d" % n))
            assert await a.tun.receive() == ipv4_packet(b.address4, a.address4, b"plain out %d" % n)
        for n in range(3):  # into B: opened, then refused before the TUN write
            a.tun.send(ipv6_packet(a.address6, b.address6, b"secret in %d" % n))
            a.tun.send(ipv6_packet(a.address6, b.address6, b"plain in %d" % n))
            assert await b.tun.receive() == ipv6_packet(a.address6, b.address6, b"plain in %d" % n)
        assert dropped(DropReason.FILTERED_OUTBOUND, Direction.OUTBOUND) == 4
        assert dropped(DropReason.FILTERED_INBOUND, Direction.INBOUND) == 4
        device_drops = b.device.stats()["device_drops"]
        assert device_drops == {"filtered_inbound": 4, "filtered_outbound": 4}, device_drops  # type: ignore[comparison-overlap]
        assert {d for d, _ in seen} == {Direction.OUTBOUND, Direction.INBOUND}
        # every packet to or from A passed the filter once: the hop carried none of them
        assert sum(b"secret" in p for _, p in seen) == 8 and sum(b"plain" in p for _, p in seen) == 6
        b.device.set_filter(a.public_key, None)
        seen.clear()
        for n in range(8):
            b.tun.send(ipv4_packet(b.address4, a.address4, b"secret again %d" % n))
            assert await a.tun.receive() == ipv4_packet(b.address4, a.address4, b"secret again %d" % n)
            a.tun.send(ipv4_packet(a.address4, b.address4, b"secret back %d" % n))
            assert await b.tun.receive() == ipv4_packet(a.address4, b.address4, b"secret back %d" % n)
        assert seen == []
        if path.startswith("threads-hop"):
            figures = b.device.stats()["datapath"]
            assert figures["hop_sends"] > hop_before.get("hop_sends", 0), figures  # type: ignore[index, operator]

    run(body, path)


def test_a_filter_that_raises_drops_the_packet_and_a_filter_is_a_callable_on_a_32_byte_key() -> None:
    def broken(direction: Direction, packet: bytes | memoryview) -> Verdict:
        raise RuntimeError("bug in the filter")

    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        await exchange(pair)
        with pytest.raises(ValueError, match="32 bytes"):
            b.device.set_filter(b"short", broken)
        with pytest.raises(TypeError, match="callable"):
            b.device.set_filter(a.public_key, "accept")  # type: ignore[arg-type]
        b.device.set_filter(a.public_key, broken)
        b.tun.send(ipv4_packet(b.address4, a.address4, b"lost"))
        await wait_until(lambda: b.device.stats()["device_drops"].get("filtered_outbound") == 1)  # type: ignore[union-attr]
        b.device.set_filter(a.public_key, None)
        await exchange(pair)

    run(body)
