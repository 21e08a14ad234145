"""The STUN codec and the Binding client, sans-I/O: RFC 5769 vectors, Tailscale's wire forms,
every malformed-message reason, hypothesis round trips and fuzzing, the RFC 8489
retransmission schedule on a fake clock, response matching, and mapping classification."""

from __future__ import annotations

import ipaddress
import itertools
import struct
import zlib
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pywg.nat.stun import (
    BINDING,
    FINGERPRINT_XOR,
    MAGIC_COOKIE_BYTES,
    Attr,
    BindingResponder,
    ErrorCode,
    StunClass,
    StunError,
    StunMessage,
    TransportAddress,
    answer_binding,
    binding_request,
    encode,
    long_term_key,
    looks_like_stun,
    message_type,
    parse,
    saslprep,
    short_term_key,
    split_message_type,
    verify_integrity,
)
from pywg.nat.stun_client import (
    BindingFailure,
    BindingResult,
    MappingBehavior,
    RetransmitPolicy,
    StunClient,
    classify_mapping,
)
from vectors import h, load

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TXID = bytes(range(1, 13))
SERVER_A = TransportAddress.of("203.0.113.1", 3478)
SERVER_B = TransportAddress.of("203.0.113.2", 3478)


def counting_random() -> Callable[[int], bytes]:
    """A deterministic random source: 12-byte ids 00..01, 00..02, ..."""
    counter = itertools.count(1)
    return lambda n: next(counter).to_bytes(n, "big")


def raw(type_value: int, body: bytes, txid: bytes = TXID, length: int | None = None) -> bytes:
    """A STUN header (length = len(body) unless given) followed by ``body``, unchecked."""
    size = len(body) if length is None else length
    return struct.pack("!HH", type_value, size) + MAGIC_COOKIE_BYTES + txid + body


def tlv(code: int, value: bytes, pad: bytes = b"\0") -> bytes:
    return struct.pack("!HH", code, len(value)) + value + pad * (-len(value) % 4)


def with_fingerprint(type_value: int, body: bytes, after: bytes = b"") -> bytes:
    """``body``, a correct FINGERPRINT (the header length counting ``after`` too), then ``after``."""
    crc = zlib.crc32(raw(type_value, body, length=len(body) + 8 + len(after))) ^ FINGERPRINT_XOR
    return raw(type_value, body + tlv(Attr.FINGERPRINT, crc.to_bytes(4, "big")) + after)


# -- RFC 5769 -----------------------------------------------------------------------------------

RFC5769 = load("stun_rfc5769")["messages"]


def credential_key(credential: dict) -> bytes:
    if credential["kind"] == "short-term":
        return short_term_key(credential["password"])
    return long_term_key(credential["username"], credential["realm"], credential["password"])


@pytest.mark.parametrize("vector", RFC5769, ids=[v["name"] for v in RFC5769])
def test_rfc5769_vector(vector: dict) -> None:
    data, expected = h(vector["bytes"]), vector["expected"]
    assert vector["source"].startswith("RFC 5769 section 2.")
    message = parse(data)
    assert message.method == BINDING
    assert message.cls == {"request": StunClass.REQUEST, "success": StunClass.SUCCESS}[expected["class"]]
    assert message.transaction_id == h(expected["transaction_id"])
    assert message.get(Attr.SOFTWARE) == expected["software"]
    assert message.fingerprint is expected["fingerprint"]
    assert message.unknown_required == ()
    key = credential_key(vector["credential"])
    assert verify_integrity(message, key) is expected["integrity"]
    assert not verify_integrity(message, key + b"x")
    mapped = expected["mapped_address"]
    if mapped is None:
        assert message.mapped_address is None
    else:
        assert message.mapped_address == TransportAddress(ipaddress.ip_address(mapped["ip"]), mapped["port"])
        assert message.get(Attr.XOR_MAPPED_ADDRESS) == message.mapped_address
    for name, attr in (("username", Attr.USERNAME), ("nonce", Attr.NONCE), ("realm", Attr.REALM),
                       ("priority", Attr.PRIORITY)):
        if name in expected:
            assert message.get(attr) == expected[name]
    if "ice_controlled" in expected:
        assert message.get(Attr.ICE_CONTROLLED) == int(expected["ice_controlled"], 16)
    # Our encoding pads with zeros where the RFC pads with spaces: same message, same MAC check.
    again = parse(encode(message, integrity_key=key))
    assert again == message
    assert verify_integrity(again, key)
    # Any flipped bit before the FINGERPRINT is caught by it, or by MESSAGE-INTEGRITY.
    for index in (0, 8, 25, len(data) - 30):
        flipped = bytearray(data)
        flipped[index] ^= 0x10
        try:
            damaged = parse(bytes(flipped))
        except StunError:
            continue
        assert not verify_integrity(damaged, key)


def test_rfc5769_long_term_password_needs_saslprep() -> None:
    vector = next(v for v in RFC5769 if v["credential"]["kind"] == "long-term")
    credential = vector["credential"]
    assert saslprep(credential["password"]) == credential["password_saslprep"] == "TheMatrIX"
    message = parse(h(vector["bytes"]))
    unprepared = __import__("hashlib").md5(
        f"{credential['username']}:{credential['realm']}:{credential['password']}".encode()).digest()
    assert not verify_integrity(message, unprepared)


def test_saslprep_refuses_prohibited_characters() -> None:
    with pytest.raises(ValueError, match="U\\+0007"):
        saslprep("bell\x07")
    assert saslprep("a\u00a0b") == "a b"


# -- Tailscale's forms (../shared/protocols/derp-stun-disco.md section 3) ------------------------

def test_binding_request_is_tailscales_40_bytes() -> None:
    txid, datagram = binding_request(lambda n: bytes(range(1, n + 1)))
    assert txid == TXID
    assert datagram.hex() == ("000100142112a442" "0102030405060708090a0b0c" "80220008"
                              "7461696c6e6f6465" "80280004" "b32c370f")
    message = parse(datagram)
    assert (message.cls, message.get(Attr.SOFTWARE), message.fingerprint) == (StunClass.REQUEST, "tailnode", True)


def test_binding_request_options() -> None:
    _, bare = binding_request(lambda n: bytes(n), software=None, fingerprint=False)
    assert bare == raw(0x0001, b"", txid=bytes(12))
    with pytest.raises(ValueError, match="returned 11 bytes"):
        binding_request(lambda n: bytes(n - 1))


def test_google_response_from_tailscale_tests() -> None:
    message = parse(h("0101000c2112a4422360b11e3ec68ffa93e0800700200008" "0001c7866957856f"))
    assert message.cls == StunClass.SUCCESS
    assert message.mapped_address == TransportAddress.of("72.69.33.45", 59028)


def test_4in6_response_is_unmapped() -> None:
    mapped = TransportAddress(ipaddress.IPv6Address("::ffff:198.51.100.7"), 4242)
    message = parse(encode(StunMessage(BINDING, StunClass.SUCCESS, TXID, ((Attr.XOR_MAPPED_ADDRESS, mapped),))))
    assert message.get(Attr.XOR_MAPPED_ADDRESS) == mapped
    assert message.mapped_address == TransportAddress.of("198.51.100.7", 4242)


def test_mapped_address_preference() -> None:
    xor, plain, draft = (TransportAddress.of(f"192.0.2.{i}", 1000 + i) for i in (1, 2, 3))
    both = StunMessage(BINDING, StunClass.SUCCESS, TXID, ((Attr.MAPPED_ADDRESS, plain), (Attr.XOR_MAPPED_ADDRESS, xor)))
    assert parse(encode(both)).mapped_address == xor
    old = StunMessage(BINDING, StunClass.SUCCESS, TXID,
                      ((Attr.MAPPED_ADDRESS, plain), (Attr.XOR_MAPPED_ADDRESS_DRAFT, draft)))
    assert parse(encode(old)).mapped_address == draft
    only_plain = StunMessage(BINDING, StunClass.SUCCESS, TXID, ((Attr.MAPPED_ADDRESS, plain),))
    assert parse(encode(only_plain)).mapped_address == plain


def test_looks_like_stun() -> None:
    assert looks_like_stun(binding_request(counting_random())[1])
    assert looks_like_stun(encode(StunMessage(BINDING, StunClass.SUCCESS, TXID)))
    assert not looks_like_stun(b"\x01\x00\x00\x00" + bytes(144))  # WireGuard handshake initiation
    assert not looks_like_stun(bytes.fromhex("5453f09f92ac") + bytes(60))  # disco
    assert not looks_like_stun(raw(0x0001, b"")[:19])
    assert not looks_like_stun(encode(StunMessage(0x003, StunClass.REQUEST, TXID)))  # Allocate


def test_message_type_interleaving() -> None:
    assert message_type(BINDING, StunClass.REQUEST) == 0x0001
    assert message_type(BINDING, StunClass.INDICATION) == 0x0011
    assert message_type(BINDING, StunClass.SUCCESS) == 0x0101
    assert message_type(BINDING, StunClass.ERROR) == 0x0111
    for method, cls in itertools.product((0x001, 0x003, 0x0F0, 0xABC, 0xFFF), StunClass):
        assert split_message_type(message_type(method, cls)) == (method, cls)
    with pytest.raises(ValueError, match="12 bits"):
        message_type(0x1000, StunClass.REQUEST)


# -- malformed messages: one exception, an exact reason ------------------------------------------

XOR = Attr.XOR_MAPPED_ADDRESS
MALFORMED = {
    "truncated header": raw(0x0001, b"")[:19],
    "top bits of the message type set (not STUN)": raw(0xC001, b""),
    "bad magic cookie": raw(0x0001, b"")[:4] + b"\x21\x12\xa4\x43" + TXID,
    "length not a multiple of 4": raw(0x0001, b"\0\0", length=2),
    "length exceeds the datagram": raw(0x0001, b"", length=8),
    "attribute overruns message": raw(0x0101, struct.pack("!HH", XOR, 8) + bytes(4)),
    "bad address family": raw(0x0101, tlv(XOR, bytes((0, 3, 0, 80)) + bytes(4))),
    "bad address length": raw(0x0101, tlv(XOR, bytes((0, 1, 0, 80)) + bytes(16))),
    "bad fingerprint": raw(0x0001, tlv(Attr.FINGERPRINT, b"\0\0\0\0")),
    "bad FINGERPRINT length": raw(0x0001, tlv(Attr.FINGERPRINT, bytes(8))),
    "attribute after FINGERPRINT": with_fingerprint(0x0001, b"", after=tlv(Attr.SOFTWARE, b"late")),
    "bad MESSAGE-INTEGRITY length": raw(0x0001, tlv(Attr.MESSAGE_INTEGRITY, bytes(16))),
    "bad ERROR-CODE value": raw(0x0111, tlv(Attr.ERROR_CODE, bytes((0, 0, 7, 0)))),
    "bad ERROR-CODE length": raw(0x0111, tlv(Attr.ERROR_CODE, bytes(3))),
    "bad UTF-8 in SOFTWARE": raw(0x0001, tlv(Attr.SOFTWARE, b"\xff\xfe")),
    "bad UTF-8 in ERROR-CODE": raw(0x0111, tlv(Attr.ERROR_CODE, bytes((0, 0, 4, 0)) + b"\xc3")),
    "SOFTWARE too long": raw(0x0001, tlv(Attr.SOFTWARE, b"x" * 764)),
    "USERNAME too long": raw(0x0001, tlv(Attr.USERNAME, b"x" * 514)),
    "bad UNKNOWN-ATTRIBUTES length": raw(0x0111, tlv(Attr.UNKNOWN_ATTRIBUTES, bytes(3))),
    "bad PRIORITY length": raw(0x0001, tlv(Attr.PRIORITY, bytes(2))),
    "bad ICE-CONTROLLED length": raw(0x0001, tlv(Attr.ICE_CONTROLLED, bytes(4))),
    "bad USE-CANDIDATE length": raw(0x0001, tlv(Attr.USE_CANDIDATE, bytes(4))),
}


@pytest.mark.parametrize("reason", list(MALFORMED))
def test_malformed_reason(reason: str) -> None:
    with pytest.raises(StunError) as caught:
        parse(MALFORMED[reason])
    assert caught.value.reason == reason
    assert str(caught.value) == reason


def test_short_attribute_values_are_reported_not_crashed() -> None:
    for code in (Attr.MAPPED_ADDRESS, XOR, Attr.RESPONSE_ORIGIN, Attr.OTHER_ADDRESS, Attr.ALTERNATE_SERVER):
        with pytest.raises(StunError, match="bad address length"):
            parse(raw(0x0101, tlv(code, bytes(2))))


def test_unknown_attributes_and_padding() -> None:
    optional, required = 0xC0DE, 0x7E57
    body = (tlv(optional, b"abc", pad=b"\xff") + tlv(required, b"xy", pad=b"\xee")
            + tlv(Attr.SOFTWARE, b"pywg", pad=b"\xdd"))
    message = parse(raw(0x0001, body))
    assert message.attributes == ((Attr.SOFTWARE, "pywg"),)
    assert message.unknown_required == (required,)
    # Raw bytes for attributes outside the table encode as given.
    assert parse(encode(StunMessage(BINDING, StunClass.REQUEST, TXID, ((required, b"xy"),)))).unknown_required \
        == (required,)
    with pytest.raises(ValueError, match="give its value as bytes"):
        encode(StunMessage(BINDING, StunClass.REQUEST, TXID, ((required, "text"),)))


def test_attributes_after_message_integrity_are_ignored_and_trailing_bytes_trimmed() -> None:
    key = short_term_key("secret")
    message = StunMessage(BINDING, StunClass.REQUEST, TXID, ((Attr.USERNAME, "alice"),))
    signed = encode(message, integrity_key=key)
    # Append a SOFTWARE after MESSAGE-INTEGRITY (fixing the length): it is ignored, the MAC still holds.
    extended = signed[:2] + struct.pack("!H", len(signed) - 20 + 8) + signed[4:] + tlv(Attr.SOFTWARE, b"evil")
    parsed = parse(extended + b"trailing garbage")
    assert parsed.attributes == ((Attr.USERNAME, "alice"),)
    assert verify_integrity(parsed, key)
    assert not verify_integrity(parse(encode(message)), key)  # no MESSAGE-INTEGRITY at all


def test_duplicate_attribute_first_wins() -> None:
    first, second = TransportAddress.of("192.0.2.1", 1), TransportAddress.of("192.0.2.2", 2)
    message = parse(encode(StunMessage(BINDING, StunClass.SUCCESS, TXID, ((XOR, first), (XOR, second)))))
    assert message.mapped_address == first


def test_encode_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="transaction id must be 12 bytes"):
        encode(StunMessage(BINDING, StunClass.REQUEST, b"short"))
    with pytest.raises(ValueError, match="outside 300-699"):
        encode(StunMessage(BINDING, StunClass.ERROR, TXID, ((Attr.ERROR_CODE, ErrorCode(200, "OK")),)))
    with pytest.raises(ValueError, match="SOFTWARE is 800 bytes"):
        encode(StunMessage(BINDING, StunClass.REQUEST, TXID, ((Attr.SOFTWARE, "x" * 800),)))
    with pytest.raises(ValueError, match="out of range"):
        TransportAddress.of("192.0.2.1", 70000)


# -- hypothesis: round trips and fuzzing ------------------------------------------------------------

addresses = st.builds(
    TransportAddress,
    st.one_of(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
              st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)),
    st.integers(0, 0xFFFF))
text = st.text(st.characters(codec="utf-8"), max_size=40)
ADDRESS_ATTRS = (Attr.MAPPED_ADDRESS, Attr.XOR_MAPPED_ADDRESS, Attr.XOR_MAPPED_ADDRESS_DRAFT,
                 Attr.ALTERNATE_SERVER, Attr.RESPONSE_ORIGIN, Attr.OTHER_ADDRESS)
attribute = st.one_of(
    st.tuples(st.sampled_from(ADDRESS_ATTRS), addresses),
    st.tuples(st.sampled_from((Attr.USERNAME, Attr.REALM, Attr.NONCE, Attr.SOFTWARE)), text),
    st.tuples(st.just(Attr.ERROR_CODE), st.builds(ErrorCode, st.integers(300, 699), text)),
    st.tuples(st.just(Attr.UNKNOWN_ATTRIBUTES), st.lists(st.integers(0, 0xFFFF), max_size=4).map(tuple)),
    st.tuples(st.just(Attr.PRIORITY), st.integers(0, 2**32 - 1)),
    st.tuples(st.sampled_from((Attr.ICE_CONTROLLED, Attr.ICE_CONTROLLING)), st.integers(0, 2**64 - 1)),
    st.tuples(st.just(Attr.USE_CANDIDATE), st.just(True)),
    st.tuples(st.sampled_from((Attr.USERHASH, Attr.PASSWORD_ALGORITHMS)), st.binary(max_size=40)),
)
messages = st.builds(StunMessage, st.integers(0, 0xFFF), st.sampled_from(StunClass), st.binary(min_size=12, max_size=12),
                     st.lists(attribute, max_size=6).map(tuple), st.booleans())


@SETTINGS
@given(messages, st.one_of(st.none(), st.binary(min_size=1, max_size=64)))
def test_round_trip(message: StunMessage, key: bytes | None) -> None:
    data = encode(message, integrity_key=key)
    assert len(data) % 4 == 0
    back = parse(data)
    assert back == message
    assert back.raw == data
    assert verify_integrity(back, key) if key is not None else back.integrity is None
    assert parse(encode(back, integrity_key=key)).raw == data


@SETTINGS
@given(st.binary(max_size=200))
def test_fuzz_garbage_only_raises_stun_error(data: bytes) -> None:
    try:
        parse(data)
    except StunError as exc:
        assert exc.reason
    assert isinstance(looks_like_stun(data), bool)


@SETTINGS
@given(st.integers(0, 0x3FFF), st.binary(max_size=120).map(lambda b: b + bytes(-len(b) % 4)))
def test_fuzz_attribute_area_only_raises_stun_error(type_value: int, body: bytes) -> None:
    """A valid header in front of random attribute bytes: past the header checks, into the walk."""
    try:
        message = parse(raw(type_value, body))
    except StunError as exc:
        assert exc.reason
    else:
        assert message.transaction_id == TXID


@SETTINGS
@given(messages, st.data())
def test_fuzz_mutations_only_raise_stun_error(message: StunMessage, data: st.DataObject) -> None:
    wire = bytearray(encode(message, fingerprint=True))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(wire) - 1))
        wire[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    try:
        parse(bytes(wire[:cut]))
    except StunError as exc:
        assert exc.reason


@SETTINGS
@given(st.binary(max_size=120), addresses)
def test_fuzz_responder(data: bytes, source: TransportAddress) -> None:
    try:
        reply = answer_binding(data, source)
    except StunError:
        return
    if reply is not None:
        assert parse(reply).cls in (StunClass.SUCCESS, StunClass.ERROR)


# -- the responder ------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", [("198.51.100.9", 40000), ("2001:db8::9", 51820), ("::ffff:198.51.100.9", 1)])
def test_answer_binding(source: tuple[str, int]) -> None:
    txid, request = binding_request(counting_random())
    reply = parse(answer_binding(request, source, software="pywg-stun"))
    assert (reply.method, reply.cls, reply.transaction_id) == (BINDING, StunClass.SUCCESS, txid)
    assert reply.mapped_address == TransportAddress.of(*source)
    assert reply.get(Attr.XOR_MAPPED_ADDRESS).ip.version == (6 if source[0].startswith("2001") else 4)
    assert reply.get(Attr.SOFTWARE) == "pywg-stun"
    assert reply.fingerprint  # the request had one
    _, bare = binding_request(counting_random(), software=None, fingerprint=False)
    assert not parse(answer_binding(bare, source)).fingerprint


def test_answer_binding_refuses_what_it_should() -> None:
    source = ("198.51.100.9", 40000)
    assert answer_binding(encode(StunMessage(BINDING, StunClass.SUCCESS, TXID)), source) is None
    assert answer_binding(encode(StunMessage(BINDING, StunClass.INDICATION, TXID)), source) is None
    assert answer_binding(encode(StunMessage(0x003, StunClass.REQUEST, TXID)), source) is None
    with pytest.raises(StunError, match="truncated header"):
        answer_binding(b"\x01\x00\x00\x00", source)
    unknown = encode(StunMessage(BINDING, StunClass.REQUEST, TXID, ((0x0777, b"?"),)))
    error = parse(answer_binding(unknown, source))
    assert error.cls == StunClass.ERROR
    assert error.error_code == ErrorCode(420, "Unknown Attribute")
    assert error.get(Attr.UNKNOWN_ATTRIBUTES) == (0x0777,)


def test_binding_responder_counts_what_it_drops() -> None:
    responder = BindingResponder(software="pywg")
    _, request = binding_request(counting_random())
    source = ("2001:db8::5", 4000, 0, 0)  # an IPv6 socket address has four fields
    assert parse(responder.handle(request, source)).mapped_address == TransportAddress.of("2001:db8::5", 4000)
    assert responder.handle(b"\x00\x01garbage", source) is None
    assert responder.handle(encode(StunMessage(BINDING, StunClass.SUCCESS, TXID)), source) is None
    assert responder.answered == 1
    assert responder.drops == {"malformed: truncated header": 1, "not a Binding request": 1}


# -- the client: retransmissions on a fake clock, matching, outcomes ----------------------------------

def test_rfc8489_default_schedule() -> None:
    sends, failure = RetransmitPolicy().schedule()
    assert sends == (0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5)
    assert failure == 39.5


@pytest.mark.parametrize("policy", [RetransmitPolicy(), RetransmitPolicy(rto=0.1, max_transmissions=3,
                                                                         last_wait_factor=4),
                                    RetransmitPolicy(max_transmissions=1)])
def test_retransmission_schedule_on_fake_clock(policy: RetransmitPolicy) -> None:
    client = StunClient(counting_random(), policy)
    t0 = 1000.0
    first = client.start(SERVER_A, t0)
    sent_at = [0.0]
    expected_sends, expected_failure = policy.schedule()
    while (deadline := client.next_deadline()) is not None:
        assert client.tick(deadline - 1e-6) == []  # nothing early
        for transmit in client.tick(deadline):
            assert transmit == first  # the same datagram, the same transaction id
            sent_at.append(deadline - t0)
        if client.take_completed():
            failed_at = deadline - t0
            break
    assert sent_at == pytest.approx(expected_sends)
    assert failed_at == pytest.approx(expected_failure)
    assert len(client) == 0 and client.next_deadline() is None
    # Retransmissions are bounded: ticking on forever sends nothing more.
    assert client.tick(t0 + 1e6) == []


def test_timeout_outcome() -> None:
    client = StunClient(counting_random(), RetransmitPolicy(rto=0.1, max_transmissions=2, last_wait_factor=2))
    client.start(SERVER_A, 0.0)
    client.tick(0.1)
    assert client.tick(0.31) == []
    (failure,) = client.take_completed()
    assert isinstance(failure, BindingFailure)
    assert (failure.server, failure.transmissions) == (SERVER_A, 2)
    assert failure.reason == "no response after 2 transmissions"
    assert client.take_completed() == []


def test_response_matching_and_rtt() -> None:
    client = StunClient(counting_random(), RetransmitPolicy(rto=0.5))
    request = client.start(SERVER_A, 10.0)
    me = TransportAddress.of("10.0.0.2", 51820)
    good = answer_binding(request.datagram, me)
    assert client.receive(good, SERVER_B, 10.05) is None  # right id, wrong source
    assert client.receive(good[:-1], SERVER_A, 10.05) is None  # malformed
    client.receive(answer_binding(binding_request(lambda n: b"\xee" * n)[1], me), SERVER_A, 10.05)  # nobody's id
    assert client.receive(request.datagram, SERVER_A, 10.05) is None  # a request is not a response
    assert client.drops == {"response from another address": 1, "malformed: length exceeds the datagram": 1,
                            "unknown transaction": 1, "not a Binding response": 1}
    assert len(client) == 1
    assert len(client.tick(10.5)) == 1
    outcome = client.receive(good, ("::ffff:203.0.113.1", 3478), 10.52)  # dual-stack form of SERVER_A
    assert isinstance(outcome, BindingResult)
    assert (outcome.server, outcome.reflexive, outcome.transmissions) == (SERVER_A, me, 2)
    assert outcome.rtt == pytest.approx(0.02)  # from the latest transmission
    assert outcome.retransmitted
    assert client.take_completed() == [outcome]
    assert client.receive(good, SERVER_A, 10.6) is None  # a late duplicate
    assert client.drops["unknown transaction"] == 2
    assert client.next_deadline() is None


def test_error_and_odd_responses_end_the_transaction_as_failures() -> None:
    client = StunClient(counting_random())
    cases = {
        "error response 401 Unauthorized": lambda txid: StunMessage(
            BINDING, StunClass.ERROR, txid, ((Attr.ERROR_CODE, ErrorCode(401, "Unauthorized")),)),
        "response without a mapped address": lambda txid: StunMessage(BINDING, StunClass.SUCCESS, txid),
        "response with unknown comprehension-required attributes 0x0777": lambda txid: StunMessage(
            BINDING, StunClass.SUCCESS, txid, ((XOR, SERVER_B), (0x0777, b"!"))),
    }
    for reason, build in cases.items():
        transmit = client.start(SERVER_A, 0.0)
        outcome = client.receive(encode(build(parse(transmit.datagram).transaction_id)), SERVER_A, 0.1)
        assert isinstance(outcome, BindingFailure) and outcome.reason == reason
    assert len(client) == 0


def test_concurrent_transactions_are_independent() -> None:
    client = StunClient(counting_random(), RetransmitPolicy(rto=0.2))
    a, b = client.start(SERVER_A, 0.0), client.start(SERVER_B, 0.1)
    assert parse(a.datagram).transaction_id != parse(b.datagram).transaction_id
    assert client.next_deadline() == pytest.approx(0.2)
    assert client.tick(0.2) == [a]
    me = TransportAddress.of("10.0.0.2", 4000)
    assert isinstance(client.receive(answer_binding(b.datagram, me), SERVER_B, 0.15), BindingResult)
    assert client.next_deadline() == pytest.approx(0.6)
    assert len(client) == 1


def test_repeating_random_source_is_refused() -> None:
    client = StunClient(lambda n: bytes(n))
    client.start(SERVER_A, 0.0)
    with pytest.raises(RuntimeError, match="repeating"):
        client.start(SERVER_B, 0.0)


def test_policy_validation() -> None:
    for bad, match in (({"rto": 0}, "rto"), ({"max_transmissions": 0}, "max_transmissions"),
                       ({"last_wait_factor": 0}, "last_wait_factor")):
        with pytest.raises(ValueError, match=match):
            RetransmitPolicy(**bad)


# -- mapping classification -------------------------------------------------------------------------

def result(server: TransportAddress, reflexive: str, port: int) -> BindingResult:
    return BindingResult(server, TransportAddress.of(reflexive, port), 0.01, 1, TXID)


def test_classify_endpoint_independent_no_nat() -> None:
    local = TransportAddress.of("10.0.0.2", 51820)
    report = classify_mapping([result(SERVER_A, "10.0.0.2", 51820), result(SERVER_B, "10.0.0.2", 51820)], [local])
    assert report.behavior == MappingBehavior.ENDPOINT_INDEPENDENT
    assert report.reflexive == local
    assert report.behind_nat is False
    body = report.to_json()
    assert body["mapping"] == "endpoint-independent" and body["reflexive"] == "10.0.0.2:51820"
    assert [s["server"] for s in body["servers"]] == ["203.0.113.1:3478", "203.0.113.2:3478"]


def test_classify_endpoint_independent_behind_nat() -> None:
    report = classify_mapping([result(SERVER_A, "198.51.100.1", 40000), result(SERVER_B, "198.51.100.1", 40000)],
                              [TransportAddress.of("192.168.1.2", 51820)])
    assert (report.behavior, report.behind_nat) == (MappingBehavior.ENDPOINT_INDEPENDENT, True)
    assert str(report.reflexive) == "198.51.100.1:40000"


def test_classify_endpoint_dependent() -> None:
    report = classify_mapping([result(SERVER_A, "198.51.100.1", 40000), result(SERVER_B, "198.51.100.1", 40001)],
                              [TransportAddress.of("192.168.1.2", 51820)])
    assert report.behavior == MappingBehavior.ENDPOINT_DEPENDENT
    assert report.reflexive is None and report.behind_nat is True
    assert "198.51.100.1:40000" in report.reason and "198.51.100.1:40001" in report.reason
    assert report.to_json()["mapping"] == "endpoint-dependent"


def test_classify_unknown_cases() -> None:
    one = classify_mapping([result(SERVER_A, "198.51.100.1", 40000),
                            BindingFailure(SERVER_B, "no response after 7 transmissions", 7, TXID)])
    assert one.behavior == MappingBehavior.UNKNOWN and "fewer than two servers" in one.reason
    assert one.to_json()["servers"][1] == {"server": "203.0.113.2:3478", "error": "no response after 7 transmissions"}
    none = classify_mapping([BindingFailure(SERVER_A, "no response after 7 transmissions", 7, TXID)])
    assert none.behavior == MappingBehavior.UNKNOWN and none.behind_nat is None
    assert "no STUN server answered (203.0.113.1:3478: no response" in none.reason
    same_ip = classify_mapping([result(SERVER_A, "198.51.100.1", 1), result(TransportAddress.of("203.0.113.1", 3479),
                                                                             "198.51.100.1", 1)])
    assert same_ip.behavior == MappingBehavior.UNKNOWN
    # An IPv4 and an IPv6 answer are not compared with each other.
    mixed = classify_mapping([result(SERVER_A, "198.51.100.1", 1),
                              result(TransportAddress.of("2001:db8::1", 3478), "2001:db8::99", 2)])
    assert mixed.behavior == MappingBehavior.UNKNOWN


# -- sans-I/O ---------------------------------------------------------------------------------------

def test_nat_package_does_no_io() -> None:
    """pywg/nat/ never imports I/O, clocks or threads; inside pywg it imports only itself."""
    import ast
    from pathlib import Path

    import pywg.nat

    forbidden = {"asyncio", "socket", "os", "select", "selectors", "time", "threading", "subprocess"}
    files = sorted(Path(pywg.nat.__file__).parent.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "stun.py", "stun_client.py"}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"
                assert not name.startswith("pywg") or name.startswith("pywg.nat"), f"{path.name} imports {name}"
