"""What only the PostgreSQL store has: several stores (as several coordinator processes
would) on one database writing at once with revisions visible in order, NOTIFY waking
the others, a lost connection reopened, and the URL's password kept out of every message.
(The contract shared with SQLite is in test_mesh_store.py.)"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
import urllib.parse

import psycopg
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pywg.manage.key import Key
from pywg.manage.types import ConnectionStatus, Endpoint, InvalidConfig, MeshConnection
from pywg.mesh.postgres_store import PostgresStore, redact
from pywg.mesh.store import AuthKeyRejected, Conflict, NodeRequest, open_store

NOW = 1_800_000_000.0


def req(name: str) -> NodeRequest:
    return NodeRequest(name=name, public_key=Key.generate_private().public_key())


def test_the_schema_uses_double_precision_times_and_keeps_insertion_order(postgres):
    url = postgres.database()
    s = PostgresStore(url)
    try:
        with psycopg.connect(url) as conn:
            kinds = dict(conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'nodes'"
            ).fetchall())
        assert kinds["created_at"] == kinds["last_contact"] == "double precision"
        key = s.create_auth_key(reusable=True, expires_at=None, now=NOW)[1]
        names = [f"n{i:02}" for i in random.Random(7).sample(range(40), 40)]
        for name in names:
            s.register(req(name), key, now=NOW + 0.125)
        assert [n.name for n in s.nodes()] == names  # oldest first, though created_at ties
        assert s.nodes()[0].created_at == NOW + 0.125  # float4 would have rounded this away
    finally:
        s.close()


def test_revisions_from_concurrent_writers_on_one_database_become_visible_in_order(postgres):
    """Four stores (four replicas) write at once in a seeded random interleaving while a
    reader polls the log: whenever it sees revision R it has seen every revision below R."""
    url = postgres.database()
    writers = [PostgresStore(url) for _ in range(4)]
    reader = PostgresStore(url)
    key = writers[0].create_auth_key(reusable=True, expires_at=None, now=NOW)[1]
    seen: list[int] = []
    done = threading.Event()
    errors: list[BaseException] = []

    def write(i: int, s: PostgresStore) -> None:
        rng = random.Random(1000 + i)
        mine: list[str] = []
        try:
            for j in range(40):
                op = rng.random()
                if op < 0.5 or not mine:
                    mine.append(s.register(req(f"w{i}-{j}"), key, now=NOW).node.id)
                elif op < 0.8:
                    s.set_endpoints(rng.choice(mine), (Endpoint.parse(f"192.0.2.{j + 1}:51820"),), now=NOW)
                elif op < 0.9 and len(mine) > 1:
                    s.report_connections(mine[0], (MeshConnection(
                        from_node=mine[0], to_node=mine[-1], status=ConnectionStatus.CONNECTED),), now=NOW)
                else:
                    s.remove_node(mine.pop(rng.randrange(len(mine))), now=NOW)
                time.sleep(rng.random() * 0.002)
        except Exception as exc:  # noqa: BLE001  # reported below
            errors.append(exc)

    def read() -> None:
        while not done.is_set():
            seen.extend(c.revision for c in reader.changes_since(seen[-1] if seen else 0))

    threads = [threading.Thread(target=write, args=(i, s)) for i, s in enumerate(writers)]
    r = threading.Thread(target=read)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    r.join()
    try:
        assert not errors, errors
        seen.extend(c.revision for c in reader.changes_since(seen[-1] if seen else 0))
        every = [c.revision for c in reader.changes_since(0, limit=10_000)]
        assert len(every) >= 160
        # The reader asked only for revisions above the last it saw: had any committed
        # behind one it already saw, it would be missing here.
        assert seen == every
    finally:
        for s in [*writers, reader]:
            s.close()


def test_a_one_off_key_used_by_several_stores_at_once_registers_one_node(postgres):
    url = postgres.database()
    stores = [PostgresStore(url) for _ in range(6)]
    key = stores[0].create_auth_key(reusable=False, expires_at=None, now=NOW)[1]
    outcomes: list[object] = []
    barrier = threading.Barrier(len(stores))

    def go(i: int) -> None:
        barrier.wait()
        try:
            outcomes.append(stores[i].register(req(f"r{i}"), key, now=NOW))
        except AuthKeyRejected as exc:
            outcomes.append(exc)

    ts = [threading.Thread(target=go, args=(i,)) for i in range(len(stores))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    try:
        assert sum(isinstance(o, AuthKeyRejected) for o in outcomes) == len(stores) - 1
        assert len(stores[0].nodes()) == 1 and stores[0].head() == 1
        with pytest.raises(Conflict):  # the name check runs under the same lock
            k2 = stores[1].create_auth_key(reusable=True, expires_at=None, now=NOW)[1]
            stores[2].register(req(stores[0].nodes()[0].name), k2, now=NOW)
    finally:
        for s in stores:
            s.close()


def test_a_write_through_one_store_wakes_the_listener_of_another_within_a_second(postgres):
    url = postgres.database()
    a, b = PostgresStore(url), PostgresStore(url)
    woke = threading.Event()
    try:
        b.on_change(woke.set)
        time.sleep(0.3)
        woke.clear()  # the first wake-up comes when the listener connects
        t0 = time.monotonic()
        a.register(req("x"), a.create_auth_key(reusable=True, expires_at=None, now=NOW)[1], now=NOW)
        assert woke.wait(1.0), "no NOTIFY arrived"
        assert time.monotonic() - t0 < 1.0
        assert [c.kind for c in b.changes_since(0)] == ["node.added"]
    finally:
        a.close()
        b.close()


def test_a_lost_connection_is_reopened_at_the_next_call_and_the_listener_reconnects(postgres):
    url = postgres.database()
    s, other = PostgresStore(url), PostgresStore(url)
    woke = threading.Event()
    try:
        s.on_change(woke.set)
        key = s.create_auth_key(reusable=True, expires_at=None, now=NOW)[1]
        with psycopg.connect(postgres.url(), autocommit=True) as admin:  # every backend on it dies
            dbname = urllib.parse.urlsplit(url).path.lstrip("/")
            deadline = time.monotonic() + 10  # the listener connects from its own thread: wait for it
            while time.monotonic() < deadline:
                connected = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                                          "AND pid <> pg_backend_pid()", (dbname,)).fetchone()
                if connected is not None and connected[0] >= 3:
                    break
                time.sleep(0.05)
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,)
            ).fetchone()
        assert killed is not None and killed[0] >= 3
        assert s.nodes() == []  # a read after the loss: reconnected, answered
        time.sleep(0.5)  # the listener backs off and reconnects
        woke.clear()
        other.register(req("after"), key, now=NOW)  # a write after the loss: reconnected, written
        assert woke.wait(3.0), "the listener did not reconnect"
        assert [n.name for n in s.nodes()] == ["after"]
    finally:
        s.close()
        other.close()


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="ascii", exclude_characters="\x00"), min_size=4, max_size=30))
def test_redact_never_shows_the_password(password):
    quoted = urllib.parse.quote(password, safe="")
    assume(quoted not in "postgresql://user:***@db.example:5432/pywg?sslmode=require&password=***")
    for url in (f"postgresql://user:{quoted}@db.example:5432/pywg",
                f"postgresql://user@db.example/pywg?sslmode=require&password={quoted}"):
        shown = redact(url)
        assert quoted not in shown and "***" in shown
        assert "db.example" in shown and "user" in shown


def test_an_unreachable_server_or_a_wrong_password_is_an_error_naming_database_without_the_password(postgres):
    wrong = postgres.url(password="hunter2-wrong")
    closed_port = f"postgresql://pywg:{postgres.password}@127.0.0.1:1/postgres"
    for url in (wrong, closed_port):
        with pytest.raises(InvalidConfig) as err:
            open_store(url, field="--database")
        assert err.value.field == "--database"
        assert "hunter2-wrong" not in str(err.value) and postgres.password not in str(err.value)
        assert "cannot connect" in str(err.value)
        run = subprocess.run([sys.executable, "-m", "pywg.cli", "coordinator", "nodes", "--database", url],
                             check=False, capture_output=True, text=True, timeout=30)
        assert run.returncode == 2
        assert run.stderr.startswith("pywg: --database: cannot connect to postgresql://pywg:***@127.0.0.1:")
        assert "hunter2-wrong" not in run.stderr + run.stdout and postgres.password not in run.stderr
    s = PostgresStore(postgres.database())
    try:
        assert postgres.password not in repr(s) and "***" in repr(s)
    finally:
        s.close()
