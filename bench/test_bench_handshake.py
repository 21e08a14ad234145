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

pywg passes keys as bytes: every ``crypto.dh`` re-imports the private key, and OpenSSL
derives the public key on import (one more scalar multiplication), and create_initiation
recomputes the initiator's own static public key. ``test_x25519_as_pywg_calls_it`` times
exactly the calls pywg makes, to separate that cost from the Python around it.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

import pywg.protocol.crypto as pcrypto
from bench.support import Pair, run
from pywg.protocol import noise
from pywg.protocol.actions import HandshakeCompleted

ROUNDS = 1000
NEEDED_SCALAR_MULTS = 8


def _count_x25519(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Run one handshake with pywg's X25519 entry points wrapped; return the call counts."""
    counts = {"dh": 0, "dh_pubkey": 0, "private_key_imports": 0, "generate": 0}
    real_dh, real_pubkey, real_cls = noise.dh, noise.dh_pubkey, pcrypto.X25519PrivateKey

    def dh(private: bytes, public: bytes) -> bytes:
        counts["dh"] += 1
        return real_dh(private, public)

    def dh_pubkey(private: bytes) -> bytes:
        counts["dh_pubkey"] += 1
        return real_pubkey(private)

    class CountingPrivateKey:
        @staticmethod
        def from_private_bytes(data: bytes) -> X25519PrivateKey:
            counts["private_key_imports"] += 1
            return real_cls.from_private_bytes(data)

        @staticmethod
        def generate() -> X25519PrivateKey:
            counts["generate"] += 1
            return real_cls.generate()

    with monkeypatch.context() as m:
        m.setattr(noise, "dh", dh)
        m.setattr(noise, "dh_pubkey", dh_pubkey)
        m.setattr(pcrypto, "X25519PrivateKey", CountingPrivateKey)
        actions = pair.handshake()
    assert isinstance(actions[0], HandshakeCompleted)
    return counts


@pytest.mark.benchmark(group="handshake")
def test_handshake_dispatchers(benchmark, pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """initiate_handshake on A, initiation into B, response into A: one full handshake."""
    counts = _count_x25519(pair, monkeypatch)
    # Each DH is an exchange (1 scalar mult) on a freshly imported private key (1 more).
    scalar_mults = counts["dh"] + counts["private_key_imports"] + counts["generate"]
    benchmark.extra_info.update(
        x25519_dh_calls=counts["dh"], x25519_pubkey_calls=counts["dh_pubkey"],
        x25519_scalar_mults=scalar_mults, x25519_scalar_mults_needed=NEEDED_SCALAR_MULTS,
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
    """Reference, not a floor: pywg's own X25519 calls (bytes in, bytes out) and nothing else."""
    counts = _count_x25519(pair, monkeypatch)
    assert counts["generate"] == 0  # ephemerals are clamped random bytes, no X25519 op
    s_i = pcrypto.dh_generate()
    s_r = pcrypto.dh_generate()
    s_i_pub, s_r_pub = pcrypto.dh_pubkey(s_i), pcrypto.dh_pubkey(s_r)

    def x25519_work() -> None:
        e_i = pcrypto.dh_generate()
        e_r = pcrypto.dh_generate()
        # create_initiation: e_i public, es, own static public (ss precomputed)
        e_i_pub = pcrypto.dh_pubkey(e_i)
        pcrypto.dh(e_i, s_r_pub)
        pcrypto.dh_pubkey(s_i)
        # consume_initiation: es (ss precomputed); create_response: e_r public, ee, se
        pcrypto.dh(s_r, e_i_pub)
        e_r_pub = pcrypto.dh_pubkey(e_r)
        pcrypto.dh(e_r, e_i_pub)
        pcrypto.dh(e_r, s_i_pub)
        # consume_response: ee, se
        pcrypto.dh(e_i, e_r_pub)
        pcrypto.dh(s_i, e_r_pub)

    assert (counts["dh"], counts["dh_pubkey"]) == (6, 3), counts  # what x25519_work mirrors
    run(benchmark, x25519_work, ops=1, rounds=ROUNDS, warmup_rounds=10, floor="test_x25519_floor")
    benchmark.extra_info["x25519_scalar_mults"] = counts["dh"] + counts["private_key_imports"]
