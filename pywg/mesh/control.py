"""The agent's control channel: a unix socket, ``control.sock`` in the agent's state dir
(the dir is 0700, the socket 0600), for ``pywg agent rotate``. Only root, or the user the
agent runs as, is served (checked by SO_PEERCRED as well as by the modes).

One JSON object a line each way: the request ``{"op": "rotate", "overlap": SECONDS}``
(``overlap`` optional), the answer ``{"ok": true, ...}`` or ``{"ok": false, "error": "...",
"field": "..."}``. A bad request gets an error naming the field; the agent keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_LINE = 4096
OPS: dict[str, tuple[str, ...]] = {"rotate": ("overlap",)}  # op -> the fields it may have

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(Exception):
    """A request refused; ``field`` names what is wrong with it."""

    def __init__(self, reason: str, field: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


class NoAgent(Exception):
    """Nobody answers on the control socket."""


def parse_request(raw: bytes) -> tuple[str, dict[str, Any]]:
    """A request line -> (op, its arguments); ControlError naming the field otherwise."""
    if len(raw) > MAX_LINE:
        raise ControlError(f"a request is at most {MAX_LINE} bytes", "request")
    try:
        data = json.loads(raw, parse_constant=lambda name: _no_constant(name))
    except (ValueError, RecursionError) as exc:
        raise ControlError(f"not JSON: {type(exc).__name__}", "request") from None
    if not isinstance(data, dict):
        raise ControlError("a request is a JSON object", "request")
    op = data.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise ControlError(f"expected one of {', '.join(sorted(OPS))}", "op")
    args = {k: v for k, v in data.items() if k != "op"}
    for name in args:
        if name not in OPS[op]:
            raise ControlError(f"unknown field for {op}", str(name)[:64])
    if "overlap" in args and args["overlap"] is not None:
        value = args["overlap"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and 0 <= value <= 3600):
            raise ControlError("expected a number of seconds, 0..3600", "overlap")
        args["overlap"] = float(value)
    return op, args


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return int(uid)


class ControlServer:
    """Serves ``handlers`` (op -> coroutine of the arguments) on ``state_dir/control.sock``."""

    def __init__(self, state_dir: Path, handlers: dict[str, Handler]) -> None:
        self.path = Path(state_dir) / SOCKET_NAME
        self.handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    def __repr__(self) -> str:
        return f"ControlServer({str(self.path)!r})"

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)  # a stale socket of an agent that died
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=str(self.path), limit=MAX_LINE + 2)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        self.path.unlink(missing_ok=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            uid = _peer_uid(writer)
            if uid is not None and uid not in (0, os.geteuid()):
                answer: dict[str, Any] = {"ok": False, "error": "only root may control the agent", "field": "uid"}
            else:
                answer = await self._answer(reader)
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), 10)
            except (ValueError, asyncio.LimitOverrunError):
                raise ControlError(f"a request is at most {MAX_LINE} bytes", "request") from None
            except TimeoutError:
                raise ControlError("no request line within 10 s", "request") from None
            op, args = parse_request(line.strip())
            return {"ok": True, **await self.handlers[op](args)}
        except ControlError as exc:
            return {"ok": False, "error": exc.reason, "field": exc.field}


def request(state_dir: Path, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one request to the agent of ``state_dir`` and return its answer. NoAgent when
    no agent listens; TimeoutError when it does not answer within ``timeout``."""
    path = Path(state_dir) / SOCKET_NAME
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
            raise NoAgent(f"{exc.strerror}: {path}") from None
        except PermissionError:
            raise NoAgent(f"permission denied: {path} (run as root)") from None
        sock.sendall(json.dumps(body).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        raise NoAgent(f"the agent closed {path} without an answer")
    answer = json.loads(data)
    if not isinstance(answer, dict):
        raise TypeError("the agent's answer is not a JSON object")
    return answer
