"""Health reports in both stores: counters kept beside the spec's connections, one
transaction per report, each node's own offline window, and schema version 3 upgrading a
version 2 database in place (SQLite and PostgreSQL)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import pytest
import test_mesh_store as mesh_store
from test_mesh_store import NOW, req, reusable_key

from pywg.manage.types import ConnectionStatus, Endpoint, MeshConnection
from pywg.mesh import schema
from pywg.mesh.health import HealthReport, PeerHealth
from pywg.mesh.store import StoreError

# The store tests' fixtures: a SQLite file and a database on the tests' PostgreSQL.
backend, path, store = mesh_store.backend, mesh_store.path, mesh_store.store
HS = datetime(2027, 1, 15, 8, 0, 0, 250000, tzinfo=UTC)


def peer(a: str, b: str, status: str = "connected", **kw: object) -> PeerHealth:
    return PeerHealth(connection=MeshConnection(from_node=a, to_node=b, status=status), **kw)  # type: ignore[arg-type]


def test_a_report_keeps_counters_beside_the_specs_connection(store):
    key = reusable_key(store)
    a, b, c = (store.register(req(n), key, now=NOW).node for n in "abc")
    report = HealthReport(interval=2.0, peers=(
        peer(a.id, b.id, last_handshake=HS, rx_bytes=2 ** 63 - 1, tx_bytes=0, endpoint=Endpoint.parse("[fd16:a::2]:51820")),
        peer(a.id, c.id, "connecting"),
    ))
    revisions = store.report_health(a.id, report, now=NOW + 5)
    assert len(revisions) == 2  # two new connections; counters are never logged
    assert store.connections() == sorted((p.connection for p in report.peers), key=lambda x: x.to_node)
    by_to = {h.connection.to_node: h for h in store.connection_health()}
    ab, ac = by_to[b.id], by_to[c.id]
    assert (ab.last_handshake, ab.rx_bytes, ab.tx_bytes, ab.endpoint, ab.reported_at) == (
        HS.timestamp(), 2 ** 63 - 1, 0, "[fd16:a::2]:51820", NOW + 5)
    assert (ac.last_handshake, ac.rx_bytes, ac.endpoint) == (None, None, None)
    assert ab.to_dict() == {"from": a.id, "to": b.id, "status": "connected", "viaRelay": False,
                            "lastHandshake": "2027-01-15T08:00:00.25Z", "rxBytes": 2 ** 63 - 1, "txBytes": 0,
                            "endpoint": "[fd16:a::2]:51820", "reportedAt": "2027-01-15T08:00:05Z"}
    node = store.node(a.id)
    assert (node.offline_after, node.last_report, node.last_contact) == (6.0, NOW + 5, NOW + 5)
    assert "offline_after" not in str(node.view()) and set(node.view()) == set(store.node(b.id).view())
    # Counters move, status does not: nothing logged, the counters replaced.
    later = HealthReport(interval=2.0, peers=(peer(a.id, b.id, rx_bytes=10, tx_bytes=20), peer(a.id, c.id, "connecting")))
    assert store.report_health(a.id, later, now=NOW + 7) == []
    assert {h.connection.to_node: (h.rx_bytes, h.last_handshake) for h in store.connection_health()} == {
        b.id: (10, None), c.id: (None, None)}


def test_a_refused_report_writes_nothing(store, backend):
    key = reusable_key(store)
    a, b = (store.register(req(n), key, now=NOW).node for n in "ab")
    store.report_health(a.id, HealthReport(interval=1.0, peers=(peer(a.id, b.id, rx_bytes=5),)), now=NOW + 1)
    before, head = backend.dump(), store.head()
    bad = HealthReport(interval=60.0, peers=(peer(a.id, b.id, "disconnected", rx_bytes=99), peer(a.id, "ghost")))
    with pytest.raises(StoreError) as err:
        store.report_health(a.id, bad, now=NOW + 2)
    assert (err.value.field, err.value.status) == ("connections[1].to", 400)
    assert backend.dump() == before and store.head() == head  # not the status, counters, window or contact
    assert store.node(a.id).offline_after == 3.0


def test_each_node_goes_offline_after_its_own_window(store):
    key = reusable_key(store)
    fast, slow, old = (store.register(req(n), key, now=NOW).node for n in ("fast", "slow", "old"))
    store.report_health(fast.id, HealthReport(interval=1.0), now=NOW)  # window 3 s (the minimum)
    store.report_health(slow.id, HealthReport(interval=100.0), now=NOW)  # window 300 s
    store.report_connections(old.id, (), now=NOW)  # no interval: the coordinator's default
    default = 90.0

    def sweep(t: float) -> set[str]:
        return {c.node_id for rev in store.sweep_offline(t - default, now=t) for c in store.changes_since(rev - 1)[:1]}

    assert sweep(NOW + 3) == set()
    assert sweep(NOW + 3.5) == {fast.id}
    assert sweep(NOW + 91) == {old.id}
    assert sweep(NOW + 299) == set()
    assert sweep(NOW + 301) == {slow.id}
    assert [n.online for n in store.nodes()] == [False, False, False]


def test_a_version_2_store_upgrades_in_place_keeping_nodes_and_connections(backend):
    assert schema.LATEST == 3
    first = backend.open()
    key = reusable_key(first)
    a, b = (first.register(req(n), key, now=NOW).node for n in "ab")
    first.close()
    # Take the database back to version 2: drop what version 3 added.
    if backend.kind == "sqlite":
        db = sqlite3.connect(backend.target)
        for table, col in (("nodes", "offline_after"), ("nodes", "last_report"), ("connections", "last_handshake"),
                           ("connections", "rx_bytes"), ("connections", "tx_bytes"), ("connections", "endpoint")):
            db.execute(f"ALTER TABLE {table} DROP COLUMN {col}")
        db.execute("DELETE FROM schema_version WHERE version = 3")
        db.execute("INSERT INTO connections VALUES (?, ?, 'connected', 0, 800, ?)", (a.id, b.id, NOW))
        db.commit()
        db.close()
    else:
        for table, col in (("nodes", "offline_after"), ("nodes", "last_report"), ("connections", "last_handshake"),
                           ("connections", "rx_bytes"), ("connections", "tx_bytes"), ("connections", "endpoint")):
            backend.sql(f"ALTER TABLE {table} DROP COLUMN {col}")
        backend.sql("DELETE FROM schema_version WHERE version = 3")
        backend.sql("INSERT INTO connections VALUES (?, ?, 'connected', 0, 800, ?)", (a.id, b.id, NOW))
    assert [r[0] for r in backend.sql("SELECT version FROM schema_version ORDER BY version")] == [1, 2]
    s = backend.open()
    try:
        assert s.schema_version() == 3
        assert [n.name for n in s.nodes()] == ["a", "b"] and s.node(a.id).offline_after is None
        assert s.connections() == [MeshConnection(from_node=a.id, to_node=b.id, status=ConnectionStatus.CONNECTED,
                                                  latency_us=800)]
        (old,) = s.connection_health()
        assert (old.rx_bytes, old.last_handshake, old.endpoint, old.reported_at) == (None, None, None, NOW)
        s.report_health(a.id, HealthReport(interval=5.0, peers=(peer(a.id, b.id, rx_bytes=1 << 40),)), now=NOW + 1)
        assert s.connection_health()[0].rx_bytes == 1 << 40 and s.node(a.id).offline_after == 15.0
    finally:
        s.close()
