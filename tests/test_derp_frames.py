"""DERP frames: every type round-trips, the bytes match the protocol note, bad input gets a
typed error with a reason, and the decoder fed anything raises nothing but FrameError."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pywg.derp import frames as f
from pywg.derp.frames import FrameDecoder, FrameError, FrameErrorReason, FrameType
from pywg.derp.keys import NodePrivateKey, NodePublicKey

K1 = NodePublicKey(bytes(range(32)))
K2 = NodePublicKey(bytes(range(32, 64)))

ONE_OF_EACH: list[f.Frame] = [
    f.ServerKey(K1),
    f.ClientInfo(K1, bytes(24) + b"sealed json and its tag."),
    f.ServerInfo(bytes(24) + bytes(16) + b"{}"),
    f.SendPacket(K2, b"\x04\0\0\0 a wireguard packet"),
    f.RecvPacket(K1, b"\x01\0\0\0 another one"),
    f.ForwardPacket(K1, K2, b"meshed"),
    f.KeepAlive(),
    f.NotePreferred(True),
    f.NotePreferred(False),
    f.PeerGone(K2, f.PeerGoneReason.DISCONNECTED),
    f.PeerGone(K2, f.PeerGoneReason.NOT_HERE),
    f.PeerPresent(K1),
    f.PeerPresent(K1, ("192.0.2.7", 41641)),
    f.PeerPresent(K1, ("2001:db8::5", 443), f.PeerPresentFlags.IS_REGULAR),
    f.PeerPresent(K2, ("10.0.0.1", 1), f.PeerPresentFlags.IS_MESH_PEER | f.PeerPresentFlags.NOT_IDEAL),
    f.WatchConns(),
    f.ClosePeer(K2),
    f.Ping(b"12345678"),
    f.Pong(b"87654321"),
    f.Health("no route to the mesh"),
    f.Health(""),
    f.Restarting(1500, 30000),
]


def decode_all(data: bytes, **kwargs: object) -> list[f.Frame]:
    decoder = FrameDecoder(**kwargs)  # type: ignore[arg-type]
    frames = decoder.feed(data)
    decoder.close()
    return frames


def test_every_frame_type_of_the_note_has_a_class() -> None:
    assert {int(t) for t in FrameType} == {0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A,
                                           0x10, 0x11, 0x12, 0x13, 0x14, 0x15}
    assert set(f.FRAME_CLASSES) == set(FrameType)
    assert {type(frame).TYPE for frame in ONE_OF_EACH} == set(FrameType)


@pytest.mark.parametrize("frame", ONE_OF_EACH, ids=lambda fr: type(fr).__name__)
def test_round_trip(frame: f.Frame) -> None:
    wire = frame.pack()
    assert wire[0] == type(frame).TYPE
    assert int.from_bytes(wire[1:5], "big") == len(wire) - 5
    assert decode_all(wire) == [frame]


def test_a_stream_of_every_frame_fed_one_byte_at_a_time() -> None:
    stream = b"".join(frame.pack() for frame in ONE_OF_EACH)
    decoder = FrameDecoder()
    out: list[f.Frame] = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i:i + 1])
    assert out == ONE_OF_EACH
    assert decoder.buffered == 0
    assert decoder.frames_decoded == len(ONE_OF_EACH)


def test_bytes_match_the_protocol_note() -> None:
    assert f.MAGIC == bytes.fromhex("44455250f09f9491") == "DERP🔑".encode()
    assert f.KeepAlive().pack() == bytes.fromhex("0600000000")
    assert f.NotePreferred(True).pack() == bytes.fromhex("070000000101")
    assert f.ServerKey(K1).pack() == bytes.fromhex("0100000028") + f.MAGIC + K1.raw
    assert f.SendPacket(K2, b"xy").pack() == bytes.fromhex("0400000022") + K2.raw + b"xy"
    assert f.PeerGone(K1, f.PeerGoneReason.NOT_HERE).pack() == bytes.fromhex("0800000021") + K1.raw + b"\x01"
    present = f.PeerPresent(K1, ("1.2.3.4", 567), f.PeerPresentFlags.IS_REGULAR).pack()
    assert len(present) == 5 + 51
    assert present[5 + 32:] == bytes.fromhex("00000000000000000000ffff01020304" "0237" "01")
    assert f.Restarting(1, 2).pack() == bytes.fromhex("15000000080000000100000002")
    assert f.Ping(b"abcdefgh").pack() == bytes.fromhex("1200000008") + b"abcdefgh"


def test_server_key_extra_bytes_are_ignored() -> None:
    wire = f._frame(FrameType.SERVER_KEY, f.MAGIC, K1.raw, b"future use")
    assert decode_all(wire) == [f.ServerKey(K1)]


def test_old_servers_short_peer_gone_and_peer_present() -> None:
    short = decode_all(f._frame(FrameType.PEER_GONE, K1.raw))
    assert short == [f.PeerGone(K1, f.PeerGoneReason.DISCONNECTED)]
    odd = decode_all(f._frame(FrameType.PEER_GONE, K1.raw, b"\x42"))[0]
    assert isinstance(odd, f.PeerGone) and odd.reason == 0x42
    v4 = bytes.fromhex("00000000000000000000ffffc0000207") + (41641).to_bytes(2, "big")
    present = decode_all(f._frame(FrameType.PEER_PRESENT, K1.raw, v4))
    assert present == [f.PeerPresent(K1, ("192.0.2.7", 41641))]
    # 33..49 bytes: the key only, the rest is not yet an endpoint.
    assert decode_all(f._frame(FrameType.PEER_PRESENT, K1.raw, b"\0" * 10)) == [f.PeerPresent(K1)]


def test_keep_alive_bytes_after_the_header_are_ignored() -> None:
    assert decode_all(f._frame(FrameType.KEEP_ALIVE, b"xyz")) == [f.KeepAlive()]


def test_ping_longer_than_8_keeps_the_first_8() -> None:
    assert decode_all(f._frame(FrameType.PING, b"12345678", b"pad" * 100)) == [f.Ping(b"12345678")]


def test_health_with_invalid_utf8_is_replaced_not_fatal() -> None:
    (frame,) = decode_all(f._frame(FrameType.HEALTH, b"bad \xff byte"))
    assert isinstance(frame, f.Health) and frame.problem == "bad \ufffd byte"


MALFORMED = [
    ("ServerKey short", FrameType.SERVER_KEY, f.MAGIC + bytes(31), FrameErrorReason.TRUNCATED),
    ("ServerKey magic", FrameType.SERVER_KEY, b"DERP\xf0\x9f\x94\x92" + bytes(32),
     FrameErrorReason.BAD_MAGIC),
    ("ClientInfo short", FrameType.CLIENT_INFO, bytes(55), FrameErrorReason.TRUNCATED),
    ("ClientInfo huge", FrameType.CLIENT_INFO, bytes(256 * 1024 + 1), FrameErrorReason.BAD_LENGTH),
    ("ServerInfo short", FrameType.SERVER_INFO, bytes(23), FrameErrorReason.TRUNCATED),
    ("SendPacket short", FrameType.SEND_PACKET, bytes(31), FrameErrorReason.TRUNCATED),
    ("RecvPacket short", FrameType.RECV_PACKET, bytes(31), FrameErrorReason.TRUNCATED),
    ("ForwardPacket short", FrameType.FORWARD_PACKET, bytes(63), FrameErrorReason.TRUNCATED),
    ("NotePreferred empty", FrameType.NOTE_PREFERRED, b"", FrameErrorReason.BAD_LENGTH),
    ("NotePreferred long", FrameType.NOTE_PREFERRED, b"\x01\x01", FrameErrorReason.BAD_LENGTH),
    ("PeerGone short", FrameType.PEER_GONE, bytes(31), FrameErrorReason.TRUNCATED),
    ("PeerPresent short", FrameType.PEER_PRESENT, bytes(31), FrameErrorReason.TRUNCATED),
    ("WatchConns payload", FrameType.WATCH_CONNS, b"\0", FrameErrorReason.BAD_LENGTH),
    ("ClosePeer short", FrameType.CLOSE_PEER, bytes(31), FrameErrorReason.BAD_LENGTH),
    ("ClosePeer long", FrameType.CLOSE_PEER, bytes(33), FrameErrorReason.BAD_LENGTH),
    ("Ping short", FrameType.PING, bytes(7), FrameErrorReason.TRUNCATED),
    ("Ping long", FrameType.PING, bytes(1001), FrameErrorReason.BAD_LENGTH),
    ("Pong short", FrameType.PONG, bytes(7), FrameErrorReason.TRUNCATED),
    ("Restarting short", FrameType.RESTARTING, bytes(7), FrameErrorReason.TRUNCATED),
    ("SendPacket oversized", FrameType.SEND_PACKET, bytes(32 + 65537), FrameErrorReason.PACKET_TOO_LARGE),
    ("RecvPacket oversized", FrameType.RECV_PACKET, bytes(32 + 65537), FrameErrorReason.PACKET_TOO_LARGE),
    ("ForwardPacket oversized", FrameType.FORWARD_PACKET, bytes(64 + 65537),
     FrameErrorReason.PACKET_TOO_LARGE),
]


@pytest.mark.parametrize(("frame_type", "payload", "reason"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_frames_get_a_typed_error(frame_type: FrameType, payload: bytes,
                                            reason: FrameErrorReason) -> None:
    with pytest.raises(FrameError) as caught:
        decode_all(f._frame(frame_type, payload))
    assert caught.value.reason is reason
    assert reason.value in str(caught.value)


def test_a_64k_packet_is_the_largest_allowed() -> None:
    biggest = f.RecvPacket(K1, bytes(65536))
    assert decode_all(biggest.pack()) == [biggest]
    with pytest.raises(FrameError) as caught:
        f.SendPacket(K1, bytes(65537)).pack()
    assert caught.value.reason is FrameErrorReason.PACKET_TOO_LARGE


def test_an_oversized_header_is_refused_before_its_payload_arrives() -> None:
    decoder = FrameDecoder(max_frame_size=70000)
    with pytest.raises(FrameError) as caught:
        decoder.feed(bytes([FrameType.RECV_PACKET]) + (70001).to_bytes(4, "big"))
    assert caught.value.reason is FrameErrorReason.FRAME_TOO_LARGE
    assert decoder.buffered == 0
    with pytest.raises(FrameError) as default_cap:
        FrameDecoder().feed(b"\x05\xff\xff\xff\xff")
    assert default_cap.value.reason is FrameErrorReason.FRAME_TOO_LARGE


def test_unknown_types_are_skipped_and_counted() -> None:
    stream = f._frame(0x0B, b"gap") + f._frame(0x7F, b"") + f.KeepAlive().pack() + f._frame(0xFF, bytes(100))
    decoder = FrameDecoder()
    assert decoder.feed(stream) == [f.KeepAlive()]
    assert decoder.unknown_skipped == 3
    with pytest.raises(FrameError) as caught:
        FrameDecoder(skip_unknown=False).feed(f._frame(0x0B, b""))
    assert caught.value.reason is FrameErrorReason.UNKNOWN_TYPE
    with pytest.raises(FrameError) as direct:
        f.parse_payload(0x0C, b"")
    assert direct.value.reason is FrameErrorReason.UNKNOWN_TYPE


def test_frames_before_a_fault_are_kept_and_the_decoder_stays_failed() -> None:
    decoder = FrameDecoder()
    good = f.RecvPacket(K1, b"first")
    with pytest.raises(FrameError) as caught:
        decoder.feed(good.pack() + f._frame(FrameType.NOTE_PREFERRED, b"\1\1") + f.KeepAlive().pack())
    assert caught.value.decoded == [good]
    with pytest.raises(FrameError) as again:
        decoder.feed(f.KeepAlive().pack())
    assert again.value.reason is FrameErrorReason.BAD_LENGTH
    assert again.value.decoded == []


def test_a_stream_that_ends_inside_a_frame_is_incomplete() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(f.RecvPacket(K1, b"cut short").pack()[:-1]) == []
    with pytest.raises(FrameError) as caught:
        decoder.close()
    assert caught.value.reason is FrameErrorReason.INCOMPLETE
    FrameDecoder().close()  # nothing buffered: a clean end


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(1, 64), max_size=20))
def test_fuzz_garbage_raises_only_frame_error(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder(max_frame_size=4096)
    pos = 0
    try:
        for cut in [*cuts, len(data)]:
            for frame in decoder.feed(data[pos:pos + cut]):
                assert type(frame).TYPE in FrameType
            pos += cut
        decoder.close()
    except FrameError as exc:
        assert isinstance(exc.reason, FrameErrorReason)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([*map(int, FrameType), 0x0B, 0x20, 0xFF]), st.binary(max_size=120)),
                max_size=8))
def test_fuzz_well_framed_random_payloads_raise_only_frame_error(parts: list[tuple[int, bytes]]) -> None:
    stream = b"".join(f._frame(t, p) for t, p in parts)  # type: ignore[arg-type]
    try:
        frames = decode_all(stream)
    except FrameError as exc:
        assert isinstance(exc.reason, FrameErrorReason)
        return
    for frame in frames:  # whatever decoded re-encodes to a frame that decodes the same
        assert decode_all(frame.pack()) == [frame]


def test_keys_print_as_tailscale_does_and_private_keys_stay_out_of_reprs() -> None:
    private = NodePrivateKey(bytes(range(1, 33)))
    secret = bytes(range(1, 33)).hex()
    assert str(private.public).startswith("nodekey:") and len(str(private.public)) == 8 + 64
    assert secret not in repr(private) and secret not in str(private)
    assert private.private_text() == "privkey:" + secret
    assert NodePrivateKey.from_text(private.private_text()).public == private.public
    assert NodePublicKey.from_text(str(private.public)) == private.public
    assert NodePublicKey.from_text(private.public.untyped_hex()) == private.public


FORBIDDEN = {"asyncio", "socket", "os", "select", "time", "threading"}


def test_the_derp_package_is_sans_io() -> None:
    package = Path(__file__).resolve().parent.parent / "pywg" / "derp"
    sources = sorted(package.glob("*.py"))
    assert {p.name for p in sources} >= {"__init__.py", "frames.py", "client.py", "http.py", "keys.py"}
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
