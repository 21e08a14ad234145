"""Disco codec and sealed packets: Tailscale's own expected bytes, fuzzing, box round trips."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pywg.nat import disco
from pywg.nat.disco import (
    AllocateUDPRelayEndpointRequest,
    AllocateUDPRelayEndpointResponse,
    BindUDPRelayEndpoint,
    BindUDPRelayEndpointAnswer,
    BindUDPRelayEndpointChallenge,
    CallMeMaybe,
    CallMeMaybeVia,
    DiscoError,
    DiscoKey,
    DiscoMessageError,
    DiscoOpenError,
    DiscoPacketError,
    DiscoUnknownTypeError,
    Ping,
    Pong,
    UDPRelayEndpoint,
    decode_message,
    looks_like_disco,
    sender_key,
)
from tests.vectors import h, load

VECTORS = load("disco_tailscale")


def counter_random(seed: bytes = b"seed"):
    """A deterministic ``random(n)`` (SHA-256 in counter mode) for reproducible packets."""
    state = {"i": 0}

    def random(n: int) -> bytes:
        out = b""
        while len(out) < n:
            state["i"] += 1
            out += hashlib.sha256(seed + state["i"].to_bytes(8, "big")).digest()
        return out[:n]

    return random


def _relay(fields: dict) -> UDPRelayEndpoint:
    return UDPRelayEndpoint(h(fields["server_disco"]), tuple(h(k) for k in fields["client_disco"]),
                            fields["lamport_id"], fields["vni"], fields["bind_lifetime_ns"],
                            fields["steady_state_lifetime_ns"], tuple(tuple(e) for e in fields["endpoints"]))


def _build(kind: str, f: dict):
    if kind == "ping":
        return Ping(h(f["txid"]), h(f["node_key"]) if f["node_key"] else None, f["padding"])
    if kind == "pong":
        return Pong(h(f["txid"]), tuple(f["src"]))
    if kind == "call_me_maybe":
        return CallMeMaybe(tuple(tuple(e) for e in f["endpoints"]))
    bind = {"bind_udp_relay_endpoint": BindUDPRelayEndpoint,
            "bind_udp_relay_endpoint_challenge": BindUDPRelayEndpointChallenge,
            "bind_udp_relay_endpoint_answer": BindUDPRelayEndpointAnswer}
    if kind in bind:
        return bind[kind](f["vni"], f["generation"], h(f["remote_key"]), h(f["challenge"]))
    if kind == "call_me_maybe_via":
        return CallMeMaybeVia(_relay(f["relay"]))
    if kind == "allocate_udp_relay_endpoint_request":
        return AllocateUDPRelayEndpointRequest(tuple(h(k) for k in f["client_disco"]), f["generation"])
    if kind == "allocate_udp_relay_endpoint_response":
        return AllocateUDPRelayEndpointResponse(f["generation"], _relay(f["relay"]))
    raise AssertionError(kind)


@pytest.mark.parametrize("vector", VECTORS["messages"], ids=lambda v: v["name"])
def test_tailscale_marshal_and_parse(vector):
    message = _build(vector["type"], vector["fields"])
    assert message.encode().hex() == vector["payload"]
    assert decode_message(h(vector["payload"])) == message


def test_packet_layout_constants():
    layout = VECTORS["packet_layout"]
    assert disco.MAGIC == h(layout["magic"]) == layout["magic_text"].encode()
    assert (disco.KEY_LENGTH, disco.NONCE_LENGTH, disco.TAG_LENGTH) == (
        layout["key_length"], layout["nonce_length"], layout["tag_length"])
    assert {t.name.lower(): t.value for t in disco.MessageType} == layout["message_types"]
    a, b = DiscoKey(bytes([1] * 32)), DiscoKey(bytes([2] * 32))
    packet = a.session(b.public).seal(Ping(bytes(12), bytes(range(32))), counter_random())
    assert len(packet) == layout["unpadded_ping_packet_length"]
    assert packet[:6] == disco.MAGIC and packet[6:38] == a.public
    assert looks_like_disco(packet) and sender_key(packet) == a.public


@pytest.mark.parametrize("vector", VECTORS["nacl_box"], ids=lambda v: v["name"])
def test_box_matches_go_nacl(vector):
    sender, receiver = DiscoKey(h(vector["sender_private"])), DiscoKey(h(vector["receiver_private"]))
    assert receiver.public == h(vector["receiver_public"])
    nonce = h(vector["nonce"])
    packet = sender.session(receiver.public).seal(h(vector["plaintext"]), lambda n: nonce[:n])
    assert packet == disco.MAGIC + sender.public + nonce + h(vector["box"])
    assert receiver.session(sender.public).open_payload(packet) == h(vector["plaintext"])


def test_forward_compatibility_rules():
    txid = bytes(range(1, 13))
    # trailing bytes are ignored; a ping's node key needs all 32 bytes, the rest is padding
    assert decode_message(b"\x01\x00" + txid + b"\x07" * 31) == Ping(txid, None, 31)
    assert decode_message(Pong(txid, ("1.2.3.4", 5)).encode() + b"junk") == Pong(txid, ("1.2.3.4", 5))
    # a CallMeMaybe with a ragged body or another version has no endpoints (not an error)
    cmm = CallMeMaybe((("1.2.3.4", 567),)).encode()
    assert decode_message(cmm + b"x") == CallMeMaybe()
    assert decode_message(b"\x03\x01" + cmm[2:]) == CallMeMaybe()
    # the relay messages with another version decode to their empty form
    assert decode_message(b"\x07\x01garbage") == CallMeMaybeVia()
    assert decode_message(b"\x08\x01") == AllocateUDPRelayEndpointRequest()
    assert decode_message(b"\x09\x05") == AllocateUDPRelayEndpointResponse()
    # ping and pong ignore the version
    assert decode_message(b"\x01\x09" + txid) == Ping(txid)


@pytest.mark.parametrize("payload, error", [
    (b"", DiscoMessageError), (b"\x01", DiscoMessageError), (b"\x01\x00" + bytes(11), DiscoMessageError),
    (b"\x02\x00" + bytes(29), DiscoMessageError), (b"\x04\x00" + bytes(71), DiscoMessageError),
    (b"\x07\x00" + bytes(124), DiscoMessageError), (b"\x07\x00" + bytes(124 + 17), DiscoMessageError),
    (b"\x08\x00" + bytes(67), DiscoMessageError), (b"\x09\x00" + bytes(3), DiscoMessageError),
    (b"\x00\x00", DiscoUnknownTypeError), (b"\x0a\x00abc", DiscoUnknownTypeError),
    (b"\xff\x00", DiscoUnknownTypeError),
])
def test_malformed_payloads_have_typed_errors(payload, error):
    with pytest.raises(error) as info:
        decode_message(payload)
    assert info.value.reason
    if error is DiscoUnknownTypeError:
        assert info.value.message_type == payload[0]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_decoder_raises_only_typed_errors(payload):
    try:
        message = decode_message(payload)
    except DiscoMessageError:
        return
    # whatever decodes re-encodes to a prefix-compatible payload of the same type
    assert message.encode()[0] == payload[0]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 2**32 - 1))
def test_fuzz_open_raises_only_typed_errors(blob, seed):
    me, peer = DiscoKey(bytes([5] * 32)), DiscoKey(bytes([6] * 32))
    session = me.session(peer.public)
    for datagram in (blob, disco.MAGIC + blob, disco.MAGIC + peer.public + blob):
        with pytest.raises(DiscoError):
            session.open(datagram)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=1200), st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_box_round_trip(payload, a_private, b_private):
    a, b = DiscoKey(a_private), DiscoKey(b_private)
    packet = a.session(b.public).seal(payload, counter_random(a_private))
    assert len(packet) == 62 + 16 + len(payload)
    assert b.session(a.public).open_payload(packet) == payload


def test_open_rejects_wrong_keys_and_tampering():
    rnd = counter_random()
    a, b, c = (DiscoKey(bytes([i] * 32)) for i in (7, 8, 9))
    packet = a.session(b.public).seal(Ping(rnd(12), rnd(32)), rnd)
    assert b.session(a.public).open(packet).node_key is not None
    with pytest.raises(DiscoOpenError):  # a third key pair cannot open it
        c.session(a.public).open(packet)
    with pytest.raises(DiscoOpenError):  # session for another peer: sender key mismatch
        b.session(c.public).open(packet)
    forged = packet[:6] + c.public + packet[38:]  # claims to be from c: the box does not open
    with pytest.raises(DiscoOpenError):
        b.session(c.public).open(forged)
    for i in range(38, len(packet)):  # any flipped bit in nonce, tag or ciphertext
        tampered = bytearray(packet)
        tampered[i] ^= 0x01
        with pytest.raises(DiscoOpenError):
            b.session(a.public).open(bytes(tampered))
    with pytest.raises(DiscoPacketError):
        b.session(a.public).open(b"XS" + packet[2:])
    with pytest.raises(DiscoPacketError):
        b.session(a.public).open(packet[:62 + 15])


def test_low_order_peer_key_is_a_typed_error():
    me = DiscoKey(bytes([3] * 32))
    session = me.session(bytes(32))  # the all-zero point: no shared secret
    with pytest.raises(DiscoOpenError):
        session.seal(b"\x01\x00" + bytes(12), counter_random())
    with pytest.raises(DiscoError):
        session.open(disco.MAGIC + bytes(32) + bytes(40))


def test_unknown_type_inside_a_valid_box_is_distinct_from_a_bad_box():
    a, b = DiscoKey(bytes([1] * 32)), DiscoKey(bytes([2] * 32))
    packet = a.session(b.public).seal(b"\x42\x00future", counter_random())
    with pytest.raises(DiscoUnknownTypeError):
        b.session(a.public).open(packet)


def test_demux_sniff():
    assert not looks_like_disco(disco.MAGIC + bytes(31))
    assert looks_like_disco(disco.MAGIC + bytes(32))
    assert not looks_like_disco(b"\x01\x00\x00\x00" + bytes(144))  # WireGuard initiation
    with pytest.raises(DiscoPacketError):
        sender_key(b"\x04\x00\x00\x00")


def test_repr_hides_the_private_key():
    key = DiscoKey(bytes(range(32)))
    assert bytes(range(32)).hex() not in repr(key) and bytes(range(32)).hex()[:16] not in repr(key)


def test_encode_rejects_bad_fields():
    with pytest.raises(ValueError, match="txid"):
        Ping(b"short").encode()
    with pytest.raises(ValueError, match="port"):
        Pong(bytes(12), ("1.2.3.4", 70000)).encode()
    with pytest.raises(ValueError):
        CallMeMaybe((("not-an-ip", 1),)).encode()


def test_nat_package_is_sans_io():
    forbidden = {"asyncio", "socket", "os", "select", "time", "threading"}
    nat = Path(disco.__file__).parent
    for name in ("disco.py", "paths.py"):
        tree = ast.parse((nat / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not names & forbidden, f"{name} imports {names & forbidden}"
