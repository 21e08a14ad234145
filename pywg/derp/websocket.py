"""DERP over WebSocket (RFC 6455), the server side, without I/O.

derper accepts ``Upgrade: websocket`` at ``/derp`` when ``Sec-WebSocket-Protocol`` offers
``derp``: it answers 101 with that subprotocol (no compression), and the DERP byte stream then
travels in binary messages whose boundaries need not match DERP frames. ``ServerStream`` turns
what the client sends into that byte stream (answering pings and the closing handshake) and
wraps what the relay sends in unmasked binary frames. Every breach of RFC 6455 (an unmasked
client frame, reserved bits, a text message, a control frame over 125 bytes or fragmented, an
oversized frame, an unknown opcode) ends the stream with a Close frame naming the fault.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import struct
from dataclasses import dataclass

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUBPROTOCOL = "derp"
MAX_FRAME_PAYLOAD = 1 << 20  # one DERP frame is at most 64 KiB + 69; a message may carry several


class Opcode(enum.IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    MESSAGE_TOO_BIG = 1009


def accept_key(client_key: str) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1((client_key + GUID).encode("latin-1")).digest()).decode()


def valid_client_key(client_key: str) -> bool:
    """A ``Sec-WebSocket-Key`` is base64 of 16 bytes."""
    try:
        return len(base64.b64decode(client_key, validate=True)) == 16
    except ValueError:
        return False


def offers_derp(protocols: str) -> bool:
    """Whether a ``Sec-WebSocket-Protocol`` list offers ``derp``."""
    return SUBPROTOCOL in (p.strip().lower() for p in protocols.split(","))


def encode_frame(opcode: Opcode, payload: bytes, *, mask: bytes | None = None, fin: bool = True) -> bytes:
    """One frame; ``mask`` (4 bytes) as a client must, none as a server must."""
    first = (0x80 if fin else 0) | opcode
    length = len(payload)
    mask_bit = 0x80 if mask is not None else 0
    if length < 126:
        head = struct.pack(">BB", first, mask_bit | length)
    elif length < 1 << 16:
        head = struct.pack(">BBH", first, mask_bit | 126, length)
    else:
        head = struct.pack(">BBQ", first, mask_bit | 127, length)
    if mask is None:
        return head + payload
    if len(mask) != 4:
        raise ValueError("mask: must be 4 bytes")
    return head + mask + _unmask(payload, mask)


def _unmask(payload: bytes, mask: bytes) -> bytes:
    if not payload:
        return b""
    repeated = (mask * (len(payload) // 4 + 1))[:len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(payload), "big")


class WebSocketError(ValueError):
    """The client broke RFC 6455; the stream ends with a Close carrying ``code``."""

    def __init__(self, code: CloseCode, detail: str) -> None:
        super().__init__(f"{code.name.lower()}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Received:
    """What some client bytes meant: DERP stream bytes, bytes to send back, whether it ended."""

    data: bytes = b""
    reply: bytes = b""
    closed: bool = False
    error: WebSocketError | None = None


class ServerStream:
    """One WebSocket connection's server side, after the 101."""

    def __init__(self, max_frame_payload: int = MAX_FRAME_PAYLOAD) -> None:
        self.max_frame_payload = max_frame_payload
        self.closed = False
        self.pings_answered = 0
        self._buffer = bytearray()
        self._in_message = False  # a binary message is open (continuations may follow)

    def wrap(self, data: bytes) -> bytes:
        """The relay's DERP bytes as one binary frame (empty for no bytes)."""
        return encode_frame(Opcode.BINARY, data) if data and not self.closed else b""

    def close_frame(self, code: CloseCode = CloseCode.GOING_AWAY, reason: str = "") -> bytes:
        """Start the closing handshake from the server side (graceful stop)."""
        if self.closed:
            return b""
        self.closed = True
        return encode_frame(Opcode.CLOSE, struct.pack(">H", code) + reason.encode()[:123])

    def receive(self, data: bytes) -> Received:
        """Feed bytes from the client; never raises (a fault is in ``Received.error``)."""
        if self.closed:
            return Received(closed=True)
        self._buffer += data
        out: list[bytes] = []
        reply: list[bytes] = []
        try:
            while True:
                frame = self._next_frame()
                if frame is None:
                    break
                opcode, payload, fin = frame
                if opcode in (Opcode.BINARY, Opcode.CONTINUATION):
                    if (opcode is Opcode.CONTINUATION) != self._in_message:
                        raise WebSocketError(CloseCode.PROTOCOL_ERROR,
                                             "a continuation outside a message" if opcode is Opcode.CONTINUATION
                                             else "a new message inside a fragmented one")
                    self._in_message = not fin
                    out.append(payload)
                elif opcode is Opcode.PING:
                    reply.append(encode_frame(Opcode.PONG, payload))
                    self.pings_answered += 1
                elif opcode is Opcode.CLOSE:
                    code = payload[:2] if len(payload) >= 2 else b""
                    reply.append(encode_frame(Opcode.CLOSE, code))
                    self.closed = True
                    return Received(b"".join(out), b"".join(reply), True)
                # PONG: nothing to do
        except WebSocketError as exc:
            self.closed = True
            self._buffer = bytearray()
            reply.append(encode_frame(Opcode.CLOSE, struct.pack(">H", exc.code) + exc.detail.encode()[:120]))
            return Received(b"".join(out), b"".join(reply), True, exc)
        return Received(b"".join(out), b"".join(reply))

    def _next_frame(self) -> tuple[Opcode, bytes, bool] | None:
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        first, second = buffer[0], buffer[1]
        if first & 0x70:
            raise WebSocketError(CloseCode.PROTOCOL_ERROR, "reserved bits set (no extension was agreed)")
        if not second & 0x80:
            raise WebSocketError(CloseCode.PROTOCOL_ERROR, "a client frame must be masked")
        try:
            opcode = Opcode(first & 0x0F)
        except ValueError:
            raise WebSocketError(CloseCode.PROTOCOL_ERROR, f"unknown opcode 0x{first & 0x0F:x}") from None
        if opcode is Opcode.TEXT:
            raise WebSocketError(CloseCode.UNSUPPORTED_DATA, "DERP travels in binary messages, not text")
        fin = bool(first & 0x80)
        length = second & 0x7F
        offset = 2
        if length == 126:
            if len(buffer) < 4:
                return None
            (length,) = struct.unpack_from(">H", buffer, 2)
            offset = 4
        elif length == 127:
            if len(buffer) < 10:
                return None
            (length,) = struct.unpack_from(">Q", buffer, 2)
            offset = 10
        if opcode >= Opcode.CLOSE and (length > 125 or not fin):
            raise WebSocketError(CloseCode.PROTOCOL_ERROR, "a control frame over 125 bytes or fragmented")
        if length > self.max_frame_payload:
            raise WebSocketError(CloseCode.MESSAGE_TOO_BIG,
                                 f"a frame of {length} bytes, the limit is {self.max_frame_payload}")
        end = offset + 4 + length
        if len(buffer) < end:
            return None
        mask = bytes(buffer[offset:offset + 4])
        payload = _unmask(bytes(buffer[offset + 4:end]), mask)
        del buffer[:end]
        return opcode, payload, fin
