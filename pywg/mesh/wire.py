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
from typing import Any

from pywg.manage.key import InvalidKey, Key
from pywg.manage.types import Endpoint, InvalidConfig, MeshConnection
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


def read_endpoints_update(data: dict[str, Any]) -> tuple[Endpoint, ...]:
    """PUT /api/v1/nodes/{id}/endpoints: ``{"endpoints": ["host:port", ...]}``."""
    _only(data, ("endpoints",))
    return read_endpoints(_need(data, "endpoints"))


def read_key_update(data: dict[str, Any]) -> Key:
    """PUT /api/v1/nodes/{id}/key (a rotation): ``{"publicKey": "<base64>"}``."""
    _only(data, ("publicKey",))
    return read_key(_need(data, "publicKey"), "publicKey")


def read_health(data: dict[str, Any], node_id: str) -> tuple[MeshConnection, ...]:
    """POST /api/v1/nodes/{id}/health: ``{"connections": [MeshConnection, ...]}``, each as
    the spec's MeshConnection JSON; ``from`` may be left out (it is the node in the path)."""
    _only(data, ("connections",))
    items = _need(data, "connections")
    if not isinstance(items, list):
        raise InvalidConfig(f"expected an array, got {_type(items)}", "connections")
    if len(items) > MAX_CONNECTIONS:
        raise InvalidConfig(f"at most {MAX_CONNECTIONS} connections, got {len(items)}", "connections")
    out: list[MeshConnection] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        where = f"connections[{i}]"
        if isinstance(item, dict) and "from" not in item:
            item = {"from": node_id, **item}
        try:
            conn = MeshConnection.from_dict(item)
        except InvalidConfig as exc:
            raise InvalidConfig(exc.reason, f"{where}.{exc.field}" if exc.field else where) from None
        if conn.to_node in seen:
            raise InvalidConfig(f"duplicate connection (same as connections[{seen[conn.to_node]}])", where)
        seen[conn.to_node] = i
        out.append(conn)
    return tuple(out)


def read_since(text: str | None) -> int | None:
    """The ``since`` query parameter: a revision (decimal, >= 0), None when absent."""
    if text is None:
        return None
    if not re.fullmatch(r"[0-9]{1,18}", text):
        raise InvalidConfig("expected a revision: a decimal integer >= 0", "since")
    return int(text)
