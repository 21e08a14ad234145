"""The scale-out store: PostgreSQL through psycopg 3 (see :mod:`pywg.mesh.store`).

Any number of coordinator processes share one database. Every write runs in a
transaction that first takes one transaction-level advisory lock (:data:`WRITE_LOCK`),
the equivalent of SQLite's ``BEGIN IMMEDIATE``: a check (name free? one-off key
unused?) and the write it guards cannot interleave with another process's write, and
since the change log's identity value is taken under the lock and the lock is released
only after commit, revisions become visible in order. A write that logs a change also
``NOTIFY``s :data:`CHANNEL` in its transaction (delivered at commit); NOTIFY is only a
wake-up, watchers catch up from the log by revision (:meth:`PostgresStore.on_change`).

Registrations come in batches (:meth:`PostgresStore.register_many`, group commit): one
transaction, one lock, one NOTIFY for all the registrations a coordinator gathered while the
previous batch ran, each still answered on its own (:mod:`pywg.mesh.batch_register`); the
lock is held for about a dozen round trips per batch instead of per registration.

One connection guarded by a lock serves the calls (the coordinator calls from one
worker thread); a broken connection is reopened at the next call. The listener has its
own connection and thread, reconnecting with backoff. The URL's password never appears
in a repr, a log line or an error (:func:`redact`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import secrets
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pywg.manage.key import Key
from pywg.manage.types import Endpoint, InvalidConfig, MeshConnection
from pywg.mesh import addressing, batch_register, credentials, schema
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

log = logging.getLogger(__name__)

WRITE_LOCK = 0x7077_6D31  # "pwm1": the advisory lock every write transaction takes
CHANNEL = "pywg_changes"
CONNECT_TIMEOUT_S = 5


def redact(url: str) -> str:
    """``url`` with its password (in the authority or a ``password=`` parameter) as ``***``."""
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            if ":" in userinfo:
                userinfo = userinfo.split(":", 1)[0] + ":***"
            netloc = f"{userinfo}@{hostport}"
        query = "&".join(
            f"{k}=***" if k.lower() == "password" else f"{k}={v}" if v or "=" in pair else k
            for pair in parts.query.split("&") if pair
            for k, _, v in [pair.partition("=")]
        )
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "postgresql://***"


def _password(url: str) -> str | None:
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password:
            return urllib.parse.unquote(parts.password)
        for k, v in urllib.parse.parse_qsl(parts.query):
            if k.lower() == "password":
                return v
    except ValueError:
        pass
    return None


def _scrub(text: str, url: str) -> str:
    """An error message from libpq with the password cut out, should it appear."""
    pw = _password(url)
    return text.replace(pw, "***") if pw else text


def _fmt_time(t: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PostgresStore(Store):
    def __init__(
        self,
        url: str,
        *,
        prefix4: ipaddress.IPv4Network | None = None,
        prefix6: ipaddress.IPv6Network | None = None,
        field: str = "--database",
    ) -> None:
        self._url = url
        self._field = field
        self._lock = threading.RLock()
        self._db: psycopg.Connection[dict[str, Any]] | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._listener: threading.Thread | None = None
        self._closing = threading.Event()
        self._in_snapshot = False
        self._connect()
        try:
            self._migrate()
            self._setup_prefixes(prefix4, prefix6)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"PostgresStore({redact(self._url)})"

    # --- plumbing -----------------------------------------------------------------------

    def _open_connection(self) -> psycopg.Connection[dict[str, Any]]:
        try:
            return psycopg.connect(
                self._url, autocommit=True, row_factory=dict_row, connect_timeout=CONNECT_TIMEOUT_S
            )
        except psycopg.Error as exc:
            reason = _scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, self._url)
            raise InvalidConfig(f"cannot connect to {redact(self._url)}: {reason}", self._field) from None

    def _connect(self) -> psycopg.Connection[dict[str, Any]]:
        with self._lock:
            if self._db is None or self._db.closed or self._db.broken:
                if self._db is not None:
                    with contextlib.suppress(Exception):
                        self._db.close()
                    log.warning("the connection to %s was lost; reconnecting", redact(self._url))
                self._db = self._open_connection()
            return self._db

    @contextlib.contextmanager
    def _write(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        """A write transaction holding :data:`WRITE_LOCK`. A connection found lost while
        beginning it (nothing written yet) is reopened once."""
        with self._lock:
            for attempt in range(2):
                db = self._connect()
                stack = contextlib.ExitStack()
                try:
                    stack.enter_context(db.transaction())
                    db.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                    break
                except psycopg.OperationalError as exc:
                    with contextlib.suppress(psycopg.Error):
                        stack.__exit__(type(exc), exc, exc.__traceback__)
                    if attempt or not db.broken:
                        raise
            with stack:
                yield db

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """A read, retried once on a fresh connection if the old one was lost (a write is not:
        its commit may have happened)."""
        with self._lock:
            try:
                return self._connect().execute(sql, args).fetchall()  # type: ignore[arg-type]
            except psycopg.OperationalError:
                if self._db is not None and self._db.broken and not self._in_snapshot:
                    return self._connect().execute(sql, args).fetchall()  # type: ignore[arg-type]
                raise

    @staticmethod
    def _one(db: psycopg.Connection[dict[str, Any]], sql: str, args: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        return db.execute(sql, args).fetchone()

    @staticmethod
    def _log(db: psycopg.Connection[dict[str, Any]], kind: str, node_id: str, payload: dict[str, Any],
             now: float, *, notify: bool = True) -> int:
        row = db.execute(
            "INSERT INTO changes (kind, node_id, payload, created_at) VALUES (%s, %s, %s, %s) RETURNING revision",
            (kind, node_id, json.dumps(payload, separators=(",", ":")), now),
        ).fetchone()
        assert row is not None
        revision = int(row["revision"])
        if notify:
            PostgresStore._notify(db, revision)
        return revision

    @staticmethod
    def _notify(db: psycopg.Connection[dict[str, Any]], revision: int) -> None:
        """Wake every listener at commit (a wake-up only: they read the log)."""
        db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(revision)))

    def _migrate(self) -> None:
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = self._one(db, "SELECT max(version) AS v FROM schema_version")
        current = (row or {}).get("v") or 0
        if current > schema.LATEST:
            raise ConfigMismatch(
                f"the store has schema version {current}, newer than this pywg knows ({schema.LATEST})"
            )
        for migration in schema.migrations("postgresql"):
            if migration.version <= current:
                continue
            with self._write() as db:
                # Another process may have migrated meanwhile: check again under the lock.
                now_at = (self._one(db, "SELECT max(version) AS v FROM schema_version") or {}).get("v") or 0
                if migration.version <= now_at:
                    continue
                for stmt in migration.statements:
                    db.execute(stmt)  # type: ignore[arg-type]  # our own constant SQL
                db.execute("INSERT INTO schema_version (version) VALUES (%s)", (migration.version,))

    def _meta(self, db: psycopg.Connection[dict[str, Any]], key: str) -> str | None:
        row = self._one(db, "SELECT value FROM meta WHERE key = %s", (key,))
        return None if row is None else str(row["value"])

    @staticmethod
    def _set_meta(db: psycopg.Connection[dict[str, Any]], key: str, value: str) -> None:
        db.execute(
            "INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
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
        return int(self._read("SELECT max(version) AS v FROM schema_version")[0]["v"] or 0)

    # --- change notification ------------------------------------------------------------

    def on_change(self, callback: Callable[[], None]) -> bool:
        """Call ``callback`` (from the listener thread) after any process commits a change."""
        with self._lock:
            self._callbacks.append(callback)
            if self._listener is None:
                self._listener = threading.Thread(target=self._listen, name="pywg-pg-listen", daemon=True)
                self._listener.start()
        return True

    def _fire(self) -> None:
        for cb in list(self._callbacks):
            try:
                cb()
            except Exception:  # e.g. the event loop closed: nothing to wake
                log.debug("a change callback failed", exc_info=True)

    def _listen(self) -> None:
        backoff = 0.1
        while not self._closing.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    backoff = 0.1
                    self._fire()  # changes made while not listening: catch up now
                    while not self._closing.is_set():
                        woke = False
                        for _ in conn.notifies(timeout=0.5):
                            woke = True
                            break  # one wake-up reads all changes; drain the rest below
                        if woke:
                            for _ in conn.notifies(timeout=0):
                                pass
                            self._fire()
            except psycopg.Error as exc:
                if self._closing.is_set():
                    return
                log.warning("listening on %s failed (%s); retrying in %.1f s", redact(self._url),
                            _scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else "", self._url),
                            backoff)
                self._closing.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    # --- pre-auth keys ------------------------------------------------------------------

    @staticmethod
    def _key_info(row: dict[str, Any]) -> AuthKeyInfo:
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
            row = self._one(
                db,
                """INSERT INTO auth_keys (id, secret_hash, reusable, created_at, expires_at)
                   VALUES (%s, %s, %s, %s, %s) RETURNING *""",
                (key_id, secret_hash, int(reusable), now, expires_at),
            )
        assert row is not None
        return self._key_info(row), text

    def auth_keys(self) -> list[AuthKeyInfo]:
        return [self._key_info(r) for r in self._read("SELECT * FROM auth_keys ORDER BY seq")]

    def revoke_auth_key(self, key_id: str, *, now: float) -> AuthKeyInfo:
        with self._write() as db:
            row = self._one(
                db, "UPDATE auth_keys SET revoked_at = coalesce(revoked_at, %s) WHERE id = %s RETURNING *",
                (now, key_id),
            )
            if row is None:
                raise NotFound(f"no pre-auth key has id {key_id!r}", "id")
        return self._key_info(row)

    def _use_auth_key(self, db: psycopg.Connection[dict[str, Any]], auth_key: str, now: float) -> str:
        try:
            key_id, presented = credentials.parse_auth_key(auth_key)
        except credentials.BadCredential as exc:
            raise AuthKeyRejected(str(exc), "authKey") from None
        row = self._one(db, "SELECT * FROM auth_keys WHERE id = %s", (key_id,))
        self._check_key(row, key_id, presented, now)
        db.execute("UPDATE auth_keys SET uses = uses + 1, last_used_at = %s WHERE id = %s", (now, key_id))
        return key_id

    def _check_key(self, row: dict[str, Any] | None, key_id: str, presented: str, now: float,
                   used_since: int = 0) -> None:
        """Refuse the key ``row`` (None: no such id) unless it may register now; ``used_since``:
        the uses not yet in the row (earlier calls of the same batch)."""
        if row is None or not credentials.digests_equal(row["secret_hash"], presented):
            raise AuthKeyRejected("unknown pre-auth key", "authKey")
        info = dataclasses.replace(self._key_info(row), uses=row["uses"] + used_since)
        state = info.state(now)
        if state == "revoked":
            raise AuthKeyRejected(f"pre-auth key {key_id} was revoked", "authKey")
        if state == "expired":
            assert info.expires_at is not None
            raise AuthKeyRejected(f"pre-auth key {key_id} expired at {_fmt_time(info.expires_at)}", "authKey")
        if state == "used":
            raise AuthKeyRejected(f"pre-auth key {key_id} is one-off and was already used", "authKey")

    # --- nodes --------------------------------------------------------------------------

    @staticmethod
    def _node(row: dict[str, Any]) -> NodeRecord:
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

    def _node_row(self, db: psycopg.Connection[dict[str, Any]], node_id: str) -> NodeRecord:
        row = self._one(db, "SELECT * FROM nodes WHERE id = %s", (node_id,))
        assert row is not None
        return self._node(row)

    def _allocate_offset(self, db: psycopg.Connection[dict[str, Any]]) -> int:
        """The next offset never used; once they run out, the lowest free one."""
        cap = addressing.capacity(self.prefix4, self.prefix6)
        nxt = int(self._meta(db, "next_offset") or "1")
        if nxt <= cap:
            self._set_meta(db, "next_offset", str(nxt + 1))
            return nxt
        expected = 1
        for row in db.execute("SELECT addr_offset FROM nodes ORDER BY addr_offset"):
            if row["addr_offset"] != expected:
                break
            expected += 1
        if expected > cap:
            raise Exhausted(f"no free address is left in {self.prefix4} / {self.prefix6}", "")
        return expected

    def register(self, request: NodeRequest, auth_key: str, *, now: float) -> Registration:
        result = self.register_many([RegisterCall(request, auth_key, now)])[0]
        if isinstance(result, StoreError):
            raise result
        return result

    def register_many(self, calls: Sequence[RegisterCall]) -> list[Registration | StoreError]:
        """Group commit (see :meth:`Store.register_many`): one write transaction, one NOTIFY.
        The batch is checked in Python against what it reads under the write lock and written
        by one statement per table (:mod:`pywg.mesh.batch_register`); should that meet
        anything it did not foresee (an integrity error, addresses running out), it is rolled
        back to its savepoint and the calls go one by one, each in a savepoint of its own.
        A lone call takes the one-by-one path without savepoints (two round trips fewer)."""
        tokens = [credentials.new_node_token()[0] for _ in calls]
        if len(calls) == 1:
            try:
                with self._write() as db:
                    key_id = self._use_auth_key(db, calls[0].auth_key, calls[0].now)
                    return [self._add_node(db, calls[0].request, "authkey", key_id, tokens[0], calls[0].now)]
            except StoreError as exc:  # rolled back: nothing of it written
                return [exc]
        with self._write() as db:
            try:
                with db.transaction():
                    results = batch_register.register_set(self, db, calls, tokens)
            except (psycopg.IntegrityError, batch_register.NotForeseen):
                results = self._register_each(db, calls, tokens)
            revisions = [r.revision for r in results if isinstance(r, Registration)]
            if revisions:
                self._notify(db, max(revisions))
        return results

    def _register_each(self, db: psycopg.Connection[dict[str, Any]], calls: Sequence[RegisterCall],
                       tokens: list[str]) -> list[Registration | StoreError]:
        results: list[Registration | StoreError] = []
        for call, token in zip(calls, tokens, strict=True):
            try:
                with db.transaction():
                    key_id = self._use_auth_key(db, call.auth_key, call.now)
                    results.append(self._add_node(db, call.request, "authkey", key_id, token, call.now,
                                                  notify=False))
            except StoreError as exc:
                results.append(exc)
        return results

    def _add_node(self, db: Any, request: NodeRequest, kind: str, identity: str, token: str,
                  now: float, *, notify: bool = True) -> Registration:
        token_hash = credentials.digest(token)
        public_key = request.public_key.to_base64()
        if self._one(db, "SELECT 1 FROM nodes WHERE name = %s", (request.name,)):
            raise Conflict(f"a node named {request.name!r} is registered already", "name")
        if self._one(db, "SELECT 1 FROM nodes WHERE public_key = %s", (public_key,)):
            raise Conflict("a node with this public key is registered already", "publicKey")
        offset = self._allocate_offset(db)
        ipv4, ipv6 = addressing.addresses_at(offset, self.prefix4, self.prefix6)
        node_id = secrets.token_hex(8)
        row = self._one(
            db,
            """INSERT INTO nodes (id, name, public_key, disco_key, addr_offset, ipv4, ipv6, endpoints,
               region, identity_kind, identity, token_hash, created_at, last_contact)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING *""",
            (
                node_id, request.name, public_key,
                request.disco_key.to_base64() if request.disco_key else None,
                offset, str(ipv4), str(ipv6), json.dumps([str(e) for e in request.endpoints]),
                request.region, kind, identity, token_hash, now, now,
            ),
        )
        assert row is not None
        node = self._node(row)
        revision = self._log(db, NODE_ADDED, node_id, {"node": node.view()}, now, notify=notify)
        return Registration(node=node, token=token, revision=revision)

    def register_spiffe(self, request: NodeRequest, spiffe_id: str, *, now: float) -> Registration:
        token, _ = credentials.new_node_token()
        with self._write() as db:
            row = db.execute("SELECT * FROM nodes WHERE identity_kind = 'spiffe' AND identity = %s",
                             (spiffe_id,)).fetchone()
            if row is None:
                return self._add_node(db, request, "spiffe", spiffe_id, token, now)
            node_id, public_key = row["id"], request.public_key.to_base64()
            if db.execute("SELECT 1 FROM nodes WHERE name = %s AND id <> %s", (request.name, node_id)).fetchone():
                raise Conflict(f"a node named {request.name!r} is registered already", "name")
            if db.execute("SELECT 1 FROM nodes WHERE public_key = %s AND id <> %s", (public_key, node_id)).fetchone():
                raise Conflict("a node with this public key is registered already", "publicKey")
            db.execute(
                """UPDATE nodes SET name = %s, public_key = %s, disco_key = %s, endpoints = %s, region = %s,
                   token_hash = %s, last_contact = %s, online = 1 WHERE id = %s""",
                (request.name, public_key, request.disco_key.to_base64() if request.disco_key else None,
                 json.dumps([str(e) for e in request.endpoints]), request.region,
                 credentials.digest(token), now, node_id),
            )
            node = self._node_row(db, node_id)
            revision = self._log(db, NODE_CHANGED, node_id, {"node": node.view()}, now)
        return Registration(node=node, token=token, revision=revision)

    def authenticate(self, token: str) -> NodeRecord | None:
        # The lookup is by digest of a 256-bit secret: timing reveals nothing usable.
        rows = self._read("SELECT * FROM nodes WHERE token_hash = %s", (credentials.digest(token),))
        return self._node(rows[0]) if rows else None

    def token_digest(self, node_id: str) -> str | None:
        rows = self._read("SELECT token_hash FROM nodes WHERE id = %s", (node_id,))
        return str(rows[0]["token_hash"]) if rows else None

    def node(self, node_id: str) -> NodeRecord | None:
        rows = self._read("SELECT * FROM nodes WHERE id = %s", (node_id,))
        return self._node(rows[0]) if rows else None

    def nodes(self) -> list[NodeRecord]:
        return [self._node(r) for r in self._read("SELECT * FROM nodes ORDER BY seq")]

    def _contact(self, db: psycopg.Connection[dict[str, Any]], node_id: str, now: float) -> int | None:
        """Record contact (in the caller's transaction); log the node back online if it was not."""
        db.execute("UPDATE nodes SET last_contact = greatest(last_contact, %s) WHERE id = %s", (now, node_id))
        cur = db.execute("UPDATE nodes SET online = 1 WHERE id = %s AND online = 0", (node_id,))
        if cur.rowcount == 0:
            return None
        return self._log(db, NODE_CHANGED, node_id, {"node": self._node_row(db, node_id).view()}, now)

    def touch(self, node_id: str, *, now: float) -> int | None:
        with self._write() as db:
            return self._contact(db, node_id, now)

    def sweep_offline(self, before: float, *, now: float) -> list[int]:
        revisions = []
        with self._write() as db:
            rows = db.execute(
                "SELECT id FROM nodes WHERE online = 1 AND CASE WHEN offline_after IS NULL "
                "THEN last_contact < %s ELSE last_contact + offline_after < %s END ORDER BY seq", (before, now)
            ).fetchall()
            for r in rows:
                node_id = r["id"]
                db.execute("UPDATE nodes SET online = 0 WHERE id = %s", (node_id,))
                revisions.append(
                    self._log(db, NODE_CHANGED, node_id, {"node": self._node_row(db, node_id).view()}, now)
                )
        return revisions

    def set_disco_key(self, node_id: str, disco_key: Key, *, now: float) -> int | None:
        return self._set_node_text(node_id, {"disco_key": disco_key.to_base64()}, now)

    def _set_node_text(self, node_id: str, values: dict[str, str], now: float) -> int | None:
        """Some of a node's own columns (endpoints, region, disco_key) set, a contact, node.changed logged."""
        assert values and set(values) <= {"endpoints", "region", "disco_key"}
        columns = ", ".join(values)
        with self._write() as db:
            row = self._one(db, f"SELECT {columns} FROM nodes WHERE id = %s", (node_id,))
            if row is None:
                raise NotFound(f"no node has id {node_id!r}", "id")
            back = self._contact(db, node_id, now)
            if all(row[column] == text for column, text in values.items()):
                return back
            assignments = ", ".join(f"{column} = %s" for column in values)
            db.execute(f"UPDATE nodes SET {assignments} WHERE id = %s", (*values.values(), node_id))
            return self._log(db, NODE_CHANGED, node_id, {"node": self._node_row(db, node_id).view()}, now)

    def set_public_key(self, node_id: str, public_key: Key, *, now: float) -> int | None:
        text = public_key.to_base64()
        with self._write() as db:
            row = self._one(db, "SELECT public_key FROM nodes WHERE id = %s", (node_id,))
            if row is None:
                raise NotFound(f"no node has id {node_id!r}", "id")
            back = self._contact(db, node_id, now)
            if row["public_key"] == text:
                return back
            if self._one(db, "SELECT 1 FROM nodes WHERE public_key = %s", (text,)):
                raise Conflict("another node has this public key", "publicKey")
            db.execute("UPDATE nodes SET public_key = %s WHERE id = %s", (text, node_id))
            return self._log(db, NODE_CHANGED, node_id, {"node": self._node_row(db, node_id).view()}, now)

    def report_health(self, node_id: str, report: HealthReport, *, now: float) -> list[int]:
        revisions: list[int] = []
        connections = report.connections
        with self._write() as db:
            if self._one(db, "SELECT 1 FROM nodes WHERE id = %s", (node_id,)) is None:
                raise NotFound(f"no node has id {node_id!r}", "id")
            for i, conn in enumerate(connections):
                if conn.from_node != node_id:
                    raise StoreError(f"a node reports its own connections ({node_id})", f"connections[{i}].from")
                if self._one(db, "SELECT 1 FROM nodes WHERE id = %s", (conn.to_node,)) is None:
                    raise StoreError(f"not a node of this mesh: {conn.to_node!r}", f"connections[{i}].to")
            old = {
                r["to_id"]: r
                for r in db.execute("SELECT * FROM connections WHERE from_id = %s", (node_id,)).fetchall()
            }
            back = self._contact(db, node_id, now)
            window = None if report.interval is None else offline_window(report.interval)
            db.execute("UPDATE nodes SET offline_after = %s, last_report = %s WHERE id = %s", (window, now, node_id))
            if back is not None:
                revisions.append(back)
            db.execute("DELETE FROM connections WHERE from_id = %s", (node_id,))
            for peer in report.peers:
                conn = peer.connection
                db.execute(
                    """INSERT INTO connections (from_id, to_id, status, via_relay, latency_us, reported_at,
                                                last_handshake, rx_bytes, tx_bytes, endpoint)
                       VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
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
            row = self._one(db, "SELECT name FROM nodes WHERE id = %s", (node_id,))
            if row is None:
                raise NotFound(f"no node has id {node_id!r}", "id")
            db.execute("DELETE FROM nodes WHERE id = %s", (node_id,))  # connections cascade
            return self._log(db, NODE_REMOVED, node_id, {"node": {"id": node_id, "name": row["name"]}}, now)

    def connections(self) -> list[MeshConnection]:
        return [connection_of(r) for r in self._read("SELECT * FROM connections ORDER BY from_id, to_id")]

    def connection_health(self) -> list[ConnectionHealth]:
        return [ConnectionHealth.of_row(r) for r in self._read("SELECT * FROM connections ORDER BY from_id, to_id")]

    # --- the change log -----------------------------------------------------------------

    def head(self) -> int:
        return int(self._read("SELECT coalesce(max(revision), 0) AS h FROM changes")[0]["h"])

    def changes_since(self, revision: int, limit: int = 1000) -> list[Change]:
        rows = self._read(
            "SELECT * FROM changes WHERE revision > %s ORDER BY revision LIMIT %s", (revision, limit)
        )
        return [
            Change(
                revision=int(r["revision"]),
                kind=r["kind"],
                node_id=r["node_id"],
                payload=json.loads(r["payload"]),
                created_at=r["created_at"],
            )
            for r in rows
        ]

    def snapshot(self) -> tuple[int, list[NodeRecord], list[MeshConnection]]:
        with self._lock:
            db = self._connect()
            with db.transaction():
                db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                self._in_snapshot = True
                try:
                    return self.head(), self.nodes(), self.connections()
                finally:
                    self._in_snapshot = False

    def close(self) -> None:
        self._closing.set()
        if self._listener is not None and self._listener is not threading.current_thread():
            self._listener.join(timeout=2.0)
        with self._lock:
            if self._db is not None:
                self._db.close()
