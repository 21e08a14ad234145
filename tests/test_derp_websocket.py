"""The WebSocket codec under ``pywg derp serve``: RFC 6455's accept key example, masked client
frames in any slicing give back the DERP byte stream, pings are answered, and any bytes
(hypothesis) either decode or close the stream with a Close frame, never raising."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from pywg.derp.websocket import CloseCode, Opcode, ServerStream, accept_key, encode_frame, valid_client_key


def test_the_rfc_6455_accept_key_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert valid_client_key("dGhlIHNhbXBsZSBub25jZQ==") and not valid_client_key("short")


@given(st.lists(st.binary(max_size=70000), min_size=1, max_size=5), st.integers(1, 9000))
@settings(max_examples=40, deadline=None)
def test_masked_binary_messages_in_any_slicing_give_the_stream(chunks: list[bytes], step: int) -> None:
    wire = b"".join(encode_frame(Opcode.BINARY, c, mask=os.urandom(4)) for c in chunks)
    wire += encode_frame(Opcode.PING, b"hi", mask=os.urandom(4))
    stream = ServerStream()
    data, replies = b"", b""
    for i in range(0, len(wire), step):
        got = stream.receive(wire[i:i + step])
        assert got.error is None and not got.closed
        data += got.data
        replies += got.reply
    assert data == b"".join(chunks)
    assert replies == encode_frame(Opcode.PONG, b"hi")


def test_protocol_breaches_close_with_a_reason() -> None:
    cases = {
        encode_frame(Opcode.BINARY, b"x"): CloseCode.PROTOCOL_ERROR,  # unmasked
        encode_frame(Opcode.TEXT, b"x", mask=b"abcd"): CloseCode.UNSUPPORTED_DATA,
        encode_frame(Opcode.PING, bytes(126), mask=b"abcd"): CloseCode.PROTOCOL_ERROR,
        encode_frame(Opcode.CONTINUATION, b"x", mask=b"abcd"): CloseCode.PROTOCOL_ERROR,
        b"\x82\xff" + (1 << 40).to_bytes(8, "big") + b"abcd": CloseCode.MESSAGE_TOO_BIG,
        b"\xc2\x80abcd": CloseCode.PROTOCOL_ERROR,  # RSV1
    }
    for wire, code in cases.items():
        got = ServerStream().receive(wire)
        assert got.closed and got.error is not None and got.error.code == code, wire
        assert got.reply[:1] == b"\x88"


@given(st.binary(max_size=3000))
@settings(max_examples=300, deadline=None)
def test_any_bytes_decode_or_close_without_raising(wire: bytes) -> None:
    stream = ServerStream(max_frame_payload=2048)
    got = stream.receive(wire)
    if got.error is not None:
        assert got.closed and got.reply.startswith(b"\x88")
        assert stream.receive(b"more").closed
