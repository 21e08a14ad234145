"""The client side of the UAPI socket (``/var/run/wireguard/IFNAME.sock``), for asyncio.

One request per connection, as ``wg`` does (wireguard-go's reader may lose what follows
a set in the same read). A response is read up to the blank line after its ``errno=``
line. Cancelling a call closes the connection; a request already written may still be
carried out by the server (the manager deals with that, see ``pywg.manage.tunnel``).
"""

from __future__ import annotations

import asyncio
import errno as _errno
from pathlib import Path

from pywg.uapi.protocol import (
    GET_REQUEST,
    IPC_ERROR_PROTOCOL,
    DeviceSnapshot,
    SetRequest,
    UapiError,
    format_set,
    parse_get,
)

SOCKET_DIR = Path("/var/run/wireguard")
MAX_RESPONSE_BYTES = 16 << 20  # a get with ~100k allowed IPs fits
LINE_LIMIT = 1 << 17


class UapiUnavailable(OSError):
    """Nobody serves the socket: it does not exist, or connecting to it is refused."""


def socket_path(ifname: str, directory: Path = SOCKET_DIR) -> Path:
    return directory / f"{ifname}.sock"


def errno_name(code: int) -> str:
    """``-98`` -> ``"EADDRINUSE"`` (wire errnos are negative); ``"errno 55"`` when unknown."""
    return _errno.errorcode.get(abs(code), f"errno {abs(code)}")


async def answers(path: Path) -> bool:
    """Whether a server accepts connections on ``path``."""
    try:
        _, writer = await asyncio.open_unix_connection(str(path))
    except OSError:
        return False
    writer.close()
    return True


async def read_response(reader: asyncio.StreamReader) -> str:
    """Lines up to and including the blank one after ``errno=N``."""
    lines: list[bytes] = []
    size = 0
    seen_errno = False
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # a line longer than LINE_LIMIT
            raise UapiError(IPC_ERROR_PROTOCOL, f"the response has a line over {LINE_LIMIT} bytes") from None
        if not line.endswith(b"\n"):
            raise UapiError(IPC_ERROR_PROTOCOL, "the server hung up before finishing its response")
        size += len(line)
        if size > MAX_RESPONSE_BYTES:
            raise UapiError(IPC_ERROR_PROTOCOL, f"the response is larger than {MAX_RESPONSE_BYTES} bytes")
        lines.append(line)
        if seen_errno:
            if line != b"\n":
                raise UapiError(IPC_ERROR_PROTOCOL, "no blank line after errno=")
            return b"".join(lines).decode("utf-8", "replace")
        seen_errno = line.startswith(b"errno=")


async def exchange(path: Path, request: str) -> str:
    """Send one request (``get=1\\n\\n`` or ``set=1\\n...\\n\\n``) and return the response text.

    Raises UapiUnavailable when nobody serves ``path``, UapiError when the response is
    malformed or cut short. The errno in the response is not interpreted here.
    """
    try:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=LINE_LIMIT)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
        raise UapiUnavailable(exc.errno, f"nobody serves {path}: {exc.strerror}") from None
    try:
        writer.write(request.encode())
        await writer.drain()
        return await read_response(reader)
    except (ConnectionError, BrokenPipeError) as exc:
        raise UapiError(IPC_ERROR_PROTOCOL, f"the connection to {path} broke: {exc}") from None
    finally:
        writer.close()


def response_errno(response: str) -> int:
    """The ``errno=N`` of a response (negative on failure, as on the wire)."""
    lines = response.rstrip("\n").split("\n")
    last = lines[-1] if lines else ""
    if not last.startswith("errno="):
        raise UapiError(IPC_ERROR_PROTOCOL, "the response has no errno= line")
    try:
        return int(last[len("errno="):])
    except ValueError:
        raise UapiError(IPC_ERROR_PROTOCOL, f"bad errno line {last[:32]!r}") from None


async def get(path: Path) -> DeviceSnapshot:
    """The device's configuration and counters; UapiError if it answers with an errno."""
    return parse_get(await exchange(path, GET_REQUEST))


async def set_device(path: Path, request: SetRequest) -> None:
    """Send a set request; UapiError carrying the server's errno if it refuses."""
    code = response_errno(await exchange(path, format_set(request)))
    if code:
        raise UapiError(code, f"the set request was refused ({errno_name(code)})")

