"""The DERP client state machine and the HTTP upgrade, without I/O.

The server side here is built from the frame codec and a NaCl box with a known server key
(a logic double; the real server is derper, in test_derp_derper.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pywg.derp import frames as f
from pywg.derp.client import (
    ClientError,
    ClientErrorReason,
    ClientState,
    ClientStateError,
    Connected,
    DerpClient,
    PacketReceived,
    PongReceived,
)
from pywg.derp.http import (
    UpgradeError,
    UpgradeErrorReason,
    UpgradeResponseParser,
    build_upgrade_request,
)
from pywg.derp.keys import NodePrivateKey, NodePublicKey

SERVER = NodePrivateKey(bytes([7]) * 32)
CLIENT = NodePrivateKey(bytes([9]) * 32)
PEER = NodePrivateKey(bytes([11]) * 32).public


def server_info(body: bytes = b'{"version":2}', to: NodePublicKey = CLIENT.public) -> bytes:
    return f.ServerInfo(SERVER.seal_to(to, body)).pack()


def sent_frames(client: DerpClient) -> list[f.Frame]:
    return f.FrameDecoder().feed(client.data_to_send())


def connected_client(**kwargs: object) -> DerpClient:
    client = DerpClient(CLIENT, **kwargs)  # type: ignore[arg-type]
    client.receive_data(f.ServerKey(SERVER.public).pack(), 0.0)
    events = client.receive_data(server_info(), 0.0)
    assert events == [Connected(SERVER.public, client.server_info)]  # type: ignore[arg-type]
    client.data_to_send()
    return client


def test_handshake_sends_client_info_sealed_to_the_server_key() -> None:
    client = DerpClient(CLIENT, preferred=True)
    assert client.state is ClientState.AWAITING_SERVER_KEY
    wire = f.ServerKey(SERVER.public).pack()
    assert client.receive_data(wire[:7], 0.0) == []
    assert client.data_to_send() == b""
    assert client.receive_data(wire[7:], 0.0) == []
    assert client.state is ClientState.AWAITING_SERVER_INFO
    info, preferred = sent_frames(client)
    assert isinstance(info, f.ClientInfo) and info.key == CLIENT.public
    assert len(info.sealed) == 24 + 16 + len(b'{"version":2,"CanAckPings":true}')
    plaintext = SERVER.open_from(info.key, info.sealed)
    assert plaintext == b'{"version":2,"CanAckPings":true}'
    assert preferred == f.NotePreferred(True)
    # A second handshake uses a fresh random nonce.
    other = DerpClient(CLIENT)
    other.receive_data(wire, 0.0)
    (again,) = sent_frames(other)
    assert isinstance(again, f.ClientInfo) and again.sealed[:24] != info.sealed[:24]

    (event,) = client.receive_data(server_info(b'{"version":2,"TokenBucketBytesPerSecond":0}'), 1.0)
    assert event == Connected(SERVER.public, client.server_info)  # type: ignore[arg-type]
    assert client.state is ClientState.CONNECTED and client.server_info is not None
    assert client.server_info.version == 2


def test_client_info_options_use_gos_spellings_and_never_an_empty_mesh_key() -> None:
    client = DerpClient(CLIENT, can_ack_pings=False, mesh_key=bytes(range(32)), is_prober=True,
                        app_name="pywg")
    client.receive_data(f.ServerKey(SERVER.public).pack(), 0.0)
    (info,) = sent_frames(client)
    assert isinstance(info, f.ClientInfo)
    body = json.loads(SERVER.open_from(info.key, info.sealed) or b"")
    assert body == {"meshKey": bytes(range(32)).hex(), "version": 2, "CanAckPings": False, "IsProber": True,
                    "AppName": "pywg"}
    with pytest.raises(ValueError, match="mesh_key"):
        DerpClient(CLIENT, mesh_key=b"")


def test_packets_may_go_before_server_info_as_the_go_client_does() -> None:
    client = DerpClient(CLIENT)
    with pytest.raises(ClientStateError):
        client.send_packet(PEER, b"too early", 0.0)
    client.receive_data(f.ServerKey(SERVER.public).pack(), 0.0)
    client.data_to_send()
    assert client.send_packet(PEER, b"wireguard bytes", 0.0)
    assert sent_frames(client) == [f.SendPacket(PEER, b"wireguard bytes")]
    assert client.stats.packets_sent == 1 and client.stats.bytes_sent == 15


def test_steady_state_packets_events_and_ignored_frames() -> None:
    client = connected_client()
    stream = (f.RecvPacket(PEER, b"one").pack() + f.KeepAlive().pack() + f.PeerGone(PEER).pack()
              + f.PeerPresent(PEER, ("192.0.2.1", 7), f.PeerPresentFlags.IS_REGULAR).pack()
              + f.Health("degraded").pack() + f.Restarting(100, 2000).pack()
              + f.ServerKey(SERVER.public).pack() + f.SendPacket(PEER, b"not for a client").pack()
              + server_info() + f.RecvPacket(PEER, b"two").pack())
    events = client.receive_data(stream, 5.0)
    assert events == [
        PacketReceived(PEER, b"one"), f.KeepAlive(), f.PeerGone(PEER),
        f.PeerPresent(PEER, ("192.0.2.1", 7), f.PeerPresentFlags.IS_REGULAR), f.Health("degraded"),
        f.Restarting(100, 2000), PacketReceived(PEER, b"two"),
    ]
    assert events[0].packet == b"one"  # type: ignore[union-attr]
    assert client.stats.ignored_frames == 3  # the late ServerKey, the SendPacket, a second ServerInfo
    assert client.stats.packets_received == 2 and client.stats.keep_alives == 1


def test_server_ping_is_answered_with_the_same_bytes() -> None:
    client = connected_client()
    assert client.receive_data(f.Ping(b"pingpong").pack(), 1.0) == []
    assert sent_frames(client) == [f.Pong(b"pingpong")]
    assert client.stats.pings_answered == 1


def test_our_ping_comes_back_as_a_pong_with_its_rtt() -> None:
    nonces = iter([b"ABCDEFGH"])
    client = DerpClient(CLIENT, random=lambda n: next(nonces) if n == 8 else bytes(n))
    client.receive_data(f.ServerKey(SERVER.public).pack() + server_info(), 0.0)
    client.data_to_send()
    data = client.ping(10.0)
    assert data == b"ABCDEFGH" and sent_frames(client) == [f.Ping(data)]
    assert client.receive_data(f.Pong(b"XXXXXXXX").pack(), 10.1) == []
    assert client.stats.pongs_unmatched == 1
    (pong,) = client.receive_data(f.Pong(data).pack(), 10.25)
    assert isinstance(pong, PongReceived) and pong.rtt == pytest.approx(0.25)


def test_the_first_frame_must_be_server_key() -> None:
    client = DerpClient(CLIENT)
    with pytest.raises(ClientError) as caught:
        client.receive_data(f.KeepAlive().pack(), 0.0)
    assert caught.value.reason is ClientErrorReason.UNEXPECTED_FRAME
    assert client.state is ClientState.CLOSED
    with pytest.raises(ClientError) as closed:
        client.receive_data(b"", 0.0)
    assert closed.value.reason is ClientErrorReason.CLOSED


def test_a_pinned_server_key_is_enforced() -> None:
    client = DerpClient(CLIENT, expected_server_key=PEER)
    with pytest.raises(ClientError) as caught:
        client.receive_data(f.ServerKey(SERVER.public).pack(), 0.0)
    assert caught.value.reason is ClientErrorReason.SERVER_KEY_MISMATCH
    assert client.data_to_send() == b""  # no ClientInfo to an impostor


@pytest.mark.parametrize("sealed", [
    pytest.param(lambda: SERVER.seal_to(PEER, b'{"version":2}'), id="sealed-to-someone-else"),
    pytest.param(lambda: SERVER.seal_to(CLIENT.public, b"[2]"), id="not-an-object"),
    pytest.param(lambda: SERVER.seal_to(CLIENT.public, b"{nope"), id="not-json"),
    pytest.param(lambda: SERVER.seal_to(CLIENT.public, b'{"version":"2"}'), id="version-a-string"),
    pytest.param(lambda: bytes(30), id="too-short-for-a-box"),
])
def test_a_bad_server_info_closes_with_a_reason(sealed) -> None:  # type: ignore[no-untyped-def]
    client = DerpClient(CLIENT)
    client.receive_data(f.ServerKey(SERVER.public).pack(), 0.0)
    with pytest.raises(ClientError) as caught:
        client.receive_data(f.ServerInfo(sealed()).pack(), 0.0)
    assert caught.value.reason is ClientErrorReason.BAD_SERVER_INFO
    assert client.state is ClientState.CLOSED


def test_a_frame_error_keeps_the_events_before_it() -> None:
    client = connected_client()
    with pytest.raises(ClientError) as caught:
        client.receive_data(f.RecvPacket(PEER, b"kept").pack() + b"\x05\x00\x00\x00\x01x", 0.0)
    assert caught.value.reason is ClientErrorReason.FRAME
    assert caught.value.cause is not None and caught.value.cause.reason is f.FrameErrorReason.TRUNCATED
    assert caught.value.events == [PacketReceived(PEER, b"kept")]


def test_the_servers_advisory_token_bucket_drops_excess_sends() -> None:
    client = DerpClient(CLIENT)
    client.receive_data(f.ServerKey(SERVER.public).pack(), 0.0)
    client.receive_data(server_info(b'{"version":2,"TokenBucketBytesPerSecond":1000,'
                                    b'"tokenbucketbytesburst":1000}'), 0.0)
    client.data_to_send()
    assert client.send_packet(PEER, bytes(900), 0.0)  # 937 of 1000 tokens
    assert not client.send_packet(PEER, bytes(100), 0.0)
    assert client.stats.dropped_rate_limited == 1
    assert client.send_packet(PEER, bytes(100), 0.2)  # 200 tokens back
    assert [type(fr) for fr in sent_frames(client)] == [f.SendPacket, f.SendPacket]


def test_oversized_sends_and_silence() -> None:
    client = connected_client()
    with pytest.raises(ValueError, match="65536"):
        client.send_packet(PEER, bytes(65537), 0.0)
    assert client.send_packet(PEER, bytes(65536), 0.0)
    client.receive_data(f.KeepAlive().pack(), 50.0)
    assert not client.timed_out(169.0)
    assert client.timed_out(170.0)
    with pytest.raises(ClientError) as caught:
        client.connection_closed()
    assert caught.value.reason is ClientErrorReason.CLOSED


def test_no_secret_in_reprs() -> None:
    client = connected_client()
    for secret in (bytes([9]) * 32, bytes([7]) * 32):
        assert secret.hex() not in repr(client) + repr(CLIENT) + repr(client.private_key)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_fuzz_the_client_raises_only_client_error(data: bytes, after_handshake: bool) -> None:
    client = connected_client() if after_handshake else DerpClient(CLIENT)
    try:
        client.receive_data(data, 0.0)
    except ClientError as exc:
        assert isinstance(exc.reason, ClientErrorReason)


# -- the HTTP upgrade ----------------------------------------------------------------------

DERPER_101 = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
              b"Derp-Version: 2\r\nDerp-Public-Key: " + SERVER.public.untyped_hex().encode() + b"\r\n\r\n")


def test_upgrade_request_bytes() -> None:
    assert build_upgrade_request("10.0.0.1:3340") == (
        b"GET /derp HTTP/1.1\r\nHost: 10.0.0.1:3340\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
    request = build_upgrade_request("derp.example", ideal_node="900a", fast_start=True)
    assert b"\r\nIdeal-Node: 900a\r\n" in request and request.endswith(b"\r\nDerp-Fast-Start: 1\r\n\r\n")
    with pytest.raises(ValueError, match="host"):
        build_upgrade_request("evil\r\nX-Injected: 1")
    with pytest.raises(ValueError, match="ideal_node"):
        build_upgrade_request("h", ideal_node="a\nb")


@pytest.mark.parametrize("cut", [1, 20, len(DERPER_101) - 2, len(DERPER_101), len(DERPER_101) + 10])
def test_the_101_and_the_server_key_frame_back_to_back(cut: int) -> None:
    stream = DERPER_101 + f.ServerKey(SERVER.public).pack()
    parser = UpgradeResponseParser()
    response = parser.feed(stream[:cut])
    if response is None:
        response = parser.feed(stream[cut:])
    else:
        response = type(response)(response.status, response.headers, response.leftover + stream[cut:])
    assert response is not None and response.status == 101
    assert response.derp_version == 2 and response.server_key == SERVER.public
    assert f.FrameDecoder().feed(response.leftover) == [f.ServerKey(SERVER.public)]


@pytest.mark.parametrize(("data", "reason", "status"), [
    (b"HTTP/1.1 426 Upgrade Required\r\nContent-Type: text/plain\r\n\r\nDERP requires connection upgrade",
     UpgradeErrorReason.BAD_STATUS, 426),
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", UpgradeErrorReason.NOT_HTTP, None),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", UpgradeErrorReason.NOT_DERP, 101),
    (b"HTTP/1.1 101 OK\r\nno colon here\r\n\r\n", UpgradeErrorReason.MALFORMED_HEADER, 101),
    (b"HTTP/1.1 1\xb91 Switching\r\n\r\n", UpgradeErrorReason.NOT_HTTP, None),  # a latin-1 digit
])
def test_upgrade_failures_are_typed(data: bytes, reason: UpgradeErrorReason, status: int | None) -> None:
    with pytest.raises(UpgradeError) as caught:
        UpgradeResponseParser().feed(data)
    assert caught.value.reason is reason and caught.value.status == status
    if status == 426:
        assert "426" in str(caught.value) and "requires connection upgrade" in str(caught.value)


def test_an_endless_or_cut_head() -> None:
    parser = UpgradeResponseParser(max_head=1024)
    assert parser.feed(b"HTTP/1.1 101 Switching Protocols\r\n") is None
    with pytest.raises(UpgradeError) as caught:
        parser.feed(b"X-Pad: " + b"a" * 2000)
    assert caught.value.reason is UpgradeErrorReason.HEAD_TOO_LARGE
    with pytest.raises(UpgradeError) as cut:
        UpgradeResponseParser().close()
    assert cut.value.reason is UpgradeErrorReason.INCOMPLETE


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_the_upgrade_parser_raises_only_upgrade_error(data: bytes) -> None:
    try:
        response = UpgradeResponseParser(max_head=200).feed(b"HTTP/1.1 101 x\r\nDerp-Version: " + data)
        if response is not None:
            assert response.derp_version is None or response.derp_version >= 0
            assert response.server_key is None or len(response.server_key.raw) == 32
    except UpgradeError as exc:
        assert isinstance(exc.reason, UpgradeErrorReason)
