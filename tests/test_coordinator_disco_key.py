"""PUT /api/v1/nodes/{id}/disco-key: a node that registered without a disco key (or made a
new one) sets it with its node token (on SQLite and on the tests' PostgreSQL): one
revision, pushed to every watcher as node.changed; bad bodies and other callers refused
with the field named and nothing written (garbage bodies and the reader's fuzzing: test_coordinator_key)."""

from __future__ import annotations

import asyncio

import test_coordinator
from coordinator_server import ADMIN_TOKEN, Watch, new_public_key
from test_coordinator_key import assert_refused

server = test_coordinator.server  # the fixture: a coordinator on SQLite, then on the tests' PostgreSQL


def test_a_node_without_a_disco_key_sets_one_and_every_watcher_gets_one_change(server):
    key = server.authkey()
    a, b = server.register("a", key), server.register("b", key)
    assert server.store.node(a["id"]).disco_key is None
    disco = new_public_key()
    path = f"/api/v1/nodes/{a['id']}/disco-key"

    async def scenario() -> None:
        async with Watch(server.url, b["token"], since=b["revision"]) as w:
            status, answer, _ = await asyncio.to_thread(server.call, "PUT", path, {"discoKey": disco},
                                                        token=a["token"])
            assert status == 200 and answer["revision"] == b["revision"] + 1
            pushed = await w.next()
            assert (pushed["kind"], pushed["nodeId"], pushed["revision"]) == ("node.changed", a["id"], answer["revision"])
            assert pushed["node"]["discoKey"] == disco
            assert pushed["node"]["internalIp"] == a["internalIp"]  # the same node, its addresses kept
            again = await asyncio.to_thread(server.call, "PUT", path, {"discoKey": disco}, token=a["token"])
            assert again[0] == 200 and again[1]["revision"] == answer["revision"]  # nothing new
            await w.nothing_for(0.3)
            newer = new_public_key()  # a new disco.key later: replaced, pushed again
            status, answer2, _ = await asyncio.to_thread(server.call, "PUT", path, {"discoKey": newer},
                                                         token=a["token"])
            assert status == 200 and answer2["revision"] == answer["revision"] + 1
            assert (await w.next())["node"]["discoKey"] == newer

    asyncio.run(scenario())
    assert server.store.node(a["id"]).view()["discoKey"] == server.store.node(a["id"]).disco_key.to_base64()
    assert server.call("GET", "/api/v1/topology", token=a["token"])[0] == 200  # the token still works


def test_bad_disco_key_changes_are_refused_naming_the_field_and_change_nothing(server):
    key = server.authkey()
    a, b = server.register("a", key), server.register("b", key)
    head = server.store.head()
    path = f"/api/v1/nodes/{a['id']}/disco-key"
    cases = [
        ({"discoKey": "A" * 43 + "="}, a["token"], 400, "discoKey", "all zeros"),
        ({"discoKey": "not base64!"}, a["token"], 400, "discoKey", "base64"),
        ({"discoKey": 5}, a["token"], 400, "discoKey", "base64 key string"),
        ({}, a["token"], 400, "discoKey", "missing"),
        ({"discoKey": new_public_key(), "publicKey": new_public_key()}, a["token"], 400, "publicKey", ""),
        ({"discoKey": new_public_key()}, b["token"], 403, "id", "own node"),
        ({"discoKey": new_public_key()}, None, 401, "Authorization", ""),
        ({"discoKey": new_public_key()}, ADMIN_TOKEN, 403, "id", ""),
    ]
    assert_refused(server, path, cases)
    assert server.store.node(a["id"]).disco_key is None
    assert server.store.head() == head
    assert server.call("PUT", path, {"discoKey": new_public_key()}, token=a["token"])[0] == 200  # still serves
