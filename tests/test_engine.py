"""The engine's protocol behaviour, on two engines in memory with a fake clock.

Every timer of the protocol is driven by ``now``; these tests move time by hand.
(Interop with wireguard-go over real sockets is in test_interop_wireguard_go.py.)
"""

from __future__ import annotations

import itertools

import pytest
from engine_pair import ENDPOINT_A, ENDPOINT_B, Pair, drops_of, ipv4_packet

from pywg.protocol import constants as C
from pywg.protocol.actions import DropReason, SendDatagram
from pywg.protocol.crypto import dh
from pywg.protocol.dispatcher import UNDER_LOAD_HANDSHAKES_PER_SECOND, Dispatcher
from pywg.protocol.messages import message_type
from pywg.protocol.timers import Timer


def kinds(wire: list[tuple[str, bytes]], who: str | None = None) -> list[int]:
    return [message_type(d) for w, d in wire if who is None or w == who]


@pytest.mark.parametrize("psk", [None, bytes(range(32))], ids=["no-psk", "psk"])
def test_handshake_and_data_both_ways(psk: bytes | None) -> None:
    pair = Pair(psk=psk)
    pair.establish()
    pair.send("b", ipv4_packet(b"reply", "10.0.0.2", "10.0.0.1"), 0.5)
    assert pair.delivered["b"] == [ipv4_packet(b"hello")]
    assert pair.delivered["a"] == [ipv4_packet(b"reply", "10.0.0.2", "10.0.0.1")]
    assert kinds(pair.wire) == [1, 2, 4, 4]
    assert pair.peer_a.last_handshake == 0.0 and pair.peer_b.last_handshake == 0.0


def test_mismatched_psk_fails_the_handshake() -> None:
    pair = Pair(psk=bytes(32))
    pair.peer_b.preshared_key = b"\x01" * 32
    pair.send("a", ipv4_packet(), 0.0)
    assert pair.a.drops[DropReason.HANDSHAKE_DECRYPT] == 1
    assert pair.delivered["b"] == [] and pair.peer_a.keypairs.current is None


def test_responder_waits_for_confirmation_before_sending() -> None:
    pair = Pair()
    pair.pump(pair.a.initiate_handshake(pair.pub_b, 0.0), "a", 0.0)
    # A completed and sent a keepalive that confirmed B's keypair.
    assert kinds(pair.wire) == [1, 2, 4]
    assert len(pair.wire[-1][1]) == C.TRANSPORT_MIN_SIZE
    assert pair.completed == {"a": [True], "b": [False]}
    assert pair.peer_b.keypairs.current is not None and pair.peer_b.keypairs.next is None


def test_unconfirmed_responder_stages_its_packets() -> None:
    pair2 = Pair()
    init = pair2.a.initiate_handshake(pair2.pub_b, 0.0)
    response = pair2.b.datagram_received(init[0].data, ENDPOINT_A, 0.0)
    assert pair2.peer_b.keypairs.next is not None and pair2.peer_b.keypairs.current is None
    # B has no confirmed session: its packet is staged and a handshake of its own begins.
    out = pair2.b.send_packet(pair2.pub_a, ipv4_packet(), 0.1)
    assert [message_type(a.data) for a in out if isinstance(a, SendDatagram)] == [1]
    assert list(pair2.peer_b.staged) == [ipv4_packet()]
    assert response  # the response itself went out


def test_retransmits_until_rekey_attempt_time_then_gives_up() -> None:
    pair = Pair()
    pair.pump(pair.a.send_packet(pair.pub_b, ipv4_packet(), 0.0), "a", 0.0, lose=True)
    sent_at = [0.0]
    now = 0.0
    while (deadline := pair.a.next_deadline()) is not None and deadline < 200:
        now = deadline
        for action in pair.a.tick(now):
            if isinstance(action, SendDatagram) and message_type(action.data) == 1:
                sent_at.append(now)
        if pair.peer_a.timers.pending(Timer.ZERO_KEY_MATERIAL):
            break
    gaps = [b - a for a, b in itertools.pairwise(sent_at)]
    assert len(sent_at) == C.MAX_TIMER_HANDSHAKES + 2  # 20 attempts, as the kernel says
    assert all(C.REKEY_TIMEOUT <= g <= C.REKEY_TIMEOUT + C.REKEY_TIMEOUT_JITTER_MAX for g in gaps)
    # The 20th attempt goes out after 19 timeouts; the next timeout gives up.
    assert 19 * C.REKEY_TIMEOUT <= sent_at[-1] <= 19 * (C.REKEY_TIMEOUT + C.REKEY_TIMEOUT_JITTER_MAX)
    assert pair.a.drops[DropReason.HANDSHAKE_GAVE_UP] == 1
    assert not pair.peer_a.staged


def test_passive_keepalive_after_keepalive_timeout() -> None:
    pair = Pair()
    pair.establish(0.0)
    wire_before = len(pair.wire)
    pair.tick(C.KEEPALIVE_TIMEOUT - 0.01)
    assert len(pair.wire) == wire_before
    pair.tick(C.KEEPALIVE_TIMEOUT)
    sent = pair.wire[wire_before:]
    assert [(w, len(d)) for w, d in sent] == [("b", C.TRANSPORT_MIN_SIZE)]


def test_persistent_keepalive_every_interval() -> None:
    pair = Pair()
    pair.establish(0.0)
    pair.peer_a.persistent_keepalive = 25
    pair.send("a", ipv4_packet(), 1.0)
    sent_at = []
    for t in range(2, 100):
        start = len(pair.wire)
        pair.tick(float(t))
        if any(w == "a" and len(d) == C.TRANSPORT_MIN_SIZE for w, d in pair.wire[start:]):
            sent_at.append(t)
    # B got data at 0 and 1: its passive keepalive goes at 10 and, because more data came
    # while that one was pending, once more at 20. Every authenticated packet re-arms the
    # persistent keepalive, so A's go out 25 s after the last one received, and on.
    assert sent_at == [45, 70, 95]


def test_new_handshake_when_sent_data_gets_no_answer() -> None:
    pair = Pair()
    pair.pump(pair.a.initiate_handshake(pair.pub_b, 0.0), "a", 0.0)
    pair.pump(pair.a.send_packet(pair.pub_b, ipv4_packet(), 1.0), "a", 1.0, lose=True)
    start = len(pair.wire)
    pair.tick(1.0 + C.KEEPALIVE_TIMEOUT + C.REKEY_TIMEOUT - 0.01)
    assert kinds(pair.wire[start:]) == []
    pair.tick(1.0 + C.KEEPALIVE_TIMEOUT + C.REKEY_TIMEOUT + C.REKEY_TIMEOUT_JITTER_MAX)
    assert kinds(pair.wire[start:], "a")[0] == 1
    assert pair.completed["a"] == [True, True]


def test_initiator_rekeys_after_rekey_after_time() -> None:
    pair = Pair()
    pair.establish(0.0)
    first = pair.peer_a.keypairs.current
    pair.send("b", ipv4_packet(b"x"), C.REKEY_AFTER_TIME + 1)  # the responder never rekeys on time
    assert pair.completed["b"] == [False]
    pair.send("a", ipv4_packet(b"y"), C.REKEY_AFTER_TIME + 2)
    assert pair.completed["a"] == [True, True]
    assert pair.peer_a.keypairs.current is not first and pair.peer_a.keypairs.previous is first
    pair.send("a", ipv4_packet(b"z"), C.REKEY_AFTER_TIME + 3)
    assert pair.delivered["b"][-2:] == [ipv4_packet(b"y"), ipv4_packet(b"z")]


def test_rekey_after_messages_and_reject_after_messages() -> None:
    pair = Pair()
    pair.establish(0.0)
    keypair = pair.peer_a.keypairs.current
    keypair.send_counter = C.REKEY_AFTER_MESSAGES + 1
    pair.pump(pair.a.send_packet(pair.pub_b, ipv4_packet(), 6.0), "a", 6.0, lose=True)
    assert pair.peer_a.handshake is not None  # a handshake started
    keypair.send_counter = C.REJECT_AFTER_MESSAGES
    out = pair.a.send_packet(pair.pub_b, ipv4_packet(b"late"), 7.0)
    assert not [a for a in out if isinstance(a, SendDatagram) and message_type(a.data) == 4]
    assert list(pair.peer_a.staged)[-1] == ipv4_packet(b"late")


def test_old_keys_rejected_after_reject_after_time() -> None:
    pair = Pair()
    pair.establish(0.0)
    keypair = pair.peer_a.keypairs.current
    # A datagram sealed just before the deadline, delivered after it.
    late = pair.a.send_packet(pair.pub_b, ipv4_packet(), 100.0)
    assert isinstance(late[0], SendDatagram)
    out = pair.b.datagram_received(late[0].data, ENDPOINT_A, C.REJECT_AFTER_TIME + 0.1)
    assert [d.reason for d in drops_of(out)] == [DropReason.KEY_EXPIRED]
    assert not keypair.can_send(C.REJECT_AFTER_TIME)


def test_last_minute_rekey_when_receiving_on_an_old_initiator_session() -> None:
    pair = Pair()
    pair.establish(0.0)
    start = len(pair.wire)
    pair.send("b", ipv4_packet(), C.REKEY_ON_RECEIVE_AGE + 1)
    assert kinds(pair.wire[start:], "a")[:1] == [1]


def test_key_material_zeroed_after_three_reject_after_times() -> None:
    pair = Pair()
    pair.establish(0.0)
    for t in range(1, int(C.KEY_ZEROING_TIME) + 2, 5):
        pair.pump(pair.a.tick(float(t)), "a", float(t), lose=True)
        pair.pump(pair.b.tick(float(t)), "b", float(t), lose=True)
    assert pair.peer_a.keypairs.all() == [] and pair.peer_b.keypairs.all() == []
    assert pair.a._indices == {} and pair.b._indices == {}


def test_replayed_initiation_and_flood_are_dropped() -> None:
    pair = Pair()
    init = pair.a.initiate_handshake(pair.pub_b, 0.0)[0].data
    assert message_type(pair.b.datagram_received(init, ENDPOINT_A, 0.0)[0].data) == 2
    out = pair.b.datagram_received(init, ENDPOINT_A, 1.0)
    assert [d.reason for d in drops_of(out)] == [DropReason.REPLAYED_TIMESTAMP]
    # A newer initiation 10 ms after the last accepted one is a flood.
    pair.peer_a.last_initiation_sent = None
    newer = pair.a.initiate_handshake(pair.pub_b, 0.2)[0].data  # timestamp whitening: > 16.8 ms later
    pair.peer_b.last_initiation_consumed = 0.195
    out = pair.b.datagram_received(newer, ENDPOINT_A, 0.2)
    assert [d.reason for d in drops_of(out)] == [DropReason.INITIATION_FLOOD]


def test_cookie_reply_under_load_then_mac2_at_once() -> None:
    """Under load B answers with a cookie; A resends the initiation at once, with mac2,
    rather than a REKEY_TIMEOUT later, and the handshake completes in the same instant."""
    pair = Pair()
    pair.b.under_load = True
    pair.send("a", ipv4_packet(), 0.0)
    assert kinds(pair.wire) == [1, 3, 1, 2, 4]
    assert pair.b.drops[DropReason.COOKIE_REQUIRED] == 1 and pair.peer_a.cookies.has_cookie
    assert pair.wire[0][1][132:148] == bytes(16) and pair.wire[2][1][132:148] != bytes(16)
    assert pair.delivered["b"] == [ipv4_packet()]


def test_a_cookie_reply_to_an_initiation_with_mac2_waits_for_the_timer() -> None:
    """Only an initiation sent without a cookie is resent at once: a second cookie reply
    (the responder's secret changed) waits for the retransmission timer, so cookie
    replies can never make the initiator loop."""
    pair = Pair()
    pair.b.under_load = True
    first = pair.a.send_packet(pair.pub_b, ipv4_packet(), 0.0)
    cookie = pair.b.datagram_received(first[0].data, ENDPOINT_A, 0.0)
    resend = pair.a.datagram_received(cookie[0].data, ENDPOINT_B, 0.0)
    assert [message_type(a.data) for a in resend if isinstance(a, SendDatagram)] == [1]
    # The resend is delayed until the responder's cookie secret has been replaced
    # (COOKIE_REFRESH_TIME): its mac2 no longer checks, and another cookie comes back.
    second = pair.b.datagram_received(resend[0].data, ENDPOINT_A, 200.0)
    assert [message_type(a.data) for a in second if isinstance(a, SendDatagram)] == [3]
    again = pair.a.datagram_received(second[0].data, ENDPOINT_B, 200.0)
    assert [a for a in again if isinstance(a, SendDatagram)] == []


def test_cookie_is_bound_to_source_address_and_port() -> None:
    pair = Pair()
    pair.b.under_load = True
    first = pair.a.send_packet(pair.pub_b, ipv4_packet(), 0.0)
    cookie = pair.b.datagram_received(first[0].data, ENDPOINT_A, 0.0)
    resend = pair.a.datagram_received(cookie[0].data, ENDPOINT_B, 0.0)
    init = next(a.data for a in resend if isinstance(a, SendDatagram))
    assert init[132:148] != bytes(16)  # mac2, for ENDPOINT_A's cookie
    out = pair.b.datagram_received(init, (ENDPOINT_A[0], ENDPOINT_A[1] + 1), 0.0)
    assert [message_type(a.data) for a in out if isinstance(a, SendDatagram)] == [3]


def test_load_detected_from_handshake_rate() -> None:
    pair = Pair()
    init = pair.a.initiate_handshake(pair.pub_b, 0.0)[0].data
    for i in range(UNDER_LOAD_HANDSHAKES_PER_SECOND + 1):
        pair.b.datagram_received(init, ENDPOINT_A, 0.001 * i)
    assert pair.b.is_under_load(0.5)
    assert not pair.b.is_under_load(5.0)


def test_roaming_follows_authenticated_packets_only() -> None:
    pair = Pair()
    pair.establish(0.0)
    sealed = pair.a.send_packet(pair.pub_b, ipv4_packet(b"roam"), 1.0)[0].data
    forged = sealed[:-1] + bytes([sealed[-1] ^ 1])
    pair.b.datagram_received(forged, ("198.51.100.9", 4000), 1.0)
    assert pair.peer_b.endpoint == ENDPOINT_A
    pair.b.datagram_received(sealed, ("198.51.100.7", 4000), 1.0)
    assert pair.peer_b.endpoint == ("198.51.100.7", 4000)


def test_staged_queue_is_bounded() -> None:
    pair = Pair()
    for i in range(C.MAX_STAGED_PACKETS + 5):
        pair.pump(pair.a.send_packet(pair.pub_b, ipv4_packet(i.to_bytes(2, "big")), 0.0), "a", 0.0, lose=True)
    assert len(pair.peer_a.staged) == C.MAX_STAGED_PACKETS
    assert pair.a.drops[DropReason.STAGED_QUEUE_FULL] == 5
    assert pair.peer_a.staged[0] == ipv4_packet((5).to_bytes(2, "big"))


def test_previous_keypair_still_accepted_after_rekey() -> None:
    pair = Pair()
    pair.establish(0.0)
    in_flight = pair.a.send_packet(pair.pub_b, ipv4_packet(b"old"), 10.0)[0].data
    pair.pump(pair.a.initiate_handshake(pair.pub_b, 20.0), "a", 20.0)
    assert pair.completed["a"] == [True, True]
    pair.pump([], "a", 20.0)
    out = pair.b.datagram_received(in_flight, ENDPOINT_A, 20.1)
    assert drops_of(out) == []


def test_padding_to_sixteen() -> None:
    pair = Pair()
    pair.establish(0.0)
    for size in (21, 32, 33, 100):
        sealed = pair.a.send_packet(pair.pub_b, ipv4_packet(bytes(size - 20)), 1.0)[0].data
        assert len(sealed) == 16 + -(-size // 16) * 16 + 16


def test_next_deadline_and_index_uniqueness() -> None:
    values = iter([b"\x01\x00\x00\x00"] * 3 + [b"\x02\x00\x00\x00"] * 3)

    def rng(n: int) -> bytes:
        return next(values) if n == 4 else bytes(range(1, n + 1))

    d = Dispatcher(bytes(range(32)), random_bytes=rng)
    assert d.next_deadline() is None
    peer = d.add_peer(Pair().a.static_public)
    assert d.allocate_index(peer) == 1 and d.allocate_index(peer) == 2


def test_bad_peer_keys_are_refused() -> None:
    d = Dispatcher(bytes(range(32)))
    with pytest.raises(ValueError, match="own public key"):
        d.add_peer(d.static_public)
    with pytest.raises(ValueError, match="low-order"):
        d.add_peer(bytes(32))
    with pytest.raises(ValueError, match="32 bytes"):
        d.add_peer(b"short")


def test_a_device_without_a_key_sends_and_answers_no_handshake() -> None:
    pair = Pair()
    keyless = Dispatcher(None)
    peer = keyless.add_peer(pair.pub_a, endpoint=ENDPOINT_A)
    assert drops_of(keyless.send_packet(pair.pub_a, ipv4_packet(), 0.0))[0].reason is DropReason.NO_PRIVATE_KEY
    initiation = pair.a.initiate_handshake(pair.pub_b, 0.0)[0]
    assert isinstance(initiation, SendDatagram)
    out = keyless.datagram_received(initiation.data, ENDPOINT_A, 0.0)
    assert drops_of(out)[0].reason is DropReason.NO_PRIVATE_KEY
    assert peer.static_static is None and keyless.static_public is None


def test_setting_the_private_key_later_and_again() -> None:
    pair = Pair()
    b_private = pair.b.static_private
    assert b_private is not None
    fresh = Dispatcher(None)
    fresh.add_peer(pair.pub_a)
    assert fresh.set_private_key(b_private) == []
    pair.b = fresh  # B's device got its key from `wg set` after its peers
    pair.peer_b = fresh.peers[pair.pub_a]
    pair.establish()
    current = pair.peer_b.keypairs.current
    # The same key again (what `wg syncconf` sends every time): sessions live on.
    assert fresh.set_private_key(b_private) == [] and pair.peer_b.keypairs.current is current
    pair.send("a", ipv4_packet(b"still"), 1.0)
    assert pair.delivered["b"][-1] == ipv4_packet(b"still")
    # A new key: every session ends; a peer holding the new public key is removed.
    new_private = bytes(range(1, 33))
    other = Dispatcher(new_private)
    fresh.add_peer(other.static_public)
    assert fresh.set_private_key(new_private) == [other.static_public]
    assert pair.peer_b.keypairs.current is None and other.static_public not in fresh.peers
    assert pair.peer_b.static_static == dh(new_private, pair.pub_a)  # precomputed with the new key


def test_keepalive_without_a_session_starts_a_handshake() -> None:
    pair = Pair()
    out = pair.a.send_keepalive(pair.pub_b, 0.0)
    assert [message_type(a.data) for a in out if isinstance(a, SendDatagram)] == [C.MESSAGE_INITIATION]
    pair.pump(out, "a", 0.0)
    assert pair.completed == {"a": [True], "b": [False]}


def test_batches_sealed_and_opened_outside_the_engine() -> None:
    """reserve_send / transport_keypair / accept_batch: what the native fast path uses."""
    from pywg.protocol.crypto import AeadKey
    from pywg.protocol.messages import transport_header
    from pywg.protocol.peer import padded_length

    pair = Pair()
    pair.establish()
    packets = [ipv4_packet(bytes([i]) * (i * 37)) for i in range(5)]
    padded = [p.ljust(padded_length(len(p), None), b"\0") for p in packets]
    reservation, actions = pair.peer_a.reserve_send(len(packets), sum(len(p) + 32 for p in padded), 1.0)
    assert reservation is not None and actions == []
    assert pair.peer_a.timers.pending(Timer.NEW_HANDSHAKE)  # a data packet's hooks ran
    key = AeadKey(reservation.send_key)
    wire = [transport_header(reservation.remote_index, reservation.first_counter + i)
            + key.seal(reservation.first_counter + i, p) for i, p in enumerate(padded)]
    wire.append(wire[1])  # a replay inside the batch
    receiver = int.from_bytes(wire[0][4:8], "little")
    target = pair.b.transport_keypair(receiver, 1.0)
    assert isinstance(target, tuple)
    peer, keypair = target
    counters = [int.from_bytes(w[8:16], "little") for w in wire]
    opened: list[bytes | None] = [keypair.receive.open(c, w[16:]) for c, w in zip(counters, wire, strict=True)]
    opened[3] = None  # as if its tag had failed
    delivered, actions = peer.accept_batch(keypair, counters, opened, [len(w) for w in wire], ENDPOINT_A, 1.0)
    assert delivered == [packets[0], packets[1], packets[2], packets[4]]
    assert [a.reason for a in drops_of(actions)] == [DropReason.DECRYPT_FAILED, DropReason.REPLAYED_COUNTER]
    assert peer.rx_bytes > 0 and peer.timers.pending(Timer.SEND_KEEPALIVE)
    unknown = pair.b.transport_keypair(receiver ^ 1, 1.0)
    assert not isinstance(unknown, tuple) and unknown.reason is DropReason.UNKNOWN_INDEX
    expired = pair.b.transport_keypair(receiver, C.REJECT_AFTER_TIME + 1)
    assert not isinstance(expired, tuple) and expired.reason is DropReason.KEY_EXPIRED


def test_timers_follow_when_packets_went_not_when_they_were_accounted_for() -> None:
    """The hop's threads account late and in either order (Peer.sent / accept_run with the
    time each packet went): A's ping left at 1.0 and its reply arrived at 1.0003, the reply
    accounted for first. A still owes B a passive keepalive KEEPALIVE_TIMEOUT after the
    reply, and does not start a handshake for want of an answer; a send accounted late
    still cancels the keepalive owed for data that arrived before it."""
    pair = Pair()
    pair.establish(0.0)
    peer = pair.peer_a
    keypair = peer.keypairs.current
    assert keypair is not None and peer.endpoint is not None
    peer.accept_run(keypair, 64, True, peer.endpoint, now=1.002, at=1.0003)  # the reply
    peer.sent(keypair, 64, now=1.004, at=1.0)  # the ping, accounted last
    assert peer.timers.deadline(Timer.SEND_KEEPALIVE) == 1.0003 + C.KEEPALIVE_TIMEOUT
    assert not peer.timers.pending(Timer.NEW_HANDSHAKE)
    start = len(pair.wire)
    pair.tick(1.0003 + C.KEEPALIVE_TIMEOUT)
    assert [len(d) for w, d in pair.wire[start:] if w == "a"] == [C.TRANSPORT_MIN_SIZE]

    peer.accept_run(keypair, 64, True, peer.endpoint, now=20.0, at=20.0)  # data in
    peer.sent(keypair, 64, now=20.5, at=20.4)  # an answer, accounted late
    peer.accept_run(keypair, 64, False, peer.endpoint, now=20.6, at=20.2)  # a keepalive before it
    assert not peer.timers.pending(Timer.SEND_KEEPALIVE)
    assert peer.timers.pending(Timer.NEW_HANDSHAKE)  # the answer's data awaits one in turn
