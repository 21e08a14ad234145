"""Hostile network input: every bad datagram is dropped with a counted reason.

Three layers, all driven by hypothesis:

1. ``messages.parse`` / ``message_type`` on arbitrary bytes either return a message or
   raise ``MessageError`` carrying a ``DropReason``, checked against an independent
   classification of the wire format.
2. Two engines with an established session (``engine_pair.Pair``) are fed forged,
   truncated, bit-flipped, replayed and stale datagrams; each must produce exactly one
   ``Drop`` with the expected reason (an exact delta of ``Dispatcher.drops``), nothing
   delivered, and the session must still carry fresh packets both ways afterwards.
3. A state machine interleaves legitimate traffic, hostile datagrams and time jumps,
   and checks that nothing escapes, nothing is mis-delivered and nothing legit is lost.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections import Counter, deque

import pytest
from engine_pair import ENDPOINT_A, ENDPOINT_B, WALL, Pair, ipv4_packet
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pywg.protocol import constants as C
from pywg.protocol.actions import Action, DeliverPacket, Drop, DropReason, HandshakeCompleted, SendDatagram
from pywg.protocol.crypto import dh_generate
from pywg.protocol.dispatcher import UNDER_LOAD_HANDSHAKES_PER_SECOND, Dispatcher
from pywg.protocol.messages import (
    CookieReply,
    Initiation,
    MessageError,
    Response,
    TransportHeader,
    message_type,
    parse,
    transport_header,
)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ATTACKER = ("203.0.113.66", 40000)
ENDPOINT = {"a": ENDPOINT_A, "b": ENDPOINT_B}
SIZES = {1: 148, 2: 92, 3: 64}  # written out again here, independently of constants.py
MESSAGE_CLASS = {1: Initiation, 2: Response, 3: CookieReply, 4: TransportHeader}

# X25519 points of small order (and non-canonical encodings of them).
LOW_ORDER_POINTS = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    ((1 << 255) - 19 - 1).to_bytes(32, "little"),
    ((1 << 255) - 19).to_bytes(32, "little"),
    ((1 << 255) - 19 + 1).to_bytes(32, "little"),
]

_serial = itertools.count()


def other(side: str) -> str:
    return "b" if side == "a" else "a"


def unique_packet(src: str, tag: bytes = b"") -> bytes:
    """A valid IPv4 packet from ``src`` whose payload is unique in the test run."""
    addresses = ("10.0.0.1", "10.0.0.2") if src == "a" else ("10.0.0.2", "10.0.0.1")
    return ipv4_packet(b"%d:%s" % (next(_serial), tag), *addresses)


# --- an independent model of the wire format -------------------------------------------


def classify(data: bytes) -> DropReason | type:
    """What parse() must make of ``data``: a DropReason or the message class."""
    if len(data) < 4:
        return DropReason.UNKNOWN_PROTOCOL  # not WireGuard, as the demux says
    mtype = int.from_bytes(data[:4], "little")
    if mtype == 4:
        return TransportHeader if len(data) >= 32 else DropReason.BAD_SIZE
    if mtype not in SIZES:
        return DropReason.UNKNOWN_PROTOCOL
    return MESSAGE_CLASS[mtype] if len(data) == SIZES[mtype] else DropReason.BAD_SIZE


def mac1_key(receiver_public: bytes) -> bytes:
    return hashlib.blake2s(b"mac1----" + receiver_public).digest()


def with_mac1(body: bytes, receiver_public: bytes) -> bytes:
    """A handshake message body (before mac1) completed with a valid mac1, zero mac2."""
    mac1 = hashlib.blake2s(body, key=mac1_key(receiver_public), digest_size=16).digest()
    return body + mac1 + bytes(16)


def mac1_valid(data: bytes, receiver_public: bytes) -> bool:
    offset = 116 if len(data) == 148 else 60
    return with_mac1(data[:offset], receiver_public)[offset:offset + 16] == data[offset:offset + 16]


def live_indices(pair: Pair, side: str) -> dict[int, object | None]:
    """The receiver indices ``side`` knows: keypair indices -> keypair, pending -> None."""
    peer = pair.peer_a if side == "a" else pair.peer_b
    known: dict[int, object | None] = {k.local_index: k for k in peer.keypairs.all()}
    if peer.handshake is not None:
        known[peer.handshake.local_index] = None
    return known


def structural_drop(pair: Pair, victim: str, data: bytes, now: float) -> DropReason | None:
    """The drop reason decidable without secrets; None when it depends on the crypto."""
    shape = classify(data)
    if isinstance(shape, DropReason):
        return shape
    index = int.from_bytes(data[4:8], "little")
    known = live_indices(pair, victim)
    if shape is TransportHeader:
        keypair = known.get(index)
        if keypair is None:
            return DropReason.UNKNOWN_INDEX
        if now - keypair.created >= C.REJECT_AFTER_TIME:  # type: ignore[attr-defined]
            return DropReason.KEY_EXPIRED
        return None
    if shape is CookieReply:
        return None if index in known else DropReason.UNKNOWN_INDEX
    if not mac1_valid(data, pair.side(victim).static_public):
        return DropReason.BAD_MAC1
    return None


# --- 1. the parser ------------------------------------------------------------------


def check_parse(data: bytes) -> None:
    expected = classify(data)
    try:
        mtype = message_type(data)
    except MessageError as exc:
        assert type(exc) is MessageError and isinstance(exc.reason, DropReason)
        assert exc.reason is expected, (data[:8].hex(), len(data))
        with pytest.raises(MessageError) as again:
            parse(data)
        assert again.value.reason is expected
        return
    assert not isinstance(expected, DropReason), (data[:8].hex(), len(data), expected)
    message = parse(data)
    assert type(message) is expected and MESSAGE_CLASS[mtype] is expected
    if isinstance(message, TransportHeader):
        assert transport_header(message.receiver_index, message.counter) == data[:16]
    else:
        assert message.pack() == data


@st.composite
def valid_messages(draw: st.DrawFn) -> bytes:
    b = st.binary
    kind = draw(st.sampled_from([1, 2, 3, 4]))
    index = draw(st.integers(0, 2**32 - 1))
    if kind == 1:
        return Initiation(index, draw(b(min_size=32, max_size=32)), draw(b(min_size=48, max_size=48)),
                          draw(b(min_size=28, max_size=28)), draw(b(min_size=16, max_size=16)),
                          draw(b(min_size=16, max_size=16))).pack()
    if kind == 2:
        return Response(index, draw(st.integers(0, 2**32 - 1)), draw(b(min_size=32, max_size=32)),
                        draw(b(min_size=16, max_size=16)), draw(b(min_size=16, max_size=16)),
                        draw(b(min_size=16, max_size=16))).pack()
    if kind == 3:
        return CookieReply(index, draw(b(min_size=24, max_size=24)), draw(b(min_size=32, max_size=32))).pack()
    return transport_header(index, draw(st.integers(0, 2**64 - 1))) + draw(b(min_size=16, max_size=200))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1600))
def test_parse_arbitrary_bytes(data: bytes) -> None:
    check_parse(data)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.binary(max_size=200))
def test_parse_any_type_word(type_word: int, body: bytes) -> None:
    check_parse(struct.pack("<I", type_word) + body)


@settings(max_examples=100, deadline=None)
@given(valid_messages())
def test_parse_valid_messages_truncated_at_every_length(message: bytes) -> None:
    for length in range(len(message) + 1):
        check_parse(message[:length])


@settings(max_examples=100, deadline=None)
@given(valid_messages(), st.binary(min_size=1, max_size=1600))
def test_parse_oversized_valid_messages(message: bytes, extra: bytes) -> None:
    check_parse(message + extra)


def test_parse_every_type_byte_with_every_size() -> None:
    sizes = [*range(170), 200, 1280, 1420, 1500, 9000, 65535]
    for type_byte in range(256):
        for size in sizes:
            for filler in (0x00, 0xFF):
                head = bytes([type_byte, 0, 0, 0])
                check_parse((head + bytes([filler]) * size)[:size])
                # a non-zero upper byte makes any type unknown
                check_parse((bytes([type_byte, 0, 1, 0]) + bytes([filler]) * size)[:size])


# --- 2. the engine under attack, one attack at a time --------------------------------


def established(now: float = 0.0) -> tuple[Pair, dict[str, bytes]]:
    """A and B with a confirmed session used both ways, and the four datagrams it took."""
    pair = Pair()
    pair.establish(now)
    pair.send("b", ipv4_packet(b"back", "10.0.0.2", "10.0.0.1"), now)
    assert pair.delivered == {"a": [ipv4_packet(b"back", "10.0.0.2", "10.0.0.1")],
                              "b": [ipv4_packet(b"hello")]}
    assert [(w, message_type(d)) for w, d in pair.wire] == [("a", 1), ("b", 2), ("a", 4), ("b", 4)]
    wire = {"init": pair.wire[0][1], "resp": pair.wire[1][1], "to_b": pair.wire[2][1],
            "to_a": pair.wire[3][1]}
    return pair, wire


VICTIM = {"init": "b", "resp": "a", "to_b": "b", "to_a": "a", "cookie": "a"}


def feed(pair: Pair, victim: str, data: bytes, now: float,
         source: tuple[str, int] = ATTACKER) -> tuple[DropReason, list[Action]]:
    """Deliver a hostile datagram: exactly one counted drop, nothing delivered."""
    device, bystander = pair.side(victim), pair.side(other(victim))
    before, before_bystander = Counter(device.drops), Counter(bystander.drops)
    actions = device.datagram_received(data, source, now)
    assert not [a for a in actions if isinstance(a, (DeliverPacket, HandshakeCompleted))], actions
    drops = [a for a in actions if isinstance(a, Drop)]
    assert len(drops) == 1, actions
    reason = drops[0].reason
    assert isinstance(reason, DropReason)
    delta = {r: n - before[r] for r, n in device.drops.items() if n != before[r]}
    assert delta == {reason: 1}
    assert bystander.drops == before_bystander
    for action in actions:
        if isinstance(action, SendDatagram):  # only ever a cookie reply to the sender, under load
            assert reason is DropReason.COOKIE_REQUIRED
            assert action.endpoint == source and message_type(action.data) == 3
    return reason, actions


def expect_drop(pair: Pair, victim: str, data: bytes, now: float, reason: DropReason,
                source: tuple[str, int] = ATTACKER) -> None:
    got, _ = feed(pair, victim, data, now, source)
    assert got is reason, f"{len(data)}-byte datagram to {victim}: {got} != {reason}"


def assert_still_works(pair: Pair, now: float) -> None:
    """Fresh packets go through intact both ways; no endpoint was hijacked."""
    for src in ("a", "b"):
        dst = other(src)
        packet = unique_packet(src, b"after the attack")
        count = len(pair.delivered[dst])
        pair.send(src, packet, now)
        assert pair.delivered[dst][count:] == [packet]
    assert pair.peer_a.endpoint == ENDPOINT_B and pair.peer_b.endpoint == ENDPOINT_A


def seal(pair: Pair, src: str, plaintext: bytes, counter: int | None = None) -> bytes:
    """A transport datagram sealed with ``src``'s current send key (as only a peer can)."""
    keypair = (pair.peer_a if src == "a" else pair.peer_b).keypairs.current
    assert keypair is not None
    if counter is None:
        counter = keypair.send_counter
        keypair.send_counter += 1
    return transport_header(keypair.remote_index, counter) + keypair.send.seal(counter, plaintext)


def cookie_reply_for_a(pair: Pair, now: float) -> bytes:
    """A genuine cookie reply from B (under load) to a fresh initiation of A's."""
    pair.b.under_load = True
    init = pair.peer_a.initiate(now, retry=True)[0].data  # type: ignore[union-attr]
    out = pair.b.datagram_received(init, ENDPOINT_A, now)
    pair.b.under_load = False
    replies = [a.data for a in out if isinstance(a, SendDatagram)]
    assert len(replies) == 1 and message_type(replies[0]) == 3
    return replies[0]


hostile_bytes = st.one_of(
    st.binary(max_size=1600),
    st.builds(lambda t, body: struct.pack("<I", t) + body,
              st.sampled_from([1, 2, 3, 4]), st.binary(min_size=0, max_size=200)),
    st.builds(lambda t, n, seed: struct.pack("<I", t) + (seed * n)[:n],
              st.sampled_from([1, 2, 3, 4]), st.sampled_from([28, 60, 88, 144, 145, 1500]),
              st.binary(min_size=1, max_size=8)),
)


@SETTINGS
@given(st.sampled_from("ab"), st.lists(hostile_bytes, min_size=1, max_size=5))
def test_random_datagrams_are_dropped(victim: str, datagrams: list[bytes]) -> None:
    pair, _ = established()
    for data in datagrams:
        expected = structural_drop(pair, victim, data, 1.0)
        if expected is None:  # a live index by chance: only the AEAD/cookie tag can fail now
            assume(classify(data) in (TransportHeader, CookieReply))
            expected = DropReason.DECRYPT_FAILED if data[0] == 4 else DropReason.BAD_COOKIE_REPLY
        expect_drop(pair, victim, data, 1.0, expected)
    assert_still_works(pair, 1.0)


def test_valid_messages_truncated_at_every_length() -> None:
    pair, wire = established()
    wire["cookie"] = cookie_reply_for_a(pair, 0.5)
    for kind, data in wire.items():
        for length in range(len(data)):
            if length < 4:
                reason = DropReason.UNKNOWN_PROTOCOL
            elif kind.startswith("to_") and length >= C.TRANSPORT_MIN_SIZE:
                reason = DropReason.DECRYPT_FAILED
            else:
                reason = DropReason.BAD_SIZE
            expect_drop(pair, VICTIM[kind], data[:length], 1.0, reason)
    assert pair.a.drops[DropReason.UNKNOWN_PROTOCOL] == 4 * 3 and pair.b.drops[DropReason.UNKNOWN_PROTOCOL] == 2 * 4
    assert_still_works(pair, 1.0)


@SETTINGS
@given(st.sampled_from(sorted(VICTIM)), st.binary(min_size=1, max_size=1500))
def test_valid_messages_with_trailing_bytes(kind: str, extra: bytes) -> None:
    pair, wire = established()
    wire["cookie"] = cookie_reply_for_a(pair, 0.5)
    reason = DropReason.DECRYPT_FAILED if kind.startswith("to_") else DropReason.BAD_SIZE
    expect_drop(pair, VICTIM[kind], wire[kind] + extra, 1.0, reason)
    assert_still_works(pair, 1.0)


# What a corrupted, already-consumed message fails on once it passes the checks that need
# no secrets: a replayed timestamp (only mac2 changed), a consumed handshake, a bad tag.
AFTER_STRUCTURE = {
    "init": DropReason.REPLAYED_TIMESTAMP,
    "resp": DropReason.UNEXPECTED_RESPONSE,
    "to_b": DropReason.DECRYPT_FAILED,
    "to_a": DropReason.DECRYPT_FAILED,
    "cookie": DropReason.BAD_COOKIE_REPLY,
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(VICTIM)), st.integers(0, 147), st.integers(1, 255))
def test_valid_messages_with_a_flipped_byte(kind: str, position: int, mask: int) -> None:
    pair, wire = established()
    wire["cookie"] = cookie_reply_for_a(pair, 0.5)
    data = bytearray(wire[kind])
    position %= len(data)
    data[position] ^= mask
    victim = VICTIM[kind]
    expected = structural_drop(pair, victim, bytes(data), 1.0) or AFTER_STRUCTURE[kind]
    expect_drop(pair, victim, bytes(data), 1.0, expected)
    assert_still_works(pair, 1.0)


@SETTINGS
@given(st.sampled_from("ab"), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1),
       st.binary(min_size=16, max_size=300))
def test_transport_with_unknown_receiver_index(victim: str, index: int, counter: int, body: bytes) -> None:
    pair, _ = established()
    assume(index not in live_indices(pair, victim))
    expect_drop(pair, victim, transport_header(index, counter) + body, 1.0, DropReason.UNKNOWN_INDEX)
    # The live index with a forged body fails authentication instead.
    live = next(i for i, k in live_indices(pair, victim).items() if k is not None)
    expect_drop(pair, victim, transport_header(live, counter) + body, 1.0, DropReason.DECRYPT_FAILED)
    assert_still_works(pair, 1.0)


@SETTINGS
@given(st.integers(1, 10), st.integers(1, 10), st.data())
def test_replayed_transport(n_ab: int, n_ba: int, data: st.DataObject) -> None:
    pair, wire = established()
    for i in range(max(n_ab, n_ba)):
        if i < n_ab:
            pair.send("a", unique_packet("a"), 1.0 + i)
        if i < n_ba:
            pair.send("b", unique_packet("b"), 1.0 + i)
    transports = [(other(w), d) for w, d in pair.wire if message_type(d) == 4]
    assert len(transports) == 2 + n_ab + n_ba
    replays = data.draw(st.lists(st.sampled_from(transports), min_size=1, max_size=20))
    for victim, datagram in replays:
        expect_drop(pair, victim, datagram, 20.0, DropReason.REPLAYED_COUNTER)
    # The handshake messages replay too: the initiation's timestamp is old, the response's
    # handshake is over.
    expect_drop(pair, "b", wire["init"], 20.0, DropReason.REPLAYED_TIMESTAMP)
    expect_drop(pair, "a", wire["resp"], 20.0, DropReason.UNEXPECTED_RESPONSE)
    assert_still_works(pair, 20.0)


def test_replay_window_edges() -> None:
    pair, _ = established()
    keypair = pair.peer_a.keypairs.current
    assert keypair is not None
    keypair.send_counter = 20_000
    pair.send("a", unique_packet("a"), 1.0)  # counter 20000: the window now ends there
    oldest_in_window = 20_000 - C.REPLAY_WINDOW_SIZE
    late = unique_packet("a", b"late")
    count = len(pair.delivered["b"])
    pair.pump(pair.b.datagram_received(seal(pair, "a", late, oldest_in_window), ENDPOINT_A, 1.0), "b", 1.0)
    assert pair.delivered["b"][count:] == [late]  # never seen and inside the window: accepted once
    expect_drop(pair, "b", seal(pair, "a", late, oldest_in_window), 1.0, DropReason.REPLAYED_COUNTER)
    expect_drop(pair, "b", seal(pair, "a", unique_packet("a"), oldest_in_window - 1), 1.0,
                DropReason.REPLAYED_COUNTER)  # never seen, but older than the window
    expect_drop(pair, "b", seal(pair, "a", unique_packet("a"), 5), 1.0, DropReason.REPLAYED_COUNTER)
    assert_still_works(pair, 1.0)


@SETTINGS
@given(st.floats(0.0, 400.0), st.floats(0.0, 2.0))
def test_replayed_initiation(delay: float, gap: float) -> None:
    pair, wire = established()
    expect_drop(pair, "b", wire["init"], delay, DropReason.REPLAYED_TIMESTAMP)
    # A fresh initiation is answered once; the same bytes again are a replay, however soon.
    now = 1.0 + delay
    init = pair.peer_a.initiate(now, retry=True)[0].data  # type: ignore[union-attr]
    answer = pair.b.datagram_received(init, ENDPOINT_A, now)
    assert [message_type(a.data) for a in answer if isinstance(a, SendDatagram)] == [2]
    expect_drop(pair, "b", init, now + gap, DropReason.REPLAYED_TIMESTAMP)
    expect_drop(pair, "b", init, now + gap, DropReason.REPLAYED_TIMESTAMP, source=ENDPOINT_A)
    pair.pump(answer, "b", now + gap)  # the genuine response still completes the handshake
    assert pair.completed["a"] == [True, True]
    assert_still_works(pair, now + gap)


@SETTINGS
@given(st.floats(1.0, 100.0), st.floats(0.02, 5.0), st.floats(0.0, 0.019))
def test_initiation_flood(start: float, created_later: float, received_later: float) -> None:
    pair, _ = established()
    first = pair.peer_a.initiate(start, retry=True)[0].data  # type: ignore[union-attr]
    answer = pair.b.datagram_received(first, ENDPOINT_A, start)
    assert [message_type(a.data) for a in answer if isinstance(a, SendDatagram)] == [2]
    # Newer (timestamp later by more than the 2**24 ns whitening) but within 20 ms of the last.
    second = pair.peer_a.initiate(start + created_later, retry=True)[0].data  # type: ignore[union-attr]
    expect_drop(pair, "b", second, start + received_later, DropReason.INITIATION_FLOOD)
    # A superseded its first initiation: the late answer to it has no handshake left.
    response = next(a.data for a in answer if isinstance(a, SendDatagram))
    expect_drop(pair, "a", response, start + received_later, DropReason.UNKNOWN_INDEX, source=ENDPOINT_B)
    assert_still_works(pair, start + 1.0)


def test_initiation_after_flood_window_is_accepted() -> None:
    pair, _ = established()
    first = pair.peer_a.initiate(1.0, retry=True)[0].data  # type: ignore[union-attr]
    assert pair.b.datagram_received(first, ENDPOINT_A, 1.0)
    second = pair.peer_a.initiate(1.05, retry=True)[0].data  # type: ignore[union-attr]
    out = pair.b.datagram_received(second, ENDPOINT_A, 1.0 + C.HANDSHAKE_INITIATION_RATE * 1.5)
    assert not [a for a in out if isinstance(a, Drop)]
    pair.pump(out, "b", 1.05)
    assert_still_works(pair, 1.1)


@SETTINGS
@given(st.sampled_from("ab"), st.sampled_from(["random", "live", "pending"]),
       st.one_of(st.binary(min_size=32, max_size=32), st.sampled_from(LOW_ORDER_POINTS)),
       st.binary(min_size=120, max_size=120), st.integers(0, 2**32 - 1))
def test_forged_handshakes_with_valid_mac1(victim: str, target: str, ephemeral: bytes, filler: bytes,
                                           index: int) -> None:
    pair, _ = established()
    public = pair.side(victim).static_public
    # An initiation anyone can forge (mac1 is keyed by the public key): it fails in the DH/AEAD.
    init = with_mac1(struct.pack("<II", 1, index) + ephemeral + filler[:76], public)
    expect_drop(pair, victim, init, 1.0, DropReason.HANDSHAKE_DECRYPT)
    # A response: unknown index, a finished handshake's index, or a pending one it can't open.
    if target == "pending":
        peer = pair.side(victim).peers[pair.side(other(victim)).static_public]
        peer.initiate(1.0, retry=True)
        assert peer.handshake is not None
        receiver, reason = peer.handshake.local_index, DropReason.HANDSHAKE_DECRYPT
    elif target == "live":
        receiver = next(i for i, k in live_indices(pair, victim).items() if k is not None)
        reason = DropReason.UNEXPECTED_RESPONSE
    else:
        receiver, reason = index, DropReason.UNKNOWN_INDEX
        assume(receiver not in live_indices(pair, victim))
    response = with_mac1(struct.pack("<III", 2, index, receiver) + ephemeral + filler[:16], public)
    expect_drop(pair, victim, response, 1.0, reason)
    assert_still_works(pair, 1.0)


def test_initiation_from_an_unknown_peer() -> None:
    pair, _ = established()
    stranger = Dispatcher(dh_generate(), wall_offset=WALL)
    stranger.add_peer(pair.b.static_public, endpoint=ENDPOINT_B)
    init = stranger.initiate_handshake(pair.b.static_public, 1.0)[0].data  # type: ignore[union-attr]
    expect_drop(pair, "b", init, 1.0, DropReason.UNKNOWN_PEER)
    assert_still_works(pair, 1.0)


@SETTINGS
@given(st.sampled_from("ab"), st.booleans(), st.integers(0, 2**32 - 1),
       st.binary(min_size=24, max_size=24), st.binary(min_size=32, max_size=32))
def test_cookie_reply_with_a_bad_tag(victim: str, live: bool, index: int, nonce: bytes, sealed: bytes) -> None:
    pair, _ = established()
    if live:
        index = next(iter(live_indices(pair, victim)))
        reason = DropReason.BAD_COOKIE_REPLY
    else:
        assume(index not in live_indices(pair, victim))
        reason = DropReason.UNKNOWN_INDEX
    expect_drop(pair, victim, CookieReply(index, nonce, sealed).pack(), 1.0, reason)
    assert_still_works(pair, 1.0)


def test_replayed_cookie_reply() -> None:
    pair, _ = established()
    reply = cookie_reply_for_a(pair, 0.5)
    # The genuine one is consumed: A resends its initiation at once, now with mac2.
    resent = pair.a.datagram_received(reply, ENDPOINT_B, 0.5)
    assert [(type(a), a.data[0], a.data[132:148] != bytes(16)) for a in resent] == [(SendDatagram, 1, True)]
    # The resend took a new sender index: a replay of the reply finds no initiation.
    expect_drop(pair, "a", reply, 60.0, DropReason.UNKNOWN_INDEX)


@SETTINGS
@given(st.sampled_from("ab"), st.floats(0.0, C.REKEY_AFTER_TIME - 1), st.floats(C.REJECT_AFTER_TIME, 3 * C.REJECT_AFTER_TIME - 1))
def test_stale_transport_after_reject_after_time(src: str, sealed_at: float, delivered_at: float) -> None:
    pair, _ = established()
    out = pair.side(src).send_packet(pair.side(other(src)).static_public, unique_packet(src), sealed_at)
    held = [a.data for a in out if isinstance(a, SendDatagram)]
    assert len(held) == 1 and message_type(held[0]) == 4  # captured by an attacker, not delivered
    expect_drop(pair, other(src), held[0], delivered_at, DropReason.KEY_EXPIRED, source=ENDPOINT[src])
    assert_still_works(pair, delivered_at)  # a new handshake; then the fresh packets go through
    assert pair.completed["a"] == [True, True]


not_ip = st.one_of(
    st.binary(min_size=1, max_size=300).filter(lambda b: b[0] >> 4 not in (4, 6)),
    st.builds(lambda b: bytes([0x45]) + b, st.binary(max_size=18)),  # IPv4 shorter than a header
    st.builds(lambda b: bytes([0x60]) + b, st.binary(max_size=38)),  # IPv6 shorter than a header
    st.builds(  # IPv4 whose total length is below the header or beyond the data
        lambda total, rest: bytes([0x45, 0]) + struct.pack("!H", total) + rest,
        st.one_of(st.integers(0, 19), st.integers(301, 65535)), st.binary(min_size=16, max_size=280)),
    st.builds(  # IPv6 whose payload length runs beyond the data
        lambda payload, rest: bytes([0x60, 0, 0, 0]) + struct.pack("!H", payload) + rest,
        st.integers(300, 65535), st.binary(min_size=34, max_size=290)),
)


@SETTINGS
@given(st.sampled_from("ab"), not_ip)
def test_authentic_transport_carrying_garbage(src: str, garbage: bytes) -> None:
    pair, _ = established()
    datagram = seal(pair, src, garbage)
    expect_drop(pair, other(src), datagram, 1.0, DropReason.INVALID_PACKET, source=ENDPOINT[src])
    expect_drop(pair, other(src), datagram, 1.0, DropReason.REPLAYED_COUNTER, source=ENDPOINT[src])
    assert_still_works(pair, 1.0)


def test_handshake_flood_puts_the_device_under_load() -> None:
    pair, _ = established()
    public = pair.b.static_public
    # Responses nobody waits for are dropped before any cookie work and do not count as load.
    for i in range(2 * UNDER_LOAD_HANDSHAKES_PER_SECOND):
        forged = with_mac1(struct.pack("<III", 2, i, 0xFFFF_FFFF) + bytes(48), public)
        assert 0xFFFF_FFFF not in live_indices(pair, "b")
        expect_drop(pair, "b", forged, 1.0 + i / 1000, DropReason.UNKNOWN_INDEX)
    assert not pair.b.is_under_load(1.3)
    # Initiations with a valid mac1 each cost a DH: past the limit the device is under load.
    for i in range(UNDER_LOAD_HANDSHAKES_PER_SECOND):
        forged = with_mac1(struct.pack("<II", 1, i) + bytes(108), public)
        expect_drop(pair, "b", forged, 1.3 + i / 10000, DropReason.HANDSHAKE_DECRYPT)
    # Now every handshake message needs mac2: a cookie reply goes back to the source.
    forged = with_mac1(struct.pack("<II", 1, 7) + bytes(108), public)
    reason, actions = feed(pair, "b", forged, 1.35)
    assert reason is DropReason.COOKIE_REQUIRED and len(actions) == 2
    assert_still_works(pair, 1.4)  # transport is not affected by load
    assert not pair.b.is_under_load(3.5)


# --- 3. everything at once ----------------------------------------------------------

# Drops legitimate traffic may meet, by the message that met them (None: an outbound packet).
LEGIT_DROPS = {
    None: {DropReason.NO_ENDPOINT},
    1: {DropReason.COOKIE_REQUIRED},
    2: {DropReason.COOKIE_REQUIRED},
    3: set(),
    4: set(),
}


class HostileNetwork(RuleBasedStateMachine):
    """Legitimate traffic both ways, an attacker on the path, and a clock that jumps."""

    def __init__(self) -> None:
        super().__init__()
        self.pair = Pair()
        self.now = 0.0
        self.sent: dict[str, Counter[bytes]] = {"a": Counter(), "b": Counter()}  # by destination
        self.accepted: list[tuple[str, bytes]] = []  # legit datagrams their receiver took
        self.carried: list[tuple[str, bytes]] = []  # every legit datagram

    # legit side

    def carry(self, actions: list[Action], origin: str) -> None:
        queue: deque[tuple[str, Action, int | None]] = deque((origin, a, None) for a in actions)
        while queue:
            who, action, cause = queue.popleft()
            if isinstance(action, SendDatagram):
                dest = other(who)
                assert action.endpoint == ENDPOINT[dest]
                device = self.pair.side(dest)
                before = sum(device.drops.values())
                out = device.datagram_received(action.data, ENDPOINT[who], self.now)
                dropped = [a for a in out if isinstance(a, Drop)]
                assert sum(device.drops.values()) - before == len(dropped)
                self.carried.append((dest, action.data))
                if not dropped and message_type(action.data) != 3:
                    self.accepted.append((dest, action.data))
                queue.extend((dest, a, message_type(action.data)) for a in out)
            elif isinstance(action, DeliverPacket):
                assert action.peer == self.pair.side(other(who)).static_public
                self.pair.delivered[who].append(action.packet)
            elif isinstance(action, Drop):
                assert action.reason in LEGIT_DROPS[cause], (cause, action)

    def send(self, src: str, size: int = 0) -> bytes:
        dst = other(src)
        peer = self.pair.peer_a if src == "a" else self.pair.peer_b
        current = peer.keypairs.current
        usable = current is not None and current.can_send(self.now) and peer.endpoint is not None
        packet = unique_packet(src, b"x" * size)
        self.sent[dst][packet] += 1
        count = len(self.pair.delivered[dst])
        self.carry(self.pair.side(src).send_packet(self.pair.side(dst).static_public, packet, self.now), src)
        if usable:
            assert packet in self.pair.delivered[dst][count:], "sent on a usable session, not delivered"
        return packet

    @rule(src=st.sampled_from("ab"), size=st.integers(0, 200))
    def legit_send(self, src: str, size: int) -> None:
        self.send(src, size)

    @rule(delta=st.one_of(st.floats(0.0, 3.0), st.floats(0.0, 0.03), st.floats(100.0, 200.0),
                          st.sampled_from([C.REKEY_AFTER_TIME + 0.5, C.REJECT_AFTER_TIME + 0.5,
                                           C.KEY_ZEROING_TIME + 0.5])))
    def advance(self, delta: float) -> None:
        self.now += delta
        self.carry(self.pair.a.tick(self.now), "a")
        self.carry(self.pair.b.tick(self.now), "b")

    @rule(side=st.sampled_from("ab"), on=st.booleans())
    def load(self, side: str, on: bool) -> None:
        self.pair.side(side).under_load = on

    # hostile side

    def attack(self, victim: str, data: bytes, source: tuple[str, int]) -> None:
        feed(self.pair, victim, data, self.now, source)

    @rule(victim=st.sampled_from("ab"), data=hostile_bytes,
          source=st.sampled_from([ATTACKER, ENDPOINT_A, ENDPOINT_B]))
    def random_datagram(self, victim: str, data: bytes, source: tuple[str, int]) -> None:
        self.attack(victim, data, source)

    @precondition(lambda self: self.accepted)
    @rule(data=st.data(), wrong_side=st.booleans(), source=st.sampled_from([ATTACKER, ENDPOINT_A, ENDPOINT_B]))
    def replay(self, data: st.DataObject, wrong_side: bool, source: tuple[str, int]) -> None:
        victim, datagram = data.draw(st.sampled_from(self.accepted))
        self.attack(other(victim) if wrong_side else victim, datagram, source)

    @precondition(lambda self: self.accepted)
    @rule(data=st.data(), position=st.integers(0, 2000), mask=st.integers(1, 255))
    def flip(self, data: st.DataObject, position: int, mask: int) -> None:
        victim, datagram = data.draw(st.sampled_from(self.accepted))
        mutated = bytearray(datagram)
        mutated[position % len(mutated)] ^= mask
        self.attack(victim, bytes(mutated), ATTACKER)

    @precondition(lambda self: self.carried)
    @rule(data=st.data(), cut=st.integers(0, 2000), extra=st.binary(max_size=40))
    def resize(self, data: st.DataObject, cut: int, extra: bytes) -> None:
        victim, datagram = data.draw(st.sampled_from(self.carried))
        if extra and message_type(datagram) != 4:
            self.attack(victim, datagram + extra, ATTACKER)
        else:
            self.attack(victim, datagram[:cut % len(datagram)], ATTACKER)

    @rule(victim=st.sampled_from("ab"), index=st.integers(0, 2**32 - 1), body=st.binary(max_size=148))
    def forged_handshake(self, victim: str, index: int, body: bytes) -> None:
        public = self.pair.side(victim).static_public
        assume(index not in live_indices(self.pair, victim))
        self.attack(victim, with_mac1((struct.pack("<I", 1) + body.ljust(112, b"\x01"))[:116], public), ATTACKER)
        self.attack(victim, with_mac1(struct.pack("<III", 2, 1, index) + body[:48].ljust(48, b"\x00"), public),
                    ATTACKER)

    @rule(victim=st.sampled_from("ab"))
    def handshake_flood(self, victim: str) -> None:
        public = self.pair.side(victim).static_public
        for i in range(UNDER_LOAD_HANDSHAKES_PER_SECOND + 2):
            self.attack(victim, with_mac1(struct.pack("<III", 2, i, 0xFFFF_FFFF) + bytes(48), public), ATTACKER)

    # invariants

    @invariant()
    def delivered_only_what_was_sent_and_at_most_once(self) -> None:
        for dst in ("a", "b"):
            delivered = Counter(self.pair.delivered[dst])
            assert all(n == 1 for n in delivered.values()), "a packet was delivered twice"
            assert not delivered - self.sent[dst], "a packet nobody sent was delivered"

    @invariant()
    def drops_are_reasons_and_endpoints_unmoved(self) -> None:
        for device in (self.pair.a, self.pair.b):
            assert all(isinstance(r, DropReason) and n > 0 for r, n in device.drops.items())
        assert self.pair.peer_a.endpoint == ENDPOINT_B
        assert self.pair.peer_b.endpoint in (None, ENDPOINT_A)

    def teardown(self) -> None:
        # Let the protocol finish: one more packet each way, then run the timers until everything
        # staged has gone through. Nothing legit may be lost to the attacker.
        self.send("a")
        self.send("b")
        for _ in range(200):
            if all(Counter(self.pair.delivered[d]) == self.sent[d] for d in "ab"):
                break
            deadlines = [d for d in (self.pair.a.next_deadline(), self.pair.b.next_deadline()) if d is not None]
            if not deadlines:
                break
            self.now = max(self.now, min(deadlines))
            self.advance(0.0)
        for dst in "ab":
            missing = self.sent[dst] - Counter(self.pair.delivered[dst])
            assert not missing, f"{sum(missing.values())} legit packet(s) to {dst} never delivered"


HostileNetwork.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_hostile_network = HostileNetwork.TestCase
