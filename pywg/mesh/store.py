"""The coordinator's state, behind one small interface (:class:`Store`).

What a store keeps: nodes (name, WireGuard and disco public keys, mesh IPv4 and IPv6
addresses, endpoint candidates, last contact, identity), pre-auth keys (hashed), the
connections nodes report, and the change log. Every write to the topology (a node
added, changed or removed; a reported connection changed) appends a :class:`Change` in
the same transaction, numbered by a growing ``revision``, so "the changes since R" is
one query and replicas sharing a database need no leader: each catches up from the log.
A node's last contact is bookkeeping, not topology, and is not logged; a node going
offline (no contact within a window, see :meth:`Store.sweep_offline`) or coming back is
logged as node.changed with ``online`` false or true.

An implementation must make revisions visible in order: a reader that sees revision R
sees every revision below R too (SQLite has one writer at a time; a PostgreSQL store must
serialise its appends, e.g. with a transaction-level advisory lock, since identity
values are taken before commit and transactions may commit out of order).

Every method is synchronous and thread-safe; times are Unix seconds passed in as
``now`` (tests use a fake clock). Errors are :class:`StoreError` subclasses naming the
request field at fault. ``open_store("sqlite:PATH")`` opens the embedded backend
(:mod:`pywg.mesh.sqlite_store`), ``open_store("postgresql://...")`` the shared one
(:mod:`pywg.mesh.postgres_store`).
"""

from __future__ import annotations

import abc
import ipaddress
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pywg.manage.key import Key
from pywg.manage.types import Endpoint, InvalidConfig, MeshConnection, MeshNode, MeshTopology
from pywg.mesh.health import ConnectionHealth, HealthReport

NODE_ADDED = "node.added"
NODE_CHANGED = "node.changed"
NODE_REMOVED = "node.removed"
CONNECTION_CHANGED = "connection.changed"
CONNECTION_REMOVED = "connection.removed"


# --- errors -----------------------------------------------------------------------------


class StoreError(Exception):
    """A request the store refuses; ``field`` names the request field at fault."""

    status = 400

    def __init__(self, reason: str, field: str = "") -> None:
        super().__init__(reason, field)
        self.reason = reason
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}" if self.field else self.reason


class AuthKeyRejected(StoreError):
    """Unknown, expired, revoked or already used (one-off) pre-auth key."""

    status = 401


class Conflict(StoreError):
    """A duplicate name or public key."""

    status = 409


class NotFound(StoreError):
    status = 404


class Exhausted(StoreError):
    """No free mesh address is left in the prefixes."""

    status = 507


class ConfigMismatch(StoreError):
    """The store was set up with other settings (e.g. prefixes) than the ones given."""


# --- records ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class NodeRequest:
    """What a registering node asks for (validated already: see :mod:`pywg.mesh.wire`)."""

    name: str
    public_key: Key
    disco_key: Key | None = None
    endpoints: tuple[Endpoint, ...] = ()
    region: str = ""


@dataclass(frozen=True, kw_only=True)
class NodeRecord:
    """A registered node as the store keeps it (its token only as a digest, not here)."""

    id: str
    name: str
    public_key: Key
    disco_key: Key | None
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address
    endpoints: tuple[Endpoint, ...]
    region: str
    identity_kind: str  # "authkey" (identity: the key id) or "spiffe" (the SPIFFE ID)
    identity: str
    created_at: float
    last_contact: float
    online: bool = True  # False once the node missed its contact window
    offline_after: float | None = None  # its own window (from its report interval); None: the default
    last_report: float | None = None  # its last health report


    def view(self) -> dict[str, Any]:
        """The node as other nodes see it (JSON; no secrets, no bookkeeping)."""
        return {
            "id": self.id,
            "name": self.name,
            "publicKey": self.public_key.to_base64(),
            "discoKey": None if self.disco_key is None else self.disco_key.to_base64(),
            "internalIp": str(self.ipv4),
            "internalIpv6": str(self.ipv6),
            "endpoints": [str(e) for e in self.endpoints],
            "region": self.region,
            "online": self.online,
        }

    def mesh_node(self) -> MeshNode:
        """The spec's MeshNode: its endpoint is the first candidate, ``""`` when none."""
        return MeshNode(
            id=self.id,
            public_key=self.public_key,
            endpoint=self.endpoints[0] if self.endpoints else None,
            internal_ip=self.ipv4,
            region=self.region,
        )


@dataclass(frozen=True, kw_only=True)
class AuthKeyInfo:
    """A pre-auth key without its secret."""

    id: str
    reusable: bool
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    uses: int
    last_used_at: float | None

    def state(self, now: float) -> str:
        """"valid", "revoked", "expired" or "used" (a one-off key that was used)."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        if not self.reusable and self.uses > 0:
            return "used"
        return "valid"


@dataclass(frozen=True, kw_only=True)
class Change:
    """One entry of the change log."""

    revision: int
    kind: str
    node_id: str
    payload: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"revision": self.revision, "kind": self.kind, "nodeId": self.node_id, **self.payload}


@dataclass(frozen=True)
class RegisterCall:
    """One pre-auth-key registration waiting in a batch (see :meth:`Store.register_many`)."""

    request: NodeRequest
    auth_key: str = field(repr=False)  # a secret: never in a repr
    now: float


@dataclass(frozen=True, kw_only=True)
class Registration:
    node: NodeRecord
    token: str  # the node's bearer token: shown once, stored as a digest
    revision: int

    def __repr__(self) -> str:
        return f"Registration(node={self.node.id!r}, revision={self.revision})"


# --- the interface --------------------------------------------------------------------------


class Store(abc.ABC):
    """The coordinator's state. Implementations: SQLite (embedded), PostgreSQL (replicas)."""

    prefix4: ipaddress.IPv4Network
    prefix6: ipaddress.IPv6Network

    @abc.abstractmethod
    def schema_version(self) -> int:
        """The version of the last migration applied."""

    # pre-auth keys
    @abc.abstractmethod
    def create_auth_key(
        self, *, reusable: bool, expires_at: float | None, now: float
    ) -> tuple[AuthKeyInfo, str]:
        """A new pre-auth key: its record and the key text (shown once; kept hashed)."""

    @abc.abstractmethod
    def auth_keys(self) -> list[AuthKeyInfo]:
        """All pre-auth keys, oldest first."""

    @abc.abstractmethod
    def revoke_auth_key(self, key_id: str, *, now: float) -> AuthKeyInfo:
        """Revoke a key (nodes it registered stay); NotFound if there is none."""

    # nodes
    @abc.abstractmethod
    def register(self, request: NodeRequest, auth_key: str, *, now: float) -> Registration:
        """Check and use the pre-auth key, allocate addresses, add the node, log it: all in
        one transaction. Raises AuthKeyRejected, Conflict or Exhausted."""

    def register_many(self, calls: Sequence[RegisterCall]) -> list[Registration | StoreError]:
        """Each call as :meth:`register` would do it, in order, as if one after the other: a
        refused call gets its own StoreError in its place (nothing of it written) and does not
        stop the others, later calls see earlier ones (a one-off key, a name). A store may do
        them in one transaction (group commit: one commit, one wake-up for the batch); both
        stores here do. Any other error (the database is gone) fails the whole batch, with
        nothing of it written."""
        results: list[Registration | StoreError] = []
        for call in calls:
            try:
                results.append(self.register(call.request, call.auth_key, now=call.now))
            except StoreError as exc:
                results.append(exc)
        return results

    @abc.abstractmethod
    def register_spiffe(self, request: NodeRequest, spiffe_id: str, *, now: float) -> Registration:
        """Register the node whose identity is ``spiffe_id`` (a validated X.509-SVID's): the
        first time as :meth:`register` does; again (a renewed SVID, a lost node token) the same
        node, id and addresses kept, with this request's keys, endpoints and a new token
        (logged as node.changed). One transaction; raises Conflict or Exhausted."""

    @abc.abstractmethod
    def authenticate(self, token: str) -> NodeRecord | None:
        """The node whose bearer token this is, or None."""

    @abc.abstractmethod
    def token_digest(self, node_id: str) -> str | None:
        """The stored digest of the node's bearer token (hex SHA-256), or None: what the NAT
        observer derives the node's request key from (pywg.mesh.nat_observer)."""

    @abc.abstractmethod
    def node(self, node_id: str) -> NodeRecord | None:
        """The node with this id, or None."""

    @abc.abstractmethod
    def nodes(self) -> list[NodeRecord]:
        """All nodes, oldest first."""

    @abc.abstractmethod
    def touch(self, node_id: str, *, now: float) -> int | None:
        """Record contact from a node; the revision if it was offline and is back, else None."""

    @abc.abstractmethod
    def sweep_offline(self, before: float, *, now: float) -> list[int]:
        """Mark offline the online nodes whose last contact is before ``before`` (a node with its
        own window, ``offline_after``: older than ``now`` minus it); the revisions."""

    def set_endpoints(self, node_id: str, endpoints: tuple[Endpoint, ...], *, now: float,
                      region: str | None = None) -> int | None:
        """Replace a node's endpoint candidates and, unless None, its (DERP home) region (a
        contact too); the last revision logged, None if nothing changed."""
        values = {"endpoints": json.dumps([str(e) for e in endpoints])}
        if region is not None:
            values["region"] = region
        return self._set_node_text(node_id, values, now)

    @abc.abstractmethod
    def _set_node_text(self, node_id: str, values: dict[str, str], now: float) -> int | None:
        """Some of a node's own columns (endpoints, region, disco_key) set, a contact,
        node.changed logged (None: nothing changed)."""

    @abc.abstractmethod
    def set_disco_key(self, node_id: str, disco_key: Key, *, now: float) -> int | None:
        """A node's new disco public key (it registered without one, or made a new one; a
        contact too), logged as node.changed; None if it has that key already. NotFound when
        there is no such node."""

    @abc.abstractmethod
    def set_public_key(self, node_id: str, public_key: Key, *, now: float) -> int | None:
        """A node's new WireGuard public key (a rotation; a contact too), logged as
        node.changed in one transaction; None if it has that key already. Conflict when
        another node has it, NotFound when there is no such node."""

    def report_connections(
        self, node_id: str, connections: tuple[MeshConnection, ...], *, now: float
    ) -> list[int]:
        """:meth:`report_health` with the connections alone (no counters, no interval)."""
        return self.report_health(node_id, HealthReport.of(connections), now=now)

    @abc.abstractmethod
    def report_health(self, node_id: str, report: HealthReport, *, now: float) -> list[int]:
        """Replace the connections ``node_id`` reports (all ``from`` it, each ``to`` a node:
        else StoreError naming ``connections[i].from``/``.to``) with their counters, set the
        node's offline window from the report's interval (None: the default) and its last
        report, record contact: one transaction. The revisions logged for connections whose
        status or relay use changed, appeared or went (counters are not logged)."""

    @abc.abstractmethod
    def remove_node(self, node_id: str, *, now: float) -> int:
        """Remove a node, its token and its connections; the revision. NotFound if none."""

    @abc.abstractmethod
    def connections(self) -> list[MeshConnection]:
        """Every reported connection."""

    @abc.abstractmethod
    def connection_health(self) -> list[ConnectionHealth]:
        """Every reported connection with its counters, by ``from`` then ``to``."""

    # the change log
    @abc.abstractmethod
    def head(self) -> int:
        """The latest revision (0: none yet)."""

    @abc.abstractmethod
    def changes_since(self, revision: int, limit: int = 1000) -> list[Change]:
        """Changes with a revision above ``revision``, in order, at most ``limit``."""

    @abc.abstractmethod
    def snapshot(self) -> tuple[int, list[NodeRecord], list[MeshConnection]]:
        """The head revision with the nodes and connections as of it (one read transaction)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection."""

    def on_change(self, callback: Callable[[], None]) -> bool:
        """Call ``callback`` (from any thread) when another process commits a change; False
        if this store cannot tell (then readers poll ``head``). A wake-up only: read the log."""
        return False

    def topology(self, coordinator: str = "") -> MeshTopology:
        """The spec's MeshTopology of the whole mesh."""
        return MeshTopology(
            nodes=tuple(n.mesh_node() for n in self.nodes()),
            connections=tuple(self.connections()),
            coordinator=coordinator,
        )


def open_store(
    url: str,
    *,
    prefix4: ipaddress.IPv4Network | None = None,
    prefix6: ipaddress.IPv6Network | None = None,
    field: str = "--store",
) -> Store:
    """Open ``sqlite:PATH`` or ``postgresql://...``; raises InvalidConfig naming ``field`` for
    another form or an unreachable server (a URL's password is never in the message)."""
    if url.startswith("sqlite:"):
        path = url[len("sqlite:"):]
        if not path:
            raise InvalidConfig("sqlite: needs a file path, e.g. sqlite:/var/lib/pywg/coordinator.db", field)
        from pywg.mesh.sqlite_store import SqliteStore

        return SqliteStore(path, prefix4=prefix4, prefix6=prefix6)
    if url.startswith(("postgresql:", "postgres:")):
        try:
            from pywg.mesh.postgres_store import PostgresStore
        except ImportError:
            raise InvalidConfig("the PostgreSQL store needs psycopg 3: pip install 'psycopg[binary]'", field) from None
        return PostgresStore(url, prefix4=prefix4, prefix6=prefix6, field=field)
    raise InvalidConfig(
        "expected sqlite:PATH (a file path after \"sqlite:\") or postgresql://USER@HOST:PORT/DB", field
    )
