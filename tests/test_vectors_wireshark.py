"""A real WireGuard handshake (Wireshark test captures, published keys) rebuilt with pywg.

Sessions: session 1 has the initiation, the response, transport keys and two data
packets; session 2 and the PSK capture have only an initiation (the PSK enters at
message 2, which is not included). Every message present is rebuilt byte-for-byte
from the keys and also consumed by the receiving side.
"""

from __future__ import annotations

import struct

import pytest

from pywg.protocol import crypto, noise
from pywg.protocol.constants import LABEL_MAC1, MESSAGE_INITIATION, MESSAGE_RESPONSE
from pywg.protocol.messages import (
    MAC1_OFFSET_INITIATION,
    MAC1_OFFSET_RESPONSE,
    Initiation,
    Response,
    TransportHeader,
    parse,
    transport_header,
)
from vectors import h, load

WIRESHARK = load("wireguard_handshake_wireshark")
KEYS = WIRESHARK["keys"]
SESSIONS = WIRESHARK["sessions"]
SESSION_IDS = [s["name"].split(" (")[0] for s in SESSIONS]

INITIATOR_PRIV = h(KEYS["initiator_static"]["private"])
INITIATOR_PUB = h(KEYS["initiator_static"]["public"])
RESPONDER_PRIV = h(KEYS["responder_static"]["private"])
RESPONDER_PUB = h(KEYS["responder_static"]["public"])


def _mac1_key(receiver_static_public: bytes) -> bytes:
    return crypto.hash_(LABEL_MAC1 + receiver_static_public)


def _session_psk(session: dict) -> bytes:
    """WireGuard always runs IKpsk2; no configured psk means 32 zero bytes."""
    return h(session["preshared_key"]) if "preshared_key" in session else noise.ZERO_PSK


def _build_initiation(
    session: dict, static_private: bytes, ephemeral_private: bytes
) -> tuple[bytes, noise.SymmetricState]:
    init = session["initiation"]
    state = noise.SymmetricState()
    # The captured timestamps predate nanosecond whitening, so the recorded 12 bytes are used
    # as the payload as they are (pywg's tai64n() would round the nanoseconds down).
    fields = noise.create_initiation(
        state,
        static_private=static_private,
        remote_static=RESPONDER_PUB,
        ephemeral_private=ephemeral_private,
        payload=h(init["decrypted_timestamp"]["tai64n"]),
    )
    unsigned = Initiation(
        sender_index=init["fields"]["sender_index"],
        ephemeral=fields.ephemeral,
        encrypted_static=fields.encrypted_static,
        encrypted_timestamp=fields.encrypted_payload,
    ).pack()
    mac1 = crypto.mac(_mac1_key(RESPONDER_PUB), unsigned[:MAC1_OFFSET_INITIATION])
    signed = Initiation(
        sender_index=init["fields"]["sender_index"],
        ephemeral=fields.ephemeral,
        encrypted_static=fields.encrypted_static,
        encrypted_timestamp=fields.encrypted_payload,
        mac1=mac1,
    ).pack()
    return signed, state


def test_static_keys() -> None:
    assert crypto.dh_pubkey(INITIATOR_PRIV) == INITIATOR_PUB
    assert crypto.dh_pubkey(RESPONDER_PRIV) == RESPONDER_PUB


def test_session_shapes() -> None:
    assert len(SESSIONS) == 3
    assert [("response" in s, len(s.get("transport", []))) for s in SESSIONS] == [
        (True, 2),
        (False, 0),
        (False, 0),
    ]


@pytest.mark.parametrize("session", SESSIONS, ids=SESSION_IDS)
def test_initiation_rebuilt(session: dict) -> None:
    init = session["initiation"]
    ephemeral = h(session["initiator_ephemeral"]["private"])
    assert crypto.dh_pubkey(ephemeral) == h(session["initiator_ephemeral"]["public"])
    expected = h(init["bytes"])
    assert len(expected) == init["length"] == 148

    wire, state = _build_initiation(session, INITIATOR_PRIV, ephemeral)
    assert wire == expected

    # Field by field, through the parser.
    fields = init["fields"]
    msg = parse(wire)
    assert isinstance(msg, Initiation)
    assert fields["type"] == MESSAGE_INITIATION == wire[0]
    assert msg.sender_index == fields["sender_index"]
    assert wire[4:8] == h(fields["sender_index_bytes"])
    assert msg.ephemeral == h(fields["unencrypted_ephemeral"])
    assert msg.encrypted_static == h(fields["encrypted_static"])
    assert msg.encrypted_timestamp == h(fields["encrypted_timestamp"])
    assert msg.mac1 == h(fields["mac1"])
    assert msg.mac2 == h(fields["mac2"]) == bytes(16)

    # Intermediate values of the reference computation, where the file gives them.
    mid = init["intermediate"]
    if "initial_chaining_key" in mid:
        assert noise.SymmetricState().ck == crypto.INITIAL_CHAINING_KEY == h(mid["initial_chaining_key"])
    if "hash_after_mixing_responder_static" in mid:
        fresh = noise.SymmetricState()
        assert fresh.h == crypto.INITIAL_HASH
        fresh.mix_hash(RESPONDER_PUB)
        assert fresh.h == h(mid["hash_after_mixing_responder_static"])
    if "mac1_key_hash_label_mac1_responder_static" in mid:
        assert _mac1_key(RESPONDER_PUB) == h(mid["mac1_key_hash_label_mac1_responder_static"])
    assert state.ck == h(mid["chaining_key_after_msg1"])
    assert state.h == h(mid["hash_after_msg1"])


@pytest.mark.parametrize("session", SESSIONS, ids=SESSION_IDS)
def test_initiation_consumed_by_responder(session: dict) -> None:
    init = session["initiation"]
    wire = h(init["bytes"])
    msg = parse(wire)
    assert isinstance(msg, Initiation)
    assert crypto.mac(_mac1_key(RESPONDER_PUB), wire[:MAC1_OFFSET_INITIATION]) == msg.mac1

    state = noise.SymmetricState()
    consumed = noise.consume_initiation(
        state,
        noise.InitiationFields(msg.ephemeral, msg.encrypted_static, msg.encrypted_timestamp),
        static_private=RESPONDER_PRIV,
        static_public=RESPONDER_PUB,
    )
    assert consumed.remote_static == h(init["decrypted_static"]) == INITIATOR_PUB
    assert consumed.remote_ephemeral == h(session["initiator_ephemeral"]["public"])
    stamp = init["decrypted_timestamp"]
    assert consumed.payload == h(stamp["tai64n"])
    seconds, nanoseconds = struct.unpack(">QI", consumed.payload)
    assert seconds - 0x400000000000000A == stamp["unix_seconds"]
    assert nanoseconds == stamp["nanoseconds"]
    assert state.ck == h(init["intermediate"]["chaining_key_after_msg1"])
    assert state.h == h(init["intermediate"]["hash_after_msg1"])


@pytest.mark.parametrize("session", SESSIONS, ids=SESSION_IDS)
def test_initiation_tampered_mac_or_payload(session: dict) -> None:
    wire = bytearray(h(session["initiation"]["bytes"]))
    wire[100] ^= 0x01  # inside encrypted_timestamp: mac1 and the AEAD tag both break
    msg = parse(bytes(wire))
    assert crypto.mac(_mac1_key(RESPONDER_PUB), bytes(wire[:MAC1_OFFSET_INITIATION])) != msg.mac1
    with pytest.raises(crypto.CryptoError):
        noise.consume_initiation(
            noise.SymmetricState(),
            noise.InitiationFields(msg.ephemeral, msg.encrypted_static, msg.encrypted_timestamp),
            static_private=RESPONDER_PRIV,
            static_public=RESPONDER_PUB,
        )


@pytest.mark.parametrize("session", SESSIONS, ids=SESSION_IDS)
def test_clamping_alt_keys(session: dict) -> None:
    """Wireshark's *_alt private keys differ only in clamped bits: same public keys, same bytes."""
    note = KEYS["clamping_note"]
    alt_static = h(note["initiator_static_private_alt"])
    assert alt_static != INITIATOR_PRIV
    assert crypto.dh_pubkey(alt_static) == INITIATOR_PUB
    ephemeral = h(session["initiator_ephemeral"]["private"])
    if session is SESSIONS[0]:
        alt_ephemeral = h(note["initiator_ephemeral0_private_alt"])
        assert alt_ephemeral != ephemeral
        assert crypto.dh_pubkey(alt_ephemeral) == h(session["initiator_ephemeral"]["public"])
        ephemeral = alt_ephemeral
    wire, _ = _build_initiation(session, alt_static, ephemeral)
    assert wire == h(session["initiation"]["bytes"])


SESSION_1 = SESSIONS[0]


def _session1_after_response() -> tuple[noise.SymmetricState, noise.ConsumedInitiation, bytes]:
    """Run session 1's handshake: (initiator state, responder's consumed state, response bytes)."""
    session = SESSION_1
    initiator_ephemeral = h(session["initiator_ephemeral"]["private"])
    responder_ephemeral = h(session["responder_ephemeral"]["private"])
    psk = _session_psk(session)
    assert psk == bytes(32)

    initiation, initiator = _build_initiation(session, INITIATOR_PRIV, initiator_ephemeral)
    msg = parse(initiation)
    consumed = noise.consume_initiation(
        noise.SymmetricState(),
        noise.InitiationFields(msg.ephemeral, msg.encrypted_static, msg.encrypted_timestamp),
        static_private=RESPONDER_PRIV,
        static_public=RESPONDER_PUB,
    )
    e_pub, encrypted_nothing = noise.create_response(consumed, ephemeral_private=responder_ephemeral, psk=psk)
    fields = session["response"]["fields"]
    unsigned = Response(
        sender_index=fields["sender_index"],
        receiver_index=msg.sender_index,
        ephemeral=e_pub,
        encrypted_nothing=encrypted_nothing,
    ).pack()
    mac1 = crypto.mac(_mac1_key(INITIATOR_PUB), unsigned[:MAC1_OFFSET_RESPONSE])
    response = Response(
        sender_index=fields["sender_index"],
        receiver_index=msg.sender_index,
        ephemeral=e_pub,
        encrypted_nothing=encrypted_nothing,
        mac1=mac1,
    ).pack()
    return initiator, consumed, response


def test_response_rebuilt() -> None:
    response = SESSION_1["response"]
    _, consumed, wire = _session1_after_response()
    assert len(wire) == response["length"] == 92
    assert wire == h(response["bytes"])

    fields = response["fields"]
    msg = parse(wire)
    assert isinstance(msg, Response)
    assert fields["type"] == MESSAGE_RESPONSE == wire[0]
    assert msg.sender_index == fields["sender_index"]
    assert wire[4:8] == h(fields["sender_index_bytes"])
    assert msg.receiver_index == fields["receiver_index"] == SESSION_1["initiation"]["fields"]["sender_index"]
    assert wire[8:12] == h(fields["receiver_index_bytes"])
    assert (
        msg.ephemeral == h(fields["unencrypted_ephemeral"]) == h(SESSION_1["responder_ephemeral"]["public"])
    )
    assert msg.encrypted_nothing == h(fields["encrypted_nothing"])
    assert msg.mac1 == h(fields["mac1"])
    assert msg.mac2 == h(fields["mac2"]) == bytes(16)

    mid = response["intermediate"]
    assert _mac1_key(INITIATOR_PUB) == h(mid["mac1_key_hash_label_mac1_initiator_static"])
    assert consumed.state.ck == h(mid["chaining_key_after_msg2"])
    assert consumed.state.h == h(mid["hash_after_msg2"])


def test_response_consumed_by_initiator() -> None:
    response = SESSION_1["response"]
    wire = h(response["bytes"])
    msg = parse(wire)
    assert isinstance(msg, Response)
    assert crypto.mac(_mac1_key(INITIATOR_PUB), wire[:MAC1_OFFSET_RESPONSE]) == msg.mac1

    initiator, _, _ = _session1_after_response()
    payload = noise.consume_response(
        initiator,
        remote_ephemeral=msg.ephemeral,
        encrypted_payload=msg.encrypted_nothing,
        ephemeral_private=h(SESSION_1["initiator_ephemeral"]["private"]),
        static_private=INITIATOR_PRIV,
        psk=_session_psk(SESSION_1),
    )
    assert payload == b""
    assert initiator.ck == h(response["intermediate"]["chaining_key_after_msg2"])
    assert initiator.h == h(response["intermediate"]["hash_after_msg2"])


def test_response_with_wrong_psk_rejected() -> None:
    initiator, _, wire = _session1_after_response()
    msg = parse(wire)
    with pytest.raises(crypto.CryptoError):
        noise.consume_response(
            initiator,
            remote_ephemeral=msg.ephemeral,
            encrypted_payload=msg.encrypted_nothing,
            ephemeral_private=h(SESSION_1["initiator_ephemeral"]["private"]),
            static_private=INITIATOR_PRIV,
            psk=b"\xff" * 32,
        )


def _transport_keys() -> dict[str, bytes]:
    initiator, consumed, wire = _session1_after_response()
    msg = parse(wire)
    noise.consume_response(
        initiator,
        remote_ephemeral=msg.ephemeral,
        encrypted_payload=msg.encrypted_nothing,
        ephemeral_private=h(SESSION_1["initiator_ephemeral"]["private"]),
        static_private=INITIATOR_PRIV,
        psk=_session_psk(SESSION_1),
    )
    send, receive = initiator.split()  # the initiator sends with the first key
    assert consumed.state.split() == (send, receive)  # the responder uses them swapped
    return {"initiator_send_key": send, "initiator_receive_key": receive}


def test_transport_keys() -> None:
    expected = SESSION_1["transport_keys"]
    keys = _transport_keys()
    assert keys["initiator_send_key"] == h(expected["initiator_send_key"])
    assert keys["initiator_receive_key"] == h(expected["initiator_receive_key"])


@pytest.mark.parametrize("packet", SESSION_1["transport"], ids=lambda p: p["direction"].split(" (")[0])
def test_transport_packet(packet: dict) -> None:
    key = _transport_keys()[packet["key"]]
    wire = h(packet["bytes"])
    header = parse(wire)
    assert header == TransportHeader(packet["receiver_index"], packet["counter"])
    plaintext = crypto.aead_decrypt(key, header.counter, wire[16:], b"")
    assert plaintext == h(packet["plaintext_padded"])
    assert len(plaintext) % 16 == 0
    assert struct.unpack(">H", plaintext[2:4])[0] == packet["plaintext_ip_total_length"]  # IPv4 total length
    ip_length = packet["plaintext_ip_total_length"]
    assert plaintext[ip_length:] == bytes(len(plaintext) - ip_length)  # zero padding to 16

    rebuilt = transport_header(header.receiver_index, header.counter) + crypto.aead_encrypt(
        key, header.counter, plaintext, b""
    )
    assert rebuilt == wire
    aead = crypto.AeadKey(key)
    assert aead.seal(header.counter, plaintext) == wire[16:]
    assert aead.open(header.counter, wire[16:]) == plaintext
    with pytest.raises(crypto.CryptoError):
        aead.open(header.counter + 1, wire[16:])
