"""``Key``: a WireGuard key as wgtypes.Key has it: 32 bytes, base64 text as `wg` prints.

A Key does not know whether it is private, public or preshared; its repr and str never
show the bytes (use ``to_base64()`` deliberately), so secrets do not leak into logs.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets

from pywg.protocol.crypto import dh_pubkey

KEY_LEN = 32


class InvalidKey(ValueError):
    """A key that cannot be parsed; the message says what is wrong with it."""


class Key:
    __slots__ = ("_bytes",)

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes | bytearray) or len(raw) != KEY_LEN:
            size = len(raw) if isinstance(raw, bytes | bytearray) else type(raw).__name__
            raise InvalidKey(f"a key is {KEY_LEN} bytes, got {size}")
        self._bytes = bytes(raw)

    # --- construction -------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> Key:
        """The base64 form `wg` prints (44 characters ending in '=')."""
        if not isinstance(text, str):
            raise InvalidKey(f"a key is base64 text, got {type(text).__name__}")
        stripped = text.strip()
        if not stripped:
            raise InvalidKey("a key is 44 base64 characters ending in '=', got an empty text")
        try:
            raw = base64.b64decode(stripped, validate=True)
        except (binascii.Error, ValueError):
            if len(stripped) != 44:
                raise InvalidKey(f"a key is 44 base64 characters ending in '=', got {len(stripped)} "
                                 "characters") from None
            raise InvalidKey("a key is base64 text: invalid characters or padding") from None
        if len(raw) != KEY_LEN:  # valid base64 of the wrong size (e.g. 33 bytes: 44 characters, no '=')
            raise InvalidKey(f"a key is {KEY_LEN} bytes (44 base64 characters ending in '='), this is "
                             f"{len(raw)} bytes")
        return cls(raw)

    @classmethod
    def from_hex(cls, text: str) -> Key:
        try:
            return cls(bytes.fromhex(text))
        except ValueError:
            raise InvalidKey("a hex key is 64 hexadecimal digits") from None

    @classmethod
    def generate_private(cls) -> Key:
        """A new private key, clamped as `wg genkey` prints it."""
        raw = bytearray(secrets.token_bytes(KEY_LEN))
        raw[0] &= 248
        raw[31] = (raw[31] & 127) | 64
        return cls(bytes(raw))

    @classmethod
    def generate_preshared(cls) -> Key:
        """32 random bytes, as `wg genpsk`."""
        return cls(secrets.token_bytes(KEY_LEN))

    def public_key(self) -> Key:
        """The X25519 public key of this (private) key, as `wg pubkey`."""
        return Key(dh_pubkey(self._bytes))

    # --- forms --------------------------------------------------------------------------

    def to_base64(self) -> str:
        return base64.b64encode(self._bytes).decode()

    def hex(self) -> str:
        return self._bytes.hex()

    def __bytes__(self) -> bytes:
        return self._bytes

    def is_zero(self) -> bool:
        return hmac.compare_digest(self._bytes, bytes(KEY_LEN))

    # --- comparison without timing leaks; no bytes in repr/str ---------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Key):
            return NotImplemented
        return hmac.compare_digest(self._bytes, other._bytes)

    def __hash__(self) -> int:
        return hash(("pywg.Key", self._bytes))

    def __repr__(self) -> str:
        return "Key(<hidden>)"

    __str__ = __repr__

    def fingerprint(self) -> str:
        """A short, non-secret label for a PUBLIC key (first 8 base64 characters); never
        call it on a private key you do not want identified."""
        return self.to_base64()[:8]
