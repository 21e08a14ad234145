"""PUT /api/v1/nodes/{id}/key: a node rotates its WireGuard key through the coordinator
(on SQLite and on the tests' PostgreSQL): one revision, pushed to every watcher; bad and
conflicting keys refused with the field named and nothing written."""

from __future__ import annotations

import asyncio
import json

import pytest
import test_coordinator
from coordinator_server import ADMIN_TOKEN, Server, Watch, new_public_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pywg.manage.types import InvalidConfig
from pywg.mesh import wire

server = test_coordinator.server  # the fixture: a coordinator on SQLite, then on the tests' PostgreSQL


def test_a_node_changes_its_key_and_every_watcher_gets_one_change(server):
    key = server.authkey()
    a, b = server.register("a", key), server.register("b", key)
    new = new_public_key()

    async def scenario() -> None:
        async with Watch(server.url, b["token"], since=b["revision"]) as w:
            status, answer, _ = await asyncio.to_thread(
                server.call, "PUT", f"/api/v1/nodes/{a['id']}/key", {"publicKey": new}, token=a["token"])
            assert status == 200 and answer["revision"] == b["revision"] + 1
            pushed = await w.next()
            assert (pushed["kind"], pushed["nodeId"], pushed["revision"]) == ("node.changed", a["id"], answer["revision"])
            assert pushed["node"]["publicKey"] == new
            assert pushed["node"]["internalIp"] == a["internalIp"]  # the same node, its addresses kept
            # The same key again: nothing new is logged or pushed.
            again = await asyncio.to_thread(
                server.call, "PUT", f"/api/v1/nodes/{a['id']}/key", {"publicKey": new}, token=a["token"])
            assert again[0] == 200 and again[1]["revision"] == answer["revision"]
            await w.nothing_for(0.3)

    asyncio.run(scenario())
    assert server.store.node(a["id"]).public_key.to_base64() == new
    _, topo, _ = server.call("GET", "/api/v1/topology", token=ADMIN_TOKEN)
    assert {n["id"]: n["publicKey"] for n in topo["nodes"]}[a["id"]] == new
    # The node's token still works after its key changed.
    assert server.call("GET", "/api/v1/topology", token=a["token"])[0] == 200


def assert_refused(server, path: str, cases: list[tuple]) -> None:
    """Each (body, token, status, field, words): PUT ``path`` answers that status, names
    that field, and says those words."""
    for body, token, status, field, words in cases:
        got, err, _ = server.call("PUT", path, body, token=token)
        assert (got, err["field"]) == (status, field), (body, err)
        assert words in err["error"], err


def test_bad_key_changes_are_refused_naming_the_field_and_change_nothing(server):
    key = server.authkey()
    a, b = server.register("a", key), server.register("b", key)
    before = server.store.node(a["id"]).public_key.to_base64()
    head = server.store.head()
    b_key = server.store.node(b["id"]).public_key.to_base64()
    path = f"/api/v1/nodes/{a['id']}/key"
    cases = [
        ({"publicKey": b_key}, a["token"], 409, "publicKey", "another node"),
        ({"publicKey": "A" * 43 + "="}, a["token"], 400, "publicKey", "all zeros"),
        ({"publicKey": "not base64!"}, a["token"], 400, "publicKey", "base64"),
        ({"publicKey": 5}, a["token"], 400, "publicKey", "base64 key string"),
        ({}, a["token"], 400, "publicKey", "missing"),
        ({"publicKey": new_public_key(), "privateKey": "x"}, a["token"], 400, "privateKey", ""),
        ({"publicKey": new_public_key()}, b["token"], 403, "id", "own node"),
        ({"publicKey": new_public_key()}, None, 401, "Authorization", ""),
        ({"publicKey": new_public_key()}, ADMIN_TOKEN, 403, "id", ""),
    ]
    assert_refused(server, path, cases)
    got, _, _ = server.call("PUT", path, raw=b'{"publicKey": ')
    assert got in (400, 401)
    assert server.store.node(a["id"]).public_key.to_base64() == before
    assert server.store.head() == head
    # The server still serves.
    assert server.call("PUT", path, {"publicKey": new_public_key()}, token=a["token"])[0] == 200


@pytest.mark.parametrize(("read", "field"), [(wire.read_key_update, "publicKey"),
                                            (wire.read_disco_key_update, "discoKey")])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.dictionaries(st.sampled_from(["publicKey", "discoKey", "x", "PublicKey"]),
                            st.one_of(st.none(), st.integers(), st.text(max_size=60),
                                      st.lists(st.integers(), max_size=2)), max_size=3))
def test_the_key_update_readers_accept_a_key_or_name_the_field(read, field, data):
    try:
        key = read(data)
    except InvalidConfig as exc:
        assert exc.field in {"publicKey", "discoKey", "x", "PublicKey"} and exc.reason
    else:
        assert list(data) == [field] and key.to_base64() == data[field]


@pytest.mark.parametrize(("route", "field"), [("key", "publicKey"), ("disco-key", "discoKey")])
def test_garbage_bodies_are_refused_with_json_errors(tmp_path, route, field):
    s = Server(tmp_path / "c.db")
    try:
        a = s.register("a", s.authkey())
        for raw in (b"[]", b"null", b'{"%s": NaN}' % field.encode(), b"\xff\xfe",
                    b'{"%s": "' % field.encode() + b"A" * 70_000 + b'"}'):
            status, err, _ = s.call("PUT", f"/api/v1/nodes/{a['id']}/{route}", raw=raw, token=a["token"])
            assert 400 <= status < 500 and isinstance(err["error"], str), raw[:20]
        assert json.dumps(s.store.node(a["id"]).view())  # still readable
    finally:
        s.stop()
