"""DERP frames: every frame type of Tailscale's protocol (version 2), encode and decode.

A frame is ``type(1) || BE32 length || payload(length)``. ``FrameDecoder`` takes bytes from a
stream in any slicing and returns whole frames; it never raises anything but ``FrameError``,
whose ``reason`` names the fault. Unknown frame types are read and discarded, as both Go
sides do. Sans-I/O: no sockets, no clocks.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass, field

from .keys import KEY_LEN, NONCE_LEN, NodePublicKey

MAGIC = b"DERP\xf0\x9f\x94\x91"  # "DERP🔑"
PROTOCOL_VERSION = 2
HEADER_LEN = 5
MAX_PACKET_SIZE = 64 << 10  # packet bytes in SendPacket / RecvPacket / ForwardPacket
MAX_INFO_LEN = 1 << 20  # the sealed JSON of ServerInfo
MAX_FRAME_SIZE = 1 << 20  # the Go client's cap on any received frame
MAX_CLIENT_INFO_LEN = 256 << 10  # the server's cap on the ClientInfo frame
MIN_CLIENT_INFO_LEN = KEY_LEN + NONCE_LEN
PING_LEN = 8
MAX_PING_FRAME_LEN = 1000
SERVER_KEY_MIN_LEN = len(MAGIC) + KEY_LEN
PEER_PRESENT_FULL_LEN = KEY_LEN + 16 + 2 + 1

_HEADER = struct.Struct(">BI")
_RESTARTING = struct.Struct(">II")
_PORT = struct.Struct(">H")


class FrameType(enum.IntEnum):
    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    FORWARD_PACKET = 0x0A
    WATCH_CONNS = 0x10
    CLOSE_PEER = 0x11
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15


class PeerGoneReason(enum.IntEnum):
    DISCONNECTED = 0x00  # the peer left the region
    NOT_HERE = 0x01  # the server has no such peer (reply to a disco packet)
    MESH_CONN_BROKE = 0xF0  # local pseudo-reason, never on the wire


class PeerPresentFlags(enum.IntFlag):
    IS_REGULAR = 0x01
    IS_MESH_PEER = 0x02
    IS_PROBER = 0x04
    NOT_IDEAL = 0x08


class FrameErrorReason(enum.Enum):
    FRAME_TOO_LARGE = "frame_too_large"  # the header announces more than the decoder's cap
    PACKET_TOO_LARGE = "packet_too_large"  # over MAX_PACKET_SIZE bytes of packet data
    TRUNCATED = "truncated"  # the payload is shorter than its type requires
    BAD_LENGTH = "bad_length"  # a type with an exact or bounded length got another one
    BAD_MAGIC = "bad_magic"  # a ServerKey frame without "DERP🔑"
    UNKNOWN_TYPE = "unknown_type"  # only when the caller asked not to skip unknown types
    INCOMPLETE = "incomplete"  # the stream ended inside a frame


class FrameError(ValueError):
    """A frame that breaks the protocol; the connection that carried it must be closed."""

    def __init__(self, reason: FrameErrorReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.decoded: list[Frame] = []  # whole frames that came before the fault in the same feed


def _header(frame_type: FrameType, payload_len: int) -> bytes:
    return _HEADER.pack(frame_type, payload_len)


def _frame(frame_type: FrameType, *parts: bytes) -> bytes:
    payload = b"".join(parts)
    return _header(frame_type, len(payload)) + payload


def _check_packet(packet: bytes) -> None:
    if len(packet) > MAX_PACKET_SIZE:
        raise FrameError(FrameErrorReason.PACKET_TOO_LARGE,
                         f"{len(packet)} bytes of packet, the limit is {MAX_PACKET_SIZE}")


def _need(payload: bytes, minimum: int, what: str) -> None:
    if len(payload) < minimum:
        raise FrameError(FrameErrorReason.TRUNCATED,
                         f"{what}: {len(payload)} bytes, needs at least {minimum}")


def _exact(payload: bytes, length: int, what: str) -> None:
    if len(payload) != length:
        raise FrameError(FrameErrorReason.BAD_LENGTH, f"{what}: {len(payload)} bytes, must be {length}")


def _key(payload: bytes, offset: int = 0) -> NodePublicKey:
    return NodePublicKey(payload[offset:offset + KEY_LEN])


@dataclass(frozen=True, slots=True)
class ServerKey:
    """S->C, first frame: the magic and the server's public key (extra bytes are ignored)."""

    key: NodePublicKey
    TYPE = FrameType.SERVER_KEY

    def pack(self) -> bytes:
        return _frame(self.TYPE, MAGIC, self.key.raw)

    @classmethod
    def parse(cls, payload: bytes) -> ServerKey:
        _need(payload, SERVER_KEY_MIN_LEN, "ServerKey")
        if payload[:len(MAGIC)] != MAGIC:
            raise FrameError(FrameErrorReason.BAD_MAGIC, "ServerKey does not start with DERP🔑")
        return cls(_key(payload, len(MAGIC)))


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """C->S: the client's public key and the sealed JSON (``nonce || tag || ciphertext``)."""

    key: NodePublicKey
    sealed: bytes = field(repr=False)
    TYPE = FrameType.CLIENT_INFO

    def pack(self) -> bytes:
        return _frame(self.TYPE, self.key.raw, self.sealed)

    @classmethod
    def parse(cls, payload: bytes) -> ClientInfo:
        _need(payload, MIN_CLIENT_INFO_LEN, "ClientInfo")
        if len(payload) > MAX_CLIENT_INFO_LEN:
            raise FrameError(FrameErrorReason.BAD_LENGTH,
                             f"ClientInfo: {len(payload)} bytes, the limit is {MAX_CLIENT_INFO_LEN}")
        return cls(_key(payload), bytes(payload[KEY_LEN:]))


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """S->C: the sealed JSON (``nonce || tag || ciphertext``) from the server to the client."""

    sealed: bytes = field(repr=False)
    TYPE = FrameType.SERVER_INFO

    def pack(self) -> bytes:
        return _frame(self.TYPE, self.sealed)

    @classmethod
    def parse(cls, payload: bytes) -> ServerInfo:
        _need(payload, NONCE_LEN, "ServerInfo")
        if len(payload) > NONCE_LEN + MAX_INFO_LEN:
            raise FrameError(FrameErrorReason.BAD_LENGTH, f"ServerInfo: {len(payload)} bytes")
        return cls(bytes(payload))


@dataclass(frozen=True, slots=True)
class SendPacket:
    """C->S: a packet for the client with key ``dst``."""

    dst: NodePublicKey
    packet: bytes = field(repr=False)
    TYPE = FrameType.SEND_PACKET

    def pack(self) -> bytes:
        _check_packet(self.packet)
        return _frame(self.TYPE, self.dst.raw, self.packet)

    @classmethod
    def parse(cls, payload: bytes) -> SendPacket:
        _need(payload, KEY_LEN, "SendPacket")
        _check_packet(payload[KEY_LEN:])
        return cls(_key(payload), bytes(payload[KEY_LEN:]))


@dataclass(frozen=True, slots=True)
class RecvPacket:
    """S->C: a packet from the client with key ``src`` (protocol version 2 layout)."""

    src: NodePublicKey
    packet: bytes = field(repr=False)
    TYPE = FrameType.RECV_PACKET

    def pack(self) -> bytes:
        _check_packet(self.packet)
        return _frame(self.TYPE, self.src.raw, self.packet)

    @classmethod
    def parse(cls, payload: bytes) -> RecvPacket:
        _need(payload, KEY_LEN, "RecvPacket")
        _check_packet(payload[KEY_LEN:])
        return cls(_key(payload), bytes(payload[KEY_LEN:]))


@dataclass(frozen=True, slots=True)
class ForwardPacket:
    """Mesh C->S: a packet from ``src`` (on the sending server) for ``dst`` (on this one)."""

    src: NodePublicKey
    dst: NodePublicKey
    packet: bytes = field(repr=False)
    TYPE = FrameType.FORWARD_PACKET

    def pack(self) -> bytes:
        _check_packet(self.packet)
        return _frame(self.TYPE, self.src.raw, self.dst.raw, self.packet)

    @classmethod
    def parse(cls, payload: bytes) -> ForwardPacket:
        _need(payload, 2 * KEY_LEN, "ForwardPacket")
        _check_packet(payload[2 * KEY_LEN:])
        return cls(_key(payload), _key(payload, KEY_LEN), bytes(payload[2 * KEY_LEN:]))


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """S->C, every 60 s: no payload, no reply. Bytes after the header are ignored (as Go does)."""

    TYPE = FrameType.KEEP_ALIVE

    def pack(self) -> bytes:
        return _header(self.TYPE, 0)

    @classmethod
    def parse(cls, payload: bytes) -> KeepAlive:
        return cls()


@dataclass(frozen=True, slots=True)
class NotePreferred:
    """C->S: whether this server is the client's home (exactly one byte, 0x01 or 0x00)."""

    preferred: bool
    TYPE = FrameType.NOTE_PREFERRED

    def pack(self) -> bytes:
        return _frame(self.TYPE, b"\x01" if self.preferred else b"\x00")

    @classmethod
    def parse(cls, payload: bytes) -> NotePreferred:
        _exact(payload, 1, "NotePreferred")
        return cls(payload[0] != 0)


@dataclass(frozen=True, slots=True)
class PeerGone:
    """S->C: ``peer`` is gone (or was never here); older servers send no reason byte."""

    peer: NodePublicKey
    reason: int = PeerGoneReason.DISCONNECTED
    TYPE = FrameType.PEER_GONE

    def pack(self) -> bytes:
        return _frame(self.TYPE, self.peer.raw, bytes([self.reason]))

    @classmethod
    def parse(cls, payload: bytes) -> PeerGone:
        _need(payload, KEY_LEN, "PeerGone")
        raw = payload[KEY_LEN] if len(payload) > KEY_LEN else 0
        try:
            reason: int = PeerGoneReason(raw)
        except ValueError:
            reason = raw
        return cls(_key(payload), reason)


@dataclass(frozen=True, slots=True)
class PeerPresent:
    """S->C (watchers): ``peer`` connected; older servers omit the endpoint and then the flags."""

    peer: NodePublicKey
    endpoint: tuple[str, int] | None = None
    flags: PeerPresentFlags | None = None
    TYPE = FrameType.PEER_PRESENT

    def pack(self) -> bytes:
        parts = [self.peer.raw]
        if self.endpoint is not None:
            ip = ipaddress.ip_address(self.endpoint[0])
            ip6 = ip if ip.version == 6 else ipaddress.IPv6Address(f"::ffff:{ip}")
            parts += [ip6.packed, _PORT.pack(self.endpoint[1])]
            if self.flags is not None:
                parts.append(bytes([self.flags]))
        elif self.flags is not None:
            raise ValueError("PeerPresent flags need an endpoint before them")
        return _frame(self.TYPE, *parts)

    @classmethod
    def parse(cls, payload: bytes) -> PeerPresent:
        _need(payload, KEY_LEN, "PeerPresent")
        endpoint = None
        flags = None
        if len(payload) >= KEY_LEN + 18:
            ip6 = ipaddress.IPv6Address(bytes(payload[KEY_LEN:KEY_LEN + 16]))
            ip = ip6.ipv4_mapped or ip6
            (port,) = _PORT.unpack_from(payload, KEY_LEN + 16)
            endpoint = (str(ip), port)
            if len(payload) >= PEER_PRESENT_FULL_LEN:
                flags = PeerPresentFlags(payload[KEY_LEN + 18])
        return cls(_key(payload), endpoint, flags)


@dataclass(frozen=True, slots=True)
class WatchConns:
    """Mesh C->S: send me PeerPresent/PeerGone for every client (no payload)."""

    TYPE = FrameType.WATCH_CONNS

    def pack(self) -> bytes:
        return _header(self.TYPE, 0)

    @classmethod
    def parse(cls, payload: bytes) -> WatchConns:
        _exact(payload, 0, "WatchConns")
        return cls()


@dataclass(frozen=True, slots=True)
class ClosePeer:
    """Mesh C->S: close every local connection of ``peer``."""

    peer: NodePublicKey
    TYPE = FrameType.CLOSE_PEER

    def pack(self) -> bytes:
        return _frame(self.TYPE, self.peer.raw)

    @classmethod
    def parse(cls, payload: bytes) -> ClosePeer:
        _exact(payload, KEY_LEN, "ClosePeer")
        return cls(_key(payload))


def _ping_data(payload: bytes, what: str) -> bytes:
    _need(payload, PING_LEN, what)
    if len(payload) > MAX_PING_FRAME_LEN:
        raise FrameError(FrameErrorReason.BAD_LENGTH,
                         f"{what}: {len(payload)} bytes, the limit is {MAX_PING_FRAME_LEN}")
    return bytes(payload[:PING_LEN])


@dataclass(frozen=True, slots=True)
class Ping:
    """Either way: 8 opaque bytes to be echoed in a Pong (a longer payload's first 8)."""

    data: bytes
    TYPE = FrameType.PING

    def pack(self) -> bytes:
        if len(self.data) != PING_LEN:
            raise ValueError(f"Ping data must be {PING_LEN} bytes")
        return _frame(self.TYPE, self.data)

    @classmethod
    def parse(cls, payload: bytes) -> Ping:
        return cls(_ping_data(payload, "Ping"))


@dataclass(frozen=True, slots=True)
class Pong:
    """Either way: the 8 bytes of the Ping it answers."""

    data: bytes
    TYPE = FrameType.PONG

    def pack(self) -> bytes:
        if len(self.data) != PING_LEN:
            raise ValueError(f"Pong data must be {PING_LEN} bytes")
        return _frame(self.TYPE, self.data)

    @classmethod
    def parse(cls, payload: bytes) -> Pong:
        return cls(_ping_data(payload, "Pong"))


@dataclass(frozen=True, slots=True)
class Health:
    """S->C: the server's problem as text; the empty string means healthy again."""

    problem: str
    TYPE = FrameType.HEALTH

    def pack(self) -> bytes:
        return _frame(self.TYPE, self.problem.encode())

    @classmethod
    def parse(cls, payload: bytes) -> Health:
        return cls(bytes(payload).decode("utf-8", errors="replace"))


@dataclass(frozen=True, slots=True)
class Restarting:
    """S->C, advisory: reconnect in ``reconnect_in_ms`` and keep trying for ``try_for_ms``."""

    reconnect_in_ms: int
    try_for_ms: int
    TYPE = FrameType.RESTARTING

    def pack(self) -> bytes:
        return _frame(self.TYPE, _RESTARTING.pack(self.reconnect_in_ms, self.try_for_ms))

    @classmethod
    def parse(cls, payload: bytes) -> Restarting:
        _need(payload, _RESTARTING.size, "Restarting")
        return cls(*_RESTARTING.unpack_from(payload))


Frame = (ServerKey | ClientInfo | ServerInfo | SendPacket | RecvPacket | ForwardPacket | KeepAlive
         | NotePreferred | PeerGone | PeerPresent | WatchConns | ClosePeer | Ping | Pong | Health
         | Restarting)

FRAME_CLASSES: dict[FrameType, type[Frame]] = {
    cls.TYPE: cls for cls in (ServerKey, ClientInfo, ServerInfo, SendPacket, RecvPacket, ForwardPacket,
                              KeepAlive, NotePreferred, PeerGone, PeerPresent, WatchConns, ClosePeer,
                              Ping, Pong, Health, Restarting)
}


def parse_payload(frame_type: int, payload: bytes) -> Frame:
    """The frame of this type and payload; FrameError (UNKNOWN_TYPE for a type not in the table)."""
    try:
        cls = FRAME_CLASSES[FrameType(frame_type)]
    except ValueError:
        raise FrameError(FrameErrorReason.UNKNOWN_TYPE, f"frame type 0x{frame_type:02x}") from None
    return cls.parse(payload)


class FrameDecoder:
    """Incremental frame decoder: ``feed`` bytes as they arrive, get the whole frames.

    A frame whose header announces more than ``max_frame_size`` payload bytes is refused as
    soon as its header arrives (nothing is buffered for it). After a FrameError the decoder
    stays failed: every later ``feed`` raises the same error, since the stream is lost.
    Unknown types are skipped (counted in ``unknown_skipped``) unless ``skip_unknown`` is off.
    """

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE, *, skip_unknown: bool = True) -> None:
        self.max_frame_size = max_frame_size
        self.skip_unknown = skip_unknown
        self.unknown_skipped = 0
        self.frames_decoded = 0
        self._buffer = bytearray()
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        """Add ``data`` from the stream; return the frames it completed, in order."""
        if self._error is not None:
            raise FrameError(self._error.reason, f"the decoder already failed ({self._error.detail})")
        self._buffer += data
        frames: list[Frame] = []
        offset = 0
        buffer = self._buffer
        try:
            while len(buffer) - offset >= HEADER_LEN:
                frame_type, length = _HEADER.unpack_from(buffer, offset)
                if length > self.max_frame_size:
                    raise FrameError(FrameErrorReason.FRAME_TOO_LARGE,
                                     f"type 0x{frame_type:02x} announces {length} bytes, "
                                     f"the limit is {self.max_frame_size}")
                end = offset + HEADER_LEN + length
                if len(buffer) < end:
                    break
                payload = bytes(buffer[offset + HEADER_LEN:end])
                offset = end
                if frame_type not in _KNOWN_TYPES:
                    if not self.skip_unknown:
                        raise FrameError(FrameErrorReason.UNKNOWN_TYPE, f"frame type 0x{frame_type:02x}")
                    self.unknown_skipped += 1
                    continue
                frames.append(FRAME_CLASSES[FrameType(frame_type)].parse(payload))
                self.frames_decoded += 1
        except FrameError as exc:
            exc.decoded = frames
            self._error = exc
            self._buffer = bytearray()
            raise
        del buffer[:offset]
        return frames

    def close(self) -> None:
        """The stream ended: FrameError(INCOMPLETE) if it ended inside a frame."""
        if self._buffer and self._error is None:
            self._error = FrameError(FrameErrorReason.INCOMPLETE,
                                     f"the stream ended with {len(self._buffer)} bytes of a frame")
            raise self._error


_KNOWN_TYPES = frozenset(int(t) for t in FrameType)
