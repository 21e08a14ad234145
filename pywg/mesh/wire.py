"""The coordinator's request bodies: strict JSON reading into typed requests.

Every reader raises :class:`~pywg.manage.types.InvalidConfig` whose ``field`` names the
culprit (``"name"``, ``"endpoints[2]"``, ``"connections[0].status"``; ``""`` for the body
itself): unknown or repeated fields, wrong JSON types, bad values. Nothing here touches
the store; a request that passes is well-formed, not yet authorised.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pywg.manage.key import InvalidKey, Key
from pywg.manage.types import Endpoint, InvalidConfig, MeshConnection, parse_time
from pywg.mesh import health
from pywg.mesh.store import NodeRequest

MAX_ENDPOINTS = 16
MAX_CONNECTIONS = 4096
MAX_REGION = 64
MAX_AUTH_KEY = 256
# A node name is a DNS label: lower-case letters, digits and inner hyphens, 1..63.
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def _type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise InvalidConfig("field given more than once", k)
        obj[k] = v
    return obj


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object (UTF-8)."""
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_pairs, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise InvalidConfig("the body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InvalidConfig(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except InvalidConfig as exc:
        # A repeated field inside a nested object is reported by its own name only.
        raise InvalidConfig(exc.reason, exc.field) from None
    except (ValueError, RecursionError) as exc:
        raise InvalidConfig(f"invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidConfig(f"expected a JSON object, got {_type(data)}")
    return data


def _only(data: dict[str, Any], known: tuple[str, ...], path: str = "") -> None:
    for name in data:
        if name not in known:
            where = f"{path}.{name}" if path else name
            raise InvalidConfig(f"unknown field (known: {', '.join(known)})", where)


def _need(data: dict[str, Any], name: str) -> Any:
    if name not in data:
        raise InvalidConfig("missing required field", name)
    return data[name]


def _text(value: object, field: str, limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidConfig(f"expected a string, got {_type(value)}", field)
    if len(value) > limit:
        raise InvalidConfig(f"at most {limit} characters, got {len(value)}", field)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise InvalidConfig("contains a control character", field)
    return value


def read_key(value: object, field: str) -> Key:
    """A 32-byte key in base64 (44 characters), not all zeros."""
    if not isinstance(value, str):
        raise InvalidConfig(f"expected a base64 key string, got {_type(value)}", field)
    if value != value.strip():
        raise InvalidConfig("a key has no surrounding whitespace", field)
    try:
        key = Key.parse(value)
    except InvalidKey as exc:
        raise InvalidConfig(str(exc), field) from None
    if key.is_zero():
        raise InvalidConfig("a public key must not be all zeros", field)
    return key


def read_name(value: object, field: str = "name") -> str:
    if not isinstance(value, str):
        raise InvalidConfig(f"expected a string, got {_type(value)}", field)
    if not _NAME.fullmatch(value):
        raise InvalidConfig(
            "a node name is 1..63 lower-case letters, digits or inner hyphens (a DNS label)", field
        )
    return value


def read_endpoints(value: object, field: str = "endpoints") -> tuple[Endpoint, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidConfig(f"expected an array of \"host:port\" strings, got {_type(value)}", field)
    if len(value) > MAX_ENDPOINTS:
        raise InvalidConfig(f"at most {MAX_ENDPOINTS} endpoint candidates, got {len(value)}", field)
    out: list[Endpoint] = []
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, str):
            raise InvalidConfig(f"expected a \"host:port\" string, got {_type(item)}", where)
        try:
            ep = Endpoint.parse(item)
        except InvalidConfig as exc:
            raise InvalidConfig(exc.reason, where) from None
        if getattr(ep.host, "scope_id", None):
            raise InvalidConfig("an endpoint candidate has no zone", where)
        if ep in out:
            raise InvalidConfig(f"duplicate endpoint (same as {field}[{out.index(ep)}])", where)
        out.append(ep)
    return tuple(out)


@dataclass(frozen=True, repr=False)
class RegisterRequest:
    node: NodeRequest
    auth_key: str | None  # from the body; the Authorization header is the other place

    def __repr__(self) -> str:
        return f"RegisterRequest(name={self.node.name!r})"


REGISTER_FIELDS = ("authKey", "name", "publicKey", "discoKey", "endpoints", "region")


def read_register(data: dict[str, Any]) -> RegisterRequest:
    """POST /api/v1/register."""
    _only(data, REGISTER_FIELDS)
    auth_key = None
    if "authKey" in data:
        auth_key = _text(data["authKey"], "authKey", MAX_AUTH_KEY)
    disco = data.get("discoKey")
    node = NodeRequest(
        name=read_name(_need(data, "name")),
        public_key=read_key(_need(data, "publicKey"), "publicKey"),
        disco_key=None if disco is None else read_key(disco, "discoKey"),
        endpoints=read_endpoints(data.get("endpoints")),
        region=_text(data.get("region", ""), "region", MAX_REGION),
    )
    return RegisterRequest(node=node, auth_key=auth_key)


def read_endpoints_update(data: dict[str, Any]) -> tuple[tuple[Endpoint, ...], str | None]:
    """PUT /api/v1/nodes/{id}/endpoints: ``{"endpoints": ["host:port", ...], "region": "900"}``
    (the node's DERP home region, optional: None leaves it as it is)."""
    _only(data, ("endpoints", "region"))
    region = None if "region" not in data else _text(data["region"], "region", MAX_REGION)
    return read_endpoints(_need(data, "endpoints")), region


def read_disco_key_update(data: dict[str, Any]) -> Key:
    """PUT /api/v1/nodes/{id}/disco-key (a node that registered without one, or made a new
    one): ``{"discoKey": "<base64>"}``."""
    _only(data, ("discoKey",))
    return read_key(_need(data, "discoKey"), "discoKey")


def read_key_update(data: dict[str, Any]) -> Key:
    """PUT /api/v1/nodes/{id}/key (a rotation): ``{"publicKey": "<base64>"}``."""
    _only(data, ("publicKey",))
    return read_key(_need(data, "publicKey"), "publicKey")


HEALTH_FIELDS = ("connections", "interval")
PEER_HEALTH_FIELDS = (*MeshConnection.JSON_FIELDS, "lastHandshake", "rxBytes", "txBytes", "endpoint")
_MAX_COUNTER = 0x7FFF_FFFF_FFFF_FFFF  # what both stores hold (a signed 64-bit integer)


def _counter(value: object, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidConfig(f"expected an integer byte count, got {_type(value)}", field)
    if not 0 <= value <= _MAX_COUNTER:
        raise InvalidConfig(f"expected 0..{_MAX_COUNTER}, got {value}", field)
    return value


def _handshake(value: object, field: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidConfig(f"expected an RFC 3339 time string or null, got {_type(value)}", field)
    try:
        return parse_time(_text(value, field, 64))
    except InvalidConfig as exc:
        raise InvalidConfig(exc.reason, field) from None


def _peer_endpoint(value: object, field: str) -> Endpoint | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidConfig(f"expected a \"host:port\" string or null, got {_type(value)}", field)
    try:
        return Endpoint.parse(value)
    except InvalidConfig as exc:
        raise InvalidConfig(exc.reason, field) from None


def _interval(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidConfig(f"expected a number of seconds, got {_type(value)}", "interval")
    if not health.MIN_INTERVAL_S <= value <= health.MAX_INTERVAL_S:
        raise InvalidConfig(f"expected {health.MIN_INTERVAL_S:g}..{health.MAX_INTERVAL_S:g} seconds, got {value}",
                            "interval")
    return float(value)


def _peer_health(item: object, where: str, node_id: str) -> health.PeerHealth:
    if not isinstance(item, dict):
        raise InvalidConfig(f"expected an object, got {_type(item)}", where)
    _only(item, PEER_HEALTH_FIELDS, where)
    spec = {"from": node_id, **{k: v for k, v in item.items() if k in MeshConnection.JSON_FIELDS}}
    try:
        conn = MeshConnection.from_dict(spec)
    except InvalidConfig as exc:
        raise InvalidConfig(exc.reason, f"{where}.{exc.field}" if exc.field else where) from None
    return health.PeerHealth(
        connection=conn,
        last_handshake=_handshake(item.get("lastHandshake"), f"{where}.lastHandshake"),
        rx_bytes=_counter(item.get("rxBytes"), f"{where}.rxBytes"),
        tx_bytes=_counter(item.get("txBytes"), f"{where}.txBytes"),
        endpoint=_peer_endpoint(item.get("endpoint"), f"{where}.endpoint"),
    )


def read_health(data: dict[str, Any], node_id: str) -> health.HealthReport:
    """POST /api/v1/nodes/{id}/health: ``{"interval": SECONDS, "connections": [...]}``, each
    entry the spec's MeshConnection JSON (``from`` may be left out: it is the node in the
    path) with the peer's ``lastHandshake`` (RFC 3339 or null), ``rxBytes``, ``txBytes`` and
    ``endpoint`` ("host:port" or null). ``interval`` (the agent's report interval) is
    optional. Whether each ``to`` is a node is the store's check (in the report's
    transaction)."""
    _only(data, HEALTH_FIELDS)
    interval = _interval(data.get("interval"))
    items = _need(data, "connections")
    if not isinstance(items, list):
        raise InvalidConfig(f"expected an array, got {_type(items)}", "connections")
    if len(items) > MAX_CONNECTIONS:
        raise InvalidConfig(f"at most {MAX_CONNECTIONS} connections, got {len(items)}", "connections")
    out: list[health.PeerHealth] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        where = f"connections[{i}]"
        peer = _peer_health(item, where, node_id)
        to = peer.connection.to_node
        if to in seen:
            raise InvalidConfig(f"duplicate connection (same as connections[{seen[to]}])", where)
        seen[to] = i
        out.append(peer)
    return health.HealthReport(peers=tuple(out), interval=interval)


def read_since(text: str | None) -> int | None:
    """The ``since`` query parameter: a revision (decimal, >= 0), None when absent."""
    if text is None:
        return None
    if not re.fullmatch(r"[0-9]{1,18}", text):
        raise InvalidConfig("expected a revision: a decimal integer >= 0", "since")
    return int(text)
