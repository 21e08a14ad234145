"""NodeKeyRelays without root: a node rotating its DERP node key on a real pywg DERP server
in this process (127.0.0.1). While both keys are accepted, a peer that learnt the new key
and one that did not each reach the node and each get its answers from the key they know
(a peer drops a datagram from a node key it does not know); once the node uses the new
key, a peer it never heard from gets the new key; once the old key is dropped, only the
new key's connection is left and everything goes out under it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from pywg.derp import NodePrivateKey
from pywg.device.derp_client import DialTarget
from pywg.device.derp_server import DerpRelayServer
from pywg.device.relay import DeviceRelay
from pywg.device.relay_keys import NodeKeyRelays
from pywg.protocol.endpoint import RelayEndpoint
from pywg.testing.memory import wait_until

REGION = 3
Inbox = list[tuple[bytes, RelayEndpoint]]


class Node:
    """A DeviceRelay that keeps what it receives."""

    def __init__(self, server: DerpRelayServer, make: Callable[..., DeviceRelay]) -> None:
        self.key = NodePrivateKey.generate()
        self.inbox: Inbox = []
        self.relay = make(self.key)
        self.relay.on_receive = lambda data, source: self.inbox.append((data, source))
        self.relay.start()

    @property
    def public(self) -> bytes:
        return bytes(self.key.public)


def run(body: Callable[[DerpRelayServer, Callable[..., DeviceRelay]], Awaitable[None]]) -> None:
    async def main() -> None:
        server = DerpRelayServer(NodePrivateKey.generate(), "127.0.0.1", 0)
        await server.start()
        target = DialTarget.make("127.0.0.1", server.port)

        def make(key: NodePrivateKey, home: int = REGION) -> DeviceRelay:
            return DeviceRelay(key, {REGION: [target]}, home=home,
                               client_options={"expected_server_key": server.public_key})
        try:
            await body(server, make)
        finally:
            await server.close()

    asyncio.run(asyncio.wait_for(main(), 30))


async def arrives(inbox: Inbox, data: bytes) -> RelayEndpoint:
    """The source ``data`` arrived from (waits up to 3 s)."""
    await wait_until(lambda: any(d == data for d, _ in inbox), 3.0)
    return next(s for d, s in inbox if d == data)


def test_each_peer_is_answered_from_the_key_it_knows_then_only_the_new_key() -> None:
    async def body(server: DerpRelayServer, make: Callable[..., DeviceRelay]) -> None:
        old, new = NodePrivateKey.generate(), NodePrivateKey.generate()
        received: Inbox = []
        node = NodeKeyRelays(make, old, home=REGION)
        node.on_receive = lambda data, source: received.append((data, source))
        node.start()
        renamed, behind, stranger = Node(server, make), Node(server, make), Node(server, make)
        try:
            await node.wait_connected(5)
            for peer in (renamed, behind, stranger):
                await peer.relay.wait_connected(5)
            assert node.send(REGION, stranger.public, b"one key")
            assert (await arrives(stranger.inbox, b"one key")).node_key == bytes(old.public)

            await node.add(new).wait_connected(5)  # the device accepts the new key too
            assert node.node_keys == [bytes(old.public), bytes(new.public)]
            assert renamed.relay.send(REGION, bytes(new.public), b"to new")
            assert behind.relay.send(REGION, bytes(old.public), b"to old")
            assert (await arrives(received, b"to new")).node_key == renamed.public
            assert (await arrives(received, b"to old")).node_key == behind.public
            for peer in (renamed, behind):
                assert node.send(REGION, peer.public, b"answer")
            assert (await arrives(renamed.inbox, b"answer")).node_key == bytes(new.public)
            assert (await arrives(behind.inbox, b"answer")).node_key == bytes(old.public)

            node.use(new)  # promoted: the node's key now, the old one still accepted
            assert node.stats()["node_key"] == str(new.public)
            assert node.send(REGION, stranger.public, b"never heard")
            assert (await arrives(stranger.inbox, b"never heard")).node_key == bytes(new.public)
            assert node.send(REGION, behind.public, b"still old")
            assert (await arrives(behind.inbox, b"still old")).node_key == bytes(old.public)

            node.drop_others()  # the overlap ended
            assert node.node_keys == [bytes(new.public)]
            assert node.stats()["other_keys"] == []
            assert node.send(REGION, behind.public, b"after")
            assert (await arrives(behind.inbox, b"after")).node_key == bytes(new.public)
            await wait_until(lambda: not server.state.is_connected(old.public), 3.0)  # old connection closed
        finally:
            await node.close()
            for peer in (renamed, behind, stranger):
                await peer.relay.close()

    run(body)


def test_a_second_accepted_key_replaces_the_first_and_close_ends_every_connection() -> None:
    async def body(server: DerpRelayServer, make: Callable[..., DeviceRelay]) -> None:
        ours, first, second = NodePrivateKey.generate(), NodePrivateKey.generate(), NodePrivateKey.generate()
        node = NodeKeyRelays(make, ours, home=REGION)
        node.start()
        await node.add(first).wait_connected(5)
        await node.add(second).wait_connected(5)  # a rotation undone, then another one
        assert node.node_keys == [bytes(ours.public), bytes(second.public)]
        await wait_until(lambda: not server.state.is_connected(first.public), 3.0)
        assert server.state.is_connected(ours.public) and server.state.is_connected(second.public)
        await node.close()
        await wait_until(lambda: not any(server.state.is_connected(k.public) for k in (ours, second)), 3.0)
        assert not node.send(REGION, bytes(first.public), b"closed")
        assert node.stats()["drops"] == {"closed": 1}

    run(body)
