"""STUN messages (RFC 8489, compatible with RFC 5389): a sans-I/O codec and a Binding responder.

``parse`` turns one datagram into a ``StunMessage`` or raises ``StunError`` (its ``reason``
names what is wrong); ``encode`` is its inverse. Attributes are decoded through one table
(``ATTRIBUTES``: code point -> name, decoder, encoder). Unknown comprehension-optional
attributes (0x8000-0xFFFF) are skipped; unknown comprehension-required ones (0x0000-0x7FFF)
are listed in ``StunMessage.unknown_required`` for the caller to answer (420) or fail on.
A FINGERPRINT, when present, is checked by ``parse`` and must be the last attribute;
MESSAGE-INTEGRITY (HMAC-SHA1) is kept with its offset so ``verify_integrity`` can check it
against a short-term or long-term key.

``binding_request`` builds the Binding request in the exact form Tailscale sends (SOFTWARE
``tailnode``, FINGERPRINT last), which Tailscale's own STUN servers require; any other STUN
server accepts it too. ``answer_binding`` is a tiny STUN server: a Binding request in, the
success response carrying the requester's XOR-MAPPED-ADDRESS out; ``BindingResponder`` wraps
it for a server socket (never raises, counts what it drops).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import stringprep
import struct
import unicodedata
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, NamedTuple

MAGIC_COOKIE = 0x2112A442
MAGIC_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
HEADER_LENGTH = 20
TRANSACTION_ID_LENGTH = 12
FINGERPRINT_XOR = 0x5354554E
INTEGRITY_LENGTH = 20
DEFAULT_PORT = 3478
# Tailscale's STUN server answers only requests whose SOFTWARE is exactly this.
TAILSCALE_SOFTWARE = "tailnode"
BINDING = 0x001
# RFC 8489 section 14: limits on the text attributes, in bytes of UTF-8.
_TEXT_LIMITS = {"USERNAME": 513, "REALM": 763, "NONCE": 763, "SOFTWARE": 763}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class StunError(ValueError):
    """A datagram that is not a well-formed STUN message; ``reason`` says what is wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StunClass(IntEnum):
    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class Attr(IntEnum):
    """Attribute code points (RFC 8489 section 18.3, RFC 8445, RFC 5780)."""

    MAPPED_ADDRESS = 0x0001
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    REALM = 0x0014
    NONCE = 0x0015
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    PASSWORD_ALGORITHM = 0x001D
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020
    PRIORITY = 0x0024
    USE_CANDIDATE = 0x0025
    PASSWORD_ALGORITHMS = 0x8002
    ALTERNATE_DOMAIN = 0x8003
    # The code point XOR-MAPPED-ADDRESS had in the drafts; some servers still send it.
    XOR_MAPPED_ADDRESS_DRAFT = 0x8020
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    ICE_CONTROLLED = 0x8029
    ICE_CONTROLLING = 0x802A
    RESPONSE_ORIGIN = 0x802B
    OTHER_ADDRESS = 0x802C


@dataclass(frozen=True, order=True)
class TransportAddress:
    """An IP address and a UDP port."""

    ip: IPAddress
    port: int

    @classmethod
    def of(cls, host: str | IPAddress, port: int) -> TransportAddress:
        """From a socket address; an IPv4-mapped IPv6 address becomes the IPv4 one."""
        ip = ipaddress.ip_address(host)
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} is out of range 0-65535")
        return cls(ip, port).unmapped()

    def unmapped(self) -> TransportAddress:
        if isinstance(self.ip, ipaddress.IPv6Address) and self.ip.ipv4_mapped is not None:
            return TransportAddress(self.ip.ipv4_mapped, self.port)
        return self

    def as_tuple(self) -> tuple[str, int]:
        return str(self.ip), self.port

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.ip.version == 6 else f"{self.ip}:{self.port}"


class ErrorCode(NamedTuple):
    """ERROR-CODE: a code 300-699 and its reason phrase."""

    code: int
    reason: str


@dataclass(frozen=True)
class StunMessage:
    """One STUN message. ``attributes`` are (code point, decoded value) in wire order, without
    MESSAGE-INTEGRITY and FINGERPRINT, which ``integrity`` and ``fingerprint`` stand for."""

    method: int
    cls: StunClass
    transaction_id: bytes
    attributes: tuple[tuple[int, Any], ...] = ()
    fingerprint: bool = False
    unknown_required: tuple[int, ...] = ()
    integrity: bytes | None = field(default=None, compare=False)
    raw: bytes = field(default=b"", repr=False, compare=False)
    integrity_offset: int | None = field(default=None, repr=False, compare=False)

    def get(self, attr: int) -> Any:
        """The first value of attribute ``attr`` (RFC 8489: later duplicates are ignored), or None."""
        for code, value in self.attributes:
            if code == attr:
                return value
        return None

    @property
    def mapped_address(self) -> TransportAddress | None:
        """The reflexive address: XOR-MAPPED-ADDRESS, else its draft code point, else
        MAPPED-ADDRESS; IPv4-mapped IPv6 is unmapped (a dual-stack server may send it)."""
        for attr in (Attr.XOR_MAPPED_ADDRESS, Attr.XOR_MAPPED_ADDRESS_DRAFT, Attr.MAPPED_ADDRESS):
            address = self.get(attr)
            if address is not None:
                return address.unmapped()
        return None

    @property
    def error_code(self) -> ErrorCode | None:
        return self.get(Attr.ERROR_CODE)


# -- message type ----------------------------------------------------------------------------

def message_type(method: int, cls: int) -> int:
    """The 14-bit message type: the class bits C1 C0 interleaved with the 12 method bits."""
    if not 0 <= method <= 0xFFF:
        raise ValueError(f"STUN method {method:#x} does not fit 12 bits")
    return ((method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2)
            | ((cls & 1) << 4) | ((cls & 2) << 7))


def split_message_type(value: int) -> tuple[int, StunClass]:
    method = (value & 0x000F) | ((value & 0x00E0) >> 1) | ((value & 0x3E00) >> 2)
    return method, StunClass(((value >> 4) & 1) | ((value >> 7) & 2))


def looks_like_stun(datagram: bytes) -> bool:
    """The demultiplexing test (Tailscale's): 20 bytes or more, the top two bits zero, the
    magic cookie at offset 4, and a Binding method (byte 1 is 0x01: request, success, error)."""
    return (len(datagram) >= HEADER_LENGTH and datagram[0] & 0xC0 == 0 and datagram[1] == 0x01
            and datagram[4:8] == MAGIC_COOKIE_BYTES)


# -- attribute values --------------------------------------------------------------------------

def _xor_pad(transaction_id: bytes) -> bytes:
    return MAGIC_COOKIE_BYTES + transaction_id


def _decode_address(value: bytes, transaction_id: bytes, xor: bool) -> TransportAddress:
    if len(value) < 4:
        raise StunError("bad address length")
    family = value[1]
    if family == 0x01:
        size = 4
    elif family == 0x02:
        size = 16
    else:
        raise StunError("bad address family")
    if len(value) != 4 + size:
        raise StunError("bad address length")
    port = int.from_bytes(value[2:4], "big")
    raw = value[4:]
    if xor:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, _xor_pad(transaction_id), strict=False))
    ip = ipaddress.IPv4Address(raw) if size == 4 else ipaddress.IPv6Address(raw)
    return TransportAddress(ip, port)


def _encode_address(address: TransportAddress, transaction_id: bytes, xor: bool) -> bytes:
    raw = address.ip.packed
    port = address.port
    if xor:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, _xor_pad(transaction_id), strict=False))
    return bytes((0, 1 if len(raw) == 4 else 2)) + port.to_bytes(2, "big") + raw


def _text(name: str) -> tuple[Callable[[bytes, bytes], str], Callable[[str, bytes], bytes]]:
    limit = _TEXT_LIMITS.get(name, 763)

    def decode(value: bytes, _txid: bytes) -> str:
        if len(value) > limit:
            raise StunError(f"{name} too long")
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise StunError(f"bad UTF-8 in {name}") from None

    def encode(value: str, _txid: bytes) -> bytes:
        data = value.encode("utf-8")
        if len(data) > limit:
            raise ValueError(f"{name} is {len(data)} bytes, more than the {limit} allowed")
        return data

    return decode, encode


def _fixed_int(name: str, size: int) -> tuple[Callable[[bytes, bytes], int], Callable[[int, bytes], bytes]]:
    def decode(value: bytes, _txid: bytes) -> int:
        if len(value) != size:
            raise StunError(f"bad {name} length")
        return int.from_bytes(value, "big")

    return decode, lambda value, _txid: value.to_bytes(size, "big")


def _decode_error_code(value: bytes, _txid: bytes) -> ErrorCode:
    if len(value) < 4:
        raise StunError("bad ERROR-CODE length")
    klass, number = value[2] & 0x07, value[3]
    if not 3 <= klass <= 6 or number > 99:
        raise StunError("bad ERROR-CODE value")
    if len(value) - 4 > 763:
        raise StunError("ERROR-CODE reason too long")
    try:
        reason = value[4:].decode("utf-8")
    except UnicodeDecodeError:
        raise StunError("bad UTF-8 in ERROR-CODE") from None
    return ErrorCode(klass * 100 + number, reason)


def _encode_error_code(value: ErrorCode, _txid: bytes) -> bytes:
    code, reason = value
    if not 300 <= code <= 699:
        raise ValueError(f"ERROR-CODE {code} is outside 300-699")
    return bytes((0, 0, code // 100, code % 100)) + reason.encode("utf-8")


def _decode_unknown_attributes(value: bytes, _txid: bytes) -> tuple[int, ...]:
    if len(value) % 2:
        raise StunError("bad UNKNOWN-ATTRIBUTES length")
    return tuple(int.from_bytes(value[i:i + 2], "big") for i in range(0, len(value), 2))


def _decode_flag(value: bytes, _txid: bytes) -> bool:
    if value:
        raise StunError("bad USE-CANDIDATE length")
    return True


def _opaque(value: bytes, _txid: bytes) -> bytes:
    return bytes(value)


class AttributeSpec(NamedTuple):
    name: str
    decode: Callable[[bytes, bytes], Any]
    encode: Callable[[Any, bytes], bytes]


def _address(xor: bool) -> tuple[Callable[[bytes, bytes], TransportAddress],
                                 Callable[[TransportAddress, bytes], bytes]]:
    return (lambda value, txid: _decode_address(value, txid, xor),
            lambda value, txid: _encode_address(value, txid, xor))


ATTRIBUTES: dict[int, AttributeSpec] = {
    Attr.MAPPED_ADDRESS: AttributeSpec("MAPPED-ADDRESS", *_address(False)),
    Attr.XOR_MAPPED_ADDRESS: AttributeSpec("XOR-MAPPED-ADDRESS", *_address(True)),
    Attr.XOR_MAPPED_ADDRESS_DRAFT: AttributeSpec("XOR-MAPPED-ADDRESS (draft)", *_address(True)),
    Attr.ALTERNATE_SERVER: AttributeSpec("ALTERNATE-SERVER", *_address(False)),
    Attr.RESPONSE_ORIGIN: AttributeSpec("RESPONSE-ORIGIN", *_address(False)),
    Attr.OTHER_ADDRESS: AttributeSpec("OTHER-ADDRESS", *_address(False)),
    Attr.USERNAME: AttributeSpec("USERNAME", *_text("USERNAME")),
    Attr.REALM: AttributeSpec("REALM", *_text("REALM")),
    Attr.NONCE: AttributeSpec("NONCE", *_text("NONCE")),
    Attr.SOFTWARE: AttributeSpec("SOFTWARE", *_text("SOFTWARE")),
    Attr.ALTERNATE_DOMAIN: AttributeSpec("ALTERNATE-DOMAIN", *_text("ALTERNATE-DOMAIN")),
    Attr.ERROR_CODE: AttributeSpec("ERROR-CODE", _decode_error_code, _encode_error_code),
    Attr.UNKNOWN_ATTRIBUTES: AttributeSpec(
        "UNKNOWN-ATTRIBUTES", _decode_unknown_attributes,
        lambda value, _txid: b"".join(code.to_bytes(2, "big") for code in value)),
    Attr.PRIORITY: AttributeSpec("PRIORITY", *_fixed_int("PRIORITY", 4)),
    Attr.ICE_CONTROLLED: AttributeSpec("ICE-CONTROLLED", *_fixed_int("ICE-CONTROLLED", 8)),
    Attr.ICE_CONTROLLING: AttributeSpec("ICE-CONTROLLING", *_fixed_int("ICE-CONTROLLING", 8)),
    Attr.USE_CANDIDATE: AttributeSpec("USE-CANDIDATE", _decode_flag, lambda _value, _txid: b""),
    Attr.MESSAGE_INTEGRITY_SHA256: AttributeSpec("MESSAGE-INTEGRITY-SHA256", _opaque, _opaque),
    Attr.PASSWORD_ALGORITHM: AttributeSpec("PASSWORD-ALGORITHM", _opaque, _opaque),
    Attr.PASSWORD_ALGORITHMS: AttributeSpec("PASSWORD-ALGORITHMS", _opaque, _opaque),
    Attr.USERHASH: AttributeSpec("USERHASH", _opaque, _opaque),
}


def _padded(length: int) -> int:
    return (length + 3) & ~3


# -- parse and encode ---------------------------------------------------------------------------

def parse(datagram: bytes) -> StunMessage:
    """Decode one STUN message; raise StunError naming the first thing that is wrong.

    Bytes after the length the header gives are ignored, as Tailscale does.
    """
    data = bytes(datagram)
    if len(data) < HEADER_LENGTH:
        raise StunError("truncated header")
    type_value, length = struct.unpack_from("!HH", data)
    if type_value & 0xC000:
        raise StunError("top bits of the message type set (not STUN)")
    if data[4:8] != MAGIC_COOKIE_BYTES:
        raise StunError("bad magic cookie")
    if length % 4:
        raise StunError("length not a multiple of 4")
    end = HEADER_LENGTH + length
    if end > len(data):
        raise StunError("length exceeds the datagram")
    data = data[:end]
    method, cls = split_message_type(type_value)
    transaction_id = data[8:HEADER_LENGTH]

    attributes: list[tuple[int, Any]] = []
    unknown: list[int] = []
    integrity: bytes | None = None
    integrity_offset: int | None = None
    fingerprint = False
    offset = HEADER_LENGTH
    while offset < end:
        if fingerprint:
            raise StunError("attribute after FINGERPRINT")
        code, size = struct.unpack_from("!HH", data, offset)
        start = offset + 4
        if start + _padded(size) > end:
            raise StunError("attribute overruns message")
        value = data[start:start + size]
        if code == Attr.FINGERPRINT:
            if size != 4:
                raise StunError("bad FINGERPRINT length")
            if int.from_bytes(value, "big") != zlib.crc32(data[:offset]) ^ FINGERPRINT_XOR:
                raise StunError("bad fingerprint")
            fingerprint = True
        elif integrity_offset is not None and code != Attr.MESSAGE_INTEGRITY_SHA256:
            pass  # RFC 8489 section 14.5: what follows MESSAGE-INTEGRITY is ignored
        elif code == Attr.MESSAGE_INTEGRITY:
            if size != INTEGRITY_LENGTH:
                raise StunError("bad MESSAGE-INTEGRITY length")
            integrity, integrity_offset = value, offset
        elif (spec := ATTRIBUTES.get(code)) is not None:
            attributes.append((Attr(code), spec.decode(value, transaction_id)))
        elif code < 0x8000:
            unknown.append(code)
        offset = start + _padded(size)
    return StunMessage(method, cls, transaction_id, tuple(attributes), fingerprint, tuple(unknown),
                       integrity, data, integrity_offset)


def _tlv(code: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"attribute {code:#06x} is {len(value)} bytes, more than 65535")
    return struct.pack("!HH", code, len(value)) + value + bytes(_padded(len(value)) - len(value))


def _header(type_value: int, length: int, transaction_id: bytes) -> bytes:
    if length > 0xFFFF:
        raise ValueError(f"STUN message body of {length} bytes does not fit the length field")
    return struct.pack("!HH", type_value, length) + MAGIC_COOKIE_BYTES + transaction_id


def encode(message: StunMessage, *, integrity_key: bytes | None = None,
           fingerprint: bool | None = None) -> bytes:
    """The wire form of ``message``: its attributes in order, then MESSAGE-INTEGRITY when
    ``integrity_key`` is given, then FINGERPRINT when ``fingerprint`` (default: the
    message's own flag). An attribute missing from ATTRIBUTES must be given as bytes."""
    txid = message.transaction_id
    if len(txid) != TRANSACTION_ID_LENGTH:
        raise ValueError(f"transaction id must be {TRANSACTION_ID_LENGTH} bytes, not {len(txid)}")
    type_value = message_type(message.method, message.cls)
    parts = []
    for code, value in message.attributes:
        spec = ATTRIBUTES.get(code)
        if spec is None:
            if not isinstance(value, bytes | bytearray):
                raise ValueError(f"attribute {code:#06x} is not in the table; give its value as bytes")
            parts.append(_tlv(code, bytes(value)))
        else:
            parts.append(_tlv(code, spec.encode(value, txid)))
    body = b"".join(parts)
    if integrity_key is not None:
        mac = hmac.new(integrity_key, _header(type_value, len(body) + 24, txid) + body, hashlib.sha1)
        body += _tlv(Attr.MESSAGE_INTEGRITY, mac.digest())
    if message.fingerprint if fingerprint is None else fingerprint:
        crc = zlib.crc32(_header(type_value, len(body) + 8, txid) + body) ^ FINGERPRINT_XOR
        body += _tlv(Attr.FINGERPRINT, crc.to_bytes(4, "big"))
    return _header(type_value, len(body), txid) + body


# -- MESSAGE-INTEGRITY ----------------------------------------------------------------------------

def verify_integrity(message: StunMessage, key: bytes) -> bool:
    """Whether the message's MESSAGE-INTEGRITY is the HMAC-SHA1 under ``key`` (False if it has none)."""
    if message.integrity is None or message.integrity_offset is None:
        return False
    offset = message.integrity_offset
    covered = (message.raw[:2] + (offset + 4 + INTEGRITY_LENGTH - HEADER_LENGTH).to_bytes(2, "big")
               + message.raw[4:offset])
    return hmac.compare_digest(hmac.new(key, covered, hashlib.sha1).digest(), message.integrity)


def short_term_key(password: str) -> bytes:
    """The short-term credential key: the password's UTF-8 (its OpaqueString form is assumed)."""
    return password.encode("utf-8")


def saslprep(text: str) -> str:
    """RFC 4013 SASLprep (mapping, NFKC, prohibited output and bidi rules); ValueError if refused."""
    mapped = "".join(" " if stringprep.in_table_c12(ch) else ch for ch in text
                     if not stringprep.in_table_b1(ch))
    prepared = unicodedata.normalize("NFKC", mapped)
    prohibited = (stringprep.in_table_c12, stringprep.in_table_c21, stringprep.in_table_c22,
                  stringprep.in_table_c3, stringprep.in_table_c4, stringprep.in_table_c5,
                  stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
                  stringprep.in_table_c9, stringprep.in_table_a1)
    for ch in prepared:
        if any(test(ch) for test in prohibited):
            raise ValueError(f"character U+{ord(ch):04X} is not allowed in a SASLprep string")
    if any(stringprep.in_table_d1(ch) for ch in prepared):
        if any(stringprep.in_table_d2(ch) for ch in prepared):
            raise ValueError("a SASLprep string may not mix right-to-left and left-to-right text")
        if not (stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])):
            raise ValueError("right-to-left SASLprep text must start and end right-to-left")
    return prepared


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """The long-term credential key: MD5(username ":" realm ":" SASLprep(password))."""
    return hashlib.md5(f"{username}:{realm}:{saslprep(password)}".encode(), usedforsecurity=False).digest()


# -- Binding ---------------------------------------------------------------------------------------

def binding_request(random: Callable[[int], bytes], *, software: str | None = TAILSCALE_SOFTWARE,
                    fingerprint: bool = True) -> tuple[bytes, bytes]:
    """(transaction id, datagram) of a Binding request; the id is ``random(12)``.

    The defaults give Tailscale's 40-byte form: SOFTWARE ``tailnode``, then FINGERPRINT.
    """
    transaction_id = bytes(random(TRANSACTION_ID_LENGTH))
    if len(transaction_id) != TRANSACTION_ID_LENGTH:
        raise ValueError(f"random({TRANSACTION_ID_LENGTH}) returned {len(transaction_id)} bytes")
    attributes: Iterable[tuple[int, Any]] = [(Attr.SOFTWARE, software)] if software else []
    request = StunMessage(BINDING, StunClass.REQUEST, transaction_id, tuple(attributes), fingerprint)
    return transaction_id, encode(request)


def binding_response(request: StunMessage, source: TransportAddress, *,
                     software: str | None = None) -> bytes:
    """The answer to a parsed Binding request from ``source``: a success response with its
    XOR-MAPPED-ADDRESS, or 420 listing the comprehension-required attributes not understood.
    FINGERPRINT is added when the request carried one."""
    txid = request.transaction_id
    extra = [(Attr.SOFTWARE, software)] if software else []
    if request.unknown_required:
        reply = StunMessage(BINDING, StunClass.ERROR, txid,
                            (*extra, (Attr.ERROR_CODE, ErrorCode(420, "Unknown Attribute")),
                             (Attr.UNKNOWN_ATTRIBUTES, request.unknown_required)), request.fingerprint)
    else:
        reply = StunMessage(BINDING, StunClass.SUCCESS, txid,
                            (*extra, (Attr.XOR_MAPPED_ADDRESS, source.unmapped())), request.fingerprint)
    return encode(reply)


def answer_binding(datagram: bytes, source: TransportAddress | tuple[str, int], *,
                   software: str | None = None) -> bytes | None:
    """A STUN server's whole job: the response to send back to ``source``, or None when the
    datagram is well-formed STUN but not a Binding request. Raises StunError when it is not
    STUN at all or malformed (the caller drops and counts it)."""
    message = parse(datagram)
    if message.method != BINDING or message.cls != StunClass.REQUEST:
        return None
    if not isinstance(source, TransportAddress):
        source = TransportAddress.of(*source[:2])  # (host, port[, flowinfo, scope_id])
    return binding_response(message, source, software=software)


class BindingResponder:
    """``answer_binding`` for a server socket: never raises on network input; what it does
    not answer is counted in ``drops`` by reason, what it answers in ``answered``."""

    def __init__(self, software: str | None = None) -> None:
        self.software = software
        self.answered = 0
        self.drops: Counter[str] = Counter()

    def handle(self, datagram: bytes, source: TransportAddress | tuple[str, int]) -> bytes | None:
        """The datagram to send back to ``source``, or None (then dropped and counted)."""
        try:
            reply = answer_binding(datagram, source, software=self.software)
        except StunError as exc:
            self.drops[f"malformed: {exc.reason}"] += 1
            return None
        if reply is None:
            self.drops["not a Binding request"] += 1
            return None
        self.answered += 1
        return reply
