"""The agent's preshared-key decisions against a real coordinator (in-process, fake clock):
one request per push, peers held back until their key is known, unchanged peers left
alone, the feature off, a gone or re-keyed peer, an unreachable coordinator, a reconnect."""

from __future__ import annotations

import asyncio
import itertools
import os

import aiohttp
import pytest
from coordinator_server import ADMIN_TOKEN, Server
from test_psk import config, join

from pywg.manage.key import Key
from pywg.mesh import agent_psk, psk
from pywg.mesh.reconcile import PeerSpec, plan


def spec(node: dict) -> PeerSpec:
    return PeerSpec(node["publicKey"], (f"{node['internalIp']}/32",), None, 25)


class Side:
    """One agent's PairKeys, talking to the server over HTTP, counting its requests."""

    def __init__(self, server: Server, node: dict) -> None:
        self.server, self.node = server, node
        self.keys = agent_psk.PairKeys()
        self.current: dict[str, PeerSpec] = {}
        self.requests = 0
        self.bodies: list[dict] = []

    async def push(self, peers: list[dict], url: str | None = None) -> tuple[list, set[str]]:
        desired = {p["publicKey"]: spec(p) for p in peers}
        ids = {p["publicKey"]: p["id"] for p in peers}
        async with aiohttp.ClientSession() as session:
            real = agent_psk.http_post(session, f"{url or self.server.url}/api/v1/nodes/{self.node['id']}/preshared-keys",
                                       self.node["token"], None)

            async def counted(body):  # type: ignore[no-untyped-def]
                self.requests += 1
                self.bodies.append(body)
                return await real(body)

            changes, held = await self.keys.prepare(counted, plan(self.current, desired), self.current, desired, ids)
        for c in changes:  # what the agent does with them
            if c.op in ("remove", "rename"):
                self.current.pop(c.public_key)
                self.keys.removed(c.public_key)
            if c.spec is not None:
                self.current[c.spec.public_key] = c.spec
                self.keys.on_device(c.spec.public_key, self.keys.key_for(c.spec.public_key))
        return [(c.op, c.public_key) for c in changes], held

    def rotated(self, peer: dict) -> dict:
        """``peer`` after a key rotation at the coordinator (same node, a new key)."""
        new = Key.generate_private()
        status, _, _ = self.server.call("PUT", f"/api/v1/nodes/{peer['id']}/key",
                                        {"publicKey": new.public_key().to_base64()}, token=peer["token"])
        assert status == 200
        return {**peer, "publicKey": new.public_key().to_base64()}


@pytest.fixture
def on(tmp_path):
    """A coordinator with preshared keys on (its secret: ``on.config.preshared_secret``)."""
    s = Server(tmp_path / "c.db", config(psk.PskSecret(os.urandom(32))))
    yield s
    s.stop()


def pair(secret: psk.PskSecret, a: dict, b: dict) -> Key:
    return secret.pair_key(a["id"], b["id"])


def test_new_peers_get_their_keys_in_one_request_and_unchanged_peers_are_left_alone(on):
    secret = on.config.preshared_secret
    assert secret is not None
    key = on.authkey()
    a, b, c, d = (join(on, n, key) for n in "abcd")
    side = Side(on, a)
    changes, held = asyncio.run(side.push([b, c]))
    assert held == set() and sorted(changes) == sorted([("add", b["publicKey"]), ("add", c["publicKey"])])
    assert side.requests == 1
    assert side.keys.installed == {b["publicKey"]: pair(secret, a, b), c["publicKey"]: pair(secret, a, c)}
    # The other end derives the same key.
    other = Side(on, b)
    asyncio.run(other.push([a]))
    assert other.keys.installed[a["publicKey"]] == side.keys.installed[b["publicKey"]]
    # A push that adds D asks for D only; B and C are not touched.
    changes, held = asyncio.run(side.push([b, c, d]))
    assert changes == [("add", d["publicKey"])] and held == set() and side.requests == 2
    # Nothing new: no request, no change.
    assert asyncio.run(side.push([b, c, d])) == ([], set()) and side.requests == 2
    # A reconnect asks again, with an empty list (the secret is the same), and changes nothing.
    side.keys.forget()
    assert asyncio.run(side.push([b, c, d])) == ([], set()) and side.requests == 3
    assert side.bodies[-1] == {"peers": []}


def test_a_gone_peer_is_held_back_the_others_go_through(on):
    key = on.authkey()
    a, b, c = (join(on, n, key) for n in "abc")
    assert on.call("DELETE", f"/api/v1/nodes/{b['id']}", token=ADMIN_TOKEN)[0] == 200
    side = Side(on, a)
    changes, held = asyncio.run(side.push([b, c]))  # the push still shows B
    assert changes == [("add", c["publicKey"])] and held == {b["publicKey"]}
    assert b["publicKey"] not in side.keys.installed
    # A new peer whose key the push shows is not its key at the coordinator (409): held too.
    d = join(on, "d", key)
    stale = {**d, "publicKey": Key.generate_private().public_key().to_base64()}
    changes, held = asyncio.run(side.push([c, stale]))
    assert changes == [] and held == {stale["publicKey"]}
    # A known peer with a new key (its node rotated) is renamed with the key it has: no request.
    requests = side.requests
    moved = {**c, "publicKey": Key.generate_private().public_key().to_base64()}
    changes, held = asyncio.run(side.push([moved]))
    assert changes == [("rename", c["publicKey"])] and held == set() and side.requests == requests


def test_an_unreachable_coordinator_holds_new_peers_and_keeps_configured_ones(on):
    secret = on.config.preshared_secret
    assert secret is not None
    key = on.authkey()
    a, b, c = (join(on, n, key) for n in "abc")
    side = Side(on, a)
    asyncio.run(side.push([b]))
    before = dict(side.keys.installed)
    side.keys.forget()  # reconnected; now the call fails
    changes, held = asyncio.run(side.push([b, c], url="http://127.0.0.1:9"))
    assert changes == [] and held == {c["publicKey"]}
    assert side.keys.installed == before  # B keeps its key, C is not added without one
    # Once the coordinator answers, C is added with its key and B untouched.
    changes, held = asyncio.run(side.push([b, c]))
    assert changes == [("add", c["publicKey"])] and held == set()
    assert side.keys.installed[c["publicKey"]] == pair(secret, a, c)


def test_off_peers_have_no_key_and_a_key_left_from_before_is_cleared(tmp_path):
    secret = psk.PskSecret(os.urandom(32))
    server = Server(tmp_path / "c.db", config(secret))
    key = server.authkey()
    a, b, c = (join(server, n, key) for n in "abc")
    side = Side(server, a)
    asyncio.run(side.push([b]))
    assert side.keys.installed[b["publicKey"]] is not None
    server.stop()
    off = Server(tmp_path / "c.db", config(None))  # restarted without --preshared-keys
    try:
        side.server = off
        side.keys.forget()
        changes, held = asyncio.run(side.push([b, c]))
        assert sorted(changes) == sorted([("add", c["publicKey"]), ("update", b["publicKey"])]) and held == set()
        assert side.keys.installed == {b["publicKey"]: None, c["publicKey"]: None}
        requests = side.requests
        assert asyncio.run(side.push([b, c])) == ([], set()) and side.requests == requests
    finally:
        off.stop()


def test_another_secret_after_a_restart_updates_every_peer(tmp_path):
    secret = psk.PskSecret(os.urandom(32))
    server = Server(tmp_path / "c.db", config(secret))
    key = server.authkey()
    a, b = (join(server, n, key) for n in "ab")
    side = Side(server, a)
    asyncio.run(side.push([b]))
    server.stop()
    other = psk.PskSecret(os.urandom(32))
    again = Server(tmp_path / "c.db", config(other))
    try:
        side.server = again
        side.keys.forget()
        assert asyncio.run(side.push([b])) == ([("update", b["publicKey"])], set())
        assert side.keys.installed[b["publicKey"]] == pair(other, a, b)
        # The probe saw another secretId, then every key was asked again.
        assert [len(body["peers"]) for body in side.bodies[-2:]] == [0, 1]
    finally:
        again.stop()


def test_held_peers_are_tried_again_with_backoff_until_their_key_comes(on):
    key = on.authkey()
    a, b = (join(on, n, key) for n in "ab")
    side = Side(on, a)
    urls = ["http://127.0.0.1:9", "http://127.0.0.1:9", on.url]  # unreachable twice, then the coordinator
    tries: list[tuple[float, set[str]]] = []

    async def main() -> None:
        done = asyncio.Event()

        async def apply() -> None:  # what Agent.apply does with the outcome
            _, held = await side.push([b], url=urls[min(len(tries), 2)])
            tries.append((asyncio.get_running_loop().time(), held))
            if held:
                retry.schedule()
                retry.schedule()  # a second hold while one is pending: still one try
            else:
                retry.reset()
                done.set()

        retry = agent_psk.Retry(apply, first=0.05, most=1.0)
        await apply()
        await asyncio.wait_for(done.wait(), 5)
        await asyncio.sleep(0.3)  # no try after the last

    asyncio.run(main())
    assert [held for _, held in tries] == [{b["publicKey"]}, {b["publicKey"]}, set()]
    gaps = [t1 - t0 for (t0, _), (t1, _) in itertools.pairwise(tries)]
    assert 0.05 <= gaps[0] < gaps[1] and gaps[1] >= 0.1  # backoff doubles
    assert b["publicKey"] in side.current and side.keys.installed[b["publicKey"]] is not None


def test_a_peer_that_rotated_its_key_is_renamed_with_the_same_preshared_key_and_no_request(on):
    secret = on.config.preshared_secret
    assert secret is not None
    key = on.authkey()
    a, b = (join(on, n, key) for n in "ab")
    side = Side(on, a)
    asyncio.run(side.push([b]))
    before, requests = side.keys.installed[b["publicKey"]], side.requests
    b2 = side.rotated(b)  # PUT /api/v1/nodes/{id}/key, as `pywg agent rotate` does
    changes, held = asyncio.run(side.push([b2]))
    assert changes == [("rename", b["publicKey"])] and held == set() and side.requests == requests
    assert side.keys.installed == {b2["publicKey"]: before} and before == pair(secret, a, b)
    # And the rotated node itself: its own new key changes none of its pairs.
    other = Side(on, {**b2, "token": b["token"]})
    asyncio.run(other.push([a]))
    assert other.keys.installed[a["publicKey"]] == before
