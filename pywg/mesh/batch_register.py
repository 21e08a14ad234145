"""Set-wise registration on PostgreSQL: a batch of pre-auth-key registrations checked in
Python and written with one statement per table (the fast path of
:meth:`pywg.mesh.postgres_store.PostgresStore.register_many`).

Run inside the store's write transaction (the advisory lock held, so nothing changes under
it) and in a savepoint of its own. It reads the batch's pre-auth keys and the nodes that
already hold one of its names or public keys (two queries), then decides every call in
order exactly as one registration after the other would: the same checks in the same order
with the same errors, a one-off key used by the first call that presents it, a name or key
taken by an earlier call of the batch refused to the later one, addresses at consecutive
offsets. The accepted calls are then written by one INSERT into ``nodes``, one into
``changes`` (one node.added each, in call order), one UPDATE of the keys' use counts and
one of ``next_offset``. Whatever this does not foresee raises (:class:`NotForeseen`, or the
database's integrity error) before anything is kept, and the caller goes one by one.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pywg.mesh import addressing, credentials
from pywg.mesh.store import (
    NODE_ADDED,
    AuthKeyRejected,
    Conflict,
    NodeRecord,
    RegisterCall,
    Registration,
    StoreError,
)

if TYPE_CHECKING:
    import psycopg

    from pywg.mesh.postgres_store import PostgresStore


class NotForeseen(Exception):
    """The batch needs what only the one-by-one path does (e.g. reusing a freed address)."""


@dataclass
class _Accepted:
    index: int
    call: RegisterCall
    key_id: str
    token: str
    node: NodeRecord | None = None


_INSERT_NODES = """
    INSERT INTO nodes (id, name, public_key, disco_key, addr_offset, ipv4, ipv6, endpoints, region,
                       identity_kind, identity, token_hash, created_at, last_contact)
    SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::integer[], %s::text[],
                         %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
                         %s::double precision[], %s::double precision[])"""

_INSERT_CHANGES = """
    INSERT INTO changes (kind, node_id, payload, created_at)
    SELECT kind, node_id, payload, created_at
    FROM unnest(%s::text[], %s::text[], %s::text[], %s::double precision[]) WITH ORDINALITY
         AS t(kind, node_id, payload, created_at, i)
    ORDER BY i
    RETURNING revision, node_id"""

_COUNT_USES = """
    UPDATE auth_keys AS a SET uses = a.uses + u.n, last_used_at = u.t
    FROM unnest(%s::text[], %s::integer[], %s::double precision[]) AS u(id, n, t)
    WHERE a.id = u.id"""


def _decide(store: PostgresStore, db: psycopg.Connection[dict[str, Any]], calls: Sequence[RegisterCall],
            tokens: list[str]) -> tuple[list[Registration | StoreError | None], list[_Accepted]]:
    """Each call's refusal (or None: accepted), as one after the other would decide."""
    parsed: list[tuple[str, str] | AuthKeyRejected] = []
    for call in calls:
        try:
            parsed.append(credentials.parse_auth_key(call.auth_key))
        except credentials.BadCredential as exc:
            parsed.append(AuthKeyRejected(str(exc), "authKey"))
    key_ids = sorted({p[0] for p in parsed if isinstance(p, tuple)})
    keys = {r["id"]: r for r in db.execute("SELECT * FROM auth_keys WHERE id = ANY(%s)", (key_ids,))}
    # A young table has no statistics yet and the planner scans all of it for the ANY() lookups
    # below (seen: every batch of a 10,000-node run, PostgreSQL's CPU growing with the square of
    # the nodes); the unique indexes answer them in a few probes whatever the statistics say.
    db.execute("SET LOCAL enable_seqscan = off")  # this transaction only
    names = [c.request.name for c in calls]
    public_keys = [c.request.public_key.to_base64() for c in calls]
    taken_names: set[str] = set()
    taken_keys: set[str] = set()
    for r in db.execute("SELECT name, public_key FROM nodes WHERE name = ANY(%s) OR public_key = ANY(%s)",
                        (names, public_keys)):
        taken_names.add(r["name"])
        taken_keys.add(r["public_key"])
    used: dict[str, int] = {}
    results: list[Registration | StoreError | None] = []
    accepted: list[_Accepted] = []
    for i, (call, p, name, public_key) in enumerate(zip(calls, parsed, names, public_keys, strict=True)):
        try:
            if isinstance(p, AuthKeyRejected):
                raise p
            key_id, presented = p
            store._check_key(keys.get(key_id), key_id, presented, call.now, used.get(key_id, 0))
            if name in taken_names:
                raise Conflict(f"a node named {name!r} is registered already", "name")
            if public_key in taken_keys:
                raise Conflict("a node with this public key is registered already", "publicKey")
        except StoreError as exc:
            results.append(exc)
            continue
        used[key_id] = used.get(key_id, 0) + 1
        taken_names.add(name)
        taken_keys.add(public_key)
        accepted.append(_Accepted(i, call, key_id, tokens[i]))
        results.append(None)
    return results, accepted


def register_set(store: PostgresStore, db: psycopg.Connection[dict[str, Any]], calls: Sequence[RegisterCall],
                 tokens: list[str]) -> list[Registration | StoreError]:
    """Register ``calls`` (``tokens``: each call's new node token) in the caller's transaction."""
    results, accepted = _decide(store, db, calls, tokens)
    if accepted:
        first = int(store._meta(db, "next_offset") or "1")
        if first + len(accepted) - 1 > addressing.capacity(store.prefix4, store.prefix6):
            raise NotForeseen("the never-used offsets run out: free ones are searched one by one")
        for offset, a in enumerate(accepted, start=first):
            req = a.call.request
            ipv4, ipv6 = addressing.addresses_at(offset, store.prefix4, store.prefix6)
            a.node = NodeRecord(
                id=secrets.token_hex(8), name=req.name, public_key=req.public_key, disco_key=req.disco_key,
                ipv4=ipv4, ipv6=ipv6, endpoints=req.endpoints, region=req.region, identity_kind="authkey",
                identity=a.key_id, created_at=a.call.now, last_contact=a.call.now,
            )
        nodes = [a.node for a in accepted if a.node is not None]
        db.execute(_INSERT_NODES, (
            [n.id for n in nodes], [n.name for n in nodes], [n.public_key.to_base64() for n in nodes],
            [None if n.disco_key is None else n.disco_key.to_base64() for n in nodes],
            list(range(first, first + len(nodes))), [str(n.ipv4) for n in nodes], [str(n.ipv6) for n in nodes],
            [json.dumps([str(e) for e in n.endpoints]) for n in nodes], [n.region for n in nodes],
            [n.identity_kind for n in nodes], [n.identity for n in nodes],
            [credentials.digest(a.token) for a in accepted], [n.created_at for n in nodes],
            [n.last_contact for n in nodes],
        ))
        revisions = {r["node_id"]: int(r["revision"]) for r in db.execute(_INSERT_CHANGES, (
            [NODE_ADDED] * len(nodes), [n.id for n in nodes],
            [json.dumps({"node": n.view()}, separators=(",", ":")) for n in nodes], [n.created_at for n in nodes],
        ))}
        last_use: dict[str, tuple[int, float]] = {}
        for a in accepted:
            n, _ = last_use.get(a.key_id, (0, 0.0))
            last_use[a.key_id] = (n + 1, a.call.now)  # the last call's time, as one by one
        db.execute(_COUNT_USES, (list(last_use), [u[0] for u in last_use.values()],
                                 [u[1] for u in last_use.values()]))
        store._set_meta(db, "next_offset", str(first + len(nodes)))
        for a, node in zip(accepted, nodes, strict=True):
            results[a.index] = Registration(node=node, token=a.token, revision=revisions[node.id])
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]
