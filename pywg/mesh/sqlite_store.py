"""The embedded store: stdlib sqlite3 in WAL mode (see :mod:`pywg.mesh.store`).

One connection, guarded by a lock, used from any thread (the coordinator calls it from
one worker thread). Writes run in ``BEGIN IMMEDIATE`` transactions, so a check (name
free? key unused?) and the write it guards cannot interleave with another process's
write (the CLI writes to the same file while ``serve`` runs). ``synchronous=NORMAL``:
in WAL mode a committed transaction survives a crash of the process; a power loss may
lose the last ones.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from pywg.manage.key import Key
from pywg.manage.types import Endpoint, MeshConnection
from pywg.mesh import addressing, credentials, schema
from pywg.mesh.health import ConnectionHealth, HealthReport, connection_of, offline_window
from pywg.mesh.store import (
    CONNECTION_CHANGED,
    CONNECTION_REMOVED,
    NODE_ADDED,
    NODE_CHANGED,
    NODE_REMOVED,
    AuthKeyInfo,
    AuthKeyRejected,
    Change,
    ConfigMismatch,
    Conflict,
    Exhausted,
    NodeRecord,
    NodeRequest,
    NotFound,
    RegisterCall,
    Registration,
    Store,
    StoreError,
)

BUSY_TIMEOUT_S = 10.0


def _fmt_time(t: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class SqliteStore(Store):
    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        prefix4: ipaddress.IPv4Network | None = None,
        prefix6: ipaddress.IPv6Network | None = None,
    ) -> None:
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            os.fspath(path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S
        )
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
            self._setup_prefixes(prefix4, prefix6)
        except BaseException:
            self._db.close()
            raise

    # --- plumbing -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @staticmethod
    def _log(db: sqlite3.Connection, kind: str, node_id: str, payload: dict[str, Any], now: float) -> int:
        cur = db.execute(
            "INSERT INTO changes (kind, node_id, payload, created_at) VALUES (?, ?, ?, ?)",
            (kind, node_id, json.dumps(payload, separators=(",", ":")), now),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def _migrate(self) -> None:
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT max(version) FROM schema_version").fetchone()
        current = row[0] or 0
        if current > schema.LATEST:
            raise ConfigMismatch(
                f"the store has schema version {current}, newer than this pywg knows ({schema.LATEST})"
            )
        for migration in schema.migrations("sqlite"):
            if migration.version <= current:
                continue
            with self._write() as db:
                # Another process may have migrated meanwhile: check again inside the lock.
                now_at = db.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
                if migration.version <= now_at:
                    continue
                for stmt in migration.statements:
                    db.execute(stmt)
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (migration.version,))

    def _meta(self, db: sqlite3.Connection, key: str) -> str | None:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    @staticmethod
    def _set_meta(db: sqlite3.Connection, key: str, value: str) -> None:
        db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _setup_prefixes(
        self, prefix4: ipaddress.IPv4Network | None, prefix6: ipaddress.IPv6Network | None
    ) -> None:
        with self._write() as db:
            allocated = self._meta(db, "next_offset") not in (None, "1")
            stored4, stored6 = self._meta(db, "prefix4"), self._meta(db, "prefix6")
            for name, given, stored in (("prefix4", prefix4, stored4), ("prefix6", prefix6, stored6)):
                if given is not None and stored is not None and str(given) != stored and allocated:
                    raise ConfigMismatch(
                        f"the store's mesh prefix is {stored}; it cannot change once addresses are allocated",
                        name,
                    )
            p4 = prefix4 or (ipaddress.IPv4Network(stored4) if stored4 else addressing.DEFAULT_PREFIX4)
            p6 = prefix6 or (ipaddress.IPv6Network(stored6) if stored6 else addressing.random_ula_prefix())
            if addressing.capacity(p4, p6) < 1:
                raise ConfigMismatch("the prefixes hold no node address", "prefix4")
            self._set_meta(db, "prefix4", str(p4))
            self._set_meta(db, "prefix6", str(p6))
            if self._meta(db, "next_offset") is None:
                self._set_meta(db, "next_offset", "1")
        self.prefix4, self.prefix6 = p4, p6

    def schema_version(self) -> int:
        return int(self._read("SELECT max(version) FROM schema_version")[0][0] or 0)

    # --- pre-auth keys ------------------------------------------------------------------

    @staticmethod
    def _key_info(row: sqlite3.Row) -> AuthKeyInfo:
        return AuthKeyInfo(
            id=row["id"],
            reusable=bool(row["reusable"]),
            created_at=row["created_at"],
            expires_at=row["expires_at"],
            revoked_at=row["revoked_at"],
            uses=row["uses"],
            last_used_at=row["last_used_at"],
        )

    def create_auth_key(
        self, *, reusable: bool, expires_at: float | None, now: float
    ) -> tuple[AuthKeyInfo, str]:
        key_id, text, secret_hash = credentials.new_auth_key()
        with self._write() as db:
            db.execute(
                "INSERT INTO auth_keys (id, secret_hash, reusable, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                (key_id, secret_hash, int(reusable), now, expires_at),
            )
            row = db.execute("SELECT * FROM auth_keys WHERE id = ?", (key_id,)).fetchone()
        return self._key_info(row), text

    def auth_keys(self) -> list[AuthKeyInfo]:
        return [self._key_info(r) for r in self._read("SELECT * FROM auth_keys ORDER BY rowid")]

    def revoke_auth_key(self, key_id: str, *, now: float) -> AuthKeyInfo:
        with self._write() as db:
            db.execute("UPDATE auth_keys SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?", (now, key_id))
            row = db.execute("SELECT * FROM auth_keys WHERE id = ?", (key_id,)).fetchone()
            if row is None:
                raise NotFound(f"no pre-auth key has id {key_id!r}", "id")
        return self._key_info(row)

    def _use_auth_key(self, db: sqlite3.Connection, auth_key: str, now: float) -> str:
        try:
            key_id, presented = credentials.parse_auth_key(auth_key)
        except credentials.BadCredential as exc:
            raise AuthKeyRejected(str(exc), "authKey") from None
        row = db.execute("SELECT * FROM auth_keys WHERE id = ?", (key_id,)).fetchone()
        if row is None or not credentials.digests_equal(row["secret_hash"], presented):
            raise AuthKeyRejected("unknown pre-auth key", "authKey")
        info = self._key_info(row)
        state = info.state(now)
        if state == "revoked":
            raise AuthKeyRejected(f"pre-auth key {key_id} was revoked", "authKey")
        if state == "expired":
            assert info.expires_at is not None
            raise AuthKeyRejected(f"pre-auth key {key_id} expired at {_fmt_time(info.expires_at)}", "authKey")
        if state == "used":
            raise AuthKeyRejected(f"pre-auth key {key_id} is one-off and was already used", "authKey")
        db.execute("UPDATE auth_keys SET uses = uses + 1, last_used_at = ? WHERE id = ?", (now, key_id))
        return key_id

    # --- nodes --------------------------------------------------------------------------

    def _node(self, row: sqlite3.Row) -> NodeRecord:
        return NodeRecord(
            id=row["id"],
            name=row["name"],
            public_key=Key.parse(row["public_key"]),
            disco_key=Key.parse(row["disco_key"]) if row["disco_key"] else None,
            ipv4=ipaddress.IPv4Address(row["ipv4"]),
            ipv6=ipaddress.IPv6Address(row["ipv6"]),
            endpoints=tuple(Endpoint.parse(e) for e in json.loads(row["endpoints"])),
            region=row["region"],
            identity_kind=row["identity_kind"],
            identity=row["identity"],
            created_at=row["created_at"],
            last_contact=row["last_contact"],
            online=bool(row["online"]),
            offline_after=row["offline_after"],
            last_report=row["last_report"],
        )

    def _allocate_offset(self, db: sqlite3.Connection) -> int:
        """The next offset never used; once they run out, the lowest free one."""
        cap = addressing.capacity(self.prefix4, self.prefix6)
        nxt = int(self._meta(db, "next_offset") or "1")
        if nxt <= cap:
            self._set_meta(db, "next_offset", str(nxt + 1))
            return nxt
        expected = 1
        for (offset,) in db.execute("SELECT addr_offset FROM nodes ORDER BY addr_offset"):
            if offset != expected:
                break
            expected += 1
        if expected > cap:
            raise Exhausted(f"no free address is left in {self.prefix4} / {self.prefix6}", "")
        return expected

    def register(self, request: NodeRequest, auth_key: str, *, now: float) -> Registration:
        token, _ = credentials.new_node_token()
        with self._write() as db:
            key_id = self._use_auth_key(db, auth_key, now)
            return self._add_node(db, request, "authkey", key_id, token, now)

    def register_many(self, calls: Sequence[RegisterCall]) -> list[Registration | StoreError]:
        """All in one ``BEGIN IMMEDIATE`` transaction (one commit), each call in a savepoint that
        a refusal rolls back (see :meth:`Store.register_many`)."""
        tokens = [credentials.new_node_token()[0] for _ in calls]
        results: list[Registration | StoreError] = []
        with self._write() as db:
            for call, token in zip(calls, tokens, strict=True):
                db.execute("SAVEPOINT register_call")
                try:
                    key_id = self._use_auth_key(db, call.auth_key, call.now)
                    results.append(self._add_node(db, call.request, "authkey", key_id, token, call.now))
                except StoreError as exc:
                    db.execute("ROLLBACK TO register_call")
                    results.append(exc)
                db.execute("RELEASE register_call")
        return results

    def _add_node(self, db: Any, request: NodeRequest, kind: str, identity: str, token: str,
                  now: float) -> Registration:
        token_hash = credentials.digest(token)
        public_key = request.public_key.to_base64()
        if db.execute("SELECT 1 FROM nodes WHERE name = ?", (request.name,)).fetchone():
            raise Conflict(f"a node named {request.name!r} is registered already", "name")
        if db.execute("SELECT 1 FROM nodes WHERE public_key = ?", (public_key,)).fetchone():
            raise Conflict("a node with this public key is registered already", "publicKey")
        offset = self._allocate_offset(db)
        ipv4, ipv6 = addressing.addresses_at(offset, self.prefix4, self.prefix6)
        node_id = secrets.token_hex(8)
        db.execute(
            """INSERT INTO nodes (id, name, public_key, disco_key, addr_offset, ipv4, ipv6, endpoints,
               region, identity_kind, identity, token_hash, created_at, last_contact)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                node_id, request.name, public_key,
                request.disco_key.to_base64() if request.disco_key else None,
                offset, str(ipv4), str(ipv6), json.dumps([str(e) for e in request.endpoints]),
                request.region, kind, identity, token_hash, now, now,
            ),
        )
        node = self._node(db.execute("SELECT * FROM nodes WHERE id = ?", (node_id,)).fetchone())
        revision = self._log(db, NODE_ADDED, node_id, {"node": node.view()}, now)
        return Registration(node=node, token=token, revision=revision)

    def register_spiffe(self, request: NodeRequest, spiffe_id: str, *, now: float) -> Registration:
        token, _ = credentials.new_node_token()
        with self._write() as db:
            row = db.execute("SELECT * FROM nodes WHERE identity_kind = 'spiffe' AND identity = ?",
                             (spiffe_id,)).fetchone()
            if row is None:
                return self._add_node(db, request, "spiffe", spiffe_id, token, now)
            node_id, public_key = row["id"], request.public_key.to_base64()
            if db.execute("SELECT 1 FROM nodes WHERE name = ? AND id <> ?", (request.name, node_id)).fetchone():
                raise Conflict(f"a node named {request.name!r} is registered already", "name")
            if db.execute("SELECT 1 FROM nodes WHERE public_key = ? AND id <> ?", (public_key, node_id)).fetchone():
                raise Conflict("a node with this public key is registered already", "publicKey")
            db.execute(
                """UPDATE nodes SET name = ?, public_key = ?, disco_key = ?, endpoints = ?, region = ?,
                   token_hash = ?, last_contact = ?, online = 1 WHERE id = ?""",
                (request.name, public_key, request.disco_key.to_base64() if request.disco_key else None,
                 json.dumps([str(e) for e in request.endpoints]), request.region,
                 credentials.digest(token), now, node_id),
            )
            node = self._node(db.execute("SELECT * FROM nodes WHERE id = ?", (node_id,)).fetchone())
            revision = self._log(db, NODE_CHANGED, node_id, {"node": node.view()}, now)
        return Registration(node=node, token=token, revision=revision)

    def authenticate(self, token: str) -> NodeRecord | None:
        # The lookup is by digest of a 256-bit secret: timing reveals nothing usable.
        rows = self._read("SELECT * FROM nodes WHERE token_hash = ?", (credentials.digest(token),))
        return self._node(rows[0]) if rows else None

    def token_digest(self, node_id: str) -> str | None:
        rows = self._read("SELECT token_hash FROM nodes WHERE id = ?", (node_id,))
        return str(rows[0]["token_hash"]) if rows else None

    def node(self, node_id: str) -> NodeRecord | None:
        rows = self._read("SELECT * FROM nodes WHERE id = ?", (node_id,))
        return self._node(rows[0]) if rows else None

    def nodes(self) -> list[NodeRecord]:
        return [self._node(r) for r in self._read("SELECT * FROM nodes ORDER BY rowid")]

    def _contact(self, db: sqlite3.Connection, node_id: str, now: float) -> int | None:
        """Record contact (in the caller's transaction); log the node back online if it was not."""
        db.execute("UPDATE nodes SET last_contact = max(last_contact, ?) WHERE id = ?", (now, node_id))
        cur = db.execute("UPDATE nodes SET online = 1 WHERE id = ? AND online = 0", (node_id,))
        if cur.rowcount == 0:
            return None
        node = self._node(db.execute("SELECT * FROM nodes WHERE id = ?", (node_id,)).fetchone())
        return self._log(db, NODE_CHANGED, node_id, {"node": node.view()}, now)

    def touch(self, node_id: str, *, now: float) -> int | None:
        with self._write() as db:
            return self._contact(db, node_id, now)

    def sweep_offline(self, before: float, *, now: float) -> list[int]:
        revisions = []
        with self._write() as db:
            rows = db.execute(
                "SELECT id FROM nodes WHERE online = 1 AND CASE WHEN offline_after IS NULL "
                "THEN last_contact < ? ELSE last_contact + offline_after < ? END ORDER BY rowid", (before, now)
            ).fetchall()
            for (node_id,) in rows:
                db.execute("UPDATE nodes SET online = 0 WHERE id = ?", (node_id,))
                node = self._node(db.execute("SELECT * FROM nodes WHERE id = ?", (node_id,)).fetchone())
                revisions.append(self._log(db, NODE_CHANGED, node_id, {"node": node.view()}, now))
        return revisions

    def set_disco_key(self, node_id: str, disco_key: Key, *, now: float) -> int | None:
        return self._set_node_text(node_id, {"disco_key": disco_key.to_base64()}, now)

    def _set_node_text(self, node_id: str, values: dict[str, str], now: float) -> int | None:
        """Some of a node's own columns (endpoints, region, disco_key) set, a contact, node.changed logged."""
        assert values and set(values) <= {"endpoints", "region", "disco_key"}
        columns = ", ".join(values)
        with self._write() as db:
            row = db.execute(f"SELECT {columns} FROM nodes WHERE id = ?", (node_id,)).fetchone()
            if row is None:
                raise NotFound(f"no node has id {node_id!r}", "id")
            back = self._contact(db, node_id, now)
            if all(row[column] == text for column, text in values.items()):
                return back
            assignments = ", ".join(f"{column} = ?" for column in values)
            db.execute(f"UPDATE nodes SET {assignments} WHERE id = ?", (*values.values(), node_id))
            node = self._node(db.execute("SELECT * FROM nodes WHERE id = ?", (node_id,)).fetchone())
            return self._log(db, NODE_CHANGED, node_id, {"node": node.view()}, now)

    def set_public_key(self, node_id: str, public_key: Key, *, now: float) -> int | None:
        text = public_key.to_base64()
        with self._write() as db:
            row = db.execute("SELECT public_key FROM nodes WHERE id = ?", (node_id,)).fetchone()
            if row is None:
                raise NotFound(f"no node has id {node_id!r}", "id")
            back = self._contact(db, node_id, now)
            if row["public_key"] == text:
                return back
            if db.execute("SELECT 1 FROM nodes WHERE public_key = ?", (text,)).fetchone():
                raise Conflict("another node has this public key", "publicKey")
            db.execute("UPDATE nodes SET public_key = ? WHERE id = ?", (text, node_id))
            node = self._node(db.execute("SELECT * FROM nodes WHERE id = ?", (node_id,)).fetchone())
            return self._log(db, NODE_CHANGED, node_id, {"node": node.view()}, now)

    def report_health(self, node_id: str, report: HealthReport, *, now: float) -> list[int]:
        revisions: list[int] = []
        connections = report.connections
        with self._write() as db:
            if db.execute("SELECT 1 FROM nodes WHERE id = ?", (node_id,)).fetchone() is None:
                raise NotFound(f"no node has id {node_id!r}", "id")
            for i, conn in enumerate(connections):
                if conn.from_node != node_id:
                    raise StoreError(f"a node reports its own connections ({node_id})", f"connections[{i}].from")
                if db.execute("SELECT 1 FROM nodes WHERE id = ?", (conn.to_node,)).fetchone() is None:
                    raise StoreError(f"not a node of this mesh: {conn.to_node!r}", f"connections[{i}].to")
            old = {
                r["to_id"]: r
                for r in db.execute("SELECT * FROM connections WHERE from_id = ?", (node_id,))
            }
            back = self._contact(db, node_id, now)
            window = None if report.interval is None else offline_window(report.interval)
            db.execute("UPDATE nodes SET offline_after = ?, last_report = ? WHERE id = ?", (window, now, node_id))
            if back is not None:
                revisions.append(back)
            db.execute("DELETE FROM connections WHERE from_id = ?", (node_id,))
            for peer in report.peers:
                conn = peer.connection
                db.execute(
                    """INSERT INTO connections (from_id, to_id, status, via_relay, latency_us, reported_at,
                                                last_handshake, rx_bytes, tx_bytes, endpoint)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (node_id, conn.to_node, conn.status.value, int(conn.via_relay), conn.latency_us, now,
                     None if peer.last_handshake is None else peer.last_handshake.timestamp(),
                     peer.rx_bytes, peer.tx_bytes, None if peer.endpoint is None else str(peer.endpoint)),
                )
                before = old.pop(conn.to_node, None)
                if before is None or (before["status"], bool(before["via_relay"])) != (
                    conn.status.value, conn.via_relay
                ):
                    revisions.append(
                        self._log(db, CONNECTION_CHANGED, node_id, {"connection": conn.to_dict()}, now)
                    )
            for to_id in old:
                revisions.append(
                    self._log(db, CONNECTION_REMOVED, node_id, {"connection": {"from": node_id, "to": to_id}}, now)
                )
        return revisions

    def remove_node(self, node_id: str, *, now: float) -> int:
        with self._write() as db:
            row = db.execute("SELECT name FROM nodes WHERE id = ?", (node_id,)).fetchone()
            if row is None:
                raise NotFound(f"no node has id {node_id!r}", "id")
            db.execute("DELETE FROM nodes WHERE id = ?", (node_id,))  # connections cascade
            return self._log(db, NODE_REMOVED, node_id, {"node": {"id": node_id, "name": row["name"]}}, now)

    def connections(self) -> list[MeshConnection]:
        return [connection_of(r) for r in self._read("SELECT * FROM connections ORDER BY from_id, to_id")]

    def connection_health(self) -> list[ConnectionHealth]:
        return [ConnectionHealth.of_row(r) for r in self._read("SELECT * FROM connections ORDER BY from_id, to_id")]

    # --- the change log -----------------------------------------------------------------

    def head(self) -> int:
        return int(self._read("SELECT coalesce(max(revision), 0) FROM changes")[0][0])

    def changes_since(self, revision: int, limit: int = 1000) -> list[Change]:
        rows = self._read(
            "SELECT * FROM changes WHERE revision > ? ORDER BY revision LIMIT ?", (revision, limit)
        )
        return [
            Change(
                revision=r["revision"],
                kind=r["kind"],
                node_id=r["node_id"],
                payload=json.loads(r["payload"]),
                created_at=r["created_at"],
            )
            for r in rows
        ]

    def snapshot(self) -> tuple[int, list[NodeRecord], list[MeshConnection]]:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                return self.head(), self.nodes(), self.connections()
            finally:
                self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()
