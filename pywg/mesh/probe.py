"""Probes that make every live peer answer, so that its silence means something.

Persistent keepalive alone does not: WireGuard restarts that timer on every packet sent
*or received*, so of two peers with the same keepalive one may never send at all (its
timer is always reset by the other's keepalives) and its partner hears nothing from a
live peer. A data packet does: a WireGuard peer that receives one answers within
KEEPALIVE_TIMEOUT (10 s) with a keepalive if it sent nothing meanwhile (the passive
keepalive), and its host usually answers at once with an ICMP port unreachable. So the
agent sends one small UDP datagram, each health interval, to each peer's mesh address
on the discard port; the bytes it then receives from the peer are the peer's answer.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable

DISCARD_PORT = 9
PAYLOAD = b"pywg-health-probe"


class Prober:
    """One non-blocking UDP socket, opened at the first :meth:`send` (which never blocks
    and never raises)."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None

    def send(self, addresses: Iterable[str]) -> int:
        """One datagram to each IPv4 address; how many were handed to the kernel."""
        if self._sock is None:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        sent = 0
        for address in addresses:
            with contextlib.suppress(OSError):  # no route yet, a full buffer: next round
                self._sock.sendto(PAYLOAD, (address, DISCARD_PORT))
                sent += 1
        return sent

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
