"""The coordinator's stores: migrations, the change log, addresses, pre-auth keys.

The contract tests run against both backends (the ``backend`` fixture): SQLite in a
temporary file and PostgreSQL on a private server the tests start (postgres_server.py)."""

from __future__ import annotations

import ipaddress
import sqlite3
import threading

import pytest

from pywg.manage.key import Key
from pywg.manage.types import ConnectionStatus, Endpoint, InvalidConfig, MeshConnection
from pywg.mesh import credentials, schema
from pywg.mesh.postgres_store import PostgresStore
from pywg.mesh.sqlite_store import SqliteStore
from pywg.mesh.store import (
    AuthKeyRejected,
    ConfigMismatch,
    Conflict,
    Exhausted,
    NodeRequest,
    NotFound,
    Store,
    StoreError,
    open_store,
)

NOW = 1_800_000_000.0


def pub() -> Key:
    return Key.generate_private().public_key()


def req(name: str, **kw: object) -> NodeRequest:
    return NodeRequest(name=name, public_key=kw.pop("public_key", pub()), **kw)  # type: ignore[arg-type]


class Backend:
    """One database of one kind: open stores on it, look at its raw contents."""

    def __init__(self, kind: str, target: str) -> None:
        self.kind, self.target = kind, target

    def open(self, **kw: object) -> Store:
        if self.kind == "sqlite":
            return SqliteStore(self.target, **kw)  # type: ignore[arg-type]
        return PostgresStore(self.target, **kw)  # type: ignore[arg-type]

    def sql(self, query: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        """Run ``query`` on the database directly (outside any store); its rows."""
        if self.kind == "sqlite":
            db = sqlite3.connect(self.target)
            try:
                rows = db.execute(query, args).fetchall()
                db.commit()
                return rows
            finally:
                db.close()
        import psycopg

        with psycopg.connect(self.target, autocommit=True) as conn:
            cur = conn.execute(query.replace("?", "%s"), args)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def refuse_changes(self, refuse: bool = True) -> None:
        """Make the database itself refuse (a trigger: 'disk on fire') or again accept inserts
        into the change log."""
        if not refuse:
            self.sql("DROP TRIGGER boom" if self.kind == "sqlite" else "DROP TRIGGER boom ON changes")
        elif self.kind == "sqlite":
            self.sql("CREATE TRIGGER boom BEFORE INSERT ON changes BEGIN SELECT RAISE(ABORT, 'disk on fire'); END")
        else:
            self.sql("CREATE OR REPLACE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$ BEGIN RAISE EXCEPTION 'disk on fire'; END $$")
            self.sql("CREATE TRIGGER boom BEFORE INSERT ON changes FOR EACH ROW EXECUTE FUNCTION boom()")

    def dump(self) -> str:
        """Every value of every table, as text."""
        if self.kind == "sqlite":
            return "\n".join(sqlite3.connect(self.target).iterdump())
        tables = [r[0] for r in self.sql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        return "\n".join(str(row) for t in tables for row in self.sql(f"SELECT * FROM {t}"))


@pytest.fixture
def path(tmp_path):
    return tmp_path / "coordinator.db"


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, path):
    if request.param == "sqlite":
        return Backend("sqlite", str(path))
    return Backend("postgresql", request.getfixturevalue("postgres").database())


@pytest.fixture
def store(backend):
    s = backend.open()
    yield s
    s.close()


def reusable_key(store: Store) -> str:
    return store.create_auth_key(reusable=True, expires_at=None, now=NOW)[1]


# --- migrations and settings -------------------------------------------------------------


def test_a_new_sqlite_store_is_migrated_to_the_latest_schema_in_wal_mode(path):
    store = SqliteStore(path)
    assert store.schema_version() == schema.LATEST
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"schema_version", "meta", "auth_keys", "nodes", "connections", "changes"} <= tables
    db.close()
    store.close()


def test_reopening_applies_no_migration_twice(backend):
    backend.open().close()
    backend.open().close()
    assert [r[0] for r in backend.sql("SELECT version FROM schema_version ORDER BY version")] == list(
        range(1, schema.LATEST + 1)
    )


def test_a_version_1_store_is_migrated_in_place_keeping_its_nodes(path):
    db = sqlite3.connect(path)  # a store as the first release wrote it
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for stmt in schema.migrations("sqlite")[0].statements:
        db.execute(stmt)
    db.execute("INSERT INTO schema_version VALUES (1)")
    db.executemany("INSERT INTO meta VALUES (?, ?)",
                   [("prefix4", "10.9.0.0/16"), ("prefix6", "fd09::/64"), ("next_offset", "2")])
    key = pub().to_base64()
    db.execute("INSERT INTO nodes VALUES ('n1', 'old', ?, NULL, 1, '10.9.0.1', 'fd09::1', '[]', '', "
               "'authkey', 'k', 'h', 1.0, 1.0)", (key,))
    db.commit()
    db.close()
    s = SqliteStore(path)
    assert s.schema_version() == schema.LATEST >= 2
    node = s.node("n1")
    assert (node.name, str(node.ipv4), node.public_key.to_base64(), node.online) == ("old", "10.9.0.1", key, True)
    assert str(s.register(req("new"), reusable_key(s), now=NOW).node.ipv4) == "10.9.0.2"
    s.close()


def test_a_store_from_a_newer_pywg_is_refused(backend):
    backend.open().close()
    backend.sql("INSERT INTO schema_version VALUES (?)", (schema.LATEST + 1,))
    with pytest.raises(ConfigMismatch, match="newer"):
        backend.open()


def test_a_later_migration_is_applied_to_an_existing_store(path, monkeypatch):
    SqliteStore(path).close()
    extra = (schema.LATEST + 1, "test column", ("ALTER TABLE nodes ADD COLUMN note TEXT",))
    monkeypatch.setattr(schema, "_MIGRATIONS", (*schema._MIGRATIONS, extra))
    monkeypatch.setattr(schema, "LATEST", schema.LATEST + 1)
    s = SqliteStore(path)
    assert s.schema_version() == schema.LATEST
    cols = {r[1] for r in s._read("PRAGMA table_info(nodes)")}
    assert "note" in cols
    s.close()


def test_open_store_names_the_option_for_a_bad_url(tmp_path):
    for url in ("mysql://x", "sqlite:", "postgresql://u:secretpw@h/db"):
        with pytest.raises(InvalidConfig) as err:
            open_store(url)
        assert err.value.field == "--store"
        assert "secretpw" not in str(err.value)
    open_store(f"sqlite:{tmp_path}/x.db").close()


# --- addresses ---------------------------------------------------------------------------


def test_addresses_are_unique_in_the_prefixes_and_the_same_offset_in_both(backend):
    p4, p6 = ipaddress.IPv4Network("10.99.0.0/24"), ipaddress.IPv6Network("fd00:99::/64")
    s = backend.open(prefix4=p4, prefix6=p6)
    key = reusable_key(s)
    nodes = [s.register(req(f"n{i}"), key, now=NOW).node for i in range(50)]
    assert len({n.ipv4 for n in nodes}) == len({n.ipv6 for n in nodes}) == 50
    for n in nodes:
        assert n.ipv4 in p4 and n.ipv6 in p6
        assert n.ipv4 != p4.network_address and n.ipv4 != p4.broadcast_address
        assert int(n.ipv4) - int(p4.network_address) == int(n.ipv6) - int(p6.network_address)
    s.close()


def test_addresses_are_stable_across_a_reopen_and_a_removed_nodes_address_is_not_reused_at_once(backend):
    s = backend.open()
    key = reusable_key(s)
    a = s.register(req("a"), key, now=NOW).node
    b = s.register(req("b"), key, now=NOW).node
    prefixes = (s.prefix4, s.prefix6)
    s.close()
    s = backend.open()
    assert (s.prefix4, s.prefix6) == prefixes  # the random ULA prefix was kept
    assert {(n.name, n.ipv4, n.ipv6) for n in s.nodes()} == {(a.name, a.ipv4, a.ipv6), (b.name, b.ipv4, b.ipv6)}
    s.remove_node(a.id, now=NOW)
    c = s.register(req("c"), key, now=NOW).node
    assert c.ipv4 not in (a.ipv4, b.ipv4)
    s.close()


def test_when_the_prefix_is_full_the_lowest_free_address_is_reused_then_exhausted(backend):
    s = backend.open(prefix4=ipaddress.IPv4Network("10.0.0.0/29"),
                     prefix6=ipaddress.IPv6Network("fd00::/120"))
    key = reusable_key(s)
    nodes = [s.register(req(f"n{i}"), key, now=NOW).node for i in range(6)]  # .1 .. .6
    with pytest.raises(Exhausted):
        s.register(req("x"), key, now=NOW)
    s.remove_node(nodes[2].id, now=NOW)
    assert s.register(req("y"), key, now=NOW).node.ipv4 == nodes[2].ipv4
    s.close()


def test_prefixes_cannot_change_once_addresses_are_allocated(backend):
    s = backend.open()
    s.close()
    s = backend.open(prefix4=ipaddress.IPv4Network("10.1.0.0/16"))  # nothing allocated: may change
    s.register(req("a"), reusable_key(s), now=NOW)
    s.close()
    with pytest.raises(ConfigMismatch) as err:
        backend.open(prefix4=ipaddress.IPv4Network("10.2.0.0/16"))
    assert err.value.field == "prefix4" and "10.1.0.0/16" in err.value.reason
    backend.open(prefix4=ipaddress.IPv4Network("10.1.0.0/16")).close()


# --- pre-auth keys ---------------------------------------------------------------------------


def test_auth_keys_are_stored_hashed(store, backend):
    info, text = store.create_auth_key(reusable=False, expires_at=None, now=NOW)
    assert text.startswith(credentials.AUTH_KEY_PREFIX + info.id + "-")
    secret = text[len(credentials.AUTH_KEY_PREFIX) + len(info.id) + 1:]
    dump = backend.dump()
    assert secret not in dump and text not in dump
    assert credentials.digest(secret) in dump


def test_a_one_off_key_registers_once(store):
    _, key = store.create_auth_key(reusable=False, expires_at=None, now=NOW)
    store.register(req("a"), key, now=NOW)
    with pytest.raises(AuthKeyRejected, match="one-off") as err:
        store.register(req("b"), key, now=NOW)
    assert err.value.field == "authKey"
    assert [n.name for n in store.nodes()] == ["a"]


def test_a_one_off_key_used_by_two_threads_at_once_registers_one_node(store, backend):
    _, key = store.create_auth_key(reusable=False, expires_at=None, now=NOW)
    others = [backend.open() for _ in range(4)]
    results: list[object] = []

    def go(s: Store, i: int) -> None:
        try:
            results.append(s.register(req(f"t{i}"), key, now=NOW))
        except AuthKeyRejected as exc:
            results.append(exc)

    threads = [threading.Thread(target=go, args=(s, i)) for i, s in enumerate(others)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(not isinstance(r, AuthKeyRejected) for r in results) == 1
    assert len(store.nodes()) == 1
    for s in others:
        s.close()


def test_expired_revoked_unknown_and_malformed_keys_are_refused(store):
    _, expiring = store.create_auth_key(reusable=True, expires_at=NOW + 60, now=NOW)
    store.register(req("a"), expiring, now=NOW + 59)
    with pytest.raises(AuthKeyRejected, match="expired at"):
        store.register(req("b"), expiring, now=NOW + 60)
    info, revoked = store.create_auth_key(reusable=True, expires_at=None, now=NOW)
    store.revoke_auth_key(info.id, now=NOW)
    with pytest.raises(AuthKeyRejected, match="revoked"):
        store.register(req("c"), revoked, now=NOW)
    wrong_secret = revoked[:-4] + ("AAAA" if not revoked.endswith("AAAA") else "BBBB")
    with pytest.raises(AuthKeyRejected, match="unknown"):
        store.register(req("d"), wrong_secret, now=NOW)
    with pytest.raises(AuthKeyRejected, match="not a pre-auth key"):
        store.register(req("e"), "hunter2", now=NOW)
    with pytest.raises(NotFound):
        store.revoke_auth_key("000000000000", now=NOW)
    assert [n.name for n in store.nodes()] == ["a"]
    states = {k.id: k.state(NOW + 61) for k in store.auth_keys()}
    assert sorted(states.values()) == ["expired", "revoked"]


# --- nodes and the change log ---------------------------------------------------------------


def test_every_topology_write_appends_to_the_change_log(store):
    key = reusable_key(store)
    a = store.register(req("a"), key, now=NOW)
    b = store.register(req("b"), key, now=NOW)
    ep = (Endpoint.parse("192.0.2.1:51820"),)
    r3 = store.set_endpoints(a.node.id, ep, now=NOW)
    assert store.set_endpoints(a.node.id, ep, now=NOW) is None  # unchanged: nothing logged
    conn = MeshConnection(from_node=a.node.id, to_node=b.node.id, status=ConnectionStatus.CONNECTED)
    r4 = store.report_connections(a.node.id, (conn,), now=NOW)
    assert store.report_connections(a.node.id, (conn,), now=NOW) == []  # same status: not logged
    r5 = store.remove_node(b.node.id, now=NOW)
    changes = store.changes_since(0)
    assert [c.revision for c in changes] == [a.revision, b.revision, r3, *r4, r5]
    assert [c.kind for c in changes] == ["node.added", "node.added", "node.changed",
                                         "connection.changed", "node.removed"]
    assert changes[2].payload["node"]["endpoints"] == ["192.0.2.1:51820"]
    assert store.connections() == []  # b's removal took the connection with it
    assert [c.revision for c in store.changes_since(a.revision)] == [b.revision, r3, *r4, r5]
    assert store.changes_since(r5) == []
    assert store.head() == r5
    assert store.changes_since(0, limit=2) == changes[:2]


def test_a_refused_write_leaves_no_trace(store):
    _, key = store.create_auth_key(reusable=False, expires_at=None, now=NOW)
    other = reusable_key(store)
    a = store.register(req("a"), other, now=NOW)
    head = store.head()
    with pytest.raises(Conflict) as err:
        store.register(req("a"), key, now=NOW)  # duplicate name
    assert err.value.field == "name"
    with pytest.raises(Conflict) as err:
        store.register(req("b", public_key=a.node.public_key), key, now=NOW)
    assert err.value.field == "publicKey"
    assert store.head() == head and len(store.nodes()) == 1
    # The one-off key was not spent by the refused registrations.
    assert store.register(req("b"), key, now=NOW).node.name == "b"


def test_a_failure_inside_the_transaction_rolls_back_the_change_log_too(store, backend):
    key = reusable_key(store)
    head = store.head()
    backend.refuse_changes()  # the database refuses the change-log insert, after the node's
    with pytest.raises(Exception, match="disk on fire"):
        store.register(req("a"), key, now=NOW)
    assert store.nodes() == [] and store.head() == head
    assert store.auth_keys()[0].uses == 0


def test_tokens_authenticate_their_node_only_and_are_stored_hashed(store, backend):
    key = reusable_key(store)
    a = store.register(req("a"), key, now=NOW)
    b = store.register(req("b"), key, now=NOW)
    assert store.authenticate(a.token).id == a.node.id
    assert store.authenticate(b.token).id == b.node.id
    assert store.authenticate(a.token + "x") is None
    assert a.token not in backend.dump()
    assert a.token not in repr(a)
    store.remove_node(a.node.id, now=NOW)
    assert store.authenticate(a.token) is None


def test_the_token_digest_of_a_node_is_what_the_nat_observer_keys_from(store):
    key = reusable_key(store)
    a = store.register(req("a"), key, now=NOW)
    assert store.token_digest(a.node.id) == credentials.digest(a.token)
    assert store.token_digest("0" * 16) is None
    store.remove_node(a.node.id, now=NOW)
    assert store.token_digest(a.node.id) is None


def test_connections_are_validated_and_replaced_per_reporter(store):
    key = reusable_key(store)
    a, b, c = (store.register(req(n), key, now=NOW).node for n in "abc")
    ab = MeshConnection(from_node=a.id, to_node=b.id, status="connected")
    ac = MeshConnection(from_node=a.id, to_node=c.id, status="connecting", via_relay=True, latency_us=900)
    store.report_connections(a.id, (ab, ac), now=NOW)
    assert store.connections() == sorted([ab, ac], key=lambda x: x.to_node)
    rev = store.report_connections(a.id, (ab,), now=NOW)
    assert [ch.kind for ch in store.changes_since(rev[0] - 1)] == ["connection.removed"]
    bc = MeshConnection(from_node=b.id, to_node=c.id, status="connected")
    with pytest.raises(StoreError) as err:
        store.report_connections(a.id, (bc,), now=NOW)
    assert err.value.field == "connections[0].from"
    ghost = MeshConnection(from_node=a.id, to_node="nope", status="connected")
    with pytest.raises(StoreError) as err:
        store.report_connections(a.id, (ab, ghost), now=NOW)
    assert (err.value.field, err.value.status) == ("connections[1].to", 400)
    assert store.connections() == [ab]
    topo = store.topology()
    assert [n.id for n in topo.nodes] == [a.id, b.id, c.id] and topo.connections == (ab,)


def test_nodes_without_contact_go_offline_once_and_come_back_on_contact(store):
    key = reusable_key(store)
    a = store.register(req("a"), key, now=NOW).node
    b = store.register(req("b"), key, now=NOW + 50).node
    assert store.sweep_offline(NOW + 10, now=NOW + 100) != []
    assert store.sweep_offline(NOW + 10, now=NOW + 101) == []  # already offline: logged once
    assert (store.node(a.id).online, store.node(b.id).online) == (False, True)
    change = store.changes_since(store.head() - 1)[0]
    assert (change.kind, change.node_id, change.payload["node"]["online"]) == ("node.changed", a.id, False)
    back = store.touch(a.id, now=NOW + 102)
    assert back == store.head() and store.changes_since(back - 1)[0].payload["node"]["online"] is True
    assert store.touch(a.id, now=NOW + 103) is None  # online already: nothing logged
    assert store.node(a.id).last_contact == NOW + 103


# --- SPIFFE identities ---------------------------------------------------------------------


def test_a_spiffe_id_registers_once_and_again_keeps_its_node(store):
    sid = "spiffe://example.org/agent/a1"
    first = store.register_spiffe(req("a1", endpoints=(Endpoint.parse("192.0.2.1:51820"),)), sid, now=NOW)
    assert (first.node.identity_kind, first.node.identity) == ("spiffe", sid)
    new_key = pub()
    again = store.register_spiffe(req("a1", public_key=new_key), sid, now=NOW + 60)
    assert (again.node.id, again.node.ipv4, again.node.ipv6) == (first.node.id, first.node.ipv4, first.node.ipv6)
    assert again.node.public_key == new_key and again.node.endpoints == ()
    assert store.authenticate(first.token) is None  # the old token is replaced
    assert store.authenticate(again.token).id == first.node.id
    assert [n.id for n in store.nodes()] == [first.node.id]
    assert [c.kind for c in store.changes_since(first.revision)] == ["node.changed"]
    other = store.register_spiffe(req("b1"), "spiffe://example.org/agent/b1", now=NOW)
    assert other.node.id != first.node.id and other.node.ipv4 != first.node.ipv4


def test_a_spiffe_re_registration_that_conflicts_changes_nothing(store):
    a = store.register_spiffe(req("a1"), "spiffe://example.org/a", now=NOW)
    b = store.register(req("b1"), reusable_key(store), now=NOW)
    head = store.head()
    with pytest.raises(Conflict, match="a node named 'b1' is registered already"):
        store.register_spiffe(req("b1"), "spiffe://example.org/a", now=NOW + 1)
    with pytest.raises(Conflict, match="public key"):
        store.register_spiffe(req("a1", public_key=b.node.public_key), "spiffe://example.org/a", now=NOW + 1)
    assert store.head() == head
    assert store.node(a.node.id) == a.node and store.authenticate(a.token).id == a.node.id


def test_an_auth_key_node_is_not_taken_over_by_a_spiffe_id_of_the_same_text(store):
    key = reusable_key(store)
    n = store.register(req("k1"), key, now=NOW)
    s = store.register_spiffe(req("s1"), n.node.identity, now=NOW)  # identity text = the key id
    assert s.node.id != n.node.id
