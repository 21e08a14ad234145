"""``pywg derp serve``: the DERP relay over TCP (TLS optional) and its STUN responder, on asyncio.

HTTP/1.1: ``GET /derp`` with ``Upgrade: DERP`` gets 101 (``Derp-Version``, ``Derp-Public-Key``)
and then the framed stream run by ``pywg.derp.server.DerpServer``; ``/derp/probe`` and
``/derp/latency-check`` answer 200, ``/generate_204`` answers 204 (echoing a
``X-Tailscale-Challenge`` as derper does), ``/`` a short page, anything else 404. A request
head that is not HTTP, too large or too slow gets 400 (or nothing) and is counted.
``Upgrade: websocket`` offering the ``derp`` subprotocol carries the same stream in binary
WebSocket messages (``pywg.derp.websocket``). The STUN port answers Binding requests.

Limits (``RelayLimits``): new connections per second and at once, handshaken clients, the
client's received bytes (a token bucket that delays reads, so TCP pushes back; mesh peers are
exempt), the bytes queued for a backed-up receiver, a write that stalls longer than the write
timeout (the client is closed), 10 s from the upgrade to ClientInfo. ``--mesh-with`` keeps a
mesh link to every other server of the region (``derp_mesh``). SIGTERM (or SIGINT) stops
gracefully: no new connections, a Restarting frame to every client, queued bytes flushed for
up to 2 s, then every connection closed.

The server key lives in a JSON file shaped like derper's ``-c`` config
(``{"PrivateKey": "privkey:<hex>"}``), 0600 in a 0700 directory, created when missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl as ssl_module
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pywg.derp import Actions, KeyFormatError, NodePrivateKey, NodePublicKey
from pywg.derp.frames import HEADER_LEN, MAX_PACKET_SIZE
from pywg.derp.keys import KEY_LEN
from pywg.derp.limits import MESH_WRITE_TIMEOUT, RelayLimits
from pywg.derp.server import DerpServer
from pywg.derp.websocket import SUBPROTOCOL, ServerStream, accept_key, offers_derp, valid_client_key
from pywg.device.derp_mesh import MeshConfigError, MeshLink, MeshTarget, load_mesh_key, parse_mesh_with
from pywg.nat.stun import BindingResponder

log = logging.getLogger("pywg.derp.server")

MAX_REQUEST_HEAD = 8 << 10
REQUEST_TIMEOUT = 10.0
KEEP_ALIVE_INTERVAL = 60.0
READ_SIZE = 65536
WRITE_HIGH_WATER = 1 << 20
RESTART_RECONNECT_MS = 500  # the Restarting hint of a graceful stop: come back (elsewhere) soon
RESTART_TRY_FOR_MS = 30_000
MAX_PACKET_FRAME = HEADER_LEN + KEY_LEN + MAX_PACKET_SIZE
STOP_GRACE = 2.0  # seconds a graceful stop waits for queued bytes to leave


class ConfigError(ValueError):
    """A server option or file is unusable; ``field`` names it."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field


def load_or_create_key(path: Path) -> NodePrivateKey:
    """The server key from derper-style JSON at ``path``; a new one written 0600 (dir 0700) if absent."""
    if path.exists():
        try:
            body = json.loads(path.read_text())
            text = body["PrivateKey"]
            if not isinstance(text, str):
                raise TypeError("PrivateKey is not a string")
            return NodePrivateKey.from_text(text, "--config PrivateKey")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError("--config", f"{path}: not a derper config with a PrivateKey ({exc})") from None
    key = NodePrivateKey.generate()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"PrivateKey": key.private_text()}, out)
    except OSError as exc:
        raise ConfigError("--config", f"cannot create {path}: {exc}") from None
    return key


def load_allowlist(path: Path) -> frozenset[NodePublicKey]:
    """Node public keys (``nodekey:<hex>``), one a line; blank lines and ``#`` comments ignored."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError("--verify-clients", f"cannot read {path}: {exc}") from None
    keys = set()
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            keys.add(NodePublicKey.from_text(text, f"--verify-clients line {number}"))
        except KeyFormatError as exc:
            raise ConfigError("--verify-clients", f"{path}: {exc}") from None
    return frozenset(keys)


def parse_listen(text: str, option: str = "--listen") -> tuple[str, int]:
    """``ADDR:PORT`` or ``[V6]:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(option, f"expected ADDR:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass
class HttpStats:
    requests: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    rate_limited_reads: int = 0  # reads delayed by a client's token bucket
    rate_limited_seconds: float = 0.0
    websocket_errors: Counter[str] = field(default_factory=Counter)


class _RawStream:
    """DERP straight on the TCP/TLS stream (the ``Upgrade: DERP`` case)."""

    closed = False

    def wrap(self, data: bytes) -> bytes:
        return data

    def receive(self, data: bytes) -> tuple[bytes, bytes, bool]:
        return data, b"", False

    def close_frame(self) -> bytes:
        return b""


class _WebSocketStream:
    """DERP inside binary WebSocket messages."""

    def __init__(self, stats: HttpStats) -> None:
        self._ws = ServerStream()
        self._stats = stats

    @property
    def closed(self) -> bool:
        return self._ws.closed

    def wrap(self, data: bytes) -> bytes:
        return self._ws.wrap(data)

    def receive(self, data: bytes) -> tuple[bytes, bytes, bool]:
        got = self._ws.receive(data)
        if got.error is not None:
            self._stats.websocket_errors[got.error.code.name.lower()] += 1
        return got.data, got.reply, got.closed

    def close_frame(self) -> bytes:
        return self._ws.close_frame()


class _StunProtocol(asyncio.DatagramProtocol):
    def __init__(self, responder: BindingResponder) -> None:
        self.responder = responder
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.responder.handle(data, (addr[0], addr[1]))
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


def _response(status: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]] | None:
    try:
        text = head.decode("latin-1")
        request_line, *lines = text.split("\r\n")
        method, target, version = request_line.split(" ")
    except ValueError:
        return None
    if version not in ("HTTP/1.1", "HTTP/1.0") or not target.startswith("/"):
        return None
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None
        headers[name.lower()] = value.strip()
    return method, target.split("?", 1)[0], headers


class DerpRelayServer:
    """The relay's sockets around one DerpServer."""

    def __init__(self, private_key: NodePrivateKey, host: str, port: int, *, stun_port: int | None = None,
                 allow: frozenset[NodePublicKey] | None = None,
                 ssl: ssl_module.SSLContext | None = None, keep_alive: float = KEEP_ALIVE_INTERVAL,
                 limits: RelayLimits | None = None, mesh_key: bytes | None = None,
                 mesh_with: Sequence[MeshTarget] = (), mesh_ssl: ssl_module.SSLContext | None = None) -> None:
        self.limits = limits = limits or RelayLimits()
        if mesh_with and mesh_key is None:
            raise ValueError("mesh_with: needs a mesh key")
        self.state = DerpServer(private_key, allow=(allow.__contains__ if allow is not None else None),
                                max_clients=limits.max_clients, send_queue_depth=limits.queue_packets,
                                send_queue_bytes=limits.queue_bytes, mesh_key=mesh_key)
        self.host, self.port, self.stun_port = host, port, stun_port
        self.ssl = ssl
        self.keep_alive = keep_alive
        self.http = HttpStats()
        self.stun = BindingResponder()
        self.mesh_links = [MeshLink(self.state, target, mesh_key, on_change=self._apply, ssl=mesh_ssl)
                           for target in mesh_with if mesh_key is not None]
        self.open_connections = 0
        self.stopping = False
        self._accepts = limits.accept_bucket(time.monotonic())
        self._server: asyncio.Server | None = None
        self._stun_transport: asyncio.DatagramTransport | None = None
        self._next_id = 0
        self._wakers: dict[int, asyncio.Event] = {}
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._streams: dict[int, _RawStream | _WebSocketStream] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def public_key(self) -> NodePublicKey:
        return self.state.public_key

    async def start(self) -> None:
        """Bind the TCP port (and the STUN port); ``self.port`` is the bound port afterwards."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port, ssl=self.ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.stun_port is not None:
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _StunProtocol(self.stun), local_addr=(self.host, self.stun_port))
            self._stun_transport = transport  # type: ignore[assignment]
            self.stun_port = transport.get_extra_info("sockname")[1]
        for link in self.mesh_links:
            link.start()

    async def close(self) -> None:
        self.stopping = True
        for link in self.mesh_links:
            await link.close()
        if self._stun_transport is not None:
            self._stun_transport.close()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers.values()):
            writer.close()
        if self._tasks:  # closed streams end their tasks; cancel only what lingers
            _, pending = await asyncio.wait(set(self._tasks), timeout=1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def shutdown(self, grace: float = STOP_GRACE) -> None:
        """Graceful stop: refuse new connections, tell every client Restarting (come back in
        RESTART_RECONNECT_MS, to this or another node of the region), let queued bytes leave
        for up to ``grace`` seconds, then close everything."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for link in self.mesh_links:
            await link.close()
        self._apply(self.state.restarting(RESTART_RECONNECT_MS, RESTART_TRY_FOR_MS))
        writers = list(self._writers.items())
        for conn_id, writer in writers:
            stream = self._streams.get(conn_id)
            if stream is not None and not writer.is_closing():
                writer.write(stream.close_frame())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await asyncio.gather(*(w.drain() for _, w in writers if not w.is_closing()),
                                     return_exceptions=True)
        for _, writer in writers:
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof() and not writer.is_closing():
                    writer.write_eof()
        await self.close()

    async def serve_forever(self) -> None:
        await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    def _admit(self) -> str | None:
        """Why a new connection is refused (closed at once), or None."""
        if self.stopping:
            return "stopping"
        if self.open_connections >= self.limits.max_connections:
            return "too_many_connections"
        if not self._accepts.allow(time.monotonic()):
            return "accept_rate"
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        refused = self._admit()
        if refused is not None:
            self.http.rejected[refused] += 1
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        self.open_connections += 1
        try:
            await self._serve_http(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl_module.SSLError, TimeoutError):
            pass
        except Exception:  # one connection's fault must not stop the server
            log.exception("DERP connection failed")
            self.http.rejected["internal_error"] += 1
        finally:
            self.open_connections -= 1
            self._tasks.discard(task)  # type: ignore[arg-type]
            writer.close()

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
        except asyncio.LimitOverrunError:
            self.http.rejected["head_too_large"] += 1
            writer.write(_response("431 Request Header Fields Too Large"))
            return
        except (asyncio.IncompleteReadError, TimeoutError):
            self.http.rejected["incomplete"] += 1
            return
        parsed = _parse_head(head[:-4]) if len(head) <= MAX_REQUEST_HEAD else None
        if parsed is None:
            self.http.rejected["not_http"] += 1
            writer.write(_response("400 Bad Request"))
            return
        method, path, headers = parsed
        self.http.requests[path if path in ("/derp", "/derp/probe", "/derp/latency-check",
                                            "/generate_204", "/") else "other"] += 1
        if path == "/derp":
            upgrade = headers.get("upgrade", "").lower()
            if upgrade not in ("derp", "websocket"):
                writer.write(_response("426 Upgrade Required", {"Content-Type": "text/plain"},
                                       b"DERP requires connection upgrade\n"))
                return
            if upgrade == "websocket" and offers_derp(headers.get("sec-websocket-protocol", "")):
                key = headers.get("sec-websocket-key", "")
                if not valid_client_key(key) or headers.get("sec-websocket-version") != "13":
                    self.http.rejected["bad_websocket_handshake"] += 1
                    writer.write(_response("400 Bad Request", {"Sec-WebSocket-Version": "13"}))
                    return
                self.http.requests["websocket"] += 1
                response = ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                            f"Sec-WebSocket-Accept: {accept_key(key)}\r\n"
                            f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n").encode()
                await self._serve_derp(reader, writer, headers, _WebSocketStream(self.http), response)
                return
            # Upgrade: DERP (and, as derper, a websocket upgrade without the derp subprotocol).
            response = b""
            if headers.get("derp-fast-start") != "1":
                response = ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
                            f"Derp-Version: 2\r\nDerp-Public-Key: {self.public_key.untyped_hex()}\r\n\r\n").encode()
            await self._serve_derp(reader, writer, headers, _RawStream(), response)
            return
        if method not in ("GET", "HEAD"):
            writer.write(_response("405 Method Not Allowed"))
        elif path in ("/derp/probe", "/derp/latency-check"):
            writer.write(_response("200 OK", {"Access-Control-Allow-Origin": "*"}))
        elif path == "/generate_204":
            extra = {}
            challenge = headers.get("x-tailscale-challenge", "")
            if challenge and len(challenge) <= 64 and all(c.isalnum() or c in "._-:" for c in challenge):
                extra["X-Tailscale-Response"] = "response " + challenge
            writer.write(_response("204 No Content", extra))
        elif path == "/":
            writer.write(_response("200 OK", {"Content-Type": "text/plain"}, b"pywg DERP relay\n"))
        else:
            writer.write(_response("404 Not Found"))
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async def _serve_derp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          headers: dict[str, str], stream: _RawStream | _WebSocketStream,
                          response: bytes) -> None:
        conn_id = self._next_id
        self._next_id += 1
        now = time.monotonic()
        peer = writer.get_extra_info("peername")
        remote = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) and len(peer) >= 2 else None
        hello = self.state.accept(conn_id, now, remote=remote, not_ideal="ideal-node" in headers)
        writer.write(response + stream.wrap(hello))
        wake = asyncio.Event()
        self._wakers[conn_id] = wake
        self._writers[conn_id] = writer
        self._streams[conn_id] = stream
        sender = asyncio.create_task(self._send_loop(conn_id, writer, wake))
        bucket = self.limits.client_bucket(now)
        handshake_deadline = now + self.limits.handshake_timeout
        try:
            while True:
                timeout = None
                if self.state.client_key(conn_id) is None:
                    timeout = max(0.0, handshake_deadline - time.monotonic())
                try:
                    async with asyncio.timeout(timeout):
                        data = await reader.read(READ_SIZE)
                except TimeoutError:
                    self.http.rejected["handshake_timeout"] += 1
                    break
                if not data:
                    break
                data, reply, ended = stream.receive(data)
                if reply:
                    writer.write(reply)
                now = time.monotonic()
                actions = self.state.receive_data(conn_id, data, now) if data else Actions()
                self._apply(actions, now, current=conn_id)
                if conn_id in actions.close or ended:
                    break
                if not self.state.is_mesh_peer(conn_id):
                    delay = bucket.consume(len(data), now)
                    if delay > 0:  # over its rate: read nothing more for a while (TCP pushes back)
                        self.http.rate_limited_reads += 1
                        self.http.rate_limited_seconds += delay
                        await asyncio.sleep(delay)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await sender
            self._wakers.pop(conn_id, None)
            self._writers.pop(conn_id, None)
            self._streams.pop(conn_id, None)
            self._apply(self.state.connection_lost(conn_id))

    def _apply(self, actions: Actions, now: float | None = None, current: int | None = None) -> None:
        """Write what the state queued for the connections it woke; close those it closed
        (but ``current``, whose own loop ends it)."""
        now = time.monotonic() if now is None else now
        for other in actions.wake:
            self._flush(other, now)
        for other in actions.close - {current}:
            writer = self._writers.get(other)
            if writer is not None:
                writer.close()

    def _flush(self, conn_id: int, now: float) -> None:
        """Write what the state queued for ``conn_id`` now, unless its socket is backed up
        (then its send loop drains it and the state bounds the queue meanwhile)."""
        writer = self._writers.get(conn_id)
        if writer is None:
            return
        transport = writer.transport
        if transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            self.state.set_writable(conn_id, False)
            self._wakers[conn_id].set()
            return
        data = self.state.data_to_send(conn_id, now)
        if data:
            transport.write(self._streams[conn_id].wrap(data))

    async def _send_loop(self, conn_id: int, writer: asyncio.StreamWriter, wake: asyncio.Event) -> None:
        stream = self._streams[conn_id]
        while True:
            try:
                await asyncio.wait_for(wake.wait(), self.keep_alive)
            except TimeoutError:
                self.state.keep_alive(conn_id, time.monotonic())
            wake.clear()
            data = self.state.data_to_send(conn_id, time.monotonic())
            if data:
                writer.write(stream.wrap(data))
            timeout = MESH_WRITE_TIMEOUT if self.state.is_mesh_peer(conn_id) else self.limits.write_timeout
            try:
                async with asyncio.timeout(timeout or None):
                    await writer.drain()
            except TimeoutError:
                # derper's write timeout: a client that takes nothing for this long is gone.
                self.state.stats.closed["write_timeout"] += 1
                writer.transport.abort()
                return
            if writer.transport.get_write_buffer_size() <= WRITE_HIGH_WATER:
                self.state.set_writable(conn_id, True)
                data = self.state.data_to_send(conn_id, time.monotonic())
                if data:
                    writer.write(stream.wrap(data))


async def serve(server: DerpRelayServer) -> None:
    """Run the relay until SIGTERM or SIGINT, then stop it gracefully."""
    await server.start()
    log.info("DERP relay %s on %s:%d (STUN %s)", server.public_key, server.host, server.port, server.stun_port)
    print(f"pywg derp: serving {server.public_key} on {server.host}:{server.port}"
          + (f", STUN on UDP {server.stun_port}" if server.stun_port is not None else "")
          + (f", meshed with {', '.join(link.target.url for link in server.mesh_links)}"
             if server.mesh_links else ""), flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        print("pywg derp: stopping (Restarting sent to clients)", flush=True)
        await server.shutdown()
    finally:
        await server.close()


def _limits(args: argparse.Namespace) -> RelayLimits:
    for option in ("client_rate", "client_burst", "queue_bytes", "accept_rate", "accept_burst", "write_timeout"):
        if getattr(args, option) < 0:
            raise ConfigError("--" + option.replace("_", "-"), f"{getattr(args, option)} is negative")
    for option in ("max_clients", "max_connections"):
        if getattr(args, option) < 1:
            raise ConfigError("--" + option.replace("_", "-"), f"{getattr(args, option)} is not at least 1")
    if args.queue_bytes < MAX_PACKET_FRAME:
        raise ConfigError("--queue-bytes", f"{args.queue_bytes} cannot hold one packet ({MAX_PACKET_FRAME} bytes)")
    return RelayLimits(client_rate=args.client_rate, client_burst=args.client_burst, queue_bytes=args.queue_bytes,
                       max_clients=args.max_clients, max_connections=args.max_connections,
                       accept_rate=args.accept_rate, accept_burst=args.accept_burst,
                       write_timeout=args.write_timeout)


def run_serve(args: argparse.Namespace) -> int:
    """``pywg derp serve``: check every option first (ConfigError names it), then serve until
    SIGTERM or SIGINT."""
    host, port = parse_listen(args.listen)
    if args.stun_port is not None and not 0 <= args.stun_port <= 65535:
        raise ConfigError("--stun-port", f"{args.stun_port} is not a UDP port (0-65535)")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert" if args.tls_cert is None else "--tls-key",
                          "--tls-cert and --tls-key go together")
    limits = _limits(args)
    allow = load_allowlist(Path(args.verify_clients)) if args.verify_clients is not None else None
    try:
        mesh_with = parse_mesh_with(args.mesh_with) if args.mesh_with is not None else []
        mesh_key = load_mesh_key(Path(args.mesh_key)) if args.mesh_key is not None else None
    except MeshConfigError as exc:
        raise ConfigError(exc.field, str(exc).split(": ", 1)[1]) from None
    if mesh_with and mesh_key is None:
        raise ConfigError("--mesh-key", "--mesh-with needs the region's mesh key")
    context = None
    if args.tls_cert is not None and args.tls_key is not None:
        context = ssl_module.SSLContext(ssl_module.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl_module.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl_module.SSLError) as exc:
            raise ConfigError("--tls-cert", f"cannot load {args.tls_cert} with {args.tls_key}: {exc}") from None
    key = load_or_create_key(Path(args.config))

    async def main() -> None:
        await serve(DerpRelayServer(key, host, port, stun_port=args.stun_port, allow=allow, ssl=context,
                                    limits=limits, mesh_key=mesh_key, mesh_with=mesh_with))

    try:
        import uvloop

        uvloop.run(main())
    except OSError as exc:
        raise ConfigError("--listen" if "stun" not in str(exc).lower() else "--stun-port",
                          f"cannot bind {args.listen}: {exc}") from None
    return 0
