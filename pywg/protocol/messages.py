"""The four WireGuard messages: exact sizes and offsets, parse and build.

Parsing never raises anything but MessageError, whose ``reason`` names the fault.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .actions import DropReason
from .constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    RESPONSE_SIZE,
    TRANSPORT_HEADER_SIZE,
    TRANSPORT_MIN_SIZE,
)


class MessageError(ValueError):
    def __init__(self, reason: DropReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason


_HEADER = struct.Struct("<I")
_INITIATION = struct.Struct("<II32s48s28s16s16s")
_RESPONSE = struct.Struct("<III32s16s16s16s")
_COOKIE_REPLY = struct.Struct("<II24s32s")
_TRANSPORT_HEADER = struct.Struct("<IIQ")

MAC1_OFFSET_INITIATION = 116
MAC1_OFFSET_RESPONSE = 60


@dataclass(frozen=True, slots=True)
class Initiation:
    sender_index: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes = bytes(16)
    mac2: bytes = bytes(16)

    def pack(self) -> bytes:
        return _INITIATION.pack(
            MESSAGE_INITIATION, self.sender_index, self.ephemeral, self.encrypted_static,
            self.encrypted_timestamp, self.mac1, self.mac2,
        )


@dataclass(frozen=True, slots=True)
class Response:
    sender_index: int
    receiver_index: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes = bytes(16)
    mac2: bytes = bytes(16)

    def pack(self) -> bytes:
        return _RESPONSE.pack(
            MESSAGE_RESPONSE, self.sender_index, self.receiver_index, self.ephemeral,
            self.encrypted_nothing, self.mac1, self.mac2,
        )


@dataclass(frozen=True, slots=True)
class CookieReply:
    receiver_index: int
    nonce: bytes
    encrypted_cookie: bytes

    def pack(self) -> bytes:
        return _COOKIE_REPLY.pack(
            MESSAGE_COOKIE_REPLY, self.receiver_index, self.nonce, self.encrypted_cookie
        )


@dataclass(frozen=True, slots=True)
class TransportHeader:
    receiver_index: int
    counter: int


Message = Initiation | Response | CookieReply | TransportHeader

_SIZES = {
    MESSAGE_INITIATION: INITIATION_SIZE,
    MESSAGE_RESPONSE: RESPONSE_SIZE,
    MESSAGE_COOKIE_REPLY: COOKIE_REPLY_SIZE,
}


def message_type(data: bytes) -> int:
    """The type of a datagram, checked for size; raises MessageError."""
    if len(data) < 4:
        raise MessageError(DropReason.UNKNOWN_PROTOCOL, f"{len(data)} bytes is shorter than a header")
    (mtype,) = _HEADER.unpack_from(data)
    if mtype == MESSAGE_TRANSPORT:
        if len(data) < TRANSPORT_MIN_SIZE:
            raise MessageError(DropReason.BAD_SIZE, f"transport of {len(data)} bytes")
        return mtype
    size = _SIZES.get(mtype)
    if size is None:
        raise MessageError(DropReason.UNKNOWN_PROTOCOL, f"type field {mtype:#x}")  # as the demux says
    if len(data) != size:
        raise MessageError(DropReason.BAD_SIZE, f"type {mtype} of {len(data)} bytes, want {size}")
    return mtype


def parse(data: bytes) -> Message:
    mtype = message_type(data)
    if mtype == MESSAGE_INITIATION:
        _, *fields = _INITIATION.unpack(data)
        return Initiation(*fields)
    if mtype == MESSAGE_RESPONSE:
        _, *fields = _RESPONSE.unpack(data)
        return Response(*fields)
    if mtype == MESSAGE_COOKIE_REPLY:
        _, *fields = _COOKIE_REPLY.unpack(data)
        return CookieReply(*fields)
    _, receiver, counter = _TRANSPORT_HEADER.unpack_from(data)
    return TransportHeader(receiver, counter)


def transport_header(receiver_index: int, counter: int) -> bytes:
    return _TRANSPORT_HEADER.pack(MESSAGE_TRANSPORT, receiver_index, counter)


def unpack_transport_header(data: bytes) -> tuple[int, int]:
    """(receiver_index, counter) of a datagram already checked by message_type."""
    _, receiver, counter = _TRANSPORT_HEADER.unpack_from(data)
    return receiver, counter


__all__ = [
    "TRANSPORT_HEADER_SIZE",
    "CookieReply",
    "Initiation",
    "Message",
    "MessageError",
    "Response",
    "TransportHeader",
    "message_type",
    "parse",
    "transport_header",
    "unpack_transport_header",
]
