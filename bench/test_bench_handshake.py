"""Handshakes per second through two Dispatchers, beside the X25519 work a handshake needs.

What a handshake needs in X25519 (Noise IKpsk2, static-static precomputed per peer, as
pywg does in Peer.__init__), counted from noise.py:

    initiator  create_initiation  ephemeral keypair (1 base-point mult), DH(e_i, S_r)
    responder  consume_initiation DH(S_r, E_i)            (ss: precomputed)
    responder  create_response    ephemeral keypair (1 base-point mult), DH(e_r, E_i), DH(e_r, S_i)
    initiator  consume_response   DH(e_i, E_r), DH(S_i, E_r)

That is 2 key generations + 6 DH = 8 scalar multiplications: the floor, done here with
cryptography's X25519 on key objects prepared where a real implementation can keep them
(the static keys and the peer's static public key).

pywg imports each X25519 private key once (crypto.PrivateKey: the device's static key,
each ephemeral key, the initiator's kept for the response) and loads each public key it
uses twice once (the peer's static key, each received ephemeral key), so it makes the
same 8 scalar multiplications. ``_count_x25519`` checks that by instrumenting every X25519
entry point during one handshake; ``test_x25519_as_pywg_calls_it`` times exactly those
calls, to separate their cost from the Python around them (BLAKE2s/HMAC chaining, AEADs,
messages, timers). Before PrivateKey, keys were passed as bytes: every ``crypto.dh``
re-imported its private key (OpenSSL derives the public key on import: one more scalar
multiplication) and create_initiation recomputed the initiator's own static public key,
15 scalar multiplications in all.
"""

from __future__ import annotations

import secrets

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

import pywg.protocol.crypto as pcrypto
from bench.support import Pair, run
from pywg.protocol import dispatcher, noise, peer
from pywg.protocol.actions import HandshakeCompleted

ROUNDS = 1000
NEEDED_SCALAR_MULTS = 8


def _count_x25519(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Run one handshake with every X25519 entry point counted; return the counts.

    Scalar multiplications: one per private-key import (``from_private_bytes``, as in
    PrivateKey, dh and dh_pubkey) or ``generate``, one per ``PrivateKey.exchange``, and one
    per ``dh`` call (its exchange does not go through PrivateKey).
    """
    counts = {"private_key_imports": 0, "generate": 0, "exchange": 0, "dh": 0, "dh_pubkey": 0}
    real_cls, real_exchange = pcrypto.X25519PrivateKey, pcrypto.PrivateKey.exchange
    real_dh, real_pubkey = pcrypto.dh, pcrypto.dh_pubkey

    class CountingPrivateKey:
        @staticmethod
        def from_private_bytes(data: bytes) -> X25519PrivateKey:
            counts["private_key_imports"] += 1
            return real_cls.from_private_bytes(data)

        @staticmethod
        def generate() -> X25519PrivateKey:
            counts["generate"] += 1
            return real_cls.generate()

    def exchange(self: pcrypto.PrivateKey, public: bytes | X25519PublicKey) -> bytes:
        counts["exchange"] += 1
        return real_exchange(self, public)

    def dh(private: bytes, public: bytes) -> bytes:
        counts["dh"] += 1
        return real_dh(private, public)

    def dh_pubkey(private: bytes) -> bytes:
        counts["dh_pubkey"] += 1
        return real_pubkey(private)

    with monkeypatch.context() as m:
        m.setattr(pcrypto, "X25519PrivateKey", CountingPrivateKey)
        m.setattr(pcrypto.PrivateKey, "exchange", exchange)
        for module in (pcrypto, noise, peer, dispatcher):  # wherever the names were imported
            if hasattr(module, "dh"):
                m.setattr(module, "dh", dh)
            if hasattr(module, "dh_pubkey"):
                m.setattr(module, "dh_pubkey", dh_pubkey)
        actions = pair.handshake()
    assert isinstance(actions[0], HandshakeCompleted)
    return counts


def _scalar_mults(counts: dict[str, int]) -> int:
    return counts["private_key_imports"] + counts["generate"] + counts["exchange"] + counts["dh"]


@pytest.mark.benchmark(group="handshake")
def test_handshake_dispatchers(benchmark, pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """initiate_handshake on A, initiation into B, response into A: one full handshake."""
    counts = _count_x25519(pair, monkeypatch)
    benchmark.extra_info.update(
        x25519_private_key_imports=counts["private_key_imports"], x25519_generate=counts["generate"],
        x25519_exchanges=counts["exchange"], x25519_dh_calls=counts["dh"],
        x25519_pubkey_calls=counts["dh_pubkey"], x25519_scalar_mults=_scalar_mults(counts),
        x25519_scalar_mults_needed=NEEDED_SCALAR_MULTS,
    )
    before = pair.a.peers[pair.b.static_public].handshakes_completed

    def one_handshake() -> None:
        pair.handshake()

    run(benchmark, one_handshake, ops=1, rounds=ROUNDS, warmup_rounds=10, floor="test_x25519_floor")
    done = pair.a.peers[pair.b.static_public].handshakes_completed - before
    assert done == ROUNDS + 10, f"only {done} handshakes completed"
    assert not pair.a.drops and not pair.b.drops, (pair.a.drops, pair.b.drops)


@pytest.mark.benchmark(group="handshake")
def test_x25519_floor(benchmark) -> None:
    """The 8 scalar multiplications a handshake needs, on prepared key objects."""
    s_i, s_r = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    s_i_pub, s_r_pub = s_i.public_key(), s_r.public_key()

    def x25519_work() -> None:
        # initiator: ephemeral keypair, es
        e_i = X25519PrivateKey.generate()
        e_i_raw = e_i.public_key().public_bytes_raw()
        e_i.exchange(s_r_pub)
        # responder: es, ephemeral keypair, ee, se
        e_i_pub = X25519PublicKey.from_public_bytes(e_i_raw)
        s_r.exchange(e_i_pub)
        e_r = X25519PrivateKey.generate()
        e_r_raw = e_r.public_key().public_bytes_raw()
        e_r.exchange(e_i_pub)
        e_r.exchange(s_i_pub)
        # initiator: ee, se
        e_r_pub = X25519PublicKey.from_public_bytes(e_r_raw)
        e_i.exchange(e_r_pub)
        s_i.exchange(e_r_pub)

    run(benchmark, x25519_work, ops=1, rounds=ROUNDS, warmup_rounds=10)
    benchmark.extra_info["x25519_scalar_mults"] = NEEDED_SCALAR_MULTS


@pytest.mark.benchmark(group="handshake")
def test_x25519_as_pywg_calls_it(benchmark, pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference, not a floor: pywg's own X25519 calls (crypto.PrivateKey) and nothing else."""
    counts = _count_x25519(pair, monkeypatch)
    # What x25519_work mirrors: two ephemeral imports, six exchanges, nothing on bytes.
    assert counts == {"private_key_imports": 2, "generate": 0, "exchange": 6, "dh": 0, "dh_pubkey": 0}, counts
    s_i = pcrypto.PrivateKey(secrets.token_bytes(32))  # Dispatcher.static_key
    s_r = pcrypto.PrivateKey(secrets.token_bytes(32))
    s_i_pub = pcrypto.load_public_key(s_i.public)  # Peer.public_key_loaded
    s_r_pub = pcrypto.load_public_key(s_r.public)

    def x25519_work() -> None:
        # create_initiation: ephemeral from the device's random bytes, es (ss precomputed)
        e_i = pcrypto.PrivateKey(secrets.token_bytes(32))
        e_i.exchange(s_r_pub)
        # consume_initiation: E_i loaded once, es; create_response: ephemeral, ee, se
        e_i_pub = pcrypto.load_public_key(e_i.public)
        s_r.exchange(e_i_pub)
        e_r = pcrypto.PrivateKey(secrets.token_bytes(32))
        e_r.exchange(e_i_pub)
        e_r.exchange(s_i_pub)
        # consume_response: E_r loaded once, ee, se (e_i kept imported in PendingInitiation)
        e_r_pub = pcrypto.load_public_key(e_r.public)
        e_i.exchange(e_r_pub)
        s_i.exchange(e_r_pub)

    run(benchmark, x25519_work, ops=1, rounds=ROUNDS, warmup_rounds=10, floor="test_x25519_floor")
    benchmark.extra_info["x25519_scalar_mults"] = _scalar_mults(counts)
