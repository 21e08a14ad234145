"""The coordinator store's schema, as versioned migrations.

Each migration is a version number and its SQL statements; a store applies, in one
transaction each, the migrations whose version is above the one it records in
``schema_version``. Migrations are append-only: never edit one that has shipped.
The SQL is the common subset of SQLite and PostgreSQL where it can be (TEXT, INTEGER,
REAL); the dialects differ in ``revision`` (an identity column on PostgreSQL), in
``seq`` (PostgreSQL has no rowid: an identity column keeps insertion order; SQLite's SQL
is unchanged) and in REAL (float4 on PostgreSQL, so DOUBLE PRECISION there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


_V1 = (
    # Key/value settings fixed at creation (mesh prefixes, next address offset).
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # Pre-auth keys: only the SHA-256 of the secret part is kept.
    """CREATE TABLE auth_keys ({seq}
        id TEXT PRIMARY KEY,
        secret_hash TEXT NOT NULL,
        reusable INTEGER NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL,
        revoked_at REAL,
        uses INTEGER NOT NULL DEFAULT 0,
        last_used_at REAL
    )""",
    # Nodes. addr_offset: the host offset of both mesh addresses in their prefixes.
    """CREATE TABLE nodes ({seq}
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        public_key TEXT NOT NULL UNIQUE,
        disco_key TEXT,
        addr_offset INTEGER NOT NULL UNIQUE,
        ipv4 TEXT NOT NULL UNIQUE,
        ipv6 TEXT NOT NULL UNIQUE,
        endpoints TEXT NOT NULL,
        region TEXT NOT NULL,
        identity_kind TEXT NOT NULL,
        identity TEXT NOT NULL,
        token_hash TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        last_contact REAL NOT NULL
    )""",
    # Connections as node from_id last reported them.
    """CREATE TABLE connections (
        from_id TEXT NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
        to_id TEXT NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
        status TEXT NOT NULL,
        via_relay INTEGER NOT NULL,
        latency_us INTEGER,
        reported_at REAL NOT NULL,
        PRIMARY KEY (from_id, to_id)
    )""",
    # The change log: every write appends here in its own transaction.
    """CREATE TABLE changes (
        revision {revision},
        kind TEXT NOT NULL,
        node_id TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at REAL NOT NULL
    )""",
)

_V2 = (
    # 0 once the node missed its contact window (see Store.sweep_offline); back to 1 on contact.
    "ALTER TABLE nodes ADD COLUMN online INTEGER NOT NULL DEFAULT 1",
)

_V3 = (
    # Health reports (see pywg.mesh.health): the node's own offline window (NULL: the
    # coordinator's default) and its last report; per connection the counters behind it.
    "ALTER TABLE nodes ADD COLUMN offline_after REAL",
    "ALTER TABLE nodes ADD COLUMN last_report REAL",
    "ALTER TABLE connections ADD COLUMN last_handshake REAL",
    "ALTER TABLE connections ADD COLUMN rx_bytes BIGINT",
    "ALTER TABLE connections ADD COLUMN tx_bytes BIGINT",
    "ALTER TABLE connections ADD COLUMN endpoint TEXT",
)

_REVISION = {
    "sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT",
    "postgresql": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
}

_SEQ = {
    "sqlite": "",
    "postgresql": "\n        seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,",
}

_MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "meta, auth_keys, nodes, connections, changes", _V1),
    (2, "nodes.online", _V2),
    (3, "health: nodes.offline_after, nodes.last_report, connection counters", _V3),
)

LATEST = _MIGRATIONS[-1][0]


def migrations(dialect: str) -> list[Migration]:
    """The migrations in order, with the SQL for ``dialect`` ("sqlite" or "postgresql")."""
    revision, seq = _REVISION[dialect], _SEQ[dialect]

    def dialected(stmt: str) -> str:
        stmt = stmt.replace("{revision}", revision).replace("{seq}", seq)
        return re.sub(r"\bREAL\b", "DOUBLE PRECISION", stmt) if dialect == "postgresql" else stmt

    return [
        Migration(version, description, tuple(dialected(s) for s in stmts))
        for version, description, stmts in _MIGRATIONS
    ]
