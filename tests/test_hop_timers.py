"""The protocol's timers on the threaded data path with the C hop: the hop sends and
receives in C and each thread accounts for what it carried afterwards, when it gets the
GIL and the device lock. The engine's timers must follow the order in which the packets
went, not the order in which the threads got round to accounting for them.

The ping that went missing (seen on the NAT lab): A sends an echo request (A's outbound
thread, in C), the reply is back 0.3 ms later (A's inbound thread, in C) and is accounted
first; the request's send, accounted last, cleared the passive keepalive the reply had
armed, and armed a "no answer" handshake instead. The tests force each bad order (A's
outbound thread held back until the reply is accounted for, and so on), so that it
happens every time."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import test_device_memory as device_memory

from pywg.device import hop as hop_module
from pywg.device.datapath import POLL_MS, ThreadedDataPath
from pywg.protocol.constants import KEEPALIVE_TIMEOUT, REKEY_TIMEOUT, REKEY_TIMEOUT_JITTER_MAX
from pywg.testing.memory import FakeClock, Pair, Side, ipv4_packet, wait_until

if not hop_module.AVAILABLE:
    if os.environ.get("CI"):
        raise RuntimeError("pywg._fastpath with the hop is not built: the C path must be tested under CI")
    pytest.skip("pywg._fastpath (the hop) is not built", allow_module_level=True)


def run(body: Callable[[Pair], Awaitable[None]]) -> None:
    device_memory.run(body, "threads-hop")


def peer_of(side: Side) -> dict[str, Any]:
    return device_memory.peer_stats(side)


def hop_figures(side: Side) -> tuple[int, int]:
    figures = side.device.stats()["datapath"]
    assert isinstance(figures, dict)
    return figures["hop_sends"], figures["hop_receives"]


def echo(packet: bytes) -> bytes:
    """The reply an application behind B sends: the addresses swapped."""
    return packet[:12] + packet[16:20] + packet[12:16] + packet[20:]


async def ping(pair: Pair, payload: bytes) -> None:
    a, b = pair.a, pair.b
    request = ipv4_packet(a.address4, b.address4, payload)
    a.tun.send(request)
    assert await b.tun.receive() == request
    b.tun.send(echo(request))
    assert await a.tun.receive() == echo(request)


async def warm_up(pair: Pair) -> None:
    """The handshake, then both hops armed both ways, everything accounted for."""
    a, b = pair.a, pair.b
    for n in range(3):
        await ping(pair, b"warm-up %d" % n)
    await wait_until(lambda: peer_of(a)["tx_packets"] == peer_of(b)["rx_packets"]
                     and peer_of(b)["tx_packets"] == peer_of(a)["rx_packets"])
    await asyncio.sleep(0.05)


def hold_sends_until(datapath: ThreadedDataPath, condition: Callable[[], bool]) -> Callable[[], None]:
    """The outbound thread accounts for what the hop sent only once ``condition`` holds
    (or 2 s passed): as when it waits for the GIL while the inbound thread, woken by the
    answer, accounts first. Returns the undo."""
    original = datapath._account_hop

    def late(received: Any = None, sent: Any = None) -> None:
        if received is None and threading.current_thread().name.startswith("pywg-out"):
            deadline = time.monotonic() + 2
            while not condition() and time.monotonic() < deadline:
                time.sleep(0.001)
        original(received=received, sent=sent)

    datapath._account_hop = late  # type: ignore[method-assign]
    return lambda: setattr(datapath, "_account_hop", original)


def test_the_reply_accounted_before_the_request_still_gets_its_passive_keepalive() -> None:
    """A pings B through the hop and goes idle, and A's outbound thread accounts for the
    request after its inbound thread accounted for the reply: A still sends its passive
    keepalive KEEPALIVE_TIMEOUT after the reply, and with it B's "data sent, nothing
    received" timer stops: neither side starts a handshake."""

    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        await warm_up(pair)
        sends, receives = hop_figures(a)
        received = peer_of(a)["rx_packets"]
        assert a.device.datapath is not None
        undo = hold_sends_until(a.device.datapath, lambda: peer_of(a)["rx_packets"] > received)
        try:
            await ping(pair, b"the last ping")
            # both went through the hop (the request accounted last)
            await wait_until(lambda: hop_figures(a)[0] > sends and hop_figures(a)[1] > receives)
        finally:
            undo()
        initiated = (peer_of(a)["handshakes_initiated"], peer_of(b)["handshakes_initiated"])
        b_received = peer_of(b)["rx_packets"]

        await pair.clock.advance(KEEPALIVE_TIMEOUT + 0.5, step=0.5)
        await wait_until(lambda: peer_of(b)["rx_packets"] == b_received + 1)  # A's keepalive
        assert b.tun.pending() == []  # (it carries nothing)
        await pair.clock.advance(REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX + 1, step=0.5)
        await asyncio.sleep(0.05)
        assert (peer_of(a)["handshakes_initiated"], peer_of(b)["handshakes_initiated"]) == initiated

    run(body)


def test_what_the_hop_delivered_while_the_engine_changed_is_accounted_for() -> None:
    """The engine changes (a timer fires on the event loop, a configuration) while the hop
    delivers the reply, before the inbound thread accounts for it: the hop takes its
    sessions back then, and the reply must still count (A's counters, A's passive
    keepalive)."""

    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        await warm_up(pair)
        assert a.device.datapath is not None and a.device.datapath.hop is not None
        hop = a.device.datapath.hop
        original = hop.receive_wait

        def meanwhile(*args: Any) -> tuple[int, Any]:
            kind, r = original(*args)
            if r.nreceived:
                hop.disable()  # as Device.engine_changing from the event loop's thread
            return kind, r

        receives = hop_figures(a)[1]
        received = peer_of(a)["rx_packets"]
        hop.receive_wait = meanwhile  # type: ignore[method-assign]
        await asyncio.sleep(POLL_MS / 1000 + 0.05)  # the inbound thread's wait in progress ends
        try:
            await ping(pair, b"while the engine changes")
            await wait_until(lambda: hop_figures(a)[1] > receives)  # the hop carried the reply
        finally:
            hop.receive_wait = original  # type: ignore[method-assign]
        await wait_until(lambda: peer_of(a)["rx_packets"] == received + 1)
        b_received = peer_of(b)["rx_packets"]
        await pair.clock.advance(KEEPALIVE_TIMEOUT + 0.5, step=0.5)
        await wait_until(lambda: peer_of(b)["rx_packets"] == b_received + 1)  # A's keepalive

    run(body)


def test_a_forged_message_on_a_session_the_hop_carries_is_no_answer() -> None:
    """B sends data to A and hears nothing back but a forged message on the session (from
    A's address, a tag that fails): B starts a new handshake KEEPALIVE_TIMEOUT +
    REKEY_TIMEOUT after its data, as with no message at all. (Only B's clock moves: A's
    passive keepalive never goes.)"""

    async def body(pair: Pair) -> None:
        a, b = pair.a, pair.b
        await warm_up(pair)
        initiated = peer_of(b)["handshakes_initiated"]
        one_way = ipv4_packet(b.address4, a.address4, b"no answer to this")
        b.tun.send(one_way)
        assert await a.tun.receive() == one_way
        with a.device.lock:
            keypair = a.device.dispatcher.peers[b.public_key].keypairs.current
            assert keypair is not None
            index = keypair.remote_index  # B's index for the session
        forged = struct.pack("<IIQ", 4, index, 1 << 40) + bytes(32)
        assert a.device.bind is not None
        sock = next(s for s in a.device.bind.sockets if s.family == socket.AF_INET)
        sock.sendto(forged, b.endpoint)
        await wait_until(lambda: b.device.stats()["engine_drops"].get("decrypt_failed") == 1)  # type: ignore[union-attr]
        await FakeClock(b.device).advance(KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX + 0.5,
                                          step=0.5)
        await wait_until(lambda: peer_of(b)["handshakes_initiated"] == initiated + 1)

    run(body)
