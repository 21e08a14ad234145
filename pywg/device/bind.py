"""Binds: where a device's datagrams leave and arrive, one kind of endpoint each.

``Bind`` is the interface (wireguard-go's conn.Bind is the model): send a run of datagrams
to an endpoint, close, a port and a fwmark, and the native sockets the data-path threads
and the C hop may poll and send on themselves. Two implementations:

- ``UdpBind``: IPv4 and IPv6 UDP sockets on one port (optional fwmark, SO_MARK), UDP GSO
  for runs when the kernel takes it; received datagrams are pulled with ``receive`` by
  whoever watches its sockets (the event loop or the inbound thread).
- ``RelayBind``: a DERP relay (``RelayPath``) for ``RelayEndpoint``s; what the relay
  receives it pushes to the device's ``relay_received``.

Every send of a Device goes through ``Device.send_run``, which picks the bind for the
endpoint's kind. A bind counts its drops through ``on_drop`` (the device's counter, by
DropReason), never raises for a failed send, and sends nothing once closed.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import NamedTuple, Protocol

from pywg.protocol.actions import DropReason, Endpoint, UdpAddress
from pywg.protocol.endpoint import RelayEndpoint

from . import offload

log = logging.getLogger(__name__)

SOCKET_BUFFER = 4 << 20
PORT_ZERO_RETRIES = 64
MAX_UDP_PAYLOAD = 65507  # the most one UDP send may carry (IPv4), a GSO batch included
UDP_READ = 65535 + 1024  # one read: a GRO batch of up to 64 KiB, or any datagram
_CMSG_SPACE = socket.CMSG_SPACE(2)
_QUIET_RECEIVE_ERRORS = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)  # ICMP errors, reported later
_GSO_REFUSALS = (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.EMSGSIZE)

DropCounter = Callable[[DropReason, int], None]
Buffer = bytes | bytearray | memoryview


class BindError(OSError):
    pass


class Received(NamedTuple):
    """A datagram read from a bind: its bytes, the size of each message in it (GRO
    coalesces a run of equal-sized datagrams: ``segment`` < len(data)), and its source."""

    data: bytes
    segment: int
    source: UdpAddress


def _uncounted(reason: DropReason, n: int) -> None:
    log.debug("bind drop (nobody counts): %s x%d", reason.value, n)


def messages(data: Buffer, stride: int) -> int:
    """How many messages ``data`` holds, each ``stride`` bytes but the last (0: one)."""
    return -(-len(data) // stride) if stride else 1


class Bind(abc.ABC):
    """One way out and in for datagrams (see the module's docstring)."""

    on_drop: DropCounter = staticmethod(_uncounted)  # type: ignore[assignment]

    @abc.abstractmethod
    def accepts(self, endpoint: Endpoint) -> bool:
        """True when this bind reaches endpoints of ``endpoint``'s kind."""

    @abc.abstractmethod
    def send(self, data: Buffer, endpoint: Endpoint, stride: int = 0) -> int:
        """Send ``data`` to ``endpoint``: one datagram, or (``stride`` > 0) messages of
        ``stride`` bytes back to back, the last possibly shorter, each its own datagram.
        From any thread, without blocking; what cannot go is counted (``on_drop``).
        Returns the number of system sends made (the batching figure)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the bind holds; sends afterwards are counted drops."""

    @property
    def port(self) -> int:
        """The UDP port datagrams leave from (0: not UDP)."""
        return 0

    def set_fwmark(self, fwmark: int) -> None:
        """Mark what leaves (SO_MARK); nothing for a bind without sockets."""

    @property
    def sockets(self) -> list[socket.socket]:
        """The native sockets (non-blocking) for poll() and the C hop; [] when none."""
        return []


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


def unmapped(endpoint: UdpAddress) -> UdpAddress:
    """An IPv4-mapped IPv6 endpoint as the IPv4 one (it goes over the IPv4 socket: the
    IPv6 socket is IPv6-only)."""
    if not endpoint[0].startswith("::ffff:"):
        return endpoint
    try:
        mapped = ipaddress.IPv6Address(endpoint[0].split("%", 1)[0]).ipv4_mapped
    except ValueError:
        return endpoint
    return endpoint if mapped is None else (str(mapped), endpoint[1])


class UdpBind(Bind):
    """Both sockets bound to the same port; IPv6 is optional (hosts without it).

    ``gso``: runs go out as UDP GSO batches (one sendmsg with UDP_SEGMENT); set by the
    data path when the kernel supports it, cleared here the first time a send is refused
    for it. ``gro``: reads take UDP GRO batches (``enable_gro``)."""

    def __init__(self, v4: socket.socket | None, v6: socket.socket | None) -> None:
        self.v4, self.v6 = v4, v6
        self.gso = False
        self.gro = False
        self._port = (v4 or v6).getsockname()[1] if (v4 or v6) is not None else 0  # type: ignore[union-attr]

    def __repr__(self) -> str:
        return f"UdpBind(port={self._port}, ipv6={self.v6 is not None}, gso={self.gso})"

    @classmethod
    def open(cls, port: int, fwmark: int = 0) -> UdpBind:
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

    # --- Bind ----------------------------------------------------------------------------

    def accepts(self, endpoint: Endpoint) -> bool:
        return not isinstance(endpoint, RelayEndpoint)

    @property
    def port(self) -> int:
        return self._port

    @property
    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.v4, self.v6) if s is not None]

    def set_fwmark(self, fwmark: int) -> None:
        for sock in self.sockets:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, fwmark)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.v4 = self.v6 = None

    def route(self, endpoint: UdpAddress) -> tuple[socket.socket | None, UdpAddress]:
        """The socket that reaches ``endpoint`` and the address to give it (None: no
        socket of its family, or closed); the hop sends on it by descriptor."""
        endpoint = unmapped(endpoint)
        return (self.v6 if ":" in endpoint[0] else self.v4), endpoint

    def send(self, data: Buffer, endpoint: Endpoint, stride: int = 0) -> int:
        if isinstance(endpoint, RelayEndpoint):
            self.on_drop(DropReason.NO_SOCKET_FOR_ENDPOINT, messages(data, stride))
            return 0
        sock, address = self.route(endpoint)
        if sock is None:
            self.on_drop(DropReason.NO_SOCKET_FOR_ENDPOINT, messages(data, stride))
            return 0
        if not stride or len(data) <= stride:
            self._send_one(sock, data, address)
            return 1
        if not self.gso:
            for start in range(0, len(data), stride):
                self._send_one(sock, data[start:start + stride], address)
            return messages(data, stride)
        per_send = min(offload.UDP_MAX_SEGMENTS, MAX_UDP_PAYLOAD // stride) * stride
        sends = 0
        for start in range(0, len(data), per_send):
            sends += self._send_batch(sock, data[start:start + per_send], stride, address)
        return sends

    def _send_one(self, sock: socket.socket, data: Buffer, address: UdpAddress) -> None:
        try:
            sock.sendto(data, address)
        except BlockingIOError:
            self.on_drop(DropReason.UDP_SEND_FULL, 1)
        except OSError as exc:
            self.on_drop(DropReason.UDP_SEND_ERROR, 1)
            log.debug("send to %s failed: %s", address, exc)

    def _send_batch(self, sock: socket.socket, chunk: Buffer, stride: int, address: UdpAddress) -> int:
        """One GSO send of ``chunk`` (segments of ``stride``); refused for GSO: GSO off, and
        the chunk datagram by datagram."""
        if len(chunk) <= stride:
            self._send_one(sock, chunk, address)
            return 1
        try:
            sock.sendmsg([chunk], offload.gso_cmsg(stride), 0, address)
        except BlockingIOError:
            self.on_drop(DropReason.UDP_SEND_FULL, 1)
        except OSError as exc:
            if exc.errno not in _GSO_REFUSALS:
                self.on_drop(DropReason.UDP_SEND_ERROR, 1)
                log.debug("send to %s failed: %s", address, exc)
                return 1
            log.info("UDP GSO refused (%s): sending datagrams one by one", exc.strerror)
            self.gso = False
            for start in range(0, len(chunk), stride):
                self._send_one(sock, chunk[start:start + stride], address)
            return 1 + messages(chunk, stride)
        return 1

    # --- receiving --------------------------------------------------------------------------

    def gso_supported(self) -> bool:
        """The kernel takes UDP_SEGMENT on every socket of the bind."""
        return bool(self.sockets) and all(offload.udp_gso_supported(s) for s in self.sockets)

    def enable_gro(self) -> None:
        """Ask for UDP GRO batches on every socket (``receive`` then reports segments)."""
        self.gro = True
        for sock in self.sockets:
            offload.enable_udp_gro(sock)

    def receive(self, sock: socket.socket, limit: int) -> list[Received]:
        """Up to ``limit`` datagrams waiting on ``sock`` (one of ``sockets``), without
        blocking; receive errors (ICMP reports) are skipped."""
        received: list[Received] = []
        gro = self.gro
        for _ in range(limit):
            try:
                if gro:
                    data, ancdata, _, addr = sock.recvmsg(UDP_READ, _CMSG_SPACE)
                    segment = offload.gro_segment_size(ancdata) or len(data)
                else:
                    data, addr = sock.recvfrom(UDP_READ)
                    segment = len(data)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno not in _QUIET_RECEIVE_ERRORS:
                    log.debug("udp receive failed: %s", exc)
                continue
            received.append(Received(data, segment, (addr[0], addr[1])))
        return received


class RelayPath(Protocol):
    """Where datagrams to a RelayEndpoint go (the mesh gives the device one, ``set_relay``)."""

    def send(self, region: int, node_key: bytes, data: bytes) -> bool:
        """Queue ``data`` for the node ``node_key`` in DERP region ``region``, from any thread,
        without blocking; False when dropped (the relay counts why)."""
        ...


class RelayBind(Bind):
    """A DERP relay as a bind: one relay packet per message, to ``RelayEndpoint``s only."""

    def __init__(self, relay: RelayPath) -> None:
        self.relay: RelayPath | None = relay

    def __repr__(self) -> str:
        return f"RelayBind({self.relay!r})"

    def accepts(self, endpoint: Endpoint) -> bool:
        return isinstance(endpoint, RelayEndpoint)

    def send(self, data: Buffer, endpoint: Endpoint, stride: int = 0) -> int:
        relay = self.relay
        if not isinstance(endpoint, RelayEndpoint) or relay is None:
            self.on_drop(DropReason.RELAY_MISSING, messages(data, stride))
            return 0
        step = stride or len(data) or 1
        sends = 0
        for start in range(0, max(len(data), 1), step):
            sends += 1
            if not relay.send(endpoint.region, endpoint.node_key, bytes(data[start:start + step])):
                self.on_drop(DropReason.RELAY_SEND_DROPPED, 1)
        return sends

    def close(self) -> None:
        self.relay = None
