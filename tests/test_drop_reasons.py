"""One DropReason per bad datagram, whichever path receives it (issue 10, item 3).

The same datagrams go to every receive path: the event loop (in-memory UDP), the threads
and the threads with the C hop and its screen (loopback UDP), UdpEngine (loopback), and
the sans-I/O engine behind the demux (the model: the demux's verdict first, then the
engine's length, mac1 and index checks). Each datagram must be counted exactly once, under
the same name everywhere; the tunnel between the two devices of each path keeps carrying
packets meanwhile. A crafted table (every WireGuard type at every wrong length around its
size, STUN- and disco-like, empty, 1 to 4 bytes, a TLS record) and hypothesis both feed it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from collections import Counter
from collections.abc import Awaitable, Iterator
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pywg.device import hop as hop_module
from pywg.device.datapath import DataPathOptions
from pywg.device.udp_engine import UdpEngine
from pywg.nat import stun
from pywg.protocol.actions import Drop, DropReason
from pywg.protocol.constants import COOKIE_REPLY_SIZE, INITIATION_SIZE, RESPONSE_SIZE, TRANSPORT_MIN_SIZE
from pywg.protocol.crypto import dh_generate
from pywg.protocol.demux import DISCO_MAGIC, Protocol, classify
from pywg.protocol.dispatcher import Dispatcher
from pywg.testing.memory import Pair, device_pair, ipv4_packet, wait_until

T = TypeVar("T")
SOURCE = ("198.51.100.7", 4000)  # the in-memory attacker
WIRE = {1: INITIATION_SIZE, 2: RESPONSE_SIZE, 3: COOKIE_REPLY_SIZE, 4: TRANSPORT_MIN_SIZE}
NEEDS_HOP = os.environ.get("CI") == "true" or hop_module.AVAILABLE  # under CI the C hop is built


def crafted() -> list[bytes]:
    """The table: each WireGuard type around its size, the other protocols, the odd ones."""
    cases: list[bytes] = [b"", b"\x04", b"\x01\x00", b"\x04\x00\x00", b"\x04\x00\x00\x00", b"\x01\x00\x00\x00",
                          b"\x00\x00\x00\x00", b"\x05\x00\x00\x00", b"\xff\xff\xff\xff", b"\x04\x01\x00\x00",
                          b"\x17\x03\x03\x00\x10" + bytes(16),  # a TLS application-data record
                          b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(505)]  # a ClientHello
    for mtype, size in WIRE.items():
        header = struct.pack("<I", mtype)
        for length in (4, 5, 8, size - 17, size - 1, size, size + 1, size + 16, 1400):
            if length >= 4:
                cases.append(header + os.urandom(length - 4))
        cases.append(bytes([mtype, 0, 1, 0]) + os.urandom(size - 4))  # the reserved bytes not zero
    _, request = stun.binding_request(os.urandom)
    response = stun.binding_response(stun.parse(request), stun.TransportAddress.of("203.0.113.5", 4242))
    cookie = struct.pack("!I", 0x2112A442)
    cases += [request, response, request[:-1], request + b"\x00",  # STUN, and STUN's length wrong
              struct.pack("!HH", 0x0400, 0) + cookie + bytes(12),  # STUN whose first byte is 4
              struct.pack("!HH", 0x0401, 12) + cookie + bytes(24),  # ... 32 bytes long
              struct.pack("<I", 4) + cookie + bytes(12),  # a 20-byte "transport" with STUN's cookie
              DISCO_MAGIC, DISCO_MAGIC + os.urandom(40), DISCO_MAGIC[:5], b"TS" + os.urandom(30)]
    return cases


def reference(data: bytes) -> DropReason:
    """The model: what the demux says, then the engine (no STUN/disco handler registered)."""
    protocol = classify(data)
    if protocol is Protocol.UNKNOWN:
        return DropReason.UNKNOWN_PROTOCOL
    if protocol is not Protocol.WIREGUARD:
        return DropReason.NO_HANDLER
    drops = [a.reason for a in Dispatcher(dh_generate()).datagram_received(data, SOURCE, 1.0)
             if isinstance(a, Drop)]
    assert len(drops) == 1, (data, drops)
    return drops[0]


# --- the paths, on one event loop in a thread of their own ---------------------------------


class Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="drop-reasons", daemon=True)
        self.thread.start()

    def run(self, coroutine: Awaitable[T], timeout: float = 20) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class PairPath:
    """A device pair; the datagrams go to B, from an address that is not A's."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.attacker: socket.socket | None = None
        if pair.network is None:
            self.attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.attacker.bind(("127.0.0.1", 0))

    def drops(self) -> Counter[str]:
        stats = self.pair.b.device.stats()
        return Counter(stats["engine_drops"]) + Counter(stats["device_drops"])  # type: ignore[arg-type]

    def send(self, data: bytes) -> None:
        if self.attacker is not None:
            self.attacker.sendto(data, self.pair.b.endpoint)
        else:
            assert self.pair.network is not None
            self.pair.network.send(SOURCE, self.pair.b.endpoint, data)

    async def traffic(self, tag: bytes) -> None:
        """A packet each way through the tunnel, arriving as sent."""
        a, b = self.pair.a, self.pair.b
        for packet, sender, receiver in ((ipv4_packet(a.address4, b.address4, tag), a, b),
                                         (ipv4_packet(b.address4, a.address4, tag), b, a)):
            sender.tun.send(packet)
            assert await receiver.tun.receive() == packet

    def close(self) -> None:
        if self.attacker is not None:
            self.attacker.close()
        self.pair.close()


class EnginePath:
    """UdpEngine on a loopback socket (the interop tests' and the demo's receive path)."""

    def __init__(self, engine: UdpEngine) -> None:
        self.engine = engine
        self.attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.attacker.bind(("127.0.0.1", 0))

    def drops(self) -> Counter[str]:
        with self.engine.lock:
            return Counter({r.value: n for r, n in self.engine.dispatcher.drops.items()})

    def send(self, data: bytes) -> None:
        self.attacker.sendto(data, self.engine.local_address)

    async def traffic(self, tag: bytes) -> None:
        """(No tunnel here: the engine's socket still answers, its loop still turns.)"""

    def close(self) -> None:
        self.attacker.close()
        self.engine.close()


Path = PairPath | EnginePath
LOOP_OPTIONS = DataPathOptions(threads=False, tun_offload=False, udp_gso=False, udp_gro=False, hop=False)
PATHS: dict[str, tuple[DataPathOptions, bool]] = {
    "event-loop": (LOOP_OPTIONS, True),
    "threads": (DataPathOptions(threads=True, tun_offload=False, hop=False), False),
    "threads-hop": (DataPathOptions(threads=True, tun_offload=False, hop=True), False),
}


async def open_paths() -> dict[str, Path]:
    paths: dict[str, Path] = {}
    for name, (options, in_memory) in PATHS.items():
        if options.hop and not hop_module.AVAILABLE:
            assert not NEEDS_HOP, "the C hop is missing (the native extension did not build)"
            continue
        pair = await device_pair(options, in_memory=in_memory)
        path = PairPath(pair)
        await path.traffic(b"handshake first")
        if options.hop:
            assert pair.b.device.stats()["data_path"]["hop"] is True  # type: ignore[index]
        paths[name] = path
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    paths["udp-engine"] = EnginePath(await UdpEngine.start(dh_generate(), sock))
    return paths


async def verdict(path: Path, data: bytes) -> str:
    """The one reason ``path`` counted ``data`` under (it must count it exactly once)."""
    before = path.drops()
    path.send(data)
    got: list[Counter[str]] = []

    def counted() -> bool:
        got[:] = [path.drops() - before]
        return sum(got[0].values()) >= 1

    await wait_until(counted, timeout=5)
    await asyncio.sleep(0.005)  # a second count (a double drop) would show by now
    delta = path.drops() - before
    assert sum(delta.values()) == 1, (data.hex(), delta)
    return next(iter(delta))


@pytest.fixture(scope="module")
def paths() -> Iterator[tuple[Loop, dict[str, Path]]]:
    loop = Loop()
    opened = loop.run(open_paths())
    try:
        yield loop, opened
    finally:
        async def close() -> None:
            for path in opened.values():
                path.close()
        loop.run(close())
        loop.close()


def check(loop: Loop, paths: dict[str, Path], datagrams: list[bytes], tag: bytes) -> None:
    async def main() -> None:
        for data in datagrams:
            expected = reference(data).value
            seen = {name: await verdict(path, data) for name, path in paths.items()}
            assert set(seen.values()) == {expected}, (data[:48].hex(), len(data), expected, seen)
        for path in paths.values():
            await path.traffic(tag)  # legitimate traffic kept flowing

    loop.run(main(), timeout=60)


def test_every_path_names_each_crafted_datagram_alike(paths: tuple[Loop, dict[str, Path]]) -> None:
    loop, opened = paths
    assert {"event-loop", "threads", "udp-engine"} <= set(opened)
    cases = crafted()
    check(loop, opened, cases, b"after the table")
    # the table covers what the vocabulary names for bad input
    names = {reference(data) for data in cases}
    assert names == {DropReason.UNKNOWN_PROTOCOL, DropReason.BAD_SIZE, DropReason.BAD_MAC1,
                     DropReason.UNKNOWN_INDEX, DropReason.NO_HANDLER}, names


def wireguard_like() -> st.SearchStrategy[bytes]:
    """A WireGuard header (maybe with non-zero reserved bytes) and a length near its size."""
    return st.builds(lambda mtype, reserved, delta, fill: (
        bytes([mtype]) + reserved + fill * max(0, WIRE[mtype] + delta - 4))[:max(0, WIRE[mtype] + delta)],
        st.sampled_from(sorted(WIRE)), st.sampled_from([b"\0\0\0", b"\0\0\1", b"\1\0\0"]),
        st.integers(-40, 40), st.sampled_from([b"\0", b"\xff", b"\x5a"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.binary(max_size=200), wireguard_like(),
                          st.binary(max_size=60).map(lambda b: DISCO_MAGIC[:len(b) % 7] + b)),
                min_size=1, max_size=4))
def test_every_path_names_random_datagrams_alike(paths: tuple[Loop, dict[str, Path]], datagrams: list[bytes]) -> None:
    loop, opened = paths
    check(loop, opened, datagrams, b"after random")


def test_a_burst_of_mixed_garbage_is_counted_datagram_by_datagram(paths: tuple[Loop, dict[str, Path]]) -> None:
    """Same-sized datagrams back to back (a UDP_GRO read may take them as one run, and the
    hop may drop the run whole in C): each still counted under its own name."""
    loop, opened = paths
    garbage, short_initiation = struct.pack("<I", 9) + bytes(60), struct.pack("<I", 1) + bytes(60)
    burst = [garbage, short_initiation] * 16

    async def main() -> dict[str, Counter[str]]:
        counted = {}
        for name, path in opened.items():
            before = path.drops()
            for data in burst:
                path.send(data)
            await wait_until(lambda: sum((path.drops() - before).values()) >= len(burst), timeout=5)  # noqa: B023
            await asyncio.sleep(0.01)
            counted[name] = path.drops() - before
            await path.traffic(b"after the burst")
        return counted

    counted = loop.run(main())
    for name, delta in counted.items():
        assert delta == Counter({"unknown_protocol": 16, "bad_size": 16}), (name, delta)


def test_the_model_is_the_demux_then_the_engine() -> None:
    """The reference itself, on the cases the issue named (so the table cannot drift)."""
    assert reference(b"\x04\x00\x00") is DropReason.UNKNOWN_PROTOCOL  # was too_short in places
    assert reference(b"\x17\x03\x03\x00\x10" + bytes(16)) is DropReason.UNKNOWN_PROTOCOL  # was bad_type
    assert reference(b"") is DropReason.UNKNOWN_PROTOCOL
    assert reference(struct.pack("<I", 4) + bytes(27)) is DropReason.BAD_SIZE
    assert reference(struct.pack("<I", 1) + bytes(143)) is DropReason.BAD_SIZE
    assert reference(struct.pack("<I", 2) + bytes(88)) is DropReason.BAD_MAC1
    assert reference(struct.pack("<I", 3) + bytes(60)) is DropReason.UNKNOWN_INDEX



@pytest.mark.parametrize("path", list(PATHS))
def test_a_full_tun_loses_packets_counted_and_the_interface_stays(path: str) -> None:
    """The application behind A's TUN stops reading: what does not fit in the queue is lost
    and counted as tun_full (by Python's writes and by the hop's, alike), every packet sent
    is either delivered or counted, and A goes on once its TUN is read again."""
    options, in_memory = PATHS[path]
    if options.hop and not hop_module.AVAILABLE:
        assert not NEEDS_HOP, "the C hop is missing (the native extension did not build)"
        pytest.skip("no C hop (the native extension is not built here)")
    sent = 64

    async def main() -> None:
        pair = await device_pair(options, in_memory=in_memory)
        try:
            a, b = pair.a, pair.b
            await PairPath(pair).traffic(b"before")

            def by_hop() -> int:
                return a.device.stats()["datapath"].get("hop_receives", 0)  # type: ignore[union-attr, no-any-return]

            for _ in range(50):  # with the hop: until it carries A's receive side itself
                if not options.hop or by_hop() > 0:
                    break
                await PairPath(pair).traffic(b"warming up")
            hop_before = by_hop()
            a.tun.limit_queue(4096)  # a few packets

            def lost() -> int:
                return a.device.stats()["device_drops"].get("tun_full", 0)  # type: ignore[union-attr, no-any-return]

            def carried() -> int:
                peers = a.device.stats()["peers"]
                return peers[0]["rx_bytes"]  # type: ignore[index, no-any-return]

            for i in range(sent):  # one by one: lone packets (the hop's own, with the hop)
                before = carried()
                b.tun.send(ipv4_packet(b.address4, a.address4, b"%d" % i))
                await wait_until(lambda: carried() > before)  # noqa: B023
            assert lost() > 0
            delivered = a.tun.pending()
            assert lost() + len(delivered) == sent, (lost(), len(delivered))
            assert a.device.stats()["engine_drops"] == {}
            if options.hop:  # the C hop wrote (and lost) them
                assert hop_before > 0 and by_hop() > hop_before
            await PairPath(pair).traffic(b"after")  # not closed as if the TUN were gone
        finally:
            pair.close()

    asyncio.run(main())
