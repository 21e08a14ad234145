"""The screen in C (native/screen.c) against the engine: fed the same datagrams, it drops
exactly what the engine would drop for being malformed, not for us, or addressed to an
index never given out, with the same reason, and passes everything else; its copy of the
indices and keys follows the engine through handshakes, expiry and key rotation."""

from __future__ import annotations

import hashlib
import os
import struct

import pytest
from engine_pair import ENDPOINT_A, Pair, ipv4_packet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pywg.device.screen import Screen, available
from pywg.nat import stun
from pywg.protocol import constants as C
from pywg.protocol.actions import Drop, DropReason, SendDatagram
from pywg.protocol.crypto import dh_generate
from pywg.protocol.demux import Protocol, classify
from pywg.protocol.dispatcher import Dispatcher

# Without the C extension there is no screen (the engine drops these itself); under CI the
# extension is built, so there these tests run or fail.
pytestmark = pytest.mark.skipif(not available() and os.environ.get("CI") != "true",
                                reason="needs pywg's C extension")
SCREENED = {DropReason.UNKNOWN_PROTOCOL, DropReason.BAD_SIZE, DropReason.BAD_MAC1,
            DropReason.UNKNOWN_INDEX}
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def engine_verdict(dispatcher: Dispatcher, data: bytes, now: float) -> DropReason | None:
    """The engine's drop reason for ``data`` if it is one the screen decides, else None.
    STUN and disco never reach the engine: the device's demux hands them to their handlers
    (the screen passes them, for the demux; hypothesis found the bare disco magic)."""
    if classify(data) in (Protocol.STUN, Protocol.DISCO):
        return None
    drops = [a.reason for a in dispatcher.datagram_received(data, ENDPOINT_A, now) if isinstance(a, Drop)]
    return drops[0] if drops and drops[0] in SCREENED else None


@given(st.binary(max_size=32), st.binary(max_size=300), st.integers(1, 32))
def test_blake2s_in_c_is_blake2s(key: bytes, message: bytes, size: int) -> None:
    from pywg import _fastpath  # type: ignore[attr-defined]

    out = _fastpath.ffi.new("uint8_t[32]")
    _fastpath.lib.pywg_blake2s(out, size, key, len(key), message, len(message))
    assert bytes(out)[:size] == hashlib.blake2s(message, key=key, digest_size=size).digest()


def with_mac1(body: bytes, mac1_key: bytes) -> bytes:
    """A handshake message body with a valid mac1 (and mac2 zero)."""
    return body + hashlib.blake2s(body, key=mac1_key, digest_size=16).digest() + bytes(16)


@pytest.fixture(scope="module")
def established() -> tuple[Pair, Screen, dict[str, bytes]]:
    pair = Pair()
    screen = Screen()
    screen.follow(pair.b)
    pair.establish(0.0)
    wire = {"init": pair.wire[0][1], "resp": pair.wire[1][1], "to_b": pair.wire[2][1]}
    return pair, screen, wire


def datagrams(wire: dict[str, bytes], pair: Pair) -> st.SearchStrategy[bytes]:
    """Garbage, WireGuard-shaped garbage, messages with B's mac1, and messages naming B's
    live indices, a pending one, or indices never given out."""
    mac1_b = hashlib.blake2s(C.LABEL_MAC1 + pair.b.static_public).digest()
    live = [k.local_index for k in pair.peer_b.keypairs.all()]
    index = st.one_of(st.sampled_from(live), st.integers(0, 2**32 - 1))
    u32 = st.integers(0, 2**32 - 1)
    return st.one_of(
        st.binary(max_size=200),
        st.builds(lambda t, rest: struct.pack("<I", t) + rest, st.integers(0, 6), st.binary(max_size=200)),
        st.builds(lambda s, rest: with_mac1(struct.pack("<II", 1, s) + rest, mac1_b), u32, st.binary(min_size=108, max_size=108)),
        st.builds(lambda s, rest: with_mac1(struct.pack("<II", 1, s) + rest, hashlib.blake2s(b"x").digest()),
                  u32, st.binary(min_size=108, max_size=108)),
        st.builds(lambda s, r, rest: with_mac1(struct.pack("<III", 2, s, r) + rest, mac1_b), u32, index,
                  st.binary(min_size=48, max_size=48)),
        st.builds(lambda r, rest: struct.pack("<II", 3, r) + rest, index, st.binary(min_size=56, max_size=56)),
        st.builds(lambda r, c, rest: struct.pack("<IIQ", 4, r, c) + rest, index, st.integers(0, 2**64 - 1),
                  st.binary(min_size=0, max_size=120)),
        st.sampled_from(list(wire.values())),
        st.builds(lambda d, n: d[:n], st.sampled_from(list(wire.values())), st.integers(0, 160)),
    )


@SETTINGS
@given(data=st.data())
def test_the_screen_drops_what_the_engine_drops(established: tuple[Pair, Screen, dict[str, bytes]],
                                                 data: st.DataObject) -> None:
    pair, screen, wire = established
    datagram = data.draw(datagrams(wire, pair))
    verdict = screen.verdict(datagram)
    now = 1.0 + data.draw(st.floats(0, 1))
    assert verdict == engine_verdict(pair.b, datagram, now), datagram.hex()


def test_stun_and_disco_pass_the_screen_and_no_wireguard_message_is_stun() -> None:
    screen = Screen()
    screen.follow(Dispatcher(dh_generate()))
    binding = struct.pack("!HHI", 0x0101, 12, 0x2112A442) + bytes(12) + struct.pack("!HHI", 0x8028, 4, 0) + bytes(4)
    binding = binding[:2] + struct.pack("!H", len(binding) - 20) + binding[4:]
    assert screen.verdict(binding) is None
    assert screen.verdict("TS💬".encode() + bytes(40)) is None
    # An initiation whose sender index happens to spell the STUN cookie is WireGuard's: bad mac1.
    forged = struct.pack("<I", 1) + struct.pack("!I", 0x2112A442) + bytes(140)
    assert screen.verdict(forged) is DropReason.BAD_MAC1


def test_the_screen_follows_sessions_and_their_expiry() -> None:
    pair = Pair()
    screen_b = Screen()
    screen_b.follow(pair.b)
    pair.establish(0.0)
    to_b = pair.wire[2][1]
    assert screen_b.verdict(to_b) is None
    # After REJECT_AFTER_TIME * 3 every key is zeroed and its index freed.
    for t in range(1, int(C.KEY_ZEROING_TIME) + 2, 5):  # the timers run, every datagram lost
        pair.pump(pair.a.tick(float(t)), "a", float(t), lose=True)
        pair.pump(pair.b.tick(float(t)), "b", float(t), lose=True)
    assert pair.peer_b.keypairs.all() == []
    assert screen_b.verdict(to_b) is DropReason.UNKNOWN_INDEX
    assert engine_verdict(pair.b, to_b, C.KEY_ZEROING_TIME + 2) is DropReason.UNKNOWN_INDEX
    # A new session: its index passes.
    pair.send("a", ipv4_packet(b"again"), C.KEY_ZEROING_TIME + 3)
    fresh = [d for w, d in pair.wire if w == "a" and d[0] == 4][-1]
    assert screen_b.verdict(fresh) is None


def test_the_screen_follows_key_rotation() -> None:
    pair = Pair()
    screen_b = Screen()
    screen_b.follow(pair.b)
    initiation = next(a.data for a in pair.a.initiate_handshake(pair.pub_b, 0.0) if isinstance(a, SendDatagram))
    assert screen_b.verdict(initiation) is None
    new_key = dh_generate()
    pair.b.add_static_key(new_key)
    pair.b.promote_static_key()
    assert screen_b.verdict(initiation) is None  # addressed to the old key: still accepted (overlap)
    pair.b.drop_secondary_key()
    assert screen_b.verdict(initiation) is DropReason.BAD_MAC1
    assert engine_verdict(pair.b, initiation, 1.0) is DropReason.BAD_MAC1


def test_the_screen_counts_what_the_hop_drops() -> None:
    from pywg import _fastpath  # type: ignore[attr-defined]

    screen = Screen()
    screen.follow(Dispatcher(dh_generate()))
    lib = _fastpath.lib
    lib.pywg_screen_count(screen.handle, lib.PYWG_SCREEN_UNKNOWN_PROTOCOL, 3)
    lib.pywg_screen_count(screen.handle, lib.PYWG_SCREEN_PASS, 5)  # passes are not drops
    run = (struct.pack("<I", 9) + bytes(60)) * 4
    assert lib.pywg_screen_run_verdict(screen.handle, run, len(run), 64) == lib.PYWG_SCREEN_UNKNOWN_PROTOCOL
    mixed = struct.pack("<I", 9) + bytes(60) + struct.pack("!HHI", 1, 44, 0x2112A442) + bytes(56)
    assert lib.pywg_screen_run_verdict(screen.handle, mixed, len(mixed), 64) == lib.PYWG_SCREEN_PASS
    assert screen.drops() == {DropReason.UNKNOWN_PROTOCOL: 3}
    # A run the hop drops whole is counted datagram by datagram, each under its own verdict.
    garbage_then_short = struct.pack("<I", 9) + bytes(60) + struct.pack("<I", 1) + bytes(60)
    assert lib.pywg_screen_run_verdict(screen.handle, garbage_then_short, 128, 64) == lib.PYWG_SCREEN_UNKNOWN_PROTOCOL
    lib.pywg_screen_count_run(screen.handle, garbage_then_short, 128, 64)
    assert screen.drops() == {DropReason.UNKNOWN_PROTOCOL: 4, DropReason.BAD_SIZE: 1}


def test_many_indices_come_and_go() -> None:
    screen = Screen()
    dispatcher = Dispatcher(dh_generate())
    screen.follow(dispatcher)
    indices = [i * 7919 + 1 for i in range(5000)]
    for i in indices:
        screen.index_changed(i, C.INDEX_SESSION)
    for i in indices[::2]:
        screen.index_changed(i, C.INDEX_FREE)
    transport = [struct.pack("<IIQ", 4, i, 0) + bytes(16) for i in indices]
    verdicts = [screen.verdict(t) for t in transport]
    assert verdicts == [DropReason.UNKNOWN_INDEX if n % 2 == 0 else None for n in range(len(indices))]
    assert screen.verdict(struct.pack("<II", 3, indices[1]) + bytes(56)) is None


def c_protocol(screen: Screen, data: bytes) -> Protocol:
    """The protocol the C screen sees in ``data``: its verdict, folded onto the demux's names."""
    lib = screen._lib
    code = lib.pywg_screen_verdict(screen.handle, data, len(data))
    if code == lib.PYWG_SCREEN_STUN:
        return Protocol.STUN
    if code == lib.PYWG_SCREEN_DISCO:
        return Protocol.DISCO
    if code == lib.PYWG_SCREEN_UNKNOWN_PROTOCOL:
        return Protocol.UNKNOWN
    return Protocol.WIREGUARD  # passed, or dropped as a WireGuard message (size, mac1, index)


def stun_shaped() -> st.SearchStrategy[bytes]:
    """STUN headers with right and wrong lengths, cookies and top bits, and STUN we build."""
    header = st.builds(lambda t, n, cookie, rest, fix: (
        struct.pack("!HH", t, len(rest) if fix else n) + cookie + bytes(12) + rest),
        st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
        st.sampled_from([struct.pack("!I", 0x2112A442), bytes(4), struct.pack("<I", 0x2112A442)]),
        st.binary(max_size=80), st.booleans())
    built = st.builds(lambda txid, fingerprint: stun.binding_request(lambda n: txid, fingerprint=fingerprint)[1],
                      st.binary(min_size=12, max_size=12), st.booleans())
    answer = st.builds(lambda txid, port: stun.binding_response(
        stun.parse(stun.binding_request(lambda n: txid)[1]), stun.TransportAddress.of("192.0.2.7", port)),
        st.binary(min_size=12, max_size=12), st.integers(1, 65535))
    return st.one_of(header, built, answer)


@SETTINGS
@given(data=st.data())
def test_the_screen_and_the_demux_agree_on_the_protocol(established: tuple[Pair, Screen, dict[str, bytes]],
                                                        data: st.DataObject) -> None:
    pair, screen, wire = established
    disco = st.builds(lambda rest: "TS💬".encode() + rest, st.binary(max_size=80))
    datagram = data.draw(st.one_of(datagrams(wire, pair), stun_shaped(), disco,
                                   st.builds(lambda d, n: d[:n], disco, st.integers(0, 8))))
    assert c_protocol(screen, datagram) is classify(datagram), datagram.hex()


@pytest.mark.parametrize("datagram, protocol", [
    (b"", Protocol.UNKNOWN), (b"\x01\0\0", Protocol.UNKNOWN), (b"\x05\0\0\0" + bytes(40), Protocol.UNKNOWN),
    (b"\x04\0\0\0" + bytes(28), Protocol.WIREGUARD), (b"\x01\0\0\0", Protocol.WIREGUARD),
    (b"\x04\x01\0\0" + bytes(28), Protocol.UNKNOWN), ("TS💬".encode(), Protocol.DISCO),
    (struct.pack("!HHI", 0x0101, 0, 0x2112A442) + bytes(12), Protocol.STUN),
    (struct.pack("!HHI", 0x0101, 4, 0x2112A442) + bytes(12), Protocol.UNKNOWN),  # length not covered
    (struct.pack("!HHI", 0xC101, 0, 0x2112A442) + bytes(12), Protocol.UNKNOWN),  # top bits set
])
def test_known_datagrams_are_classified_alike(datagram: bytes, protocol: Protocol) -> None:
    screen = Screen()
    screen.follow(Dispatcher(dh_generate()))
    assert classify(datagram) is protocol
    assert c_protocol(screen, datagram) is protocol
