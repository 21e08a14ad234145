"""WireGuard's cryptographic primitives, as named in the paper (section 5.4).

DH (X25519), HASH/MAC (BLAKE2s), HMAC-BLAKE2s, KDF1/2/3, AEAD (ChaCha20-Poly1305 with
the WireGuard nonce), XAEAD (XChaCha20-Poly1305) and TAI64N.
"""

from __future__ import annotations

import hmac as _hmac
import struct
from hashlib import blake2s as _blake2s

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
    """X25519(private, public); raises CryptoError on an all-zero shared secret.

    Imports ``private`` on every call (one extra scalar multiplication): for a key used
    more than once, import it once as a PrivateKey.
    """
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(public)
        )
    except ValueError as exc:  # cryptography refuses all-zero outputs itself
        raise CryptoError("x25519 produced an all-zero shared secret") from exc
    if not _hmac.compare_digest(shared, ZERO_KEY):
        return shared
    raise CryptoError("x25519 produced an all-zero shared secret")


class PrivateKey:
    """An X25519 private key imported once, with its public key computed once.

    Importing a key from bytes costs OpenSSL one scalar multiplication (it derives the
    public key), so a key used more than once (the device's static key, an initiator's
    ephemeral key) is kept in this form. The secret never leaves the object: no accessor,
    and ``repr`` shows only the public key.
    """

    __slots__ = ("_key", "public")

    def __init__(self, private: bytes) -> None:
        """Import 32 private-key bytes (clamped by X25519 itself, as ``dh`` does)."""
        self._key = X25519PrivateKey.from_private_bytes(private)
        self.public: bytes = self._key.public_key().public_bytes_raw()

    def __repr__(self) -> str:
        return f"PrivateKey(public={self.public.hex()[:16]}..., <secret>)"

    def exchange(self, public: bytes | X25519PublicKey) -> bytes:
        """X25519(self, public); raises CryptoError on an all-zero shared secret.

        ``public``: 32 bytes, or a key loaded once by ``load_public_key`` when it is used again.
        """
        try:
            if isinstance(public, bytes):
                public = X25519PublicKey.from_public_bytes(public)
            shared = self._key.exchange(public)
        except ValueError as exc:  # cryptography refuses all-zero outputs itself
            raise CryptoError("x25519 produced an all-zero shared secret") from exc
        if not _hmac.compare_digest(shared, ZERO_KEY):
            return shared
        raise CryptoError("x25519 produced an all-zero shared secret")


def load_public_key(public: bytes) -> X25519PublicKey:
    """Load a 32-byte X25519 public key once, for several ``PrivateKey.exchange`` calls."""
    try:
        return X25519PublicKey.from_public_bytes(public)
    except ValueError as exc:
        raise CryptoError("not a 32-byte x25519 public key") from exc


_LOW_ORDER_PROBE = bytes([0x48]) + bytes(30) + bytes([0x40])  # any clamped scalar will do


def is_low_order(public: bytes) -> bool:
    """True if X25519 with ``public`` gives the all-zero secret for every private key
    (a small-order point): no handshake with such a key can ever succeed."""
    try:
        dh(_LOW_ORDER_PROBE, public)
    except CryptoError:
        return True
    return False


def as_private_key(private: bytes | PrivateKey) -> PrivateKey:
    """``private`` itself if already imported, else imported from its bytes."""
    return private if isinstance(private, PrivateKey) else PrivateKey(private)


# --- BLAKE2s ------------------------------------------------------------------


def hash_(*parts: bytes) -> bytes:
    """HASH(parts...) = BLAKE2s-256 over the concatenation."""
    h = _blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    """MAC(key, data) = keyed BLAKE2s with a 16-byte output."""
    return _blake2s(data, key=key, digest_size=16).digest()


_BLAKE2S_BLOCK = 64
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


def _hmac_pads(key: bytes) -> tuple[bytes, bytes]:
    """HMAC's key XOR ipad and key XOR opad blocks (RFC 2104) for BLAKE2s."""
    if len(key) > _BLAKE2S_BLOCK:
        key = _blake2s(key).digest()
    key = key.ljust(_BLAKE2S_BLOCK, b"\x00")
    return key.translate(_IPAD), key.translate(_OPAD)


def hmac(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s-256 (RFC 2104 spelled out: about twice as fast as the hmac module)."""
    ipad, opad = _hmac_pads(key)
    return _blake2s(opad + _blake2s(ipad + data).digest()).digest()


# KDFn (paper, 5.4.2): t0 = HMAC(key, data); t_i = HMAC(t0, t_(i-1) || i). The t0 pads
# are computed once for the two or three HMACs keyed with t0.


def kdf1(key: bytes, data: bytes) -> bytes:
    ipad, opad = _hmac_pads(hmac(key, data))
    return _blake2s(opad + _blake2s(ipad + b"\x01").digest()).digest()


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    ipad, opad = _hmac_pads(hmac(key, data))
    t1 = _blake2s(opad + _blake2s(ipad + b"\x01").digest()).digest()
    return t1, _blake2s(opad + _blake2s(ipad + t1 + b"\x02").digest()).digest()


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    ipad, opad = _hmac_pads(hmac(key, data))
    t1 = _blake2s(opad + _blake2s(ipad + b"\x01").digest()).digest()
    t2 = _blake2s(opad + _blake2s(ipad + t1 + b"\x02").digest()).digest()
    return t1, t2, _blake2s(opad + _blake2s(ipad + t2 + b"\x03").digest()).digest()


INITIAL_CHAINING_KEY = hash_(CONSTRUCTION)
INITIAL_HASH = hash_(INITIAL_CHAINING_KEY, IDENTIFIER)


# --- AEAD -------------------------------------------------------------------


_nonce = struct.Struct("<4xQ").pack  # 4 zero bytes || LE64 counter


def aead_nonce(counter: int) -> bytes:
    """The WireGuard nonce: 4 zero bytes then the 64-bit little-endian counter."""
    return _nonce(counter)


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_nonce(counter), plaintext, aad or None)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, aad: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(_nonce(counter), ciphertext, aad or None)
    except InvalidTag as exc:
        raise CryptoError("aead authentication failed") from exc


class AeadKey:
    """A ChaCha20-Poly1305 key prepared once for many transport packets."""

    __slots__ = ("_decrypt", "_encrypt")

    def __init__(self, key: bytes) -> None:
        aead = ChaCha20Poly1305(key)
        self._encrypt = aead.encrypt  # bound once: one attribute lookup per packet
        self._decrypt = aead.decrypt

    def __repr__(self) -> str:
        return "AeadKey(<secret>)"

    def seal(self, counter: int, plaintext: bytes) -> bytes:
        return self._encrypt(_nonce(counter), plaintext, None)

    def open(self, counter: int, ciphertext: bytes) -> bytes:
        try:
            return self._decrypt(_nonce(counter), ciphertext, None)
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
