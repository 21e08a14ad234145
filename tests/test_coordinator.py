"""The coordinator over HTTP on 127.0.0.1: registration, the spec's topology JSON, the
watch stream resumed by revision, every kind of bad input, rate limits, a restart."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import sqlite3

import pytest
from coordinator_server import ADMIN_TOKEN, Clock, Server, Watch, new_public_key, open_target

from pywg.manage.types import MeshTopology
from pywg.mesh import credentials
from pywg.mesh.coordinator import Config, Limits
from pywg.mesh.ratelimit import RateLimiter


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request, tmp_path):
    """A coordinator on each store: a SQLite file, a database on the tests' PostgreSQL."""
    if request.param == "sqlite":
        s = Server(tmp_path / "coordinator.db")
    else:
        s = Server(request.getfixturevalue("postgres").database())
    yield s
    s.stop()


def test_register_returns_id_addresses_and_a_token_and_the_topology_has_the_specs_fields(server):
    key = server.authkey()
    a = server.register("alpha", key, endpoints=["192.0.2.10:51820", "[2001:db8::10]:51820"], region="eu")
    assert set(a) == {"id", "name", "internalIp", "internalIpv6", "prefix4", "prefix6", "token", "revision",
                      "stunServers", "natObserver"}
    assert a["stunServers"] == []  # no `serve --stun`
    assert a["natObserver"] is None  # no `serve --nat-observer`
    assert a["internalIp"] == "100.64.0.1" and a["internalIpv6"].endswith("::1")
    b = server.register("bravo", key)
    status, topo, hdrs = server.call("GET", "/api/v1/topology", token=b["token"])
    assert status == 200 and hdrs["Content-Type"].startswith("application/json")
    assert list(topo) == ["nodes", "connections", "coordinator", "stunServers"]
    assert [list(n) for n in topo["nodes"]] == [["id", "publicKey", "endpoint", "internalIp", "region"]] * 2
    assert topo["nodes"][0]["endpoint"] == "192.0.2.10:51820" and topo["nodes"][0]["region"] == "eu"
    assert topo["nodes"][1]["endpoint"] == ""
    parsed = MeshTopology.from_dict({k: v for k, v in topo.items() if k != "stunServers"})  # the spec's fields
    assert {n.id for n in parsed.nodes} == {a["id"], b["id"]}
    # The admin token reads it too; no token, or a wrong one, does not.
    assert server.call("GET", "/api/v1/topology", token=ADMIN_TOKEN)[1] == topo
    status, err, hdrs = server.call("GET", "/api/v1/topology")
    assert status == 401 and err["field"] == "Authorization" and "WWW-Authenticate" in hdrs
    assert server.call("GET", "/api/v1/topology", token=a["token"] + "x")[0] == 401
    # Secrets appear nowhere but in the registration response.
    assert "token" not in json.dumps(topo) and key not in json.dumps(topo)


def test_the_auth_key_may_come_in_the_authorization_header(server):
    key = server.authkey()
    status, answer, _ = server.call("POST", "/api/v1/register", {"name": "h", "publicKey": new_public_key()},
                                    token=key)
    assert status == 201 and answer["name"] == "h"
    status, err, _ = server.call("POST", "/api/v1/register", {"name": "i", "publicKey": new_public_key(),
                                                               "authKey": server.authkey()}, token=key)
    assert status == 400 and err["field"] == "authKey"


def test_endpoints_health_and_removal_by_the_node_itself(server):
    key = server.authkey()
    a, b = server.register("a", key), server.register("b", key)
    status, _, _ = server.call("PUT", f"/api/v1/nodes/{a['id']}/endpoints", {"endpoints": ["198.51.100.7:4000"]},
                               token=a["token"])
    assert status == 200
    # Another node's token cannot touch it.
    status, err, _ = server.call("PUT", f"/api/v1/nodes/{a['id']}/endpoints", {"endpoints": []},
                                 token=b["token"])
    assert (status, err["field"]) == (403, "id")
    status, _, _ = server.call("POST", f"/api/v1/nodes/{a['id']}/health",
                               {"connections": [{"to": b["id"], "status": "connected", "latencyUs": 850}]},
                               token=a["token"])
    assert status == 200
    topo = server.call("GET", "/api/v1/topology", token=a["token"])[1]
    assert topo["nodes"][0]["endpoint"] == "198.51.100.7:4000"
    assert topo["connections"] == [{"from": a["id"], "to": b["id"], "status": "connected", "viaRelay": False,
                                    "latencyUs": 850}]
    assert server.call("DELETE", f"/api/v1/nodes/{a['id']}", token=b["token"])[0] == 403
    assert server.call("DELETE", f"/api/v1/nodes/{a['id']}", token=a["token"])[0] == 200
    assert server.call("GET", "/api/v1/topology", token=a["token"])[0] == 401  # its token died with it
    assert server.call("DELETE", f"/api/v1/nodes/{b['id']}", token=ADMIN_TOKEN)[0] == 200
    assert server.call("DELETE", "/api/v1/nodes/nope", token=ADMIN_TOKEN)[0] == 404
    assert server.call("GET", "/api/v1/topology", token=ADMIN_TOKEN)[1]["nodes"] == []


# --- bad input ------------------------------------------------------------------------------


def _b64(n: int) -> str:
    return base64.b64encode(bytes(range(n))).decode()


def test_bad_registrations_get_a_status_and_the_field_and_write_nothing(tmp_path):
    clock = Clock()
    server = Server(tmp_path / "c.db", clock=clock)
    try:
        good = server.authkey()
        one_off = server.authkey(reusable=False)
        expiring = server.authkey(expires_in=60)
        revoked = server.authkey()
        revoked_id = revoked.split("-")[2]
        server.store.revoke_auth_key(revoked_id, now=clock.now)
        taken = server.register("taken", good)
        server.register("once", one_off)
        clock.now += 61
        head = server.store.head()
        pk = new_public_key

        def body(**kw: object) -> dict[str, object]:
            return {"authKey": good, "name": "fresh", "publicKey": pk(), **kw}

        cases: list[tuple[bytes | dict[str, object], int, str, str]] = [
            (b"{not json", 400, "", "invalid JSON"),
            (b"[1, 2]", 400, "", "expected a JSON object"),
            (b'{"name": "a", "name": "b"}', 400, "name", "more than once"),
            (b'{"authKey": "k", "name": "x", "publicKey": NaN}', 400, "", "NaN"),
            (b"\xff\xfe", 400, "", "UTF-8"),
            (b"x" * (64 * 1024 + 1), 413, "", "larger than"),
            (body(colour="red"), 400, "colour", "unknown field"),
            ({"authKey": good, "publicKey": pk()}, 400, "name", "missing"),
            (body(name="Not A Label"), 400, "name", "DNS label"),
            (body(name=7), 400, "name", "expected a string"),
            (body(publicKey=_b64(31)), 400, "publicKey", "32 bytes"),
            (body(publicKey="A" * 43 + "="), 400, "publicKey", "all zeros"),
            (body(publicKey="not base64!"), 400, "publicKey", "44 base64"),
            (body(discoKey=_b64(33)), 400, "discoKey", ""),
            (body(endpoints=["192.0.2.1:51820", "192.0.2.1"]), 400, "endpoints[1]", "host:port"),
            (body(endpoints=["192.0.2.1:1"] * 2), 400, "endpoints[1]", "duplicate"),
            (body(endpoints=[f"192.0.2.1:{p}" for p in range(1, 18)]), 400, "endpoints", "at most 16"),
            (body(region="x" * 65), 400, "region", "at most 64"),
            ({"name": "fresh", "publicKey": pk()}, 401, "authKey", "required"),
            (body(authKey="hunter2"), 401, "authKey", "not a pre-auth key"),
            (body(authKey=good[:-3] + ("abc" if not good.endswith("abc") else "xyz")), 401, "authKey", "unknown"),
            (body(authKey=one_off), 401, "authKey", "one-off"),
            (body(authKey=expiring), 401, "authKey", "expired"),
            (body(authKey=revoked), 401, "authKey", "revoked"),
            (body(name="taken"), 409, "name", "registered already"),
            (body(publicKey=server.store.node(taken["id"]).public_key.to_base64()), 409, "publicKey", "already"),
        ]
        for payload, status, field, words in cases:
            raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            got, err, _ = server.call("POST", "/api/v1/register", raw=raw)
            assert (got, err["field"]) == (status, field), (payload if len(raw) < 300 else raw[:40], err)
            assert set(err) == {"error", "field"} and words in err["error"], err
        assert server.store.head() == head
        assert [n.name for n in server.store.nodes()] == ["taken", "once"]
        # ...and the server keeps serving.
        assert server.register("fresh", good)["name"] == "fresh"
    finally:
        server.stop()


def test_bad_updates_and_bad_watch_parameters(server):
    key = server.authkey()
    a, b = server.register("a", key), server.register("b", key)
    url = f"/api/v1/nodes/{a['id']}"
    cases = [
        ("PUT", "/endpoints", {"endpoints": "192.0.2.1:1"}, 400, "endpoints"),
        ("PUT", "/endpoints", {"endpoints": [], "extra": 1}, 400, "extra"),
        ("PUT", "/endpoints", {}, 400, "endpoints"),
        ("POST", "/health", {"connections": [{"to": b["id"], "status": "fine"}]}, 400, "connections[0].status"),
        ("POST", "/health", {"connections": [{"to": "ghost", "status": "connected"}]}, 400, "connections[0].to"),
        ("POST", "/health", {"connections": [{"from": b["id"], "to": a["id"], "status": "connected"}]}, 400,
         "connections[0].from"),
        ("POST", "/health", {"connections": [{"to": b["id"], "status": "connected"}] * 2}, 400, "connections[1]"),
        ("POST", "/health", {"connections": [{"to": b["id"], "status": "connected", "latencyUs": -1}]}, 400,
         "connections[0].latencyUs"),
    ]
    for method, suffix, payload, status, field in cases:
        got, err, _ = server.call(method, url + suffix, payload, token=a["token"])
        assert (got, err["field"]) == (status, field), (payload, err)
    assert server.call("GET", "/api/v1/watch?since=-1", token=a["token"])[1]["field"] == "since"
    assert server.call("GET", "/api/v1/nope", token=a["token"])[0] == 404
    status, err, _ = server.call("PATCH", "/api/v1/register", {})
    assert status == 405 and "error" in err
    assert server.call("GET", "/api/v1/topology", token=a["token"])[0] == 200


def test_registrations_are_rate_limited_per_source_address(tmp_path):
    clock = Clock()
    config = Config(limits=Limits(per_address_rate=1, per_address_burst=3))
    server = Server(tmp_path / "c.db", config=config, clock=clock)
    try:
        key = server.authkey()
        for i in range(3):
            server.register(f"n{i}", key)
        status, err, hdrs = server.call("POST", "/api/v1/register", {"authKey": key, "name": "x",
                                                                      "publicKey": new_public_key()})
        assert status == 429 and "address" in err["error"] and int(hdrs["Retry-After"]) >= 1
        # Bad requests count too: a flood of garbage is limited the same way.
        assert server.call("POST", "/api/v1/register", raw=b"junk")[0] == 429
        clock.now += 1.0
        server.register("later", key)
        assert len(server.store.nodes()) == 4
    finally:
        server.stop()


def test_registrations_are_rate_limited_per_auth_key(tmp_path):
    clock = Clock()
    config = Config(limits=Limits(per_address_rate=1000, per_address_burst=1000, per_key_rate=1, per_key_burst=2))
    server = Server(tmp_path / "c.db", config=config, clock=clock)
    try:
        key, other = server.authkey(), server.authkey()
        forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")  # the real id, a wrong secret
        for _ in range(5):
            body = {"authKey": forged, "name": "f", "publicKey": new_public_key()}
            assert server.call("POST", "/api/v1/register", body)[0] in (401, 429)
        server.register("a", key)  # guesses did not use up the real key's budget
        server.register("b", key)
        status, err, _ = server.call("POST", "/api/v1/register", {"authKey": key, "name": "c",
                                                                   "publicKey": new_public_key()})
        assert (status, err["field"]) == (429, "authKey") and key not in err["error"]
        server.register("d", other)  # another key is not held up
    finally:
        server.stop()


def test_the_rate_limit_tables_are_bounded():
    limiter = RateLimiter(rate=1, burst=1, max_entries=100)
    for i in range(10_000):
        assert limiter.take(f"10.0.{i // 256}.{i % 256}", now=0.0) == 0.0
    assert len(limiter) == 100
    assert limiter.take("10.0.39.15", now=0.0) > 0  # a recent key is still remembered


def test_secrets_are_never_logged(server, caplog):
    caplog.set_level(logging.DEBUG)
    key = server.authkey()
    a = server.register("a", key)
    server.call("GET", "/api/v1/topology", token=a["token"])
    server.call("POST", "/api/v1/register", {"authKey": key, "name": "a", "publicKey": new_public_key()})
    secret = key[len("pywg-authkey-") + 13:]
    text = caplog.text
    assert "registered node" in text
    assert secret not in text and a["token"] not in text


# --- the watch stream -------------------------------------------------------------------------


def test_watch_streams_changes_and_resumes_exactly_after_a_reconnect(server):
    key = server.authkey()
    a = server.register("a", key)

    async def scenario() -> None:
        async with Watch(server.url, a["token"], since=0) as w:
            first = await w.next()
            assert (first["type"], first["kind"], first["revision"]) == ("change", "node.added", a["revision"])
            assert first["node"]["name"] == "a" and "token" not in first["node"]
            b = await asyncio.to_thread(server.register, "b", key)
            live = await w.next()
            assert (live["kind"], live["node"]["id"], live["revision"]) == ("node.added", b["id"], b["revision"])
            last = live["revision"]
        # While disconnected: three changes.
        await asyncio.to_thread(server.call, "PUT", f"/api/v1/nodes/{b['id']}/endpoints",
                                {"endpoints": ["203.0.113.5:51820"]}, token=b["token"])
        c = await asyncio.to_thread(server.register, "c", key)
        await asyncio.to_thread(server.call, "DELETE", f"/api/v1/nodes/{b['id']}", token=ADMIN_TOKEN)
        async with Watch(server.url, a["token"], since=last) as w:
            # resumed: the coordinator's settings first (it may be another one, or restarted)
            assert w.settings is not None and w.settings["revision"] == last, w.settings
            assert {"stunServers", "natObserver"} <= set(w.settings), w.settings  # (derpMap: with --derp-map)
            missed = [await w.next() for _ in range(3)]
            assert [m["kind"] for m in missed] == ["node.changed", "node.added", "node.removed"]
            assert [m["revision"] for m in missed] == [last + 1, last + 2, last + 3]
            assert missed[0]["node"]["endpoints"] == ["203.0.113.5:51820"]
            assert missed[1]["node"]["id"] == c["id"] and missed[2]["nodeId"] == b["id"]
            await w.nothing_for(0.3)  # exactly the missed ones, nothing twice
            await asyncio.to_thread(server.call, "POST", f"/api/v1/nodes/{a['id']}/health",
                                    {"connections": [{"to": c["id"], "status": "connecting"}]}, token=a["token"])
            conn = await w.next()
            assert conn["kind"] == "connection.changed"
            assert conn["connection"] == {"from": a["id"], "to": c["id"], "status": "connecting", "viaRelay": False}

    asyncio.run(scenario())


def test_watch_without_since_starts_with_a_snapshot(server):
    key = server.authkey()
    a, b = server.register("a", key), server.register("b", key)

    async def scenario() -> None:
        async with Watch(server.url, ADMIN_TOKEN, since=None) as w:
            snap = await w.next()
            assert snap["type"] == "snapshot" and snap["revision"] == b["revision"]
            assert [n["id"] for n in snap["nodes"]] == [a["id"], b["id"]]
            await asyncio.to_thread(server.register, "c", key)
            assert (await w.next())["revision"] == b["revision"] + 1
        async with Watch(server.url, ADMIN_TOKEN, since=10_000) as w:  # another store's revision
            snap = await w.next()
            assert snap["type"] == "snapshot" and len(snap["nodes"]) == 3

    asyncio.run(scenario())


def test_watch_sees_changes_another_process_writes_to_the_store(server):
    key = server.authkey()
    a, b = server.register("a", key), server.register("b", key)

    async def scenario() -> None:
        async with Watch(server.url, a["token"], since=b["revision"]) as w:
            other = open_target(server.path)  # as `pywg coordinator node remove` does
            try:
                other.remove_node(b["id"], now=0)
            finally:
                other.close()
            change = await w.next(timeout=2.0)
            assert (change["kind"], change["nodeId"]) == ("node.removed", b["id"])

    asyncio.run(scenario())


def test_a_node_that_misses_its_window_is_pushed_offline_and_back_online(tmp_path):
    clock = Clock()
    config = Config(offline_after=90, sweep_interval=0.05, poll_interval=0.05,
                    limits=Limits(1e6, 1e6, 1e6, 1e6), admin_token_digest=credentials.digest(ADMIN_TOKEN))
    server = Server(tmp_path / "c.db", config=config, clock=clock)
    try:
        key = server.authkey()
        a, b = server.register("a", key), server.register("b", key)

        async def scenario() -> None:
            async with Watch(server.url, ADMIN_TOKEN, since=b["revision"]) as w:
                clock.now += 60
                await asyncio.to_thread(server.call, "POST", f"/api/v1/nodes/{b['id']}/health",
                                        {"connections": []}, token=b["token"])
                await w.nothing_for(0.3)  # within the window: nothing
                clock.now += 31  # a: 91 s without contact; b: 31 s
                gone = await w.next()
                assert (gone["kind"], gone["nodeId"], gone["node"]["online"]) == ("node.changed", a["id"], False)
                await w.nothing_for(0.3)
                await asyncio.to_thread(server.call, "POST", f"/api/v1/nodes/{a['id']}/health",
                                        {"connections": []}, token=a["token"])
                back = await w.next()
                assert (back["nodeId"], back["node"]["online"]) == (a["id"], True)

        asyncio.run(scenario())
    finally:
        server.stop()


def test_a_watch_needs_a_token(server):
    assert server.call("GET", "/api/v1/watch?since=0")[0] == 401


# --- restart ----------------------------------------------------------------------------------


def test_a_restart_on_the_same_file_loses_nothing(tmp_path):
    path = tmp_path / "c.db"
    server = Server(path)
    key = server.authkey(reusable=False)
    again = server.authkey()
    a = server.register("a", key)
    b = server.register("b", again, endpoints=["192.0.2.2:51820"])
    server.call("POST", f"/api/v1/nodes/{a['id']}/health",
                {"connections": [{"to": b["id"], "status": "connected"}]}, token=a["token"])
    before = server.call("GET", "/api/v1/topology", token=ADMIN_TOKEN)[1]
    head = server.store.head()
    server.stop()
    sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()

    server = Server(path)
    try:
        assert server.call("GET", "/api/v1/topology", token=a["token"])[1] == before  # tokens still work
        assert server.store.head() == head
        status, err, _ = server.call("POST", "/api/v1/register", {"authKey": key, "name": "c",
                                                                   "publicKey": new_public_key()})
        assert status == 401 and "one-off" in err["error"]  # a used key stays used
        c = server.register("c", again)
        assert c["internalIp"] == "100.64.0.3" and c["revision"] == head + 1

        async def resume() -> None:
            async with Watch(server.url, b["token"], since=head - 1) as w:
                assert [(await w.next())["revision"] for _ in range(2)] == [head, head + 1]

        asyncio.run(resume())
    finally:
        server.stop()
