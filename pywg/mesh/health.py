"""Health reports: what an agent tells the coordinator about each peer, and how long the
coordinator waits for the next report before it shows the node offline.

An agent posts a :class:`HealthReport` every ``interval`` seconds (``POST
/api/v1/nodes/{id}/health``, read by :func:`pywg.mesh.wire.read_health`): per peer the
spec's MeshConnection (``to``, ``status``, ``viaRelay``, ``latencyUs``) and the counters
behind it (``lastHandshake``, ``rxBytes``, ``txBytes``, ``endpoint``). The topology keeps
the spec's MeshConnection only; the counters are bookkeeping a store keeps beside it
(:class:`ConnectionHealth`), shown by ``pywg coordinator nodes``.

A node's offline window follows its own interval: :data:`MISSED_REPORTS` reports missed,
within [:data:`MIN_WINDOW_S`, :data:`MAX_WINDOW_S`]. A node that never said its interval
(an older agent) gets the coordinator's ``--offline-after``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from pywg.manage.types import ConnectionStatus, Endpoint, MeshConnection, format_time

MISSED_REPORTS = 3
MIN_INTERVAL_S = 0.5  # what a report may claim; outside: 400
MAX_INTERVAL_S = 3600.0
MIN_WINDOW_S = 3.0
MAX_WINDOW_S = 3 * 3600.0


def offline_window(interval: float) -> float:
    """Seconds without contact after which a node reporting every ``interval`` is offline."""
    return min(max(MISSED_REPORTS * interval, MIN_WINDOW_S), MAX_WINDOW_S)


@dataclass(frozen=True, kw_only=True)
class PeerHealth:
    """One peer as a node reports it: the spec's connection and the counters behind it
    (None: not reported, e.g. by an agent older than these fields)."""

    connection: MeshConnection
    last_handshake: datetime | None = None
    rx_bytes: int | None = None
    tx_bytes: int | None = None
    endpoint: Endpoint | None = None


@dataclass(frozen=True, kw_only=True)
class HealthReport:
    """One health report; ``interval`` None when the agent did not say it."""

    peers: tuple[PeerHealth, ...] = ()
    interval: float | None = None

    @property
    def connections(self) -> tuple[MeshConnection, ...]:
        return tuple(p.connection for p in self.peers)

    @classmethod
    def of(cls, connections: tuple[MeshConnection, ...]) -> HealthReport:
        """A report of connections alone (no counters, no interval)."""
        return cls(peers=tuple(PeerHealth(connection=c) for c in connections))


class Row(Protocol):
    """A database row by column name (sqlite3.Row, psycopg's dict rows)."""

    def __getitem__(self, key: str, /) -> Any: ...


def connection_of(row: Row) -> MeshConnection:
    """The spec's MeshConnection from a ``connections`` row (either store's)."""
    return MeshConnection(
        from_node=row["from_id"],
        to_node=row["to_id"],
        status=ConnectionStatus(row["status"]),
        via_relay=bool(row["via_relay"]),
        latency_us=row["latency_us"],
    )


def _when(t: float | None) -> str | None:
    return None if t is None else format_time(datetime.fromtimestamp(t, UTC))


@dataclass(frozen=True, kw_only=True)
class ConnectionHealth:
    """A connection with its counters as a store keeps them (times in Unix seconds)."""

    connection: MeshConnection
    last_handshake: float | None
    rx_bytes: int | None
    tx_bytes: int | None
    endpoint: str | None
    reported_at: float

    @classmethod
    def of_row(cls, row: Row) -> ConnectionHealth:
        """From a ``connections`` row (either store's)."""
        return cls(connection=connection_of(row), last_handshake=row["last_handshake"], rx_bytes=row["rx_bytes"],
                   tx_bytes=row["tx_bytes"], endpoint=row["endpoint"], reported_at=row["reported_at"])

    def to_dict(self) -> dict[str, Any]:
        """JSON for ``pywg coordinator nodes --json`` (no secrets: there are none here)."""
        return {
            **self.connection.to_dict(),
            "lastHandshake": _when(self.last_handshake),
            "rxBytes": self.rx_bytes,
            "txBytes": self.tx_bytes,
            "endpoint": self.endpoint,
            "reportedAt": _when(self.reported_at),
        }
