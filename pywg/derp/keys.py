"""Node keys (Curve25519) as DERP names them, and the NaCl box that seals the handshake.

A node public key prints as ``nodekey:`` + 64 lowercase hex, a private key as ``privkey:`` +
64 hex; the server key in ``Derp-Public-Key`` is the same 64 hex with no prefix. The private
key never appears in a repr or str.
"""

from __future__ import annotations

from collections.abc import Callable

import nacl.exceptions
import nacl.public
import nacl.utils

KEY_LEN = 32
NONCE_LEN = 24
BOX_TAG_LEN = 16
NODE_PUBLIC_PREFIX = "nodekey:"
NODE_PRIVATE_PREFIX = "privkey:"

RandomSource = Callable[[int], bytes]
"""Returns that many random bytes; injectable so tests can fix the nonces."""


class KeyFormatError(ValueError):
    """A key in text or bytes form is not a valid Curve25519 key; ``field`` names it."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field


def _parse_hex_key(text: str, prefix: str, field: str, *, untyped_ok: bool) -> bytes:
    body = text.strip()
    if body.startswith(prefix):
        body = body[len(prefix):]
    elif not untyped_ok:
        raise KeyFormatError(field, f"expected {prefix}<64 hex>")
    if len(body) != 2 * KEY_LEN:
        raise KeyFormatError(field, f"expected 64 hex characters, got {len(body)}")
    try:
        return bytes.fromhex(body)
    except ValueError:
        raise KeyFormatError(field, "not hexadecimal") from None


class NodePublicKey:
    """A 32-byte Curve25519 node public key (the address of a DERP client)."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes | bytearray) or len(raw) != KEY_LEN:
            raise KeyFormatError("public key", f"expected {KEY_LEN} bytes")
        self.raw = bytes(raw)

    @classmethod
    def from_text(cls, text: str, field: str = "public key") -> NodePublicKey:
        """Parse ``nodekey:<hex>`` or untyped 64 hex (the server key header form)."""
        return cls(_parse_hex_key(text, NODE_PUBLIC_PREFIX, field, untyped_ok=True))

    def untyped_hex(self) -> str:
        return self.raw.hex()

    def __str__(self) -> str:
        return NODE_PUBLIC_PREFIX + self.raw.hex()

    def __repr__(self) -> str:
        return f"NodePublicKey({str(self)!r})"

    def short(self) -> str:
        """The form Tailscale logs use: the first 5 hex characters in brackets."""
        return f"[{self.raw.hex()[:5]}]"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NodePublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __bytes__(self) -> bytes:
        return self.raw


class NodePrivateKey:
    """A Curve25519 node private key; its repr shows only the public half."""

    __slots__ = ("_key", "public")

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes | bytearray) or len(raw) != KEY_LEN:
            raise KeyFormatError("private key", f"expected {KEY_LEN} bytes")
        self._key = nacl.public.PrivateKey(bytes(raw))
        self.public = NodePublicKey(bytes(self._key.public_key))

    @classmethod
    def generate(cls) -> NodePrivateKey:
        return cls(bytes(nacl.public.PrivateKey.generate()))

    @classmethod
    def from_text(cls, text: str, field: str = "private key") -> NodePrivateKey:
        """Parse ``privkey:<64 hex>``."""
        return cls(_parse_hex_key(text, NODE_PRIVATE_PREFIX, field, untyped_ok=False))

    def private_text(self) -> str:
        """``privkey:<hex>``: only for writing a key file, never for logs."""
        return NODE_PRIVATE_PREFIX + bytes(self._key).hex()

    def __repr__(self) -> str:
        return f"NodePrivateKey(public={str(self.public)!r})"

    __str__ = __repr__

    def seal_to(self, peer: NodePublicKey, plaintext: bytes,
                random: RandomSource = nacl.utils.random) -> bytes:
        """NaCl crypto_box from this key to ``peer``: nonce(24) || tag(16) || ciphertext."""
        box = nacl.public.Box(self._key, nacl.public.PublicKey(peer.raw))
        return bytes(box.encrypt(plaintext, random(NONCE_LEN)))

    def open_from(self, peer: NodePublicKey, sealed: bytes) -> bytes | None:
        """Open a box sealed by ``peer`` to this key; None when it does not open."""
        if len(sealed) < NONCE_LEN + BOX_TAG_LEN:
            return None
        box = nacl.public.Box(self._key, nacl.public.PublicKey(peer.raw))
        try:
            return bytes(box.decrypt(sealed))
        except nacl.exceptions.CryptoError:
            return None
