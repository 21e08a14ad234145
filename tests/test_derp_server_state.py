"""The sans-I/O DERP server state (``pywg.derp.server``) driven with pywg's sans-I/O client:
handshake, forwarding, the send queue bound, replacement, limits, and hypothesis fuzzing of
the frame input: no input raises, and a broken stream closes only its own connection."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from pywg.derp import DerpClient, NodePrivateKey
from pywg.derp.client import Connected, PacketReceived
from pywg.derp.frames import ClientInfo, PeerGone, PeerGoneReason, SendPacket
from pywg.derp.server import DerpServer

SERVER_KEY = NodePrivateKey.generate()


def connect(server: DerpServer, conn_id: int, key: NodePrivateKey | None = None) -> DerpClient:
    """A client handshaken with ``server`` on ``conn_id``."""
    client = DerpClient(key or NodePrivateKey.generate())
    client.receive_data(server.accept(conn_id, 0.0), 0.0)
    actions = server.receive_data(conn_id, client.data_to_send(), 0.0)
    assert conn_id in actions.wake and not actions.close
    events = client.receive_data(server.data_to_send(conn_id, 0.0), 0.0)
    assert any(isinstance(e, Connected) for e in events)
    return client


def test_packets_are_forwarded_with_the_source_key_and_the_queue_is_bounded() -> None:
    server = DerpServer(SERVER_KEY, send_queue_depth=4)
    a, b = connect(server, 1), connect(server, 2)
    server.set_writable(2, False)  # B's socket is backed up: its queue is bounded
    for i in range(10):
        a.send_packet(b.public_key, b"p%d" % i, 0.0)
    actions = server.receive_data(1, a.data_to_send(), 0.0)
    assert actions.wake == {2}
    events = b.receive_data(server.data_to_send(2, 0.0), 0.0)
    # The oldest six were dropped (and counted); the newest four arrive in order, from A.
    assert [(e.src, e.packet) for e in events if isinstance(e, PacketReceived)] == [
        (a.public_key, b"p%d" % i) for i in range(6, 10)]
    assert server.stats.dropped["queue_full"] == 6 and server.stats.packets_forwarded == 10
    # Writable again: one feed's packets all wait for the caller's next write.
    server.set_writable(2, True)
    for i in range(10):
        a.send_packet(b.public_key, b"q%d" % i, 0.0)
    server.receive_data(1, a.data_to_send(), 0.0)
    events = b.receive_data(server.data_to_send(2, 0.0), 0.0)
    assert len([e for e in events if isinstance(e, PacketReceived)]) == 10


def test_a_disconnect_tells_only_those_that_sent_to_it() -> None:
    server = DerpServer(SERVER_KEY)
    a, b, c = connect(server, 1), connect(server, 2), connect(server, 3)
    a.send_packet(b.public_key, b"x", 0.0)
    server.receive_data(1, a.data_to_send(), 0.0)
    actions = server.connection_lost(2)
    assert actions.wake == {1}
    events = a.receive_data(server.data_to_send(1, 0.0), 0.0)
    assert events == [PeerGone(b.public_key, PeerGoneReason.DISCONNECTED)]
    assert server.data_to_send(3, 0.0) == b"" and c.state.value == "connected"


def test_replacement_and_the_client_limit() -> None:
    server = DerpServer(SERVER_KEY, max_clients=2)
    key = NodePrivateKey.generate()
    connect(server, 1, key)
    connect(server, 2)
    newer = DerpClient(key)
    newer.receive_data(server.accept(3, 0.0), 0.0)
    actions = server.receive_data(3, newer.data_to_send(), 0.0)
    assert actions.close == {1} and server.client_count == 2  # the same key: replaces, not over the limit
    assert server.connection_lost(1).wake == frozenset()  # the replaced one leaves no PeerGone
    assert server.is_connected(key.public)
    extra = DerpClient(NodePrivateKey.generate())
    extra.receive_data(server.accept(4, 0.0), 0.0)
    assert server.receive_data(4, extra.data_to_send(), 0.0).close == {4}
    assert server.stats.closed == {"replaced": 1, "server_full": 1}


def test_a_client_info_sealed_with_another_key_does_not_prove_ownership() -> None:
    server = DerpServer(SERVER_KEY)
    owner, thief = NodePrivateKey.generate(), NodePrivateKey.generate()
    server.accept(1, 0.0)
    sealed = thief.seal_to(SERVER_KEY.public, json.dumps({"version": 2}).encode())
    actions = server.receive_data(1, ClientInfo(owner.public, sealed).pack(), 0.0)
    assert actions.close == {1} and not server.is_connected(owner.public)
    assert server.stats.closed == {"bad_client_info": 1}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8), st.booleans())
def test_fuzz_frame_input_never_raises_and_hurts_only_its_connection(chunks: list[bytes], handshake: bool) -> None:
    server = DerpServer(SERVER_KEY)
    a, b = connect(server, 1), connect(server, 2)
    if handshake:
        connect(server, 3)
    else:
        server.accept(3, 0.0)
    for chunk in chunks:
        actions = server.receive_data(3, chunk, 0.0)
        assert actions.close <= {3}
        for conn_id in actions.wake:
            server.data_to_send(conn_id, 0.0)
        if actions.close:
            server.connection_lost(3)
            break
    a.send_packet(b.public_key, b"still here", 0.0)
    server.receive_data(1, a.data_to_send(), 0.0)
    events = b.receive_data(server.data_to_send(2, 0.0), 0.0)
    assert PacketReceived(a.public_key, b"still here") in events


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0x04, 0x06, 0x07, 0x10, 0x11, 0x12, 0x13, 0x02, 0x05, 0x7F]),
                          st.binary(max_size=80)), max_size=10))
def test_fuzz_well_framed_payloads_of_every_type(frames: list[tuple[int, bytes]]) -> None:
    server = DerpServer(SERVER_KEY)
    connect(server, 1)
    b = connect(server, 2)
    data = b"".join(bytes([t]) + len(p).to_bytes(4, "big") + p for t, p in frames)
    data += SendPacket(b.public_key, b"last").pack()
    actions = server.receive_data(1, data, 0.0)
    assert actions.close <= {1}
    if not actions.close:
        events = b.receive_data(server.data_to_send(2, 0.0), 0.0)
        assert PacketReceived(server.client_key(1), b"last") in events  # type: ignore[arg-type]
    assert sum(server.stats.closed.values()) == len(actions.close)
