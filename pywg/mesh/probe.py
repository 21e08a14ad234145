"""ICMP echo to every peer's mesh addresses, each health interval, on the asyncio loop:
a live peer's host answers at once, which says that its tunnel works and how long the
round trip takes (:mod:`pywg.mesh.echoes` keeps the books, :mod:`pywg.mesh.icmp` the
format).

The sockets are raw (``SOCK_RAW``; the agent runs as root to manage its interface), not
the unprivileged ``SOCK_DGRAM`` ping sockets: those need ``net.ipv4.ping_group_range``
to admit the agent's group, and its default in every new network namespace is "1 0"
(nobody). A raw ICMP socket sees every ICMP message the host receives, so the kernel
filters them (``ICMP_FILTER``, ``ICMP6_FILTER``) to echo replies, and
:class:`~pywg.mesh.echoes.Echoes` drops those that are not this agent's. Both sockets
are non-blocking, read by the loop's reader callbacks, and open at the first
:meth:`Prober.send`; one that cannot be opened (no IPv6 on the host) is logged once and
that family is not probed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import struct
import time
from collections.abc import Callable, Iterable

from pywg.mesh import icmp
from pywg.mesh.echoes import Echoes

log = logging.getLogger(__name__)

SOL_RAW = 255  # Linux <linux/icmp.h>: ICMP_FILTER is a SOL_RAW option, a mask of types to drop
ICMP_FILTER = 1
ICMP6_FILTER = 1  # <netinet/icmp6.h>: 256 bits, one per type; a set bit blocks it
READS_PER_WAKEUP = 64  # a flood of replies cannot hold the loop longer than this


def _open(v6: bool) -> socket.socket:
    family, proto = (socket.AF_INET6, socket.IPPROTO_ICMPV6) if v6 else (socket.AF_INET, socket.IPPROTO_ICMP)
    sock = socket.socket(family, socket.SOCK_RAW, proto)
    try:
        sock.setblocking(False)
        if v6:
            words = [0xFFFFFFFF] * 8
            words[icmp.ECHO_REPLY_V6 >> 5] &= ~(1 << (icmp.ECHO_REPLY_V6 & 31))
            sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("=8I", *words))
        else:
            sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("=I", 0xFFFFFFFF & ~(1 << icmp.ECHO_REPLY_V4)))
    except OSError:
        sock.close()
        raise
    return sock


class Prober:
    """Echoes to peers, their replies read on the running loop; ``stale_after``: see
    :class:`~pywg.mesh.echoes.Echoes`."""

    def __init__(self, stale_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.echoes = Echoes(identifier=secrets.randbits(16), cookie=secrets.token_bytes(8), stale_after=stale_after)
        self._socks: dict[bool, socket.socket] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for v6 in (False, True):
            try:
                sock = _open(v6)
            except OSError as exc:
                log.warning("no ICMP%s echo probes: %s", "v6" if v6 else "", exc)
                continue
            self._socks[v6] = sock
            self._loop.add_reader(sock.fileno(), self._readable, sock, v6)

    def send(self, targets: Iterable[tuple[str, Iterable[str | None]]]) -> int:
        """One echo to each address of each ``(public key, addresses)``; how many were
        handed to the kernel. Never blocks, never raises for a network error (no route
        yet, a full buffer: the next round)."""
        if self._loop is None:
            self._start()
        sent = 0
        for key, addresses in targets:
            for address in addresses:
                if not address:
                    continue
                v6 = ":" in address
                sock = self._socks.get(v6)
                if sock is None:
                    continue
                with contextlib.suppress(OSError, ValueError):  # ValueError: not an address
                    sock.sendto(self.echoes.request(key, address, self.clock()), (address, 0))
                    sent += 1
        return sent

    def _readable(self, sock: socket.socket, v6: bool) -> None:
        for _ in range(READS_PER_WAKEUP):
            try:
                datagram, source = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("ICMP receive: %s", exc)
                return
            self.echoes.received(datagram, source[0], self.clock(), v6=v6)

    def close(self) -> None:
        for sock in self._socks.values():
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._socks.clear()
        self._loop = None
