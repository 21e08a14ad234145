"""PUT /api/v1/nodes/{id}/disco-key: a node that registered without a disco key (or made a
new one) sets it with its node token (on SQLite and on the tests' PostgreSQL): one
revision, pushed to every watcher as node.changed; bad bodies and other callers refused
with the field named and nothing written."""

from __future__ import annotations

import asyncio
import json

import test_coordinator
from coordinator_server import ADMIN_TOKEN, Server, Watch, new_public_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pywg.manage.types import InvalidConfig
from pywg.mesh import wire

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
    for body, token, status, field, words in cases:
        got, err, _ = server.call("PUT", path, body, token=token)
        assert (got, err["field"]) == (status, field), (body, err)
        assert words in err["error"], err
    assert server.store.node(a["id"]).disco_key is None
    assert server.store.head() == head
    assert server.call("PUT", path, {"discoKey": new_public_key()}, token=a["token"])[0] == 200  # still serves


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["discoKey", "x", "DiscoKey"]),
                       st.one_of(st.none(), st.integers(), st.text(max_size=60), st.lists(st.integers(), max_size=2)),
                       max_size=3))
def test_the_disco_key_reader_accepts_a_key_or_names_the_field(data):
    try:
        key = wire.read_disco_key_update(data)
    except InvalidConfig as exc:
        assert exc.field in {"discoKey", "x", "DiscoKey"} and exc.reason
    else:
        assert list(data) == ["discoKey"] and key.to_base64() == data["discoKey"]


def test_garbage_bodies_are_refused_with_json_errors(tmp_path):
    s = Server(tmp_path / "c.db")
    try:
        a = s.register("a", s.authkey())
        for raw in (b"[]", b"null", b'{"discoKey": NaN}', b"\xff\xfe", b'{"discoKey": "' + b"A" * 70_000 + b'"}'):
            status, err, _ = s.call("PUT", f"/api/v1/nodes/{a['id']}/disco-key", raw=raw, token=a["token"])
            assert 400 <= status < 500 and isinstance(err["error"], str), raw[:20]
        assert json.dumps(s.store.node(a["id"]).view())
    finally:
        s.stop()
