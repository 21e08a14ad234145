"""A root-only socket that answers every connection with the device's counters as JSON:
/var/run/pywg/IFNAME.stats (directory 0700, socket 0600). ``pywg stats IFNAME`` reads it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

STATS_DIR = Path("/var/run/pywg")


def stats_path(ifname: str, directory: Path = STATS_DIR) -> Path:
    return directory / f"{ifname}.stats"


class StatsServer:
    def __init__(self, path: Path, server: asyncio.AbstractServer) -> None:
        self.path = path
        self._server = server

    @classmethod
    async def start(cls, ifname: str, stats: Callable[[], dict[str, object]],
                    directory: Path = STATS_DIR) -> StatsServer:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        path = stats_path(ifname, directory)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

        async def handle(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(json.dumps(stats(), indent=2).encode() + b"\n")
                await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()

        old_umask = os.umask(0o077)
        try:
            server = await asyncio.start_unix_server(handle, path=str(path))
        finally:
            os.umask(old_umask)
        return cls(path, server)

    async def close(self) -> None:
        self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def read_stats(ifname: str, directory: Path = STATS_DIR) -> dict[str, object]:
    """Ask a running daemon for its counters."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(stats_path(ifname, directory)))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    result: dict[str, object] = json.loads(b"".join(chunks))
    return result
