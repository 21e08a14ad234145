"""Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s with WireGuard's construction (paper, 5.4.2-5.4.5).

Pure functions over explicit state: every random input (ephemeral keys) and the
timestamp payload are arguments, so the published vectors can drive this code.

    initiator                                responder
    create_initiation  -- e, es, s, ss -->   consume_initiation
    consume_response   <-- e, ee, se, psk -- create_response
    derive_transport_keys(...)               derive_transport_keys(...)

``psk=None`` gives plain Noise_IK (used only by the generic Noise vectors); WireGuard
always runs IKpsk2 with an all-zero psk when none is configured.

Private keys are accepted as bytes or as crypto.PrivateKey: the engine passes PrivateKey
objects (imported once: the static key per device, an initiator's ephemeral key for both
of its messages), so a handshake costs the 8 X25519 scalar multiplications it needs. A
remote static key can likewise be passed loaded once (``remote_static_key``), and each
received ephemeral key is loaded once for its two DHs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from hashlib import blake2s as _blake2s

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from .constants import CONSTRUCTION, HASH_LEN, IDENTIFIER, KEY_LEN
from .crypto import (
    PrivateKey,
    aead_decrypt,
    aead_encrypt,
    as_private_key,
    hash_,
    kdf1,
    kdf2,
    kdf3,
    load_public_key,
)

ZERO_PSK = bytes(KEY_LEN)

# (protocol name, prologue) -> the initial (ck, h): constant, so computed once.
_INITIAL_STATES: dict[tuple[bytes, bytes], tuple[bytes, bytes]] = {}


class SymmetricState:
    """The Noise SymmetricState: chaining key ck, handshake hash h, cipher key k."""

    __slots__ = ("ck", "h", "k")

    def __init__(self, protocol_name: bytes = CONSTRUCTION, prologue: bytes = IDENTIFIER) -> None:
        initial = _INITIAL_STATES.get((protocol_name, prologue))
        if initial is None:
            if len(protocol_name) <= HASH_LEN:
                h = protocol_name.ljust(HASH_LEN, b"\x00")
            else:
                h = hash_(protocol_name)
            initial = _INITIAL_STATES[protocol_name, prologue] = (h, hash_(h, prologue))
        self.ck, self.h = initial
        self.k = b""

    def __repr__(self) -> str:
        return "SymmetricState(<secret>)"

    def copy(self) -> SymmetricState:
        clone = SymmetricState.__new__(SymmetricState)
        clone.ck, clone.h, clone.k = self.ck, self.h, self.k
        return clone

    def mix_hash(self, data: bytes) -> None:
        self.h = _blake2s(self.h + data).digest()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, self.k = kdf2(self.ck, ikm)

    def mix_chain(self, ikm: bytes) -> None:
        """C := KDF1(C, ikm) (the paper's form when the derived key is not used)."""
        self.ck = kdf1(self.ck, ikm)

    def mix_key_and_hash(self, psk: bytes) -> None:
        self.ck, tau, self.k = kdf3(self.ck, psk)
        self.mix_hash(tau)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = aead_encrypt(self.k, 0, plaintext, self.h)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = aead_decrypt(self.k, 0, ciphertext, self.h)  # raises CryptoError
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        """(initiator->responder key, responder->initiator key)."""
        return kdf2(self.ck, b"")


@dataclass(slots=True, repr=False)
class InitiationFields:
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_payload: bytes


@dataclass(slots=True, repr=False)
class ConsumedInitiation:
    """A responder's state after an initiation decrypted: who sent it and what."""

    state: SymmetricState
    remote_static: bytes
    remote_ephemeral: bytes
    payload: bytes  # the TAI64N timestamp in WireGuard
    remote_ephemeral_key: X25519PublicKey | None = None  # remote_ephemeral, loaded for DH


def create_initiation(
    state: SymmetricState,
    *,
    static_private: bytes | PrivateKey,
    remote_static: bytes,
    ephemeral_private: bytes | PrivateKey,
    payload: bytes,
    psk_mode: bool = True,
    static_static: bytes | None = None,
    remote_static_key: X25519PublicKey | None = None,
) -> InitiationFields:
    """Initiator: -> e, es, s, ss (+payload). ``state`` is fresh and is advanced.

    ``remote_static_key``, if given, must be ``load_public_key(remote_static)`` (kept loaded
    by the caller); ``static_static``, if given, DH(static_private, remote_static).
    """
    static = as_private_key(static_private)
    ephemeral = as_private_key(ephemeral_private)
    state.mix_hash(remote_static)  # pre-message: <- s
    e_pub = ephemeral.public
    state.mix_hash(e_pub)
    if psk_mode:
        state.mix_chain(e_pub)
    state.mix_key(ephemeral.exchange(remote_static if remote_static_key is None else remote_static_key))
    encrypted_static = state.encrypt_and_hash(static.public)
    state.mix_key(static_static if static_static is not None else static.exchange(remote_static))
    encrypted_payload = state.encrypt_and_hash(payload)
    return InitiationFields(e_pub, encrypted_static, encrypted_payload)


def consume_initiation(
    state: SymmetricState,
    fields: InitiationFields,
    *,
    static_private: bytes | PrivateKey,
    static_public: bytes,
    psk_mode: bool = True,
    static_static_for: Callable[[bytes], bytes | None] | None = None,
) -> ConsumedInitiation:
    """Responder: decrypt an initiation. Raises CryptoError when it does not authenticate."""
    static = as_private_key(static_private)
    state.mix_hash(static_public)
    state.mix_hash(fields.ephemeral)
    if psk_mode:
        state.mix_chain(fields.ephemeral)
    remote_ephemeral = load_public_key(fields.ephemeral)  # loaded once: es here, ee in create_response
    state.mix_key(static.exchange(remote_ephemeral))
    remote_static = state.decrypt_and_hash(fields.encrypted_static)
    ss = static_static_for(remote_static) if static_static_for else None
    state.mix_key(ss if ss is not None else static.exchange(remote_static))
    payload = state.decrypt_and_hash(fields.encrypted_payload)
    return ConsumedInitiation(state, remote_static, fields.ephemeral, payload, remote_ephemeral)


def create_response(
    consumed: ConsumedInitiation,
    *,
    ephemeral_private: bytes | PrivateKey,
    psk: bytes | None,
    payload: bytes = b"",
    remote_static_key: X25519PublicKey | None = None,
) -> tuple[bytes, bytes]:
    """Responder: <- e, ee, se, psk (+payload). Returns (ephemeral public, encrypted payload).

    ``remote_static_key``, if given, must be ``load_public_key(consumed.remote_static)``.
    """
    ephemeral = as_private_key(ephemeral_private)
    state = consumed.state
    e_pub = ephemeral.public
    state.mix_hash(e_pub)
    if psk is not None:
        state.mix_chain(e_pub)
    remote_ephemeral = consumed.remote_ephemeral_key
    state.mix_key(ephemeral.exchange(consumed.remote_ephemeral if remote_ephemeral is None else remote_ephemeral))
    state.mix_key(ephemeral.exchange(consumed.remote_static if remote_static_key is None else remote_static_key))
    if psk is not None:
        state.mix_key_and_hash(psk)
    return e_pub, state.encrypt_and_hash(payload)


def consume_response(
    state: SymmetricState,
    *,
    remote_ephemeral: bytes,
    encrypted_payload: bytes,
    ephemeral_private: bytes | PrivateKey,
    static_private: bytes | PrivateKey,
    psk: bytes | None,
) -> bytes:
    """Initiator: process the response on the state left by create_initiation."""
    state.mix_hash(remote_ephemeral)
    if psk is not None:
        state.mix_chain(remote_ephemeral)
    remote = load_public_key(remote_ephemeral)  # loaded once for ee and se
    state.mix_key(as_private_key(ephemeral_private).exchange(remote))
    state.mix_key(as_private_key(static_private).exchange(remote))
    if psk is not None:
        state.mix_key_and_hash(psk)
    return state.decrypt_and_hash(encrypted_payload)
