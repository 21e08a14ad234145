"""The UDP sockets of a device: IPv4 and IPv6 on one port, optional fwmark (SO_MARK)."""

from __future__ import annotations

import contextlib
import errno
import socket

SOCKET_BUFFER = 4 << 20
PORT_ZERO_RETRIES = 64


class BindError(OSError):
    pass


def _open(family: int, port: int, fwmark: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        if fwmark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, fwmark)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Bind:
    """Both sockets bound to the same port; IPv6 is optional (hosts without it)."""

    def __init__(self, v4: socket.socket | None, v6: socket.socket | None) -> None:
        self.v4, self.v6 = v4, v6

    @classmethod
    def open(cls, port: int, fwmark: int = 0) -> Bind:
        """Bind ``port`` (0: one chosen by the kernel, free on both families)."""
        for _ in range(PORT_ZERO_RETRIES if port == 0 else 1):
            v4 = _open(socket.AF_INET, port, fwmark)
            chosen = v4.getsockname()[1]
            try:
                v6 = _open(socket.AF_INET6, chosen, fwmark)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    v4.close()
                    if port == 0:
                        continue
                    raise BindError(errno.EADDRINUSE, f"UDP port {chosen} is in use (IPv6)") from exc
                if exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
                    v6 = None  # no IPv6 on this host
                else:
                    v4.close()
                    raise
            return cls(v4, v6)
        raise BindError(errno.EADDRINUSE, "no UDP port free on both IPv4 and IPv6")

    @property
    def port(self) -> int:
        sock = self.v4 or self.v6
        return sock.getsockname()[1] if sock is not None else 0

    @property
    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.v4, self.v6) if s is not None]

    def socket_for(self, host: str) -> socket.socket | None:
        return self.v6 if ":" in host else self.v4

    def set_fwmark(self, fwmark: int) -> None:
        for sock in self.sockets:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, fwmark)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.v4 = self.v6 = None
