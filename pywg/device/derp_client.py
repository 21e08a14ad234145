"""A DERP client over TCP (TLS optional), driven by asyncio, that keeps itself connected.

It opens the stream (plain, TLS with the caller's context, or TLS pinned to a self-signed
certificate by a DERPNode ``CertName`` of the form ``sha256-raw:<hex>``: the SHA-256 of the
leaf's DER must match, checked before a byte is sent), performs the HTTP upgrade and runs
``pywg.derp.DerpClient`` on it. When the connection fails or drops it reconnects with
exponential backoff (jittered, capped),
and a server's Restarting hint sets the next delay. Sends while disconnected are dropped and
counted, as a datagram path would; received packets go to a bounded queue (the oldest is
dropped and counted when it is full) or to a callback.

    client = DerpRelayClient(private_key, "10.0.0.1", 3340)
    client.start()
    await client.wait_connected(10)
    await client.send(peer_key, payload)
    async for src, payload in client: ...
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import ssl as ssl_module
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Self

from pywg.derp import (
    ClientError,
    Connected,
    DerpClient,
    NodePrivateKey,
    NodePublicKey,
    PacketReceived,
    PongReceived,
    UpgradeError,
    UpgradeResponseParser,
    build_upgrade_request,
)
from pywg.derp.client import READ_TIMEOUT, Event
from pywg.derp.derpmap import DerpNode, DerpRegion
from pywg.derp.frames import FrameError, Restarting

log = logging.getLogger("pywg.derp")

CONNECT_TIMEOUT = 10.0  # TCP + TLS + upgrade + handshake, as the Go client allows
BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 5.0  # tailscaled backs off up to 5 s
NODE_DIAL_TIMEOUT = 1.5  # per node of a region, as the Go client allows
READ_SIZE = 65536

PacketCallback = Callable[[NodePublicKey, bytes], None]
EventCallback = Callable[[Event], None]


class DerpNotConnected(ConnectionError):
    """The relay is not connected right now."""


class CertificatePinMismatch(ConnectionError):
    """The server's TLS certificate is not the one its ``sha256-raw:`` CertName pins."""


CERT_PIN_PREFIX = "sha256-raw:"


def parse_cert_pin(cert_name: str) -> bytes:
    """The SHA-256 of ``sha256-raw:<64 hex>`` (a DERPNode CertName pinning a self-signed cert)."""
    if not cert_name.startswith(CERT_PIN_PREFIX):
        raise ValueError(f"cert_name: expected {CERT_PIN_PREFIX}<64 hex>, got {cert_name[:20]!r}")
    body = cert_name[len(CERT_PIN_PREFIX):]
    try:
        digest = bytes.fromhex(body)
    except ValueError:
        raise ValueError("cert_name: the SHA-256 is not hexadecimal") from None
    if len(digest) != 32:
        raise ValueError(f"cert_name: expected 64 hex characters, got {len(body)}")
    return digest


def pinned_tls_context() -> ssl_module.SSLContext:
    """A client context that leaves the check to the pin (the chain of a self-signed server
    cannot be verified); TLS 1.2 at least, as derper serves."""
    context = ssl_module.SSLContext(ssl_module.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl_module.CERT_NONE
    context.minimum_version = ssl_module.TLSVersion.TLSv1_2
    return context


@dataclass
class RelayStats:
    connects: int = 0  # handshakes completed
    connect_failures: int = 0  # attempts that never reached Connected
    disconnects: int = 0  # connected sessions that ended
    dropped_not_connected: int = 0
    dropped_queue_full: int = 0
    dropped_events: int = 0
    dropped_rate_limited: int = 0  # over the server's advisory token bucket
    callback_errors: int = 0  # on_packet raised (logged; the connection carries on)
    unexpected_errors: int = 0  # sessions ended by an error no rule expected (logged with its trace)
    packets_sent: int = 0
    bytes_sent: int = 0
    packets_received: int = 0
    bytes_received: int = 0


@dataclass(frozen=True, slots=True)
class DialTarget:
    """One DERP node to dial: where, and how the stream is secured."""

    host: str  # an IP literal or a name to resolve
    port: int
    ssl: ssl_module.SSLContext | None = None  # None: plain HTTP
    server_hostname: str | None = None  # TLS name to verify (and SNI); defaults to host
    host_header: str = ""
    cert_sha256: bytes | None = None  # a sha256-raw pin of the leaf certificate
    node_name: str = ""  # the DERP map's node name, when it came from one

    @classmethod
    def make(cls, host: str, port: int, *, ssl: ssl_module.SSLContext | None = None,
             server_hostname: str | None = None, host_header: str | None = None,
             cert_pin: str | None = None, node_name: str = "") -> DialTarget:
        """A target; ``cert_pin`` (``sha256-raw:<hex>``) turns TLS on with the pin as the check."""
        digest = parse_cert_pin(cert_pin) if cert_pin is not None else None
        if digest is not None and ssl is None:
            ssl = pinned_tls_context()
        if not host:
            raise ValueError("host: must not be empty")
        if not 0 < port < 65536:
            raise ValueError(f"port: {port} is not in 1..65535")
        default_port = 443 if ssl is not None else 80
        name = server_hostname or host
        header = host_header or (name if port == default_port else f"{_bracket(name)}:{port}")
        build_upgrade_request(header)  # refuses a header that would break the request, naming it
        return cls(host, port, ssl, server_hostname, header, digest, node_name)

    @classmethod
    def for_node(cls, node: DerpNode, *, plain_http: bool = False,
                 ssl: ssl_module.SSLContext | None = None) -> list[DialTarget]:
        """How to reach a DERP map node: one target per address to dial (IPv6 first). TLS
        verifies HostName (or CertName), pins a ``sha256-raw:`` CertName, and skips checks
        with InsecureForTests; ``plain_http`` (labs only) dials without TLS."""
        pin = node.cert_name if node.cert_name.startswith(CERT_PIN_PREFIX) else None
        if plain_http:
            context = None
        elif pin is not None:
            context = ssl or pinned_tls_context()
        elif node.insecure_for_tests:
            context = pinned_tls_context()  # verification off, as the flag says
        else:
            context = ssl or ssl_module.create_default_context()
        tls_name = node.cert_name if node.cert_name and pin is None else node.host_name
        header = f"{node.host_name}:{node.derp_port}" if node.derp_port else node.host_name
        return [cls.make(address, node.port, ssl=context, server_hostname=None if plain_http else tls_name,
                         host_header=header, cert_pin=None if plain_http else pin, node_name=node.name)
                for address in node.dial_addresses()]


class DerpRelayClient:
    """One client identity kept connected to one DERP server (or the first working node of
    a region, tried in order, each with NODE_DIAL_TIMEOUT)."""

    def __init__(self, private_key: NodePrivateKey, host: str | None = None, port: int = 443, *,
                 ssl: ssl_module.SSLContext | None = None, server_hostname: str | None = None,
                 host_header: str | None = None, cert_pin: str | None = None,
                 targets: list[DialTarget] | None = None,
                 expected_server_key: NodePublicKey | None = None, mesh_key: bytes | None = None,
                 watch_conns: bool = False, preferred: bool = True, on_packet: PacketCallback | None = None,
                 queue_size: int = 1024, connect_timeout: float = CONNECT_TIMEOUT,
                 node_dial_timeout: float = NODE_DIAL_TIMEOUT,
                 read_timeout: float = READ_TIMEOUT, backoff_initial: float = BACKOFF_INITIAL,
                 backoff_max: float = BACKOFF_MAX, rng: random.Random | None = None,
                 on_event: EventCallback | None = None,
                 on_disconnect: Callable[[], None] | None = None) -> None:
        self.private_key = private_key
        self.public_key = private_key.public
        if targets is None:
            if host is None:
                raise ValueError("host: give a host or a list of targets")
            targets = [DialTarget.make(host, port, ssl=ssl, server_hostname=server_hostname,
                                       host_header=host_header, cert_pin=cert_pin)]
        elif not targets:
            raise ValueError("targets: the region has no DERP node to dial")
        self.targets = list(targets)
        self.target: DialTarget | None = None  # the one of the current (or last) connection
        self.host_header = self.targets[0].host_header
        self.node_dial_timeout = node_dial_timeout
        self.expected_server_key = expected_server_key
        if mesh_key is not None and len(mesh_key) != 32:
            raise ValueError("mesh_key: must be 32 bytes")
        self._mesh_key = mesh_key
        self.watch_conns = watch_conns
        self.preferred = preferred
        self.on_packet = on_packet
        self.on_event = on_event  # every non-packet event, in order, instead of next_event's queue
        self.on_disconnect = on_disconnect  # each time a connection ends (a mesh link forgets its peers)
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.stats = RelayStats()
        self.server_key: NodePublicKey | None = None
        self.last_error: str | None = None
        self._rng = rng or random.Random()
        self._packets: asyncio.Queue[tuple[NodePublicKey, bytes]] = asyncio.Queue(queue_size)
        self._events: asyncio.Queue[Event] = asyncio.Queue(queue_size)
        self._client: DerpClient | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._connected = asyncio.Event()
        self._pings: dict[bytes, asyncio.Future[float]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._session_connected = False
        self._connected_at = 0.0
        self._next_delay: float | None = None

    def __repr__(self) -> str:
        state = "connected" if self._connected.is_set() else "disconnected"
        return f"DerpRelayClient({self.public_key}, {self.host_header}, {state})"

    @classmethod
    def for_region(cls, private_key: NodePrivateKey, region: DerpRegion, *, plain_http: bool = False,
                   ssl: ssl_module.SSLContext | None = None, **options: Any) -> DerpRelayClient:
        """A client of a DERP map region: its relaying nodes in map order (STUN-only ones skipped)."""
        targets = [t for node in region.derp_nodes
                   for t in DialTarget.for_node(node, plain_http=plain_http, ssl=ssl)]
        if not targets:
            raise ValueError(f"region {region.region_id}: no DERP node to dial")
        return cls(private_key, targets=targets, **options)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting (and reconnecting) in the background."""
        if self._task is None:
            self._closing = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"derp {self.host_header}")

    async def close(self) -> None:
        """Disconnect and stop reconnecting."""
        self._closing = True
        self._drop_connection()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Return once the handshake is complete (TimeoutError after ``timeout``)."""
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    def disconnect(self) -> None:
        """Drop the current connection (the client reconnects after its backoff)."""
        self._drop_connection()

    # -- traffic --------------------------------------------------------------------------

    async def send(self, dst: NodePublicKey, payload: bytes) -> bool:
        """Relay ``payload`` to the client ``dst``; False (counted) when not connected or rate limited."""
        writer = self._writer
        if not self._write_packet(dst, payload, None) or writer is None:
            return False
        try:
            await writer.drain()
        except (ConnectionError, OSError):
            return False
        return True

    def send_nowait(self, dst: NodePublicKey, payload: bytes, max_buffered: int = 1 << 20, *,
                    write: bool = True) -> bool:
        """``send`` without waiting (event-loop thread): written now (``write=False``: framed,
        and written with the next write or ``write_pending``, so that many packets go in one
        system call); False (counted) when not connected, rate limited, or the socket is
        backed up beyond ``max_buffered`` bytes."""
        return self._write_packet(dst, payload, max_buffered, write)

    def write_pending(self) -> None:
        """Write what ``send_nowait(write=False)`` framed."""
        client, writer = self._client, self._writer
        if client is not None and writer is not None:
            out = client.data_to_send()
            if out:
                writer.write(out)

    def _write_packet(self, dst: NodePublicKey, payload: bytes, max_buffered: int | None,
                      write: bool = True) -> bool:
        client, writer = self._client, self._writer
        if client is None or writer is None or not self._connected.is_set():
            self.stats.dropped_not_connected += 1
            return False
        if max_buffered is not None and writer.transport.get_write_buffer_size() > max_buffered:
            self.stats.dropped_queue_full += 1
            return False
        if not client.send_packet(dst, payload, time.monotonic()):
            self.stats.dropped_rate_limited += 1
            return False
        self.stats.packets_sent += 1
        self.stats.bytes_sent += len(payload)
        if write:
            writer.write(client.data_to_send())
        return True

    async def ping(self, timeout: float = 5.0) -> float:
        """Ping the server; the round-trip time in seconds. DerpNotConnected, or TimeoutError."""
        client, writer = self._client, self._writer
        if client is None or writer is None or not self._connected.is_set():
            raise DerpNotConnected(f"not connected to {self.host_header}")
        data = client.ping(time.monotonic())
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[data] = future
        writer.write(client.data_to_send())
        try:
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self._pings.pop(data, None)

    async def note_preferred(self, preferred: bool) -> None:
        """Tell the server (now and after every reconnect) whether it is the home region."""
        self.preferred = preferred
        client, writer = self._client, self._writer
        if client is not None and writer is not None and self._connected.is_set():
            client.note_preferred(preferred)
            writer.write(client.data_to_send())
            await writer.drain()

    async def recv(self) -> tuple[NodePublicKey, bytes]:
        """The next relayed packet: (source node key, payload)."""
        return await self._packets.get()

    def __aiter__(self) -> AsyncIterator[tuple[NodePublicKey, bytes]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[NodePublicKey, bytes]]:
        while True:
            yield await self._packets.get()

    async def next_event(self) -> Event:
        """The next non-packet event: Connected, PeerGone, PeerPresent, Health, Restarting, KeepAlive."""
        return await self._events.get()

    # -- the connection loop ----------------------------------------------------------------

    async def _run(self) -> None:
        delay = self.backoff_initial
        while not self._closing:
            self._session_connected = False
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, EOFError, ClientError, UpgradeError, FrameError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.info("derp %s: %s", self.host_header, self.last_error)
            except Exception as exc:  # a bug or an odd library error: never end the loop for it
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.stats.unexpected_errors += 1
                log.exception("derp %s: unexpected error", self.host_header)
            finally:
                self._drop_connection()
                if self._session_connected:
                    self.stats.disconnects += 1
                elif not self._closing:
                    self.stats.connect_failures += 1
            if self._closing:
                return
            if self._session_connected and time.monotonic() - self._connected_at >= self.backoff_max:
                delay = self.backoff_initial  # a session that held resets the backoff; a flapping one not
            wait = delay * (0.5 + self._rng.random() / 2)  # jitter: half to all of the delay
            if self._next_delay is not None:  # the server said when to come back
                wait = self._next_delay
            self._next_delay = None
            await asyncio.sleep(wait)
            delay = min(delay * 2, self.backoff_max)

    async def _dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, DialTarget, int]:
        """The first target that accepts (TCP and TLS), in order; the last error if none does."""
        error: BaseException = OSError("no target")
        for index, target in enumerate(self.targets):
            try:
                async with asyncio.timeout(self.node_dial_timeout):
                    reader, writer = await asyncio.open_connection(
                        target.host, target.port, ssl=target.ssl,
                        server_hostname=(target.server_hostname or target.host) if target.ssl else None)
            except (OSError, TimeoutError) as exc:
                error = exc
                log.debug("derp %s: %s:%d: %s", target.node_name or target.host_header, target.host,
                          target.port, exc)
                continue
            return reader, writer, target, index
        raise error

    async def _session(self) -> None:
        """One connection, until it fails (every way out is an exception)."""
        async with asyncio.timeout(self.connect_timeout) as deadline:
            reader, writer, target, index = await self._dial()
            self._writer, self.target, self.host_header = writer, target, target.host_header
            if target.cert_sha256 is not None:
                _check_pin(writer, target.cert_sha256)
            # A node other than the region's first says which one it would have liked (stats only).
            first = self.targets[0].node_name
            ideal = first if index and first and first != target.node_name else None
            writer.write(build_upgrade_request(target.host_header, ideal_node=ideal))
            parser = UpgradeResponseParser()
            response = None
            while response is None:
                data = await reader.read(READ_SIZE)
                if not data:
                    parser.close()
                response = parser.feed(data)
            client = DerpClient(self.private_key, expected_server_key=self.expected_server_key,
                                preferred=self.preferred, mesh_key=self._mesh_key,
                                watch_conns=self.watch_conns, now=time.monotonic(),
                                read_timeout=self.read_timeout)
            self._client = client
            self._feed(client, response.leftover)
            while not self._connected.is_set():
                self._feed(client, await self._read(reader, client))
            deadline.reschedule(None)
        while True:
            self._feed(client, await self._read(reader, client))

    async def _read(self, reader: asyncio.StreamReader, client: DerpClient) -> bytes:
        try:
            async with asyncio.timeout(self.read_timeout):
                data = await reader.read(READ_SIZE)
        except TimeoutError:
            raise TimeoutError(f"nothing from the server for {self.read_timeout:g} s") from None
        if not data:
            client.connection_closed()
        return data

    def _feed(self, client: DerpClient, data: bytes) -> None:
        try:
            events = client.receive_data(data, time.monotonic())
        except ClientError as exc:
            self._dispatch(exc.events)
            raise
        finally:
            out = client.data_to_send()
            if out and self._writer is not None:
                self._writer.write(out)
        self._dispatch(events)

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, PacketReceived):
                self.stats.packets_received += 1
                self.stats.bytes_received += len(event.packet)
                if self.on_packet is not None:
                    try:
                        self.on_packet(event.src, event.packet)
                    except Exception:
                        self.stats.callback_errors += 1
                        log.exception("derp %s: on_packet failed", self.host_header)
                    continue
                if self._packets.full():
                    self._packets.get_nowait()
                    self.stats.dropped_queue_full += 1
                self._packets.put_nowait((event.src, event.packet))
                continue
            if isinstance(event, PongReceived):
                future = self._pings.get(event.data)
                if future is not None and not future.done():
                    future.set_result(event.rtt)
                continue
            if isinstance(event, Connected):
                self.server_key = event.server_key
                self.stats.connects += 1
                self._session_connected = True
                self._connected_at = time.monotonic()
                self._connected.set()
                log.info("derp %s: connected as %s, server %s", self.host_header, self.public_key.short(),
                         event.server_key.short())
            elif isinstance(event, Restarting):
                self._next_delay = event.reconnect_in_ms / 1000
            if self.on_event is not None:
                self.on_event(event)
                continue
            if self._events.full():
                self._events.get_nowait()
                self.stats.dropped_events += 1
            self._events.put_nowait(event)

    def forward_packet(self, src: NodePublicKey, dst: NodePublicKey, payload: bytes,
                       max_buffered: int = 4 << 20) -> bool:
        """Mesh (needs the mesh key): a ForwardPacket from ``src`` for the server's client ``dst``,
        written now without waiting; False (counted) when not connected or the socket is backed
        up beyond ``max_buffered`` bytes."""
        client, writer = self._client, self._writer
        if client is None or writer is None or not self._connected.is_set():
            self.stats.dropped_not_connected += 1
            return False
        if writer.transport.get_write_buffer_size() > max_buffered:
            self.stats.dropped_queue_full += 1
            return False
        client.forward_packet(src, dst, payload)
        writer.write(client.data_to_send())
        self.stats.packets_sent += 1
        self.stats.bytes_sent += len(payload)
        return True

    def _drop_connection(self) -> None:
        was_open = self._writer is not None
        self._connected.clear()
        self._client = None
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        if was_open and self.on_disconnect is not None:
            self.on_disconnect()
        for future in self._pings.values():
            if not future.done():
                future.set_exception(DerpNotConnected("the connection dropped"))
        self._pings.clear()


def _check_pin(writer: asyncio.StreamWriter, digest: bytes) -> None:
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if der is None or hashlib.sha256(der).digest() != digest:
        got = hashlib.sha256(der).hexdigest() if der else "no certificate"
        raise CertificatePinMismatch(f"server certificate {CERT_PIN_PREFIX}{got} is not the pinned one")


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
