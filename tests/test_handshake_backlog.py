"""Handshake messages wait in a backlog of the inbound thread (pywg.device.datapath, the C
hop's in native/hop.c): a flood of initiations never keeps transport packets from crossing,
a backlog an eighth full puts the device under load (cookies first), and a full one drops,
counted where `pywg stats` shows it. Threaded data path with the hop, real UDP on the
loopback, no root."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable

import pytest

from pywg.device import datapath
from pywg.device import hop as hop_module
from pywg.device.datapath import DataPathOptions
from pywg.protocol import constants as C
from pywg.protocol.actions import DropReason
from pywg.testing.memory import Pair, device_pair, ipv4_packet, wait_until

pytestmark = pytest.mark.skipif(not hop_module.AVAILABLE and os.environ.get("CI") != "true",
                                reason="needs pywg's C extension")
HOP = DataPathOptions(threads=True, tun_offload=False, hop=True)
BACKLOG = 1024  # PYWG_HOP_BACKLOG


def run(body: Callable[[Pair], Awaitable[None]]) -> None:
    async def main() -> None:
        pair = await device_pair(HOP, in_memory=False)
        try:
            await body(pair)
        finally:
            pair.close()

    asyncio.run(main())


def initiation_for(public_key: bytes, sender_index: int) -> bytes:
    """An initiation anyone who knows ``public_key`` can make: random contents, a valid mac1
    (it passes the screen), no mac2, and it decrypts to nothing."""
    body = struct.pack("<II", 1, sender_index) + os.urandom(108)
    mac1_key = hashlib.blake2s(C.LABEL_MAC1 + public_key).digest()
    return body + hashlib.blake2s(body, key=mac1_key, digest_size=16).digest() + bytes(16)


def send_initiations(target: tuple[str, int], public_key: bytes, count: int, burst: int = 100) -> None:
    """``count`` initiations from one socket, in bursts that fit the target's socket buffer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        for start in range(0, count, burst):
            for i in range(start, min(count, start + burst)):
                sock.sendto(initiation_for(public_key, i), target)
            time.sleep(0.002)


def handshakes_judged(pair: Pair) -> int:
    """B's engine drops for the flood's initiations: a cookie required (under load) or one
    that did not decrypt."""
    drops = pair.b.device.stats()["engine_drops"]
    return sum(drops.get(reason.value, 0) for reason in  # type: ignore[union-attr]
               (DropReason.COOKIE_REQUIRED, DropReason.HANDSHAKE_DECRYPT, DropReason.RATE_LIMITED))


async def session(pair: Pair) -> None:
    a, b = pair.a, pair.b
    packet = ipv4_packet(a.address4, b.address4, b"session")
    a.tun.send(packet)
    assert await b.tun.receive() == packet


def test_transport_crosses_while_initiations_wait_and_then_they_are_answered(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(pair: Pair) -> None:
        await session(pair)
        a, b = pair.a, pair.b
        flood = 300
        monkeypatch.setattr(datapath, "HANDSHAKE_BUDGET", 0)  # the inbound thread takes none for now
        await asyncio.to_thread(send_initiations, b.endpoint, b.public_key, flood)
        hop = b.device.datapath.hop  # type: ignore[union-attr]
        await wait_until(lambda: hop.backlog_count() == flood)
        for n in range(5):  # transport behind the waiting initiations crosses at once
            packet = ipv4_packet(a.address4, b.address4, bytes([n]) * 20)
            a.tun.send(packet)
            assert await b.tun.receive() == packet
        assert handshakes_judged(pair) == 0 and hop.backlog_count() == flood
        monkeypatch.setattr(datapath, "HANDSHAKE_BUDGET", 4)
        await wait_until(lambda: handshakes_judged(pair) == flood, timeout=10)
        drops = b.device.stats()["engine_drops"]
        # 300 waiting (more than an eighth of the backlog): under load, each answered with a
        # cookie reply rather than a Diffie-Hellman.
        assert drops.get("cookie_required", 0) == flood, drops  # type: ignore[union-attr]
        assert hop.backlog_count() == 0
    run(body)


def test_a_full_backlog_drops_what_does_not_fit_and_counts_it(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(pair: Pair) -> None:
        await session(pair)
        b = pair.b
        extra = 76
        monkeypatch.setattr(datapath, "HANDSHAKE_BUDGET", 0)
        await asyncio.to_thread(send_initiations, b.endpoint, b.public_key, BACKLOG + extra)
        hop = b.device.datapath.hop  # type: ignore[union-attr]
        await wait_until(lambda: hop.backlog_count() + hop.backlog_full() == BACKLOG + extra)
        assert hop.backlog_count() == BACKLOG
        assert b.device.stats()["device_drops"] == {"handshake_backlog_full": extra}
        monkeypatch.setattr(datapath, "HANDSHAKE_BUDGET", 16)
        await wait_until(lambda: handshakes_judged(pair) == BACKLOG, timeout=20)
        await session(pair)  # the tunnel is as it was
    run(body)
