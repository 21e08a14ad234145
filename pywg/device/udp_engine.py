"""The engine on a plain UDP socket, under asyncio: no TUN.

Decrypted packets go to ``on_packet`` (by default the ``delivered`` queue) and the
caller injects outbound IP packets with ``send_packet``. Used by the interop tests and
the demo, where pywg's side of the tunnel is played by the caller.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any, cast

from pywg.protocol.actions import DeliverPacket, Endpoint, HandshakeCompleted
from pywg.protocol.constants import TRANSPORT_MIN_SIZE
from pywg.protocol.demux import TRANSPORT_TYPE
from pywg.protocol.dispatcher import Dispatcher
from pywg.protocol.endpoint import RelayEndpoint

from .runner import Runner

log = logging.getLogger(__name__)

WireTap = Callable[[str, bytes, tuple[str, int]], None]


class UdpEngine(Runner, asyncio.DatagramProtocol):
    """Runs a Dispatcher on one UDP socket. Create with :meth:`start`."""

    def __init__(self, dispatcher: Dispatcher, *, clock_skew: float = 0.0) -> None:
        super().__init__(dispatcher, clock_skew=clock_skew)
        self.transport: asyncio.DatagramTransport | None = None
        self.delivered: asyncio.Queue[DeliverPacket] = asyncio.Queue()
        self.handshakes: asyncio.Queue[HandshakeCompleted] = asyncio.Queue()
        self.on_packet: Callable[[DeliverPacket], None] = self.delivered.put_nowait
        self.wire_tap: WireTap | None = None  # ("in" | "out", datagram, remote endpoint)

    @classmethod
    async def start(cls, private_key: bytes, sock: socket.socket, *, clock_skew: float = 0.0,
                    **dispatcher_args: Any) -> UdpEngine:
        loop = asyncio.get_running_loop()
        dispatcher = Dispatcher(private_key, wall_offset=time.time() - loop.time(), **dispatcher_args)
        engine = cls(dispatcher, clock_skew=clock_skew)
        await loop.create_datagram_endpoint(lambda: engine, sock=sock)
        return engine

    # --- asyncio protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        source = (addr[0], addr[1])
        if self.wire_tap:
            self.wire_tap("in", data, source)
        if data[:4] != TRANSPORT_TYPE or len(data) < TRANSPORT_MIN_SIZE:  # as every receive path
            with self.lock:
                if self.demux_other(data, source):
                    return  # STUN, disco or unknown: not the engine's
        self.carry(self.dispatcher.datagram_received(data, source, self.now()))

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_timer()

    # --- Runner -----------------------------------------------------------------------

    def send_datagram(self, data: bytes, endpoint: Endpoint) -> None:
        if isinstance(endpoint, RelayEndpoint):
            return  # this engine has UDP only (a relayed peer is the Device's)
        if self.wire_tap:
            self.wire_tap("out", data, endpoint)
        if self.transport is not None:
            self.transport.sendto(data, endpoint)

    def deliver(self, delivered: DeliverPacket) -> None:
        self.on_packet(delivered)

    def handshake_completed(self, event: HandshakeCompleted) -> None:
        self.handshakes.put_nowait(event)

    # --- caller API -------------------------------------------------------------------

    def send_packet(self, peer_public_key: bytes, packet: bytes) -> None:
        self.carry(self.dispatcher.send_packet(peer_public_key, packet, self.now()))

    def initiate_handshake(self, peer_public_key: bytes) -> None:
        self.carry(self.dispatcher.initiate_handshake(peer_public_key, self.now()))

    def close(self) -> None:
        self.cancel_timer()
        if self.transport is not None:
            self.transport.close()

    @property
    def local_address(self) -> tuple[str, int]:
        assert self.transport is not None
        name = self.transport.get_extra_info("sockname")
        return name[0], name[1]
