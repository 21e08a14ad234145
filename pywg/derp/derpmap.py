"""The DERP map: regions of relay nodes, in Tailscale's DERPMap JSON shape.

Keys are Go's field names and are matched case-insensitively, as Go decodes them; unknown
keys are ignored. A map is configuration, so every fault is a ``DerpMapError`` naming the
field by its path (``Regions.900.Nodes[0].HostName``) and nothing is half-built.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

MAX_REGION_ID = 2**53 - 1
USER_REGION_IDS = range(900, 1000)  # reserved for user-run DERPs
DEFAULT_DERP_PORT = 443
DEFAULT_STUN_PORT = 3478


class DerpMapError(ValueError):
    """A DERP map that cannot be used; ``field`` is the path of the fault."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


@dataclass(frozen=True, slots=True)
class DerpNode:
    name: str
    region_id: int
    host_name: str
    cert_name: str = ""
    ipv4: str = ""
    ipv6: str = ""
    stun_port: int = 0  # 0 means 3478, -1 disables STUN
    stun_only: bool = False
    derp_port: int = 0  # 0 means 443
    insecure_for_tests: bool = False
    stun_test_ip: str = ""
    can_port80: bool = False

    @property
    def port(self) -> int:
        """The TCP port to dial for DERP."""
        return self.derp_port or DEFAULT_DERP_PORT

    @property
    def stun(self) -> int | None:
        """The STUN UDP port, or None when this node runs no STUN."""
        return None if self.stun_port < 0 else (self.stun_port or DEFAULT_STUN_PORT)

    def dial_addresses(self) -> list[str]:
        """What to dial, IPv6 first: literal IPs when set, else the host name (for DNS). A
        non-IP value such as "none" turns that family off."""
        literal = [ip for ip in (self.ipv6, self.ipv4) if ip and _is_ip(ip)]
        if literal:
            return literal
        if (self.ipv4 and not _is_ip(self.ipv4)) and (self.ipv6 and not _is_ip(self.ipv6)):
            return []
        return [self.host_name]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Name": self.name, "RegionID": self.region_id, "HostName": self.host_name}
        for key, value in (("CertName", self.cert_name), ("IPv4", self.ipv4), ("IPv6", self.ipv6),
                           ("STUNPort", self.stun_port), ("STUNOnly", self.stun_only),
                           ("DERPPort", self.derp_port), ("InsecureForTests", self.insecure_for_tests),
                           ("STUNTestIP", self.stun_test_ip), ("CanPort80", self.can_port80)):
            if value:
                out[key] = value
        return out


@dataclass(frozen=True, slots=True)
class DerpRegion:
    region_id: int
    region_code: str
    region_name: str = ""
    nodes: tuple[DerpNode, ...] = ()
    latitude: float = 0.0
    longitude: float = 0.0
    avoid: bool = False
    no_measure_no_home: bool = False

    @property
    def derp_nodes(self) -> tuple[DerpNode, ...]:
        """The nodes that relay (not STUN-only), in priority order."""
        return tuple(node for node in self.nodes if not node.stun_only)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"RegionID": self.region_id, "RegionCode": self.region_code,
                               "RegionName": self.region_name, "Nodes": [n.to_json() for n in self.nodes]}
        for key, value in (("Latitude", self.latitude), ("Longitude", self.longitude), ("Avoid", self.avoid),
                           ("NoMeasureNoHome", self.no_measure_no_home)):
            if value:
                out[key] = value
        return out


@dataclass(frozen=True, slots=True)
class DerpMap:
    regions: dict[int, DerpRegion] = field(default_factory=dict)
    omit_default_regions: bool = False
    region_score: dict[int, float] | None = None  # HomeParams.RegionScore; None: unchanged

    def node(self, name: str) -> DerpNode | None:
        for region in self.regions.values():
            for node in region.nodes:
                if node.name == name:
                    return node
        return None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Regions": {str(rid): r.to_json() for rid, r in sorted(self.regions.items())}}
        if self.region_score is not None:
            out["HomeParams"] = {"RegionScore": {str(k): v for k, v in sorted(self.region_score.items())}}
        if self.omit_default_regions:
            out["omitDefaultRegions"] = True
        return out


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class _Fields:
    """One JSON object, read case-insensitively with typed getters that name the field."""

    def __init__(self, value: object, path: str) -> None:
        if not isinstance(value, dict):
            raise DerpMapError(path or "(map)", "must be a JSON object")
        self.path = path
        self.values = {str(k).lower(): v for k, v in value.items()}

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, *,
            required: bool = False) -> Any:
        value = self.values.get(key.lower())
        if value is None:
            if required:
                raise DerpMapError(self.name(key), "required")
            return default
        # JSON true/false must not pass for a number, nor a number for a bool.
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            expected = kind.__name__ if isinstance(kind, type) else "number"
            raise DerpMapError(self.name(key), f"must be a {expected}, got {json.dumps(value)[:40]}")
        return value

    def integer(self, key: str, low: int, high: int, default: int = 0, *, required: bool = False) -> int:
        value = self.get(key, int, default, required=required)
        if not low <= value <= high:
            raise DerpMapError(self.name(key), f"must be in {low}..{high}, got {value}")
        return int(value)


def _node(value: object, path: str, region_id: int) -> DerpNode:
    fields = _Fields(value, path)
    name = fields.get("Name", str, required=True)
    if not name:
        raise DerpMapError(fields.name("Name"), "must not be empty")
    node_region = fields.integer("RegionID", 0, MAX_REGION_ID, region_id)
    if node_region != region_id:
        raise DerpMapError(fields.name("RegionID"), f"{node_region} is not the region's {region_id}")
    host = fields.get("HostName", str, required=True)
    if not host:
        raise DerpMapError(fields.name("HostName"), "must not be empty")
    for key, family in (("IPv4", 4), ("IPv6", 6)):
        text = fields.get(key, str, "")
        if text and _is_ip(text) and ipaddress.ip_address(text).version != family:
            raise DerpMapError(fields.name(key), f"{text} is not an IPv{family} address")
    return DerpNode(
        name=name, region_id=region_id, host_name=host, cert_name=fields.get("CertName", str, ""),
        ipv4=fields.get("IPv4", str, ""), ipv6=fields.get("IPv6", str, ""),
        stun_port=fields.integer("STUNPort", -1, 65535), stun_only=fields.get("STUNOnly", bool, False),
        derp_port=fields.integer("DERPPort", 0, 65535),
        insecure_for_tests=fields.get("InsecureForTests", bool, False),
        stun_test_ip=fields.get("STUNTestIP", str, ""), can_port80=fields.get("CanPort80", bool, False))


def _region(value: object, path: str, key_id: int) -> DerpRegion:
    fields = _Fields(value, path)
    region_id = fields.integer("RegionID", 1, MAX_REGION_ID, required=True)
    if region_id != key_id:
        raise DerpMapError(fields.name("RegionID"), f"{region_id} is not the key it is listed under")
    nodes_value = fields.get("Nodes", list, [])
    nodes = tuple(_node(v, f"{fields.name('Nodes')}[{i}]", region_id) for i, v in enumerate(nodes_value))
    number = (int, float)
    return DerpRegion(
        region_id=region_id, region_code=fields.get("RegionCode", str, ""),
        region_name=fields.get("RegionName", str, ""), nodes=nodes,
        latitude=float(fields.get("Latitude", number, 0.0)),
        longitude=float(fields.get("Longitude", number, 0.0)),
        avoid=fields.get("Avoid", bool, False), no_measure_no_home=fields.get("NoMeasureNoHome", bool, False))


def _region_key(text: str, path: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_REGION_ID:
        raise DerpMapError(path, "a region key must be its RegionID as a decimal string")
    return int(text)


def parse_derp_map(source: str | bytes | dict[str, Any]) -> DerpMap:
    """A DERPMap from its JSON text (or the decoded object); DerpMapError naming the field."""
    if isinstance(source, str | bytes):
        try:
            source = json.loads(source)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise DerpMapError("(map)", f"not JSON: {exc}") from None
    top = _Fields(source, "")
    regions_value = top.get("Regions", dict, {})
    regions: dict[int, DerpRegion] = {}
    for key, value in regions_value.items():
        path = f"Regions.{key}"
        region_id = _region_key(str(key), path)
        regions[region_id] = _region(value, path, region_id)
    seen: dict[str, str] = {}
    for region in regions.values():
        for i, node in enumerate(region.nodes):
            path = f"Regions.{region.region_id}.Nodes[{i}].Name"
            if node.name in seen:
                raise DerpMapError(path, f"{node.name!r} is also {seen[node.name]}")
            seen[node.name] = path
    score = None
    home = top.get("HomeParams", dict)
    if home is not None:
        params = _Fields(home, "HomeParams")
        raw_scores = params.get("RegionScore", dict)
        if raw_scores is not None:
            score = {}
            for key, value in raw_scores.items():
                path = f"HomeParams.RegionScore.{key}"
                region_id = _region_key(str(key), path)
                if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                    raise DerpMapError(path, "must be a positive number")
                score[region_id] = float(value)
    return DerpMap(regions, top.get("omitDefaultRegions", bool, False), score)
