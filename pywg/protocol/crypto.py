"""WireGuard's cryptographic primitives, as named in the paper (section 5.4).

DH (X25519), HASH/MAC (BLAKE2s), HMAC-BLAKE2s, KDF1/2/3, AEAD (ChaCha20-Poly1305 with
the WireGuard nonce), XAEAD (XChaCha20-Poly1305) and TAI64N.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
import struct

import nacl.bindings as _nacl
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .constants import CONSTRUCTION, IDENTIFIER, KEY_LEN

ZERO_KEY = bytes(KEY_LEN)


class CryptoError(Exception):
    """An authentication or key-agreement failure (remote input; drop, don't crash)."""


# --- X25519 -----------------------------------------------------------------


def dh_generate(random_bytes: bytes | None = None) -> bytes:
    """Return a new clamped private key; ``random_bytes`` (32) makes it deterministic."""
    raw = random_bytes if random_bytes is not None else X25519PrivateKey.generate().private_bytes_raw()
    k = bytearray(raw)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


def dh_pubkey(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def dh(private: bytes, public: bytes) -> bytes:
    """X25519(private, public); raises CryptoError on an all-zero shared secret."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(public)
        )
    except ValueError as exc:  # cryptography refuses all-zero outputs itself
        raise CryptoError("x25519 produced an all-zero shared secret") from exc
    if not _hmac.compare_digest(shared, ZERO_KEY):
        return shared
    raise CryptoError("x25519 produced an all-zero shared secret")


# --- BLAKE2s ------------------------------------------------------------------


def hash_(*parts: bytes) -> bytes:
    """HASH(parts...) = BLAKE2s-256 over the concatenation."""
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    """MAC(key, data) = keyed BLAKE2s with a 16-byte output."""
    return hashlib.blake2s(data, key=key, digest_size=16).digest()


def hmac(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s-256."""
    return _hmac.new(key, data, hashlib.blake2s).digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    t0 = hmac(key, data)
    return hmac(t0, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    t0 = hmac(key, data)
    t1 = hmac(t0, b"\x01")
    return t1, hmac(t0, t1 + b"\x02")


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    t0 = hmac(key, data)
    t1 = hmac(t0, b"\x01")
    t2 = hmac(t0, t1 + b"\x02")
    return t1, t2, hmac(t0, t2 + b"\x03")


INITIAL_CHAINING_KEY = hash_(CONSTRUCTION)
INITIAL_HASH = hash_(INITIAL_CHAINING_KEY, IDENTIFIER)


# --- AEAD -------------------------------------------------------------------


def aead_nonce(counter: int) -> bytes:
    """The WireGuard nonce: 4 zero bytes then the 64-bit little-endian counter."""
    return b"\x00\x00\x00\x00" + struct.pack("<Q", counter)


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(aead_nonce(counter), plaintext, aad or None)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, aad: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(aead_nonce(counter), ciphertext, aad or None)
    except InvalidTag as exc:
        raise CryptoError("aead authentication failed") from exc


class AeadKey:
    """A ChaCha20-Poly1305 key prepared once for many transport packets."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)

    def __repr__(self) -> str:
        return "AeadKey(<secret>)"

    def seal(self, counter: int, plaintext: bytes) -> bytes:
        return self._aead.encrypt(aead_nonce(counter), plaintext, None)

    def open(self, counter: int, ciphertext: bytes) -> bytes:
        try:
            return self._aead.decrypt(aead_nonce(counter), ciphertext, None)
        except InvalidTag as exc:
            raise CryptoError("aead authentication failed") from exc


def xaead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """XChaCha20-Poly1305 (libsodium through pynacl)."""
    return _nacl.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)


def xaead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    try:
        return _nacl.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, aad, nonce, key)
    except Exception as exc:  # nacl.exceptions.CryptoError
        raise CryptoError("xaead authentication failed") from exc


# --- TAI64N -----------------------------------------------------------------

_TAI64_BASE = 0x400000000000000A
_WHITENER_MASK = 0x1000000 - 1


def tai64n(unix_time_ns: int) -> bytes:
    """TAI64N label for a wall-clock time, nanoseconds whitened to 2**24 ns."""
    secs, nsec = divmod(unix_time_ns, 1_000_000_000)
    return struct.pack(">QI", _TAI64_BASE + secs, nsec & ~_WHITENER_MASK)


def constant_time_eq(a: bytes, b: bytes) -> bool:
    return _hmac.compare_digest(a, b)
