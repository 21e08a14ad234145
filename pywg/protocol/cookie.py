"""mac1/mac2 and cookie replies (paper, 5.4.7): DoS mitigation under load."""

from __future__ import annotations

import ipaddress

from .actions import Endpoint
from .constants import (
    COOKIE_REFRESH_TIME,
    COOKIE_SECRET_LATENCY,
    INITIATION_SIZE,
    LABEL_COOKIE,
    LABEL_MAC1,
)
from .crypto import CryptoError, constant_time_eq, hash_, mac, xaead_decrypt, xaead_encrypt
from .endpoint import RelayEndpoint
from .messages import CookieReply

_ZERO_MAC = bytes(16)


def mac_offsets(message: bytes) -> tuple[int, int]:
    """(mac1 offset, mac2 offset) of an initiation or a response."""
    if len(message) == INITIATION_SIZE:
        return 116, 132
    return 60, 76


def endpoint_bytes(endpoint: Endpoint) -> bytes:
    """Source IP (4 or 16 bytes) || port (big-endian), the input of a cookie."""
    if isinstance(endpoint, RelayEndpoint):  # a relayed source: its region and DERP node key
        return endpoint.region.to_bytes(4, "big") + endpoint.node_key
    host, port = endpoint[0], endpoint[1].to_bytes(2, "big")
    if ":" not in host:  # IPv4 as sockets give it (dotted quad): ipaddress's parse costs 10 us
        try:
            packed = bytes([int(part) for part in host.split(".")])
        except ValueError:
            packed = b""
        if len(packed) == 4 and host == ".".join(map(str, packed)):  # canonical only
            return packed + port
    return ipaddress.ip_address(host.split("%", 1)[0]).packed + port


class CookieChecker:
    """The receiving side, for our own static public key: checks macs, makes cookies."""

    def __init__(self, static_public: bytes, random_bytes) -> None:
        self._random = random_bytes
        self.mac1_key = hash_(LABEL_MAC1, static_public)
        self.cookie_key = hash_(LABEL_COOKIE, static_public)
        self._secret = b""
        self._secret_born: float | None = None

    def __repr__(self) -> str:
        return "CookieChecker(<secret>)"

    def check_mac1(self, message: bytes) -> bool:
        off1, off2 = mac_offsets(message)
        return constant_time_eq(mac(self.mac1_key, message[:off1]), message[off1:off2])

    def _cookie(self, source: Endpoint, now: float) -> bytes:
        if self._secret_born is None or now - self._secret_born >= COOKIE_REFRESH_TIME:
            self._secret = self._random(32)
            self._secret_born = now
        return mac(self._secret, endpoint_bytes(source))

    def check_mac2(self, message: bytes, source: Endpoint, now: float) -> bool:
        _, off2 = mac_offsets(message)
        expected = mac(self._cookie(source, now), message[:off2])
        return constant_time_eq(expected, message[off2:off2 + 16])

    def create_reply(self, message: bytes, receiver_index: int, source: Endpoint,
                     now: float) -> CookieReply:
        off1, off2 = mac_offsets(message)
        nonce = self._random(24)
        sealed = xaead_encrypt(self.cookie_key, nonce, self._cookie(source, now), message[off1:off2])
        return CookieReply(receiver_index, nonce, sealed)


class CookieGenerator:
    """The sending side, for one peer's static key: adds mac1/mac2, consumes cookie replies."""

    def __init__(self, remote_static: bytes) -> None:
        self.mac1_key = hash_(LABEL_MAC1, remote_static)
        self.cookie_key = hash_(LABEL_COOKIE, remote_static)
        self._cookie: bytes | None = None
        self._cookie_born = 0.0
        self._last_mac1: bytes | None = None
        self.last_had_mac2 = False  # whether the last message sent carried a cookie's mac2

    def __repr__(self) -> str:
        return "CookieGenerator(<secret>)"

    def add_macs(self, message: bytes, now: float) -> bytes:
        """Return ``message`` with mac1 and (if a fresh cookie is held) mac2 filled in."""
        off1, _ = mac_offsets(message)
        body = message[:off1]
        mac1 = mac(self.mac1_key, body)
        self._last_mac1 = mac1
        mac2 = _ZERO_MAC
        if self._cookie is not None and now - self._cookie_born < COOKIE_REFRESH_TIME - COOKIE_SECRET_LATENCY:
            mac2 = mac(self._cookie, body + mac1)
        self.last_had_mac2 = mac2 is not _ZERO_MAC
        return body + mac1 + mac2

    def consume_reply(self, reply: CookieReply, now: float) -> bool:
        if self._last_mac1 is None:
            return False
        try:
            cookie = xaead_decrypt(self.cookie_key, reply.nonce, reply.encrypted_cookie, self._last_mac1)
        except CryptoError:
            return False
        self._cookie = cookie
        self._cookie_born = now
        self._last_mac1 = None  # one reply per message sent: a replayed reply is refused
        return True

    @property
    def has_cookie(self) -> bool:
        return self._cookie is not None
