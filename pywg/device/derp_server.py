"""``pywg derp serve``: the DERP relay over TCP (TLS optional) and its STUN responder, on asyncio.

HTTP/1.1: ``GET /derp`` with ``Upgrade: DERP`` gets 101 (``Derp-Version``, ``Derp-Public-Key``)
and then the framed stream run by ``pywg.derp.server.DerpServer``; ``/derp/probe`` and
``/derp/latency-check`` answer 200, ``/generate_204`` answers 204 (echoing a
``X-Tailscale-Challenge`` as derper does), ``/`` a short page, anything else 404. A request
head that is not HTTP, too large or too slow gets 400 (or nothing) and is counted. WebSocket
upgrades are not served. The STUN port answers Binding requests (``BindingResponder``).

The server key lives in a JSON file shaped like derper's ``-c`` config
(``{"PrivateKey": "privkey:<hex>"}``), 0600 in a 0700 directory, created when missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl as ssl_module
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pywg.derp import KeyFormatError, NodePrivateKey, NodePublicKey
from pywg.derp.server import DerpServer
from pywg.nat.stun import BindingResponder

log = logging.getLogger("pywg.derp.server")

MAX_REQUEST_HEAD = 8 << 10
REQUEST_TIMEOUT = 10.0
KEEP_ALIVE_INTERVAL = 60.0
READ_SIZE = 65536
WRITE_HIGH_WATER = 1 << 20


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
                 ssl: ssl_module.SSLContext | None = None, keep_alive: float = KEEP_ALIVE_INTERVAL) -> None:
        self.state = DerpServer(private_key, allow=(allow.__contains__ if allow is not None else None))
        self.host, self.port, self.stun_port = host, port, stun_port
        self.ssl = ssl
        self.keep_alive = keep_alive
        self.http = HttpStats()
        self.stun = BindingResponder()
        self._server: asyncio.Server | None = None
        self._stun_transport: asyncio.DatagramTransport | None = None
        self._next_id = 0
        self._wakers: dict[int, asyncio.Event] = {}
        self._writers: dict[int, asyncio.StreamWriter] = {}
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

    async def close(self) -> None:
        if self._stun_transport is not None:
            self._stun_transport.close()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers.values()):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def serve_forever(self) -> None:
        await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            await self._serve_http(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl_module.SSLError, TimeoutError):
            pass
        except Exception:  # one connection's fault must not stop the server
            log.exception("DERP connection failed")
            self.http.rejected["internal_error"] += 1
        finally:
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
            if headers.get("upgrade", "").lower() != "derp":
                writer.write(_response("426 Upgrade Required", {"Content-Type": "text/plain"},
                                       b"DERP requires connection upgrade\n"))
                return
            await self._serve_derp(reader, writer)
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

    async def _serve_derp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn_id = self._next_id
        self._next_id += 1
        now = time.monotonic()
        hello = self.state.accept(conn_id, now)
        writer.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
                      f"Derp-Version: 2\r\nDerp-Public-Key: {self.public_key.untyped_hex()}\r\n\r\n")
                     .encode() + hello)
        wake = asyncio.Event()
        self._wakers[conn_id] = wake
        self._writers[conn_id] = writer
        sender = asyncio.create_task(self._send_loop(conn_id, writer, wake))
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                now = time.monotonic()
                actions = self.state.receive_data(conn_id, data, now)
                for other in actions.wake:
                    self._flush(other, now)
                if actions.close:
                    for other in actions.close:
                        if other != conn_id and other in self._writers:
                            self._writers[other].close()
                    if conn_id in actions.close:
                        break
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await sender
            self._wakers.pop(conn_id, None)
            self._writers.pop(conn_id, None)
            actions = self.state.connection_lost(conn_id)
            for other in actions.wake:
                self._flush(other, time.monotonic())

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
            transport.write(data)

    async def _send_loop(self, conn_id: int, writer: asyncio.StreamWriter, wake: asyncio.Event) -> None:
        while True:
            try:
                await asyncio.wait_for(wake.wait(), self.keep_alive)
            except TimeoutError:
                self.state.keep_alive(conn_id, time.monotonic())
            wake.clear()
            data = self.state.data_to_send(conn_id, time.monotonic())
            if data:
                writer.write(data)
            await writer.drain()
            if writer.transport.get_write_buffer_size() <= WRITE_HIGH_WATER:
                self.state.set_writable(conn_id, True)
                data = self.state.data_to_send(conn_id, time.monotonic())
                if data:
                    writer.write(data)


async def serve(private_key: NodePrivateKey, host: str, port: int, *, stun_port: int | None,
                allow: frozenset[NodePublicKey] | None, ssl: ssl_module.SSLContext | None = None) -> None:
    """Run the relay until cancelled."""
    server = DerpRelayServer(private_key, host, port, stun_port=stun_port, allow=allow, ssl=ssl)
    await server.start()
    log.info("DERP relay %s on %s:%d (STUN %s)", server.public_key, host, server.port, server.stun_port)
    print(f"pywg derp: serving {server.public_key} on {host}:{server.port}"
          + (f", STUN on UDP {server.stun_port}" if server.stun_port is not None else ""), flush=True)
    try:
        assert server._server is not None
        await server._server.serve_forever()
    finally:
        await server.close()


def run_serve(listen: str, stun_port: int | None, config: str, verify_clients: str | None,
              tls_cert: str | None = None, tls_key: str | None = None) -> int:
    """``pywg derp serve``: check every option first (ConfigError names it), then serve until
    interrupted."""
    host, port = parse_listen(listen)
    if stun_port is not None and not 0 <= stun_port <= 65535:
        raise ConfigError("--stun-port", f"{stun_port} is not a UDP port (0-65535)")
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert" if tls_cert is None else "--tls-key",
                          "--tls-cert and --tls-key go together")
    allow = load_allowlist(Path(verify_clients)) if verify_clients is not None else None
    context = None
    if tls_cert is not None and tls_key is not None:
        context = ssl_module.SSLContext(ssl_module.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl_module.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(tls_cert, tls_key)
        except (OSError, ssl_module.SSLError) as exc:
            raise ConfigError("--tls-cert", f"cannot load {tls_cert} with {tls_key}: {exc}") from None
    key = load_or_create_key(Path(config))
    try:
        import uvloop

        uvloop.run(serve(key, host, port, stun_port=stun_port, allow=allow, ssl=context))
    except OSError as exc:
        raise ConfigError("--listen" if "stun" not in str(exc).lower() else "--stun-port",
                          f"cannot bind {listen}: {exc}") from None
    return 0
