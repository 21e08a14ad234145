"""Disco, Tailscale's out-of-band path probing: the sealed packet and its messages, sans-I/O.

A disco packet (the same over UDP and inside a DERP packet) is::

    magic "TS💬" (6) | sender's disco public key (32) | nonce (24) | box(payload)

where the box is NaCl ``crypto_box`` (X25519, HSalsa20, XSalsa20-Poly1305) between the
sender's disco private key and the receiver's disco public key, ``tag(16) || ciphertext``.
The payload is ``type (1) | version (1) | body``; receivers ignore bytes at the end.

Two layers, two kinds of error, as tailscaled treats them:

* ``DiscoSession.open`` (the sealed layer) raises ``DiscoPacketError`` for a datagram that
  is not a disco packet, and ``DiscoOpenError`` when the box does not open (a wrong key, a
  tampered box, an old disco key after a restart). The receiver drops and counts those.
* ``decode_message`` (the payload) raises ``DiscoMessageError`` for a short body and its
  subclass ``DiscoUnknownTypeError`` for a type it does not know; inside a box that opened,
  tailscaled ignores both silently (forward compatibility), and so must the caller.

Per-type rules, as Tailscale's ``disco`` package: a Ping's node key is read only when 32
bytes follow the TxID (the rest is padding, for path-MTU probes); a CallMeMaybe whose body is
not a whole number of 18-byte endpoints, or whose version is not 0, is a CallMeMaybe with no
endpoints; CallMeMaybeVia and the AllocateUDPRelayEndpoint pair with a version other than 0
decode to an empty message of their type; the other types ignore the version.

Endpoints are ``(host, port)`` tuples (``Endpoint``); on the wire an address is 16 bytes, an
IPv4 address in its IPv4-mapped IPv6 form, and is unmapped again when decoded.
Randomness (nonces, TxIDs) is injected as a ``random(n)`` callable; nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

# The one place the endpoint type is defined (a colleague brings an Endpoint value type).
Endpoint = tuple[str, int]
Random = Callable[[int], bytes]

MAGIC = "TS💬".encode()  # 54 53 f0 9f 92 ac
KEY_LENGTH = 32
NONCE_LENGTH = 24
TAG_LENGTH = 16
HEADER_LENGTH = len(MAGIC) + KEY_LENGTH  # 38: the most a demux needs to call it disco
SEALED_HEADER_LENGTH = HEADER_LENGTH + NONCE_LENGTH  # 62
MESSAGE_HEADER_LENGTH = 2
TXID_LENGTH = 12
ENDPOINT_LENGTH = 18  # 16-byte address + BE16 port
PONG_BODY_LENGTH = TXID_LENGTH + ENDPOINT_LENGTH  # 30
BIND_UDP_RELAY_BODY_LENGTH = 72
BIND_UDP_RELAY_CHALLENGE_LENGTH = 32
_RELAY_ENDPOINT_FIXED_LENGTH = 3 * KEY_LENGTH + 8 + 4 + 8 + 8  # 124, then the endpoints
VERSION = 0


class MessageType(IntEnum):
    PING = 0x01
    PONG = 0x02
    CALL_ME_MAYBE = 0x03
    BIND_UDP_RELAY_ENDPOINT = 0x04
    BIND_UDP_RELAY_ENDPOINT_CHALLENGE = 0x05
    BIND_UDP_RELAY_ENDPOINT_ANSWER = 0x06
    CALL_ME_MAYBE_VIA = 0x07
    ALLOCATE_UDP_RELAY_ENDPOINT_REQUEST = 0x08
    ALLOCATE_UDP_RELAY_ENDPOINT_RESPONSE = 0x09


class DiscoError(ValueError):
    """Base of every disco error; ``reason`` says what is wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DiscoPacketError(DiscoError):
    """The datagram is not a disco packet (no magic, or shorter than the sealed header + tag)."""


class DiscoOpenError(DiscoError):
    """The box did not open: wrong key pair, tampered bytes, or an unusable sender key."""


class DiscoMessageError(DiscoError):
    """The payload inside an opened box is malformed (tailscaled ignores it)."""


class DiscoUnknownTypeError(DiscoMessageError):
    """The payload's message type is not one this codec knows (tailscaled ignores it)."""

    def __init__(self, message_type: int) -> None:
        super().__init__(f"unknown message type 0x{message_type:02x}")
        self.message_type = message_type


# --- endpoints on the wire ---------------------------------------------------------------------


def encode_endpoint(endpoint: Endpoint) -> bytes:
    """16-byte address (IPv4 as IPv4-mapped IPv6) + BE16 port."""
    host, port = endpoint
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
    raw = ip.packed if ip.version == 6 else b"\x00" * 10 + b"\xff\xff" + ip.packed
    return raw + port.to_bytes(2, "big")


def decode_endpoint(raw: bytes) -> Endpoint:
    ip6 = ipaddress.IPv6Address(raw[:16])
    ip = ip6.ipv4_mapped or ip6
    return (str(ip), int.from_bytes(raw[16:18], "big"))


def normalize_endpoint(endpoint: Endpoint) -> Endpoint:
    """The canonical form of an endpoint (compressed IPv6, unmapped IPv4); ValueError if invalid."""
    return decode_endpoint(encode_endpoint(endpoint))


# --- messages ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ping:
    """TxID, the sender's (alleged) WireGuard node public key, and zero padding."""

    txid: bytes
    node_key: bytes | None = None
    padding: int = 0

    def encode(self) -> bytes:
        _check_length("txid", self.txid, TXID_LENGTH)
        body = self.txid
        if self.node_key is not None and any(self.node_key):
            _check_length("node_key", self.node_key, KEY_LENGTH)
            body += self.node_key
        return _header(MessageType.PING) + body + b"\x00" * self.padding


@dataclass(frozen=True)
class Pong:
    """TxID of the ping answered and the source address the responder saw it come from."""

    txid: bytes
    src: Endpoint

    def encode(self) -> bytes:
        _check_length("txid", self.txid, TXID_LENGTH)
        return _header(MessageType.PONG) + self.txid + encode_endpoint(self.src)


@dataclass(frozen=True)
class CallMeMaybe:
    """The sender's own endpoints; sent via DERP after pinging, asking the receiver to ping back."""

    endpoints: tuple[Endpoint, ...] = ()

    def encode(self) -> bytes:
        return _header(MessageType.CALL_ME_MAYBE) + b"".join(encode_endpoint(e) for e in self.endpoints)


@dataclass(frozen=True)
class _BindUDPRelayCommon:
    vni: int = 0
    generation: int = 0
    remote_key: bytes = bytes(KEY_LENGTH)
    challenge: bytes = bytes(BIND_UDP_RELAY_CHALLENGE_LENGTH)

    TYPE = MessageType.BIND_UDP_RELAY_ENDPOINT

    def encode(self) -> bytes:
        _check_length("remote_key", self.remote_key, KEY_LENGTH)
        _check_length("challenge", self.challenge, BIND_UDP_RELAY_CHALLENGE_LENGTH)
        return (_header(self.TYPE) + struct.pack(">II", self.vni, self.generation)
                + self.remote_key + self.challenge)


class BindUDPRelayEndpoint(_BindUDPRelayCommon):
    """Peer-relay bind handshake, message 1 (client to relay server). Decoded, not acted on."""

    TYPE = MessageType.BIND_UDP_RELAY_ENDPOINT


class BindUDPRelayEndpointChallenge(_BindUDPRelayCommon):
    """Peer-relay bind handshake, message 2 (server to client)."""

    TYPE = MessageType.BIND_UDP_RELAY_ENDPOINT_CHALLENGE


class BindUDPRelayEndpointAnswer(_BindUDPRelayCommon):
    """Peer-relay bind handshake, message 3 (client to server)."""

    TYPE = MessageType.BIND_UDP_RELAY_ENDPOINT_ANSWER


@dataclass(frozen=True)
class UDPRelayEndpoint:
    """A peer-relay server endpoint; lifetimes in nanoseconds as on the wire."""

    server_disco: bytes = bytes(KEY_LENGTH)
    client_disco: tuple[bytes, bytes] = (bytes(KEY_LENGTH), bytes(KEY_LENGTH))
    lamport_id: int = 0
    vni: int = 0
    bind_lifetime_ns: int = 0
    steady_state_lifetime_ns: int = 0
    endpoints: tuple[Endpoint, ...] = ()

    def encode_body(self) -> bytes:
        _check_length("server_disco", self.server_disco, KEY_LENGTH)
        for key in self.client_disco:
            _check_length("client_disco", key, KEY_LENGTH)
        return (self.server_disco + self.client_disco[0] + self.client_disco[1]
                + struct.pack(">QIQQ", self.lamport_id, self.vni, self.bind_lifetime_ns,
                              self.steady_state_lifetime_ns)
                + b"".join(encode_endpoint(e) for e in self.endpoints))


@dataclass(frozen=True)
class CallMeMaybeVia:
    """A CallMeMaybe through a peer relay (decoded, not acted on). ``relay`` None: empty message."""

    relay: UDPRelayEndpoint | None = None

    def encode(self) -> bytes:
        body = self.relay.encode_body() if self.relay is not None else b""
        return _header(MessageType.CALL_ME_MAYBE_VIA) + body


@dataclass(frozen=True)
class AllocateUDPRelayEndpointRequest:
    client_disco: tuple[bytes, bytes] = (bytes(KEY_LENGTH), bytes(KEY_LENGTH))
    generation: int = 0

    def encode(self) -> bytes:
        for key in self.client_disco:
            _check_length("client_disco", key, KEY_LENGTH)
        return (_header(MessageType.ALLOCATE_UDP_RELAY_ENDPOINT_REQUEST) + self.client_disco[0]
                + self.client_disco[1] + struct.pack(">I", self.generation))


@dataclass(frozen=True)
class AllocateUDPRelayEndpointResponse:
    generation: int = 0
    relay: UDPRelayEndpoint | None = None

    def encode(self) -> bytes:
        relay = self.relay if self.relay is not None else UDPRelayEndpoint()
        return (_header(MessageType.ALLOCATE_UDP_RELAY_ENDPOINT_RESPONSE)
                + struct.pack(">I", self.generation) + relay.encode_body())


Message = (Ping | Pong | CallMeMaybe | BindUDPRelayEndpoint | BindUDPRelayEndpointChallenge
           | BindUDPRelayEndpointAnswer | CallMeMaybeVia | AllocateUDPRelayEndpointRequest
           | AllocateUDPRelayEndpointResponse)


def _header(message_type: MessageType) -> bytes:
    return bytes((message_type, VERSION))


def _check_length(name: str, value: bytes, length: int) -> None:
    if len(value) != length:
        raise ValueError(f"{name} must be {length} bytes, got {len(value)}")


def encode_message(message: Message) -> bytes:
    """The plaintext payload (type, version, body) of ``message``."""
    return message.encode()


def _endpoint_list(body: bytes) -> tuple[Endpoint, ...]:
    return tuple(decode_endpoint(body[i:i + ENDPOINT_LENGTH]) for i in range(0, len(body), ENDPOINT_LENGTH))


def _decode_relay_endpoint(body: bytes) -> UDPRelayEndpoint:
    fixed = _RELAY_ENDPOINT_FIXED_LENGTH
    if len(body) < fixed + ENDPOINT_LENGTH or (len(body) - fixed) % ENDPOINT_LENGTH:
        raise DiscoMessageError(f"relay endpoint of {len(body)} bytes: needs {fixed} + a whole number"
                                f" (at least one) of {ENDPOINT_LENGTH}-byte endpoints")
    lamport, vni, bind_ns, steady_ns = struct.unpack_from(">QIQQ", body, 3 * KEY_LENGTH)
    return UDPRelayEndpoint(body[:32], (body[32:64], body[64:96]), lamport, vni, bind_ns, steady_ns,
                            _endpoint_list(body[fixed:]))


def decode_message(payload: bytes) -> Message:
    """Decode an opened payload; ``DiscoMessageError`` / ``DiscoUnknownTypeError`` on failure."""
    if len(payload) < MESSAGE_HEADER_LENGTH:
        raise DiscoMessageError(f"payload of {len(payload)} bytes: shorter than the 2-byte header")
    kind, version, body = payload[0], payload[1], bytes(payload[2:])
    if kind == MessageType.PING:
        if len(body) < TXID_LENGTH:
            raise DiscoMessageError(f"ping body of {len(body)} bytes: shorter than the 12-byte TxID")
        rest = body[TXID_LENGTH:]
        node_key = None
        if len(rest) >= KEY_LENGTH:
            node_key = rest[:KEY_LENGTH] if any(rest[:KEY_LENGTH]) else None
            rest = rest[KEY_LENGTH:]
        return Ping(body[:TXID_LENGTH], node_key, len(rest))
    if kind == MessageType.PONG:
        if len(body) < PONG_BODY_LENGTH:
            raise DiscoMessageError(f"pong body of {len(body)} bytes: shorter than {PONG_BODY_LENGTH}")
        return Pong(body[:TXID_LENGTH], decode_endpoint(body[TXID_LENGTH:PONG_BODY_LENGTH]))
    if kind == MessageType.CALL_ME_MAYBE:
        if version != VERSION or len(body) % ENDPOINT_LENGTH:
            return CallMeMaybe()
        return CallMeMaybe(_endpoint_list(body))
    if kind in (MessageType.BIND_UDP_RELAY_ENDPOINT, MessageType.BIND_UDP_RELAY_ENDPOINT_CHALLENGE,
                MessageType.BIND_UDP_RELAY_ENDPOINT_ANSWER):
        if len(body) < BIND_UDP_RELAY_BODY_LENGTH:
            raise DiscoMessageError(f"bind-udp-relay body of {len(body)} bytes: shorter than 72")
        vni, generation = struct.unpack_from(">II", body)
        fields = (vni, generation, body[8:40], body[40:72])
        if kind == MessageType.BIND_UDP_RELAY_ENDPOINT:
            return BindUDPRelayEndpoint(*fields)
        if kind == MessageType.BIND_UDP_RELAY_ENDPOINT_CHALLENGE:
            return BindUDPRelayEndpointChallenge(*fields)
        return BindUDPRelayEndpointAnswer(*fields)
    if kind == MessageType.CALL_ME_MAYBE_VIA:
        if version != VERSION:
            return CallMeMaybeVia()
        return CallMeMaybeVia(_decode_relay_endpoint(body))
    if kind == MessageType.ALLOCATE_UDP_RELAY_ENDPOINT_REQUEST:
        if version != VERSION:
            return AllocateUDPRelayEndpointRequest()
        if len(body) < 2 * KEY_LENGTH + 4:
            raise DiscoMessageError(f"allocate-udp-relay request of {len(body)} bytes: shorter than 68")
        return AllocateUDPRelayEndpointRequest((body[:32], body[32:64]),
                                               int.from_bytes(body[64:68], "big"))
    if kind == MessageType.ALLOCATE_UDP_RELAY_ENDPOINT_RESPONSE:
        if version != VERSION:
            return AllocateUDPRelayEndpointResponse()
        if len(body) < 4:
            raise DiscoMessageError(f"allocate-udp-relay response of {len(body)} bytes: shorter than 4")
        return AllocateUDPRelayEndpointResponse(int.from_bytes(body[:4], "big"), _decode_relay_endpoint(body[4:]))
    raise DiscoUnknownTypeError(kind)


# --- the sealed packet -------------------------------------------------------------------------


def looks_like_disco(datagram: bytes) -> bool:
    """The demux test (magicsock's): the magic and room for the sender key."""
    return len(datagram) >= HEADER_LENGTH and datagram[:len(MAGIC)] == MAGIC


def sender_key(datagram: bytes) -> bytes:
    """The sender's disco public key, to find the peer before opening; ``DiscoPacketError`` if none."""
    if not looks_like_disco(datagram):
        raise DiscoPacketError("not a disco packet (no magic or shorter than 38 bytes)")
    return bytes(datagram[len(MAGIC):HEADER_LENGTH])


class DiscoKey:
    """A node's disco key pair (Curve25519), separate from its WireGuard node key.

    The private half never appears in a repr.
    """

    def __init__(self, private: bytes) -> None:
        _check_length("disco private key", private, KEY_LENGTH)
        self._private = PrivateKey(private)
        self.public = bytes(self._private.public_key)

    @classmethod
    def generate(cls, random: Random) -> DiscoKey:
        return cls(random(KEY_LENGTH))

    def session(self, peer_public: bytes) -> DiscoSession:
        return DiscoSession(self, peer_public)

    def __repr__(self) -> str:
        return f"DiscoKey(public={self.public.hex()[:16]}…)"


class DiscoSession:
    """The box between our disco key and one peer's disco public key (shared key precomputed)."""

    def __init__(self, key: DiscoKey, peer_public: bytes) -> None:
        _check_length("peer disco public key", peer_public, KEY_LENGTH)
        self.local_public = key.public
        self.peer_public = bytes(peer_public)
        try:
            self._box: Box | None = Box(key._private, PublicKey(self.peer_public))
        except CryptoError:  # a low-order peer key: no shared secret, nothing will open
            self._box = None

    def seal(self, message: Message | bytes, random: Random) -> bytes:
        """The full packet: magic, our disco public key, a fresh nonce and the box."""
        if self._box is None:
            raise DiscoOpenError("peer disco public key is unusable (low order)")
        payload = message if isinstance(message, bytes) else message.encode()
        nonce = random(NONCE_LENGTH)
        _check_length("nonce", nonce, NONCE_LENGTH)
        sealed = self._box.encrypt(payload, nonce)
        return MAGIC + self.local_public + bytes(sealed)

    def open_payload(self, datagram: bytes) -> bytes:
        """The opened payload bytes; ``DiscoPacketError`` / ``DiscoOpenError`` on failure."""
        if len(datagram) < SEALED_HEADER_LENGTH + TAG_LENGTH or datagram[:len(MAGIC)] != MAGIC:
            raise DiscoPacketError(f"not a disco packet ({len(datagram)} bytes, needs magic and at least "
                                   f"{SEALED_HEADER_LENGTH + TAG_LENGTH})")
        if datagram[len(MAGIC):HEADER_LENGTH] != self.peer_public:
            raise DiscoOpenError("sender disco key is not this session's peer")
        if self._box is None:
            raise DiscoOpenError("peer disco public key is unusable (low order)")
        try:
            return self._box.decrypt(bytes(datagram[HEADER_LENGTH:]))
        except CryptoError:
            raise DiscoOpenError("box does not open (wrong key or tampered)") from None

    def open(self, datagram: bytes) -> Message:
        """Open and decode; the payload errors (``DiscoMessageError``) pass through for the caller
        to ignore, distinct from ``DiscoPacketError`` / ``DiscoOpenError``."""
        return decode_message(self.open_payload(datagram))

