"""Standard Noise test vectors (IK and IKpsk2, 25519/ChaChaPoly/BLAKE2s) through pywg.protocol.noise.

The vectors use their own prologues and payloads and no WireGuard framing, so they test
the Noise core only: both handshake messages byte-for-byte, the final handshake hash,
and every transport message under the Split() keys.
"""

from __future__ import annotations

import pytest

from pywg.protocol import crypto, noise
from vectors import h, load

NOISE = load("noise_ikpsk2")
VECTORS = NOISE["vectors"]


def _id(v: dict) -> str:
    return f"{v['protocol_name']}@{v['origin'].split()[0]}"


def test_vector_count() -> None:
    names = [v["protocol_name"] for v in VECTORS]
    assert len(names) == 4
    assert names.count("Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s") == 1


@pytest.mark.parametrize("v", VECTORS, ids=[_id(v) for v in VECTORS])
def test_noise_vector(v: dict) -> None:
    protocol = v["protocol_name"].encode()
    psk_mode = "psk2" in v["protocol_name"]
    init_psk = h(v["init_psks"][0]) if psk_mode else None
    resp_psk = h(v["resp_psks"][0]) if psk_mode else None
    init_static, init_ephemeral = h(v["init_static"]), h(v["init_ephemeral"])
    resp_static, resp_ephemeral = h(v["resp_static"]), h(v["resp_ephemeral"])
    resp_static_pub = h(v["init_remote_static"])
    assert crypto.dh_pubkey(resp_static) == resp_static_pub
    msg0, msg1, *transport = v["messages"]

    # -> e, es, s, ss
    initiator = noise.SymmetricState(protocol, h(v["init_prologue"]))
    fields = noise.create_initiation(
        initiator,
        static_private=init_static,
        remote_static=resp_static_pub,
        ephemeral_private=init_ephemeral,
        payload=h(msg0["payload"]),
        psk_mode=psk_mode,
    )
    wire0 = fields.ephemeral + fields.encrypted_static + fields.encrypted_payload
    assert wire0 == h(msg0["ciphertext"])

    responder = noise.SymmetricState(protocol, h(v["resp_prologue"]))
    received = noise.InitiationFields(wire0[:32], wire0[32:80], wire0[80:])
    consumed = noise.consume_initiation(
        responder,
        received,
        static_private=resp_static,
        static_public=resp_static_pub,
        psk_mode=psk_mode,
    )
    assert consumed.remote_static == crypto.dh_pubkey(init_static)
    assert consumed.remote_ephemeral == crypto.dh_pubkey(init_ephemeral)
    assert consumed.payload == h(msg0["payload"])
    assert (responder.ck, responder.h) == (initiator.ck, initiator.h)

    # <- e, ee, se (, psk)
    e_pub, encrypted = noise.create_response(
        consumed, ephemeral_private=resp_ephemeral, psk=resp_psk, payload=h(msg1["payload"])
    )
    wire1 = e_pub + encrypted
    assert wire1 == h(msg1["ciphertext"])
    payload1 = noise.consume_response(
        initiator,
        remote_ephemeral=wire1[:32],
        encrypted_payload=wire1[32:],
        ephemeral_private=init_ephemeral,
        static_private=init_static,
        psk=init_psk,
    )
    assert payload1 == h(msg1["payload"])

    assert initiator.h == responder.h
    if "handshake_hash" in v:
        assert initiator.h == h(v["handshake_hash"])

    # Transport: alternating initiator->responder (key 1) and responder->initiator (key 2),
    # each direction with its own nonce counter from 0 and empty AD.
    keys = initiator.split()
    assert responder.split() == keys
    counters = [0, 0]
    for n, message in enumerate(transport):
        direction = n % 2
        key, counter = keys[direction], counters[direction]
        plaintext, ciphertext = h(message["payload"]), h(message["ciphertext"])
        assert crypto.aead_encrypt(key, counter, plaintext, b"") == ciphertext, f"transport {n}"
        assert crypto.aead_decrypt(key, counter, ciphertext, b"") == plaintext
        assert crypto.AeadKey(key).seal(counter, plaintext) == ciphertext
        assert crypto.AeadKey(key).open(counter, ciphertext) == plaintext
        counters[direction] += 1
    assert sum(counters) == len(transport) > 0


@pytest.mark.parametrize("v", VECTORS, ids=[_id(v) for v in VECTORS])
def test_noise_vector_wrong_responder_key_rejected(v: dict) -> None:
    """A responder with a different static key cannot decrypt message 0."""
    protocol = v["protocol_name"].encode()
    psk_mode = "psk2" in v["protocol_name"]
    wire0 = h(v["messages"][0]["ciphertext"])
    wrong_static = crypto.dh_generate(bytes(range(32)))
    responder = noise.SymmetricState(protocol, h(v["resp_prologue"]))
    with pytest.raises(crypto.CryptoError):
        noise.consume_initiation(
            responder,
            noise.InitiationFields(wire0[:32], wire0[32:80], wire0[80:]),
            static_private=wrong_static,
            static_public=crypto.dh_pubkey(wrong_static),
            psk_mode=psk_mode,
        )
