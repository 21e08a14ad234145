"""A device without root: an in-memory TUN, in-memory UDP sockets, a jump clock, and two
Devices wired back to back.

``MemoryTun`` is a Tun whose "kernel" side is one end of an AF_UNIX datagram socketpair:
the device reads and writes a real file descriptor (the event loop watches it, the data
path threads and the C hop read and write it), the test sends and receives the packets
applications would. ``MemoryNetwork`` carries datagrams between ``MemorySocket``s, each a
real (AF_UNIX) socket with an IP address and port of its own, so the event-loop data path
sees datagrams arrive from UDP addresses; every datagram carried is on ``wire``, and a
test may send any bytes from any address (replays, garbage, a peer that roamed).
``Host.open_bind`` stands in for ``UdpBind.open`` (the device's ``open_bind``).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pywg.device.bind import BindError, UdpBind
from pywg.device.datapath import DataPathOptions
from pywg.device.device import Device
from pywg.device.runner import Runner
from pywg.device.tun import DEFAULT_MTU, READ_SIZE, VNET_HDR_LEN, Tun
from pywg.protocol.crypto import dh_generate, dh_pubkey
from pywg.uapi.protocol import parse_set

Address = tuple[str, int]
FIRST_EPHEMERAL_PORT = 49152
_PORT = struct.Struct("!H")


def _normal(address: Address) -> Address:
    host = ipaddress.ip_address(address[0].split("%", 1)[0])
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
        host = host.ipv4_mapped
    return host.compressed, int(address[1])


# --- the TUN ------------------------------------------------------------------------------


class MemoryTun(Tun):
    """A layer-3 TUN in memory. ``send`` is an application sending a packet into the
    interface; ``receive`` takes one the device wrote. ``vnet_hdr``: every frame carries a
    virtio-net header (as a TUN with offloads): ``send`` adds a plain one, ``receive``
    strips it (``receive_frame`` keeps it)."""

    def __init__(self, name: str = "mem0", mtu: int = DEFAULT_MTU, *, vnet_hdr: bool = False) -> None:
        self.name = name
        self.vnet_hdr = vnet_hdr
        self._plain_header = bytes(VNET_HDR_LEN) if vnet_hdr else b""
        self._mtu = mtu
        self._device_end, self._kernel_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._device_end.setblocking(False)
        self._kernel_end.setblocking(False)
        self.deleted = False
        # errnos the next writes fail with, one each (EIO: as a TUN whose interface is down)
        self.failing_writes: list[int] = []

    def __repr__(self) -> str:
        return f"MemoryTun({self.name!r}, mtu={self._mtu})"

    def fileno(self) -> int:
        return self._device_end.fileno()

    @property
    def mtu(self) -> int:
        return 0 if self.deleted else self._mtu

    @mtu.setter
    def mtu(self, value: int) -> None:  # as `ip link set mtu`
        self._mtu = value

    def read(self) -> bytes | None:
        if self.deleted:
            raise OSError(errno.ENODEV, "No such device")
        return super().read()

    def write_frame(self, frame: bytes) -> bool:
        if self.deleted:
            raise OSError(errno.ENODEV, "No such device")
        if self.failing_writes:
            err = self.failing_writes.pop(0)
            raise OSError(err, os.strerror(err))
        return super().write_frame(frame)

    def close(self) -> None:
        self._device_end.close()
        self._kernel_end.close()

    # --- the kernel's side ---

    def send(self, packet: bytes) -> None:
        """An application sends ``packet`` into the interface (the device reads it)."""
        self.send_frame(self._plain_header + packet)

    def send_frame(self, frame: bytes) -> None:
        """Exactly these bytes (a virtio-net header first when ``vnet_hdr``)."""
        self._kernel_end.send(frame)

    async def receive(self, timeout: float = 2.0) -> bytes:
        """The next packet the device wrote (TimeoutError if none comes)."""
        return (await self.receive_frame(timeout))[len(self._plain_header):]

    async def receive_frame(self, timeout: float = 2.0) -> bytes:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.sock_recv(self._kernel_end, READ_SIZE), timeout)

    def limit_queue(self, size: int) -> None:
        """Hold at most about ``size`` bytes of packets the device wrote and nobody read yet
        (as a TUN's queue): a write beyond that is refused, EAGAIN, as from a full TUN."""
        self._device_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    def pending(self) -> list[bytes]:
        """Every packet written and not yet received."""
        packets = []
        while True:
            try:
                packets.append(self._kernel_end.recv(READ_SIZE)[len(self._plain_header):])
            except BlockingIOError:
                return packets

    def delete(self, *, wake: bool = True) -> None:
        """The interface is deleted (`ip link del`): reads and writes fail from now on
        (``wake``: a reader waiting on the descriptor sees it now, else at the next write)."""
        self.deleted = True
        if wake:
            self._kernel_end.send(b"\x00")


# --- UDP ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Datagram:
    source: Address
    destination: Address
    data: bytes


class MemorySocket(socket.socket):
    """A UDP socket of a MemoryNetwork: bound to ``address``, readable by its descriptor
    (an AF_UNIX socket: the loop and poll() watch it as they would a UDP socket)."""

    def __init__(self, network: MemoryNetwork, address: Address) -> None:
        inbox, self._feeder = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        super().__init__(socket.AF_UNIX, socket.SOCK_DGRAM, fileno=inbox.detach())
        self.setblocking(False)
        self._feeder.setblocking(False)
        self.network = network
        self.address = address
        self.fwmark = 0

    def __repr__(self) -> str:
        return f"MemorySocket({self.address[0]}:{self.address[1]})"

    def getsockname(self) -> Address:  # type: ignore[override]
        return self.address

    def setsockopt(self, level: int, option: int, value: Any, *rest: Any) -> None:  # type: ignore[override]
        if level == socket.SOL_SOCKET and option == socket.SO_MARK:
            self.fwmark = int(value)  # no CAP_NET_ADMIN needed in memory
        else:
            super().setsockopt(level, option, value, *rest)

    def sendto(self, data: Any, *args: Any) -> int:  # type: ignore[override]
        if _normal(args[-1])[0] in self.network.unreachable:
            raise OSError(errno.ENETUNREACH, "Network is unreachable")
        self.network.send(self.address, args[-1], bytes(data))
        return len(data)

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, Address]:  # type: ignore[override]
        frame = self.recv(READ_SIZE + 64)
        (length,) = _PORT.unpack_from(frame)
        host = frame[2:2 + length].decode()
        (port,) = _PORT.unpack_from(frame, 2 + length)
        return frame[4 + length:4 + length + bufsize], (host, port)

    def arrive(self, source: Address, data: bytes) -> bool:
        host = source[0].encode()
        try:
            self._feeder.send(_PORT.pack(len(host)) + host + _PORT.pack(source[1]) + data)
        except (BlockingIOError, OSError):
            return False  # the receive queue is full (or the socket closed): lost
        return True

    def close(self) -> None:
        self.network.unbind(self)
        self._feeder.close()
        super().close()


class MemoryNetwork:
    """UDP between MemorySockets: ``wire`` holds every datagram sent, ``lost`` counts those
    with nobody at the destination (or a full queue)."""

    def __init__(self) -> None:
        self._sockets: dict[Address, MemorySocket] = {}
        self.wire: list[Datagram] = []
        self.lost = 0
        self.tap: Callable[[Datagram], bool] | None = None  # False: the datagram is dropped
        self.unreachable: set[str] = set()  # hosts a send to fails (ENETUNREACH), as with no route

    def host(self, v4: str, v6: str | None = None) -> Host:
        return Host(self, v4, v6)

    def socket(self, address: Address) -> MemorySocket:
        """A socket bound to ``address`` (BindError if taken)."""
        address = _normal(address)
        if address in self._sockets:
            raise BindError(errno.EADDRINUSE, f"{address[0]}:{address[1]} is in use")
        sock = self._sockets[address] = MemorySocket(self, address)
        return sock

    def unbind(self, sock: MemorySocket) -> None:
        if self._sockets.get(sock.address) is sock:
            del self._sockets[sock.address]

    def in_use(self, address: Address) -> bool:
        return _normal(address) in self._sockets

    def send(self, source: Address, destination: Address, data: bytes) -> None:
        """Carry one datagram (any bytes, from any address: what an attacker could send)."""
        datagram = Datagram(_normal(source), _normal(destination), bytes(data))
        self.wire.append(datagram)
        if self.tap is not None and not self.tap(datagram):
            return
        target = self._sockets.get(datagram.destination)
        if target is None or not target.arrive(datagram.source, datagram.data):
            self.lost += 1

    def sent(self, source: Address, destination: Address, first_byte: int | None = None) -> list[Datagram]:
        """The datagrams that went from ``source`` to ``destination`` (of a message type)."""
        source, destination = _normal(source), _normal(destination)
        return [d for d in self.wire if d.source == source and d.destination == destination
                and (first_byte is None or d.data[:1] == bytes([first_byte]))]


@dataclass
class Host:
    """A machine on a MemoryNetwork with an IPv4 (and optionally an IPv6) address."""

    network: MemoryNetwork
    v4: str
    v6: str | None = None

    def open_bind(self, port: int, fwmark: int = 0) -> UdpBind:
        """What ``UdpBind.open`` does, in memory (0: a free port on both addresses)."""
        addresses = [a for a in (self.v4, self.v6) if a is not None]
        if port == 0:
            port = FIRST_EPHEMERAL_PORT
            while any(self.network.in_use((a, port)) for a in addresses):
                port += 1
        elif any(self.network.in_use((a, port)) for a in addresses):
            raise BindError(errno.EADDRINUSE, f"UDP port {port} is in use")
        v4 = self.network.socket((self.v4, port))
        v6 = self.network.socket((self.v6, port)) if self.v6 is not None else None
        bind = UdpBind(v4, v6)
        if fwmark:
            bind.set_fwmark(fwmark)
        return bind


# --- time ---------------------------------------------------------------------------------


class FakeClock:
    """The runners' clock jumps when the test says (Runner.advance_clock: the engine's
    timers fire as if that much time had passed); between steps the loop carries what the
    timers sent."""

    def __init__(self, *runners: Runner) -> None:
        self.runners = list(runners)
        self.elapsed = 0.0

    async def advance(self, seconds: float, step: float = 1.0) -> None:
        left = seconds
        while left > 1e-9:
            jump = min(step, left)
            for runner in self.runners:
                runner.advance_clock(jump)
            self.elapsed += jump
            left -= jump
            await settle()


async def settle(rounds: int = 20) -> None:
    """Let the loop run what is ready (datagrams in flight between memory sockets)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def wait_until(condition: Callable[[], object], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.002)


# --- packets ------------------------------------------------------------------------------


def ipv4_packet(source: str, destination: str, payload: bytes = b"hello", protocol: int = 253) -> bytes:
    """A minimal valid IPv4 packet (protocol 253: experimental) carrying ``payload``."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, protocol, 0,
                         socket.inet_aton(source), socket.inet_aton(destination))
    return header + payload


def ipv6_packet(source: str, destination: str, payload: bytes = b"hello", next_header: int = 253) -> bytes:
    header = struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, 64,
                         socket.inet_pton(socket.AF_INET6, source), socket.inet_pton(socket.AF_INET6, destination))
    return header + payload


# --- two devices back to back -------------------------------------------------------------


@dataclass
class Side:
    device: Device
    tun: MemoryTun
    private_key: bytes = field(repr=False)
    address4: str  # inside the tunnel
    address6: str
    outer: str  # the host's IPv4 address (the endpoint the other side sends to)

    @property
    def public_key(self) -> bytes:
        return dh_pubkey(self.private_key)

    @property
    def endpoint(self) -> Address:
        assert self.device.bind is not None
        return self.outer, self.device.bind.port

    def set(self, *lines: str) -> None:
        """A UAPI set request (the lines between set=1 and the blank line)."""
        self.device.apply(parse_set(list(lines)))


@dataclass
class Pair:
    """Devices A (10.9.0.1, fd09::1) and B (10.9.0.2, fd09::2), each the other's peer."""

    a: Side
    b: Side
    network: MemoryNetwork | None
    clock: FakeClock = field(init=False)

    def __post_init__(self) -> None:
        self.clock = FakeClock(self.a.device, self.b.device)

    def close(self) -> None:
        for side in (self.a, self.b):
            side.device.close()


async def device_pair(options: DataPathOptions | None = None, *, network: MemoryNetwork | None = None,
                      in_memory: bool = True, peer_lines: Sequence[str] = (), endpoints: bool = True) -> Pair:
    """Two started Devices, configured over UAPI as each other's peer. ``in_memory``: their
    UDP sockets are MemorySockets on ``network`` (192.0.2.1/.2, 2001:db8::1/::2); else
    real sockets on the loopback (the threaded data path and the hop need real UDP).
    ``endpoints=False``: the peers have no endpoint (something else must find one)."""
    if options is None:
        options = DataPathOptions(threads=False, tun_offload=False, udp_gso=False, udp_gro=False, hop=False)
    if in_memory and network is None:
        network = MemoryNetwork()
    sides = []
    for n in (1, 2):
        tun = MemoryTun(f"mem{n}", vnet_hdr=options.tun_offload)
        device = Device(tun, options)
        if network is not None:
            device.open_bind = network.host(f"192.0.2.{n}", f"2001:db8::{n}").open_bind
        side = Side(device, tun, dh_generate(), f"10.9.0.{n}", f"fd09::{n}",
                    f"192.0.2.{n}" if network is not None else "127.0.0.1")
        side.set(f"private_key={side.private_key.hex()}", "listen_port=0")
        device.start()
        sides.append(side)
    a, b = sides
    for me, other in ((a, b), (b, a)):
        where = [f"endpoint={other.endpoint[0]}:{other.endpoint[1]}"] if endpoints else []
        me.set(f"public_key={other.public_key.hex()}", *where,
               f"allowed_ip={other.address4}/32", f"allowed_ip={other.address6}/128",
               *peer_lines)
    return Pair(a, b, network)
