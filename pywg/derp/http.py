"""The HTTP/1.1 upgrade that opens a DERP connection, without I/O.

The client writes ``GET /derp HTTP/1.1`` with ``Upgrade: DERP`` and ``Connection: Upgrade``
and reads the answer by hand: derper writes the 101 headers and the ServerKey frame back to
back, so the bytes after the blank line belong to the DERP stream (``UpgradeResponse.leftover``).
Fast start (``Derp-Fast-Start: 1``, no 101 at all) needs the server key from a TLS meta
certificate; this client does not use it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .keys import KeyFormatError, NodePublicKey

DERP_PATH = "/derp"
MAX_RESPONSE_HEAD = 16 << 10
IDEAL_NODE_HEADER = "Ideal-Node"
FAST_START_HEADER = "Derp-Fast-Start"


class UpgradeErrorReason(enum.Enum):
    NOT_HTTP = "not_http"  # the status line is not HTTP/1.x NNN
    BAD_STATUS = "bad_status"  # any status but 101 (derper answers 426 to a plain GET)
    HEAD_TOO_LARGE = "head_too_large"  # no blank line within MAX_RESPONSE_HEAD bytes
    MALFORMED_HEADER = "malformed_header"
    NOT_DERP = "not_derp"  # a 101 that upgrades to something else
    INCOMPLETE = "incomplete"  # the stream ended before the blank line


class UpgradeError(Exception):
    """The server did not switch to DERP; ``status`` is its HTTP status when it sent one."""

    def __init__(self, reason: UpgradeErrorReason, detail: str, status: int | None = None) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.status = status


def _header_value(name: str, value: str) -> str:
    if any(c in value for c in "\r\n\0") or not value:
        raise ValueError(f"{name}: must be non-empty and without line breaks")
    return value


def build_upgrade_request(host: str, *, path: str = DERP_PATH, ideal_node: str | None = None,
                          fast_start: bool = False) -> bytes:
    """The request bytes. ``host`` is the Host header (``name`` or ``name:port``)."""
    _header_value("host", host)
    if not path.startswith("/") or any(c in path for c in " \r\n\0"):
        raise ValueError("path: must start with / and contain no spaces or line breaks")
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: DERP", "Connection: Upgrade"]
    if ideal_node is not None:
        lines.append(f"{IDEAL_NODE_HEADER}: {_header_value('ideal_node', ideal_node)}")
    if fast_start:
        lines.append(f"{FAST_START_HEADER}: 1")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass(frozen=True, slots=True)
class UpgradeResponse:
    """A 101 answer: its headers (names lower-cased) and the DERP bytes that followed it."""

    status: int
    headers: dict[str, str]
    leftover: bytes = field(repr=False)

    @property
    def derp_version(self) -> int | None:
        value = self.headers.get("derp-version", "")
        return int(value) if value.isascii() and value.isdigit() else None

    @property
    def server_key(self) -> NodePublicKey | None:
        """``Derp-Public-Key`` (untyped hex), when present and well formed."""
        value = self.headers.get("derp-public-key")
        if value is None:
            return None
        try:
            return NodePublicKey.from_text(value)
        except KeyFormatError:
            return None


class UpgradeResponseParser:
    """Feed bytes from the server until ``feed`` returns the response; raises UpgradeError only."""

    def __init__(self, max_head: int = MAX_RESPONSE_HEAD) -> None:
        self.max_head = max_head
        self._buffer = bytearray()

    def feed(self, data: bytes) -> UpgradeResponse | None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > self.max_head:
                raise UpgradeError(UpgradeErrorReason.HEAD_TOO_LARGE,
                                   f"no end of headers in {len(self._buffer)} bytes")
            return None
        if end > self.max_head:
            raise UpgradeError(UpgradeErrorReason.HEAD_TOO_LARGE, f"a head of {end} bytes")
        head = bytes(self._buffer[:end]).decode("latin-1")
        leftover = bytes(self._buffer[end + 4:])
        status_line, *header_lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        if (len(parts) < 2 or parts[0] not in ("HTTP/1.1", "HTTP/1.0") or len(parts[1]) != 3
                or not (parts[1].isascii() and parts[1].isdigit())):
            raise UpgradeError(UpgradeErrorReason.NOT_HTTP, f"status line {status_line[:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip() or " " in name:
                raise UpgradeError(UpgradeErrorReason.MALFORMED_HEADER, f"header line {line[:80]!r}", status)
            headers[name.lower()] = value.strip()
        if status != 101:
            body = leftover[:200].decode("utf-8", errors="replace").strip()
            raise UpgradeError(UpgradeErrorReason.BAD_STATUS,
                               f"HTTP {status} {parts[2] if len(parts) > 2 else ''}".strip()
                               + (f": {body}" if body else ""), status)
        upgrade = headers.get("upgrade", "").lower()
        if upgrade and upgrade != "derp":
            raise UpgradeError(UpgradeErrorReason.NOT_DERP, f"Upgrade: {headers['upgrade']}", status)
        return UpgradeResponse(status, headers, leftover)

    def close(self) -> None:
        """The stream ended: always raises UpgradeError(INCOMPLETE)."""
        raise UpgradeError(UpgradeErrorReason.INCOMPLETE,
                           f"the connection closed after {len(self._buffer)} bytes of the response")
