"""Group commit: ``Store.register_many`` on both stores, and registrations gathered into batches
by the coordinator.

A batch must decide every call exactly as the same calls one after the other would (the
reference: ``register`` on a second store, call by call), with one transaction for the batch:
one commit, one NOTIFY on PostgreSQL, and nothing of it written when the database fails."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import threading

import aiohttp
import pytest
from coordinator_server import new_public_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_coordinator import server  # noqa: F401  # the fixture: a coordinator on each store
from test_mesh_store import NOW, Backend, pub, req

from pywg.manage.key import Key
from pywg.manage.types import Endpoint
from pywg.mesh.coordinator import COORDINATOR
from pywg.mesh.store import (
    AuthKeyRejected,
    Conflict,
    Exhausted,
    NodeRequest,
    RegisterCall,
    Registration,
    Store,
    StoreError,
)

MALFORMED = "hunter2"
PREFIX6 = ipaddress.IPv6Network("fd00:5c::/48")  # both stores the same (the default is random)


@pytest.fixture(params=["sqlite", "postgresql"])
def backends(request, tmp_path):
    """Two empty databases of one kind: one for batches, one for the one-by-one reference."""
    if request.param == "sqlite":
        return Backend("sqlite", str(tmp_path / "a.db")), Backend("sqlite", str(tmp_path / "b.db"))
    pg = request.getfixturevalue("postgres")
    return Backend("postgresql", pg.database()), Backend("postgresql", pg.database())


class Keys:
    """The same set of pre-auth keys in one store, by label (their ids differ per store)."""

    def __init__(self, store: Store) -> None:
        self.text: dict[str, str] = {}
        for label, reusable, expires in (("reusable", True, None), ("one-off", False, None),
                                         ("one-off-2", False, None), ("expiring", True, NOW + 10)):
            self.text[label] = store.create_auth_key(reusable=reusable, expires_at=expires, now=NOW)[1]
        revoked, self.text["revoked"] = store.create_auth_key(reusable=True, expires_at=None, now=NOW)
        store.revoke_auth_key(revoked.id, now=NOW)
        self.text["unknown"] = self.text["reusable"][:-4] + ("AAAA" if not self.text["reusable"].endswith("AAAA")
                                                             else "BBBB")
        self.text["malformed"] = MALFORMED
        self.labels = {t.split("-")[2]: label for label, t in self.text.items() if t.startswith("pywg-authkey-")}

    def neutral(self, reason: str) -> str:
        """``reason`` with key ids replaced by their labels."""
        return re.sub(r"\b[0-9a-f]{12}\b", lambda m: f"<{self.labels.get(m.group(0), '?')}>", reason)


def outcome(result: Registration | StoreError, keys: Keys) -> tuple[object, ...]:
    """What a user sees of one registration, without the random parts (ids, tokens)."""
    if isinstance(result, StoreError):
        return type(result).__name__, result.field, keys.neutral(result.reason)
    n = result.node
    return "ok", n.name, n.public_key, str(n.ipv4), str(n.ipv6), keys.labels.get(n.identity), n.endpoints


DISCO = pub()


def full_req(name: str, public_key: Key) -> NodeRequest:
    """A request with every field set (a record built from it must equal one read back)."""
    return req(name, public_key=public_key, disco_key=DISCO, region="eu-1",
               endpoints=(Endpoint.parse("192.0.2.1:51820"), Endpoint.parse("[2001:db8:0::1]:51820")))


def compare(a: Store, b: Store, spec: list[tuple[str, str, int, float]],
            batch_at: list[int]) -> list[tuple[object, ...]]:
    """Run ``spec`` (name, key label, public key number, now) as batches split at
    ``batch_at`` on ``a`` and one by one on ``b`` (stores with the same history); the
    outcomes, asserted equal, and the log and nodes ``a`` shows for them."""
    head = a.head()
    keys_a, keys_b = Keys(a), Keys(b)
    pubkeys = [pub() for _ in range(max(len(spec), 6))]  # numbers: the first 6 in the property test
    calls_a = [RegisterCall(full_req(name, pubkeys[k]), keys_a.text[label], now)
               for name, label, k, now in spec]
    got: list[Registration | StoreError] = []
    for lo, hi in zip([0, *batch_at], [*batch_at, len(spec)], strict=True):
        got.extend(a.register_many(calls_a[lo:hi]))
    want: list[Registration | StoreError] = []
    for name, label, k, now in spec:
        try:
            want.append(b.register(full_req(name, pubkeys[k]), keys_b.text[label], now=now))
        except StoreError as exc:
            want.append(exc)
    outcomes = [outcome(r, keys_a) for r in got]
    assert outcomes == [outcome(r, keys_b) for r in want]
    # The log: one node.added per accepted call, in call order; the nodes, exactly those.
    accepted = [r for r in got if isinstance(r, Registration)]
    changes = a.changes_since(head)
    assert [c.node_id for c in changes] == [r.node.id for r in accepted]
    assert [c.revision for c in changes] == sorted(r.revision for r in accepted)
    assert {n.id: n for n in a.nodes()} == {r.node.id: r.node for r in accepted}
    assert [c.payload["node"] for c in changes] == [r.node.view() for r in accepted]
    # Tokens authenticate their own node.
    assert all(a.authenticate(r.token) == r.node for r in accepted)
    assert sorted((k.reusable, k.uses) for k in a.auth_keys()) == sorted((k.reusable, k.uses) for k in b.auth_keys())
    return outcomes


def test_a_batch_answers_each_call_as_one_after_the_other_would(backends):
    a, b = (x.open(prefix6=PREFIX6) for x in backends)
    try:
        spec = [
            ("a", "reusable", 0, NOW),
            ("b", "one-off", 1, NOW),
            ("c", "one-off", 2, NOW),        # the one-off key again, in the same batch
            ("a", "reusable", 3, NOW),       # a name taken earlier in the batch
            ("d", "reusable", 0, NOW),       # a public key taken earlier in the batch
            ("e", "expiring", 4, NOW + 9),
            ("f", "expiring", 5, NOW + 10),  # expired by its own time
            ("g", "revoked", 6, NOW),
            ("h", "unknown", 7, NOW),
            ("i", "malformed", 8, NOW),
            ("j", "one-off-2", 9, NOW),
        ]
        outcomes = compare(a, b, spec, batch_at=[])
        assert [o[0] for o in outcomes] == ["ok", "ok", "AuthKeyRejected", "Conflict", "Conflict", "ok",
                                            "AuthKeyRejected", "AuthKeyRejected", "AuthKeyRejected",
                                            "AuthKeyRejected", "ok"]
        assert outcomes[2][1:] == ("authKey", "pre-auth key <one-off> is one-off and was already used")
        assert outcomes[3][1:] == ("name", "a node named 'a' is registered already")
        assert outcomes[4][1:] == ("publicKey", "a node with this public key is registered already")
        assert outcomes[6][2].startswith("pre-auth key <expiring> expired at")
        # A second batch sees the first: the same name refused, the next address.
        again = a.register_many([RegisterCall(req("a"), Keys(a).text["reusable"], NOW),
                                 RegisterCall(req("k"), Keys(a).text["reusable"], NOW)])
        assert isinstance(again[0], Conflict) and again[0].field == "name"
        assert isinstance(again[1], Registration) and str(again[1].node.ipv4) == "100.64.0.5"
    finally:
        a.close()
        b.close()


def test_a_batch_that_fails_in_the_database_writes_nothing(backends):
    """A database error (a trigger refusing the change-log insert) fails the whole batch and
    rolls all of it back: no node, no change, no key use, no address spent."""
    backend = backends[0]
    s = backend.open()
    try:
        keys = Keys(s)
        head = s.head()
        backend.refuse_changes()
        calls = [RegisterCall(req(f"n{i}"), keys.text["one-off" if i == 0 else "reusable"], NOW) for i in range(5)]
        with pytest.raises(Exception, match="disk on fire"):
            s.register_many(calls)
        with pytest.raises(Exception, match="disk on fire"):
            s.register(req("single"), keys.text["reusable"], now=NOW)
        assert s.nodes() == [] and s.head() == head
        assert all(k.uses == 0 for k in s.auth_keys())
        backend.refuse_changes(False)
        results = s.register_many(calls)
        assert [str(r.node.ipv4) for r in results if isinstance(r, Registration)] == [
            f"100.64.0.{i}" for i in range(1, 6)]
    finally:
        s.close()


def test_a_batch_running_out_of_addresses_reuses_freed_ones_then_is_refused_per_call(backends):
    s = backends[0].open(prefix4=ipaddress.IPv4Network("10.0.0.0/29"), prefix6=ipaddress.IPv6Network("fd00::/120"))
    try:
        key = Keys(s).text["reusable"]
        first = s.register_many([RegisterCall(req(f"n{i}"), key, NOW) for i in range(4)])
        assert [str(r.node.ipv4) for r in first if isinstance(r, Registration)] == [
            "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
        s.remove_node(first[1].node.id, now=NOW)  # type: ignore[union-attr]
        more = s.register_many([RegisterCall(req(f"m{i}"), key, NOW) for i in range(4)]
                               + [RegisterCall(req("n0"), key, NOW)])
        assert [str(r.node.ipv4) if isinstance(r, Registration) else type(r).__name__ for r in more] == [
            "10.0.0.5", "10.0.0.6", "10.0.0.2", "Exhausted", "Conflict"]
        assert isinstance(more[3], Exhausted)
        assert sorted(n.name for n in s.nodes()) == ["m0", "m1", "m2", "n0", "n2", "n3"]
    finally:
        s.close()


def test_batches_from_several_stores_at_once_keep_names_keys_and_addresses_unique(backends):
    """Four stores on one database (replicas, or the CLI beside serve) registering batches at
    once, every name wanted by two of them, one one-off key raced by all: each name once,
    each address once, the one-off key used once, and every refusal names its field."""
    backend = backends[0]
    stores = [backend.open() for _ in range(4)]
    try:
        keys = Keys(stores[0])
        results: list[list[Registration | StoreError]] = [[] for _ in stores]

        def go(i: int) -> None:
            for round_ in range(10):
                calls = [RegisterCall(req(f"r{round_}-{(i // 2) * 8 + j}"), keys.text["reusable"], NOW)
                         for j in range(8)]
                calls.append(RegisterCall(req(f"oneoff-{i}-{round_}"), keys.text["one-off"], NOW))
                results[i].extend(stores[i].register_many(calls))

        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        flat = [r for rs in results for r in rs]
        ok = [r for r in flat if isinstance(r, Registration)]
        refused = [r for r in flat if isinstance(r, StoreError)]
        assert len(ok) == 10 * 16 + 1  # each name once, the one-off key once
        assert {type(r) for r in refused} == {Conflict, AuthKeyRejected}
        assert all(r.field == ("name" if isinstance(r, Conflict) else "authKey") for r in refused)
        nodes = stores[1].nodes()
        assert sorted(n.id for n in nodes) == sorted(r.node.id for r in ok)
        assert len({n.name for n in nodes}) == len({n.ipv4 for n in nodes}) == len({n.ipv6 for n in nodes}) == len(ok)
        assert len({n.public_key for n in nodes}) == len(ok)
        assert sum(n.name.startswith("oneoff") for n in nodes) == 1
        revisions = [c.revision for c in stores[2].changes_since(0)]
        assert revisions == sorted(revisions) and len(revisions) == len(ok)
    finally:
        for s in stores:
            s.close()


def test_a_pending_registration_shows_no_secret_in_its_repr():
    key = "pywg-authkey-0123456789ab-" + "A" * 43
    assert key not in repr(RegisterCall(req("a"), key, NOW)) and "auth_key" not in repr(RegisterCall(req("a"), key, NOW))


def test_a_batch_wakes_the_other_replicas_with_one_notify(postgres):
    import psycopg

    backend = Backend("postgresql", postgres.database())
    s = backend.open()
    try:
        key = Keys(s).text["reusable"]
        with psycopg.connect(backend.target, autocommit=True) as listener:
            listener.execute("LISTEN pywg_changes")
            results = s.register_many([RegisterCall(req(f"n{i}"), key, NOW) for i in range(50)])
            got = [n.payload for n in listener.notifies(timeout=1.0)]
        assert got == [str(max(r.revision for r in results if isinstance(r, Registration)))]
    finally:
        s.close()


# The property: any sequence of calls, cut into batches anywhere, decides as one by one.
CALL = st.tuples(st.sampled_from("abcdef"),
                 st.sampled_from(["reusable", "one-off", "one-off-2", "expiring", "revoked", "unknown", "malformed"]),
                 st.integers(0, 5), st.sampled_from([NOW, NOW + 9, NOW + 10]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=st.lists(CALL, max_size=14), cuts=st.lists(st.integers(0, 14), max_size=3))
def test_any_calls_in_any_batches_decide_as_one_by_one(backends, spec, cuts):
    a, b = (x.open(prefix6=PREFIX6) for x in backends)
    try:
        for s in (a, b):  # each example starts from empty stores
            for n in s.nodes():
                s.remove_node(n.id, now=NOW)
        compare(a, b, spec, sorted({min(c, len(spec)) for c in cuts}))
    finally:
        a.close()
        b.close()


# --- the coordinator gathers concurrent registrations into batches ----------------------------


def test_concurrent_registrations_over_http_are_batched_and_answered_each_on_its_own(server):  # noqa: F811
    reusable = server.authkey()
    one_off = server.authkey(reusable=False)

    async def main() -> list[tuple[int, dict[str, object], str]]:
        async with aiohttp.ClientSession() as session:
            async def one(name: str, key: str) -> tuple[int, dict[str, object], str]:
                body = {"authKey": key, "name": name, "publicKey": new_public_key()}
                async with session.post(server.url + "/api/v1/register", json=body) as r:
                    return r.status, await r.json(), name

            jobs = [one(f"n{i}", reusable) for i in range(150)]
            jobs += [one(f"n{i}", reusable) for i in range(0, 150, 10)]  # 15 duplicate names
            jobs += [one(f"o{i}", one_off) for i in range(2)]  # a one-off key raced by two
            jobs += [one("bad", "pywg-authkey-nope")]
            return await asyncio.gather(*jobs)

    answers = asyncio.run(main())
    by_status: dict[int, list[tuple[int, dict[str, object], str]]] = {}
    for a in answers:
        by_status.setdefault(a[0], []).append(a)
    assert sorted(by_status) == [201, 401, 409]
    assert len(by_status[201]) == 151  # 150 names once each, the one-off key once
    assert len(by_status[409]) == 15
    assert all(a[1] == {"error": f"a node named {a[2]!r} is registered already", "field": "name"}
               for a in by_status[409])
    assert len(by_status[401]) == 2 and all(a[1]["field"] == "authKey" for a in by_status[401])
    refused = {a[2]: str(a[1]["error"]) for a in by_status[401]}
    assert refused.pop("bad").startswith("not a pre-auth key")
    assert next(iter(refused.values())).endswith("is one-off and was already used")
    assert sum(a[2].startswith("o") for a in by_status[201]) == 1
    addresses = [a[1]["internalIp"] for a in by_status[201]]
    assert len(set(addresses)) == len(addresses)
    assert len(server.store.nodes()) == 151
    commits = server.app[COORDINATOR].registrations
    assert commits.largest > 1 and commits.batches < len(answers)  # gathered, not one by one
