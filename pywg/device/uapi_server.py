"""The UAPI socket, /var/run/wireguard/IFNAME.sock, as wireguard-go serves it.

The directory is 0755 root, the socket 0600: only root configures the interface. Each
connection may carry several requests; a bad one is answered with its errno and the
connection (and the daemon) keeps serving, except after a framing error that cannot be
resynchronised, where the connection is closed as wireguard-go closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Protocol

from pywg.uapi.protocol import (
    IPC_ERROR_PROTOCOL,
    IPC_ERROR_UNKNOWN,
    DeviceSnapshot,
    RequestReader,
    SetRequest,
    UapiError,
    format_errno,
    format_get,
    parse_set,
)

log = logging.getLogger(__name__)

SOCKET_DIR = Path("/var/run/wireguard")
READ_SIZE = 65536


class Configurable(Protocol):
    def snapshot(self) -> DeviceSnapshot: ...
    def apply(self, request: SetRequest) -> None: ...  # raises UapiError; all or nothing


def _socket_in_use(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class UapiServer:
    def __init__(self, path: Path, server: asyncio.AbstractServer) -> None:
        self.path = path
        self._server = server
        self._connections: set[asyncio.Task[None]] = set()

    @classmethod
    async def start(cls, ifname: str, device: Configurable, directory: Path = SOCKET_DIR) -> UapiServer:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(directory, 0o755)
        path = directory / f"{ifname}.sock"
        if path.exists():
            if _socket_in_use(path):
                raise OSError(f"{path} is served by another process: is {ifname} already running?")
            path.unlink()
        holder: dict[str, UapiServer] = {}

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            holder["server"]._connections.add(task)
            try:
                await _serve_connection(device, reader, writer)
            finally:
                holder["server"]._connections.discard(task)

        # Listening on a private name first, then renamed into place: the socket's path
        # appears only once it accepts connections (whoever waits for it, as wg-quick and
        # test beds do, never meets a refused connection).
        pending = directory / f".{ifname}.sock.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            pending.unlink()
        old_umask = os.umask(0o077)
        try:
            server = await asyncio.start_unix_server(handle, path=str(pending))
        finally:
            os.umask(old_umask)
        os.chmod(pending, 0o600)
        os.rename(pending, path)
        holder["server"] = cls(path, server)
        return holder["server"]

    async def close(self) -> None:
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)


def answer(device: Configurable, op: str, pairs: list[tuple[str, str]]) -> str:
    """The reply to one framed request."""
    try:
        if op == "get":
            return format_get(device.snapshot())
        device.apply(parse_set(pairs))
        return format_errno(0)
    except UapiError as exc:
        log.info("UAPI %s refused: %s", op, exc)
        return exc.response()
    except Exception:  # a bug must not take the daemon down: answer, log, go on
        log.exception("UAPI %s failed", op)
        return format_errno(IPC_ERROR_UNKNOWN)


async def _serve_connection(device: Configurable, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
    requests = RequestReader()
    try:
        while True:
            data = await reader.read(READ_SIZE)
            eof = not data
            pending = requests.feed_eof() if eof else requests.feed(data)
            while True:
                try:
                    for request in pending:
                        writer.write(answer(device, request.op, request.pairs).encode())
                    break
                except UapiError as exc:
                    if exc.fatal:  # cannot resynchronise: hang up (an unknown operation unanswered)
                        if exc.errno != IPC_ERROR_PROTOCOL:
                            writer.write(exc.response().encode())
                        return
                    writer.write(exc.response().encode())  # consumed: go on with what is buffered
                    pending = requests.feed_eof() if eof else requests.feed(b"")
            await writer.drain()
            if eof:
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(Exception):
            await writer.drain()
        writer.close()
