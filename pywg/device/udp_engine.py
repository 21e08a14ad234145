"""The engine on a plain UDP socket, under asyncio: datagrams in, actions carried out.

No TUN here: decrypted packets go to ``on_packet`` (by default a queue), and the caller
injects outbound IP packets with ``send_packet``. The clock is the loop's, plus a
``clock_skew`` that tests move forward to reach REKEY_AFTER_TIME without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any, cast

from pywg.protocol.actions import Action, DeliverPacket, Drop, HandshakeCompleted, SendDatagram
from pywg.protocol.dispatcher import Dispatcher

log = logging.getLogger(__name__)

# Wake a hair after a deadline so the engine sees it as expired.
TIMER_SLACK = 0.001

WireTap = Callable[[str, bytes, tuple[str, int]], None]


class UdpEngine(asyncio.DatagramProtocol):
    """Runs a Dispatcher on one UDP socket. Create with :meth:`start`."""

    def __init__(self, dispatcher: Dispatcher, *, clock_skew: float = 0.0) -> None:
        self.dispatcher = dispatcher
        self.clock_skew = clock_skew
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.DatagramTransport | None = None
        self.delivered: asyncio.Queue[DeliverPacket] = asyncio.Queue()
        self.handshakes: asyncio.Queue[HandshakeCompleted] = asyncio.Queue()
        self.on_packet: Callable[[DeliverPacket], None] = self.delivered.put_nowait
        self.wire_tap: WireTap | None = None  # ("in" | "out", datagram, remote endpoint)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    @classmethod
    async def start(cls, private_key: bytes, sock: socket.socket, *, clock_skew: float = 0.0,
                    **dispatcher_args: Any) -> UdpEngine:
        loop = asyncio.get_running_loop()
        wall_offset = time.time() - loop.time()
        dispatcher = Dispatcher(private_key, wall_offset=wall_offset, **dispatcher_args)
        engine = cls(dispatcher, clock_skew=clock_skew)
        await loop.create_datagram_endpoint(lambda: engine, sock=sock)
        return engine

    # --- clock ------------------------------------------------------------------

    def now(self) -> float:
        return self.loop.time() + self.clock_skew

    def advance_clock(self, seconds: float) -> None:
        """Jump this engine's clock forward (its wall clock for timestamps moves too)."""
        self.clock_skew += seconds
        self._cancel_timer()
        self._carry(self.dispatcher.tick(self.now()))

    # --- asyncio protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        source = (addr[0], addr[1])
        if self.wire_tap:
            self.wire_tap("in", data, source)
        self._carry(self.dispatcher.datagram_received(data, source, self.now()))

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()

    # --- caller API ---------------------------------------------------------------

    def send_packet(self, peer_public_key: bytes, packet: bytes) -> None:
        self._carry(self.dispatcher.send_packet(peer_public_key, packet, self.now()))

    def initiate_handshake(self, peer_public_key: bytes) -> None:
        self._carry(self.dispatcher.initiate_handshake(peer_public_key, self.now()))

    def close(self) -> None:
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    @property
    def local_address(self) -> tuple[str, int]:
        assert self.transport is not None
        name = self.transport.get_extra_info("sockname")
        return name[0], name[1]

    # --- carrying out actions -------------------------------------------------------

    def _carry(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendDatagram):
                if self.wire_tap:
                    self.wire_tap("out", action.data, action.endpoint)
                if self.transport is not None:
                    self.transport.sendto(action.data, action.endpoint)
            elif isinstance(action, DeliverPacket):
                self.on_packet(action)
            elif isinstance(action, HandshakeCompleted):
                self.handshakes.put_nowait(action)
            elif isinstance(action, Drop):
                log.debug("drop: %s", action.reason.value)
        self._schedule()

    def _schedule(self) -> None:
        deadline = self.dispatcher.next_deadline()
        if deadline == self._timer_at:
            return
        self._cancel_timer()
        if deadline is not None:
            self._timer_at = deadline
            self._timer = self.loop.call_at(deadline - self.clock_skew + TIMER_SLACK, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = None

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._carry(self.dispatcher.tick(self.now()))
