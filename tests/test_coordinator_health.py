"""Health reports through the coordinator's HTTP API (in-process app, fake clock): the
topology keeps the spec's MeshConnection, `pywg coordinator nodes` shows the counters,
bad reports are 400s naming the field with nothing written, and a node is offline after
three of its own report intervals."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from coordinator_server import ADMIN_TOKEN, Clock, Server, Watch
from hypothesis import HealthCheck, event, given, settings
from test_health import bodies

from pywg.mesh import credentials
from pywg.mesh.coordinator import Config, Limits

PYWG = str(Path(sys.executable).parent / "pywg")


def _store_url(server: Server) -> str:
    return server.path if isinstance(server.path, str) else f"sqlite:{server.path}"


def nodes_json(server: Server) -> list[dict[str, object]]:
    out = subprocess.run([PYWG, "coordinator", "nodes", "--json", "--store", _store_url(server)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return json.loads(out)  # type: ignore[no-any-return]


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request, tmp_path):
    clock = Clock()
    config = Config(admin_token_digest=credentials.digest(ADMIN_TOKEN), limits=Limits(1e6, 1e6, 1e6, 1e6),
                    poll_interval=0.05, sweep_interval=0.05, offline_after=90)
    target = tmp_path / "c.db" if request.param == "sqlite" else request.getfixturevalue("postgres").database()
    s = Server(target, config=config, clock=clock)
    yield s
    s.stop()


def report(server: Server, node: dict[str, object], body: object) -> tuple[int, object]:
    status, answer, _ = server.call("POST", f"/api/v1/nodes/{node['id']}/health", body, token=str(node["token"]))
    return status, answer


def test_the_report_shows_in_nodes_and_the_topology_keeps_the_specs_fields(server):
    key = server.authkey()
    a, b, c = (server.register(n, key) for n in ("alpha", "bravo", "charlie"))
    server.clock.now += 1
    status, _ = report(server, a, {"interval": 2, "connections": [
        {"to": b["id"], "status": "connected", "lastHandshake": "2027-01-15T07:59:58Z", "rxBytes": 4242,
         "txBytes": 9000, "endpoint": "10.216.0.3:51820", "latencyUs": None},
        {"to": c["id"], "status": "connecting", "lastHandshake": None, "rxBytes": 0, "txBytes": 148,
         "endpoint": None}]})
    assert status == 200
    topo = server.call("GET", "/api/v1/topology", token=ADMIN_TOKEN)[1]
    assert [list(conn) for conn in topo["connections"]] == [["from", "to", "status", "viaRelay"]] * 2
    assert "rxBytes" not in json.dumps(topo) and "lastHandshake" not in json.dumps(topo)
    rows = {r["name"]: r for r in nodes_json(server)}
    assert rows["alpha"]["lastReport"] == "2027-01-15T08:00:01Z" and rows["alpha"]["offlineAfter"] == 6.0
    assert rows["bravo"]["lastReport"] is None and rows["bravo"]["connections"] == []
    by_to = {conn["to"]: conn for conn in rows["alpha"]["connections"]}
    assert by_to[b["id"]] == {"from": a["id"], "to": b["id"], "status": "connected", "viaRelay": False,
                              "lastHandshake": "2027-01-15T07:59:58Z", "rxBytes": 4242, "txBytes": 9000,
                              "endpoint": "10.216.0.3:51820", "reportedAt": "2027-01-15T08:00:01Z"}
    assert (by_to[c["id"]]["lastHandshake"], by_to[c["id"]]["rxBytes"]) == (None, 0)
    assert "token" not in json.dumps(rows) and key not in json.dumps(rows)
    text = subprocess.run([PYWG, "coordinator", "nodes", "--store", _store_url(server)], capture_output=True,
                          text=True, check=True).stdout
    assert "-> bravo: connected, handshake 2027-01-15T07:59:58Z, rx 4242 B, tx 9000 B, endpoint 10.216.0.3:51820" in text


@pytest.mark.parametrize(("entry", "field"), [
    ({"status": "connected", "rxBytes": -1}, "connections[0].rxBytes"),
    ({"status": "connected", "lastHandshake": "2027-01-15 08:00"}, "connections[0].lastHandshake"),
    ({"status": "connected", "rtt": 1}, "connections[0].rtt"),
    ({"status": "connected", "txBytes": "1"}, "connections[0].txBytes"),
])
def test_a_bad_report_is_a_400_naming_the_field_and_writes_nothing(tmp_path, entry, field):
    server = Server(tmp_path / "c.db")
    try:
        key = server.authkey()
        a, b = server.register("a", key), server.register("b", key)
        assert report(server, a, {"interval": 1, "connections": [{"to": b["id"], "status": "connected",
                                                                  "rxBytes": 7}]})[0] == 200
        before = "\n".join(server.store._db.iterdump())  # type: ignore[attr-defined]
        for body in ({"connections": [{"to": b["id"], **entry}]},
                     {"interval": 100, "connections": [{"to": b["id"], "status": "disconnected", "rxBytes": 8},
                                                       {"to": "ghost", "status": "connected"}]}):
            status, err = report(server, a, body)
            assert status == 400 and set(err) == {"error", "field"}  # type: ignore[arg-type]
            assert err["field"] in (field, "connections[1].to"), err  # type: ignore[index]
        assert "\n".join(server.store._db.iterdump()) == before  # type: ignore[attr-defined]
        assert report(server, a, {"connections": []})[0] == 200  # still serving
    finally:
        server.stop()


def test_a_node_is_offline_after_three_of_its_intervals_and_its_peer_reports_it_disconnected(server):
    key = server.authkey()
    a, b = server.register("a", key), server.register("b", key)

    async def scenario() -> None:
        async with Watch(server.url, ADMIN_TOKEN, since=b["revision"]) as w:
            for node, other in ((a, b), (b, a)):
                await asyncio.to_thread(report, server, node, {"interval": 1, "connections": [
                    {"to": other["id"], "status": "connected", "rxBytes": 100}]})
            assert {(await w.next())["kind"] for _ in range(2)} == {"connection.changed"}
            # b keeps reporting every second; a falls silent.
            for _ in range(3):
                server.clock.now += 1
                await asyncio.to_thread(report, server, b, {"interval": 1, "connections": [
                    {"to": a["id"], "status": "connected", "rxBytes": 100}]})
            await w.nothing_for(0.3)  # a: 3 s without contact, not more: still online
            server.clock.now += 0.5
            gone = await w.next()
            assert (gone["kind"], gone["nodeId"], gone["node"]["online"]) == ("node.changed", a["id"], False)
            await asyncio.to_thread(report, server, b, {"interval": 1, "connections": [
                {"to": a["id"], "status": "disconnected", "rxBytes": 100}]})
            change = await w.next()
            assert change["kind"] == "connection.changed" and change["connection"]["status"] == "disconnected"

    asyncio.run(scenario())
    rows = {r["name"]: r for r in nodes_json(server)}
    assert (rows["a"]["online"], rows["b"]["online"]) == (False, True)
    assert [c["status"] for c in rows["b"]["connections"]] == ["disconnected"]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("fuzz") / "c.db")
    key = s.authkey()
    s.me, s.peer = s.register("me", key), s.register("peer", key)  # type: ignore[attr-defined]
    yield s
    s.stop()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bodies)
def test_over_http_any_report_is_stored_or_a_json_400_and_the_server_keeps_serving(fuzz_server, body):
    s = fuzz_server
    # Point the entries at real nodes now and then, so that some reports are stored.
    if isinstance(body.get("connections"), list):
        for entry in body["connections"][:1]:
            if isinstance(entry, dict) and entry.get("to") == "n1":
                entry["to"] = s.peer["id"]
    status, answer = report(s, s.me, body)
    event(f"HTTP {status}")
    if status == 200:
        stored = {h.connection.to_node for h in s.store.connection_health() if h.connection.from_node == s.me["id"]}
        assert stored == {e["to"] for e in body["connections"]}
    else:
        assert status == 400 and set(answer) == {"error", "field"}, (status, answer)  # type: ignore[arg-type]
    assert s.call("GET", "/api/v1/topology", token=ADMIN_TOKEN)[0] == 200  # still serving
