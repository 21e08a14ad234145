"""The sans-I/O relay state's mesh and limits: a mesh-key client watches connections
(a flood of PeerPresent, then live PeerPresent/PeerGone), forwards packets one hop and closes
peers; a wrong key gets none of that; forwarders carry packets for keys not connected here and
PeerGone follows their loss; the queue of a backed-up receiver is bounded in bytes; the
token bucket delays by the debt."""

from __future__ import annotations

import os

from test_derp_server_state import connect

from pywg.derp import DerpClient, NodePrivateKey, NodePublicKey
from pywg.derp.client import PacketReceived
from pywg.derp.frames import PeerGone, PeerGoneReason, PeerPresent, PeerPresentFlags
from pywg.derp.limits import TokenBucket
from pywg.derp.server import DerpServer

SERVER_KEY = NodePrivateKey.generate()
MESH_KEY = os.urandom(32)


def mesh_peer(server: DerpServer, conn_id: int, mesh_key: bytes) -> DerpClient:
    client = DerpClient(NodePrivateKey.generate(), mesh_key=mesh_key, watch_conns=True)
    client.receive_data(server.accept(conn_id, 0.0), 0.0)
    server.receive_data(conn_id, client.data_to_send(), 0.0)
    return client


def test_a_mesh_peer_watches_forwards_and_closes_peers() -> None:
    server = DerpServer(SERVER_KEY, mesh_key=MESH_KEY)
    a = connect(server, 1)
    watcher = mesh_peer(server, 2, MESH_KEY)
    events = watcher.receive_data(server.data_to_send(2, 0.0), 0.0)
    present = [e for e in events if isinstance(e, PeerPresent)]
    assert a.public_key in [e.peer for e in present]
    assert next(e for e in present if e.peer == a.public_key).flags == PeerPresentFlags.IS_REGULAR
    b = connect(server, 3)
    events = watcher.receive_data(server.data_to_send(2, 0.0), 0.0)
    assert [e.peer for e in events if isinstance(e, PeerPresent)] == [b.public_key]
    # ForwardPacket from a far client to B: delivered with the far source key.
    far = NodePrivateKey.generate().public
    watcher.forward_packet(far, b.public_key, b"across the mesh")
    server.receive_data(2, watcher.data_to_send(), 0.0)
    got = b.receive_data(server.data_to_send(3, 0.0), 0.0)
    assert [(e.src, e.packet) for e in got if isinstance(e, PacketReceived)] == [(far, b"across the mesh")]
    assert server.stats.packets_from_mesh == 1
    # ClosePeer closes B; its loss is a PeerGone on the watch stream.
    watcher.close_peer(b.public_key)
    actions = server.receive_data(2, watcher.data_to_send(), 0.0)
    assert 3 in actions.close
    server.connection_lost(3)
    events = watcher.receive_data(server.data_to_send(2, 0.0), 0.0)
    assert [(e.peer, e.reason) for e in events if isinstance(e, PeerGone)] == [
        (b.public_key, PeerGoneReason.DISCONNECTED)]


def test_a_wrong_mesh_key_is_closed_on_watch_conns() -> None:
    server = DerpServer(SERVER_KEY, mesh_key=MESH_KEY)
    connect(server, 1)
    client = DerpClient(NodePrivateKey.generate(), mesh_key=os.urandom(32), watch_conns=True)
    client.receive_data(server.accept(2, 0.0), 0.0)
    actions = server.receive_data(2, client.data_to_send(), 0.0)
    assert 2 in actions.close and server.stats.closed["not_permitted"] == 1
    assert server.stats.mesh_handshakes == 0


class Link:
    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.sent: list[tuple[NodePublicKey, NodePublicKey, bytes]] = []

    def forward_packet(self, src: NodePublicKey, dst: NodePublicKey, packet: bytes) -> bool:
        self.sent.append((src, dst, packet))
        return self.accept


def test_forwarders_carry_packets_for_far_keys_and_their_loss_is_peer_gone() -> None:
    server = DerpServer(SERVER_KEY, mesh_key=MESH_KEY)
    a = connect(server, 1)
    far = NodePrivateKey.generate().public
    first, second = Link(), Link()
    assert server.add_forwarder(far, first) and server.add_forwarder(far, second)
    assert not server.add_forwarder(SERVER_KEY.public, first)  # never our own key
    a.send_packet(far, b"to the far side", 0.0)
    server.receive_data(1, a.data_to_send(), 0.0)
    assert first.sent == [(a.public_key, far, b"to the far side")] and not second.sent  # earliest wins
    assert not server.remove_forwarder(far, first).wake  # still reachable through the second
    actions = server.remove_link(second)
    assert actions.wake == {1}
    events = a.receive_data(server.data_to_send(1, 0.0), 0.0)
    assert [(e.peer, e.reason) for e in events if isinstance(e, PeerGone)] == [(far, PeerGoneReason.DISCONNECTED)]


def test_a_backed_up_receiver_holds_at_most_the_queue_bytes() -> None:
    server = DerpServer(SERVER_KEY, send_queue_depth=1000, send_queue_bytes=10_000)
    a, b = connect(server, 1), connect(server, 2)
    server.set_writable(2, False)
    for _ in range(40):
        a.send_packet(b.public_key, bytes(1000), 0.0)
    server.receive_data(1, a.data_to_send(), 0.0)
    queued = server.data_to_send(2, 0.0)
    assert len(queued) <= 10_000
    assert server.stats.dropped["queue_full"] == 40 - len(queued) // (5 + 32 + 1000)


def test_the_token_bucket_delays_by_the_debt() -> None:
    bucket = TokenBucket(1000, 500, 0.0)
    assert bucket.consume(500, 0.0) == 0.0
    assert bucket.consume(1000, 0.0) == 1.0  # 1000 tokens in debt at 1000/s
    assert bucket.consume(0, 1.0) == 0.0
    assert TokenBucket(0, 0, 0.0).consume(10**9, 0.0) == 0.0  # rate 0: unlimited
    accepts = TokenBucket(1, 2, 0.0)
    assert accepts.allow(0.0) and accepts.allow(0.0) and not accepts.allow(0.0) and accepts.allow(1.0)
