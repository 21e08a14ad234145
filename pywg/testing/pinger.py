"""Ping through an engine that has no TUN: answer echo requests for our tunnel address,
send our own and time the replies."""

from __future__ import annotations

import asyncio
import os

from pywg.device.udp_engine import UdpEngine
from pywg.protocol.actions import DeliverPacket

from .icmp import ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, Echo, build_echo, parse_echo, reply_to


class Pinger:
    """Owns ``engine.on_packet``: echo requests to ``address`` are answered, echo replies
    resolve pending pings, anything else goes to ``engine.delivered``."""

    def __init__(self, engine: UdpEngine, address: str) -> None:
        self.engine = engine
        self.address = address
        self.identifier = os.getpid() & 0xFFFF
        self.answered = 0  # echo requests we replied to
        self._sequence = 0
        self._pending: dict[int, asyncio.Future[float]] = {}
        engine.on_packet = self._on_packet

    def _on_packet(self, delivered: DeliverPacket) -> None:
        echo = parse_echo(delivered.packet)
        if echo is not None and echo.destination == self.address:
            if echo.kind == ICMP_ECHO_REQUEST:
                self.answered += 1
                self.engine.send_packet(delivered.peer, build_echo(reply_to(echo)))
                return
            if echo.kind == ICMP_ECHO_REPLY and echo.identifier == self.identifier:
                waiter = self._pending.pop(echo.sequence, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(self.engine.loop.time())
                return
        self.engine.delivered.put_nowait(delivered)

    async def ping(self, peer: bytes, destination: str, *, timeout: float = 10.0,
                   payload: bytes = b"pywg" * 14) -> float:
        """One echo request to ``destination`` via ``peer``; the round trip in seconds."""
        self._sequence = (self._sequence + 1) & 0xFFFF
        sequence = self._sequence
        waiter: asyncio.Future[float] = self.engine.loop.create_future()
        self._pending[sequence] = waiter
        sent = self.engine.loop.time()
        self.engine.send_packet(peer, build_echo(
            Echo(ICMP_ECHO_REQUEST, self.address, destination, self.identifier, sequence, payload)))
        try:
            received = await asyncio.wait_for(waiter, timeout)
        finally:
            self._pending.pop(sequence, None)
        return received - sent
