"""The spec's tunnel-management types as Python dataclasses, with the spec's JSON.

Every type is a frozen, keyword-only dataclass whose attributes are the Go fields in
snake_case; ``to_dict``/``to_json`` write, and ``from_dict``/``from_json`` read, the JSON
a Go program using the spec's structs would exchange, with these encodings:

- keys: base64 as ``wg`` prints them (44 characters);
- ``address``: CIDR text keeping the host bits, as Go prints an interface address
  (``"10.0.0.1/24"``); ``allowedIps``: masked networks (``"10.0.0.0/24"``; host bits given
  on input are masked away, as ``wg`` and Go's ``net.ParseCIDR`` do);
- endpoints: ``"host:port"`` or ``"[v6]:port"`` (``"[fe80::1%eth0]:51820"`` with a zone);
  the host is an IP literal (a ``*net.UDPAddr`` holds no host name), the port 1..65535;
  an IPv4-mapped IPv6 host is written as IPv4, as Go prints it;
- ``persistentKeepalive``: integer seconds (0 = off);
- times: RFC 3339 in UTC as Go's ``time.Time`` writes them (``"2026-11-25T10:00:00Z"``,
  ``"2026-11-25T10:00:00.25Z"``: a fraction only when nonzero, trailing zeros trimmed).
  ``lastHandshake`` is ``null`` when there was none; on input Go's zero time
  ``"0001-01-01T00:00:00Z"`` also means none, any UTC offset is accepted and converted,
  and digits past microseconds (Go keeps nanoseconds) are truncated.

Secrets: ``privateKey`` and ``presharedKey`` are left out of the JSON unless the caller
asks with ``include_secrets=True``; reprs never show them (public keys are shown).

Output is byte-for-byte what Go's ``encoding/json`` writes: ``to_json()`` is
``json.MarshalIndent(v, "", "  ")`` (``indent=None``: ``json.Marshal``), with fields in
the Go structs' order, non-ASCII text as UTF-8, and ``<``, ``>``, ``&``, U+2028, U+2029
escaped as Go escapes them. No trailing newline (Go adds none either).

Parsing is strict. Unknown fields, duplicate fields, wrong JSON types (a float or a
boolean where an integer belongs, ``null`` where the Go type cannot be nil) and invalid
values raise :class:`InvalidConfig`, whose ``field`` is the JSON path of the culprit,
e.g. ``"peers[1].allowedIps[0]"``. Field names match exactly (Go would also match them
case-insensitively; pywg does not). A field left out takes its Go zero value, except the
required ones: ``name`` (interfaces, configs, stats), a peer's ``publicKey``,
``collectedAt``, a node's ``id``, ``publicKey`` and ``internalIp``, and a connection's
``from``, ``to`` and ``status``. Lists may be ``null`` on input (Go's nil slice) and are
written as ``[]``. Constructors validate too, and report the same JSON field names.

Validation: interface names are 1..15 bytes of UTF-8 (IFNAMSIZ), not ``.`` or ``..``,
without ``/``, ``:``, whitespace or control characters (Linux's ``dev_valid_name``);
ports 0..65535 (0 = pick one); ``mtu`` 576..65535, or 0 meaning the backend's default
(1420, as wg-quick); ``fwMark`` 0..2^32-1 (0 = none); ``persistentKeepalive`` 0..65535;
peers' public keys nonzero and unique within an interface. An all-zero preshared key
means none (WireGuard's meaning) and becomes ``None``; an all-zero interface key (Go's
zero value) likewise.

The spec leaves InterfaceConfig, InterfaceStats and MeshConnection open; as Go they are::

    type InterfaceConfig struct {              // what CreateInterface takes
        Name       string          `json:"name"`
        PrivateKey wgtypes.Key     `json:"privateKey"`        // secret, see above
        ListenPort int             `json:"listenPort"`        // 0: random
        FwMark     int             `json:"fwMark,omitempty"`
        Peers      []WireGuardPeer `json:"peers"`
        Address    *net.IPNet      `json:"address"`           // null: assign none
        MTU        int             `json:"mtu"`               // 0: default
    }
    type PeerStats struct {
        PublicKey     wgtypes.Key  `json:"publicKey"`
        Endpoint      *net.UDPAddr `json:"endpoint,omitempty"`
        LastHandshake time.Time    `json:"lastHandshake"`       // null: never
        RxBytes       uint64       `json:"rxBytes"`
        TxBytes       uint64       `json:"txBytes"`
        Handshakes    *uint64      `json:"handshakes,omitempty"` // completed; if counted
        LatencyUs     *int64       `json:"latencyUs,omitempty"`  // microseconds; if measured
    }
    type InterfaceStats struct {
        Name        string      `json:"name"`
        PublicKey   wgtypes.Key `json:"publicKey"`               // null: no key set
        ListenPort  int         `json:"listenPort"`
        CollectedAt time.Time   `json:"collectedAt"`             // when sampled
        Peers       []PeerStats `json:"peers"`
    }
    type MeshConnection struct {               // a link as node `from` reports it
        From      string `json:"from"`         // MeshNode.ID
        To        string `json:"to"`           // MeshNode.ID
        Status    string `json:"status"`       // "connecting" | "connected" | "disconnected"
        ViaRelay  bool   `json:"viaRelay"`     // traffic goes through a DERP relay
        LatencyUs *int64 `json:"latencyUs,omitempty"`
    }

For the spec's own structs: ``WireGuardInterface.address`` is ``null`` when unknown (a
UAPI backend does not know it) and ``publicKey`` is ``null`` when the interface has no
private key yet; when ``private_key`` is given, ``public_key`` is derived from it (and must
match it if given too). ``MeshNode.endpoint`` is a Go string, so an unknown endpoint is
``""``; its ``publicKey`` and ``internalIp`` are a base64 key and a bare IP address. A
topology's node ids, public keys and internal IPs are unique, its connections name
existing, distinct nodes (each ordered pair once), and ``coordinator`` is ``""`` or a
node id.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, ClassVar, Self, TypeAlias, TypeVar

from pywg.manage.key import InvalidKey, Key

__all__ = [
    "MTU_DEFAULT",
    "MTU_MAX",
    "MTU_MIN",
    "ConnectionStatus",
    "Endpoint",
    "IPAddress",
    "IPInterface",
    "IPNetwork",
    "InterfaceConfig",
    "InterfaceStats",
    "InvalidConfig",
    "MeshConnection",
    "MeshNode",
    "MeshTopology",
    "PeerStats",
    "WireGuardInterface",
    "WireGuardPeer",
    "format_time",
    "parse_time",
    "validate_interface_name",
]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface: TypeAlias = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

IFNAMSIZ = 16
MTU_MIN = 576
MTU_MAX = 65535
MTU_DEFAULT = 1420
_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF
_I64 = 0x7FFF_FFFF_FFFF_FFFF
_ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)

_SECRET = {"secret": True}


# --- errors -------------------------------------------------------------------------------


class InvalidConfig(ValueError):
    """Invalid input; ``field`` is the JSON path at fault ("" for the document itself),
    e.g. ``"peers[1].allowedIps[0]"``, and ``reason`` says what is wrong."""

    def __init__(self, reason: str, field: str = "") -> None:
        super().__init__(reason, field)
        self.reason = reason
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}" if self.field else self.reason


def _join(prefix: str, field: str) -> str:
    if not prefix:
        return field
    if not field:
        return prefix
    return prefix + field if field.startswith("[") else f"{prefix}.{field}"


def _rebase(exc: InvalidConfig, prefix: str) -> InvalidConfig:
    return InvalidConfig(exc.reason, _join(prefix, exc.field))


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# --- value checks shared by constructors (paths are relative JSON names) ----------------------


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


def _check_int(value: object, field: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidConfig(f"expected an integer, got {_json_type(value)}", field)
    if not lo <= value <= hi:
        raise InvalidConfig(f"{value} is out of range {lo}..{hi}", field)
    return value


def _check_opt_int(value: object, field: str, lo: int, hi: int) -> int | None:
    return None if value is None else _check_int(value, field, lo, hi)


def _check_bool(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidConfig(f"expected a boolean, got {_json_type(value)}", field)
    return value


def _bad_char(text: str) -> str | None:
    for ch in text:
        code = ord(ch)
        if code < 0x20 or 0x7F <= code < 0xA0:
            return f"control character {ch!r}"
        if 0xD800 <= code < 0xE000:
            return "a lone surrogate"
    return None


def _check_text(value: object, field: str, *, nonempty: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidConfig(f"expected a string, got {_json_type(value)}", field)
    if nonempty and not value:
        raise InvalidConfig("must not be empty", field)
    bad = _bad_char(value)
    if bad:
        raise InvalidConfig(f"contains {bad}", field)
    return value


def validate_interface_name(name: object, field: str = "name") -> str:
    """Return ``name`` if Linux would accept it as an interface name, else raise
    :class:`InvalidConfig` naming ``field``."""
    if not isinstance(name, str):
        raise InvalidConfig(f"expected a string, got {_json_type(name)}", field)
    if not name:
        raise InvalidConfig("an interface name must not be empty", field)
    bad = _bad_char(name)
    if bad:
        raise InvalidConfig(f"an interface name must not contain {bad}", field)
    size = len(name.encode())
    if size >= IFNAMSIZ:
        raise InvalidConfig(f"an interface name is at most {IFNAMSIZ - 1} bytes, got {size}", field)
    if name in (".", ".."):
        raise InvalidConfig(f"{name!r} is not a valid interface name", field)
    for ch in name:
        if ch in "/:" or ch.isspace():
            raise InvalidConfig(f"an interface name must not contain {ch!r}", field)
    return name


def _check_key(value: object, field: str) -> Key:
    if not isinstance(value, Key):
        raise InvalidConfig(f"expected a Key, got {type(value).__name__}", field)
    return value


def _check_peer_key(value: object, field: str) -> Key:
    key = _check_key(value, field)
    if key.is_zero():
        raise InvalidConfig("a peer's public key must not be all zeros", field)
    return key


def _check_opt_key(value: object, field: str) -> Key | None:
    """None, or a Key; the all-zero key (WireGuard's and Go's "none") becomes None."""
    if value is None:
        return None
    key = _check_key(value, field)
    return None if key.is_zero() else key


def _check_type(value: object, types: Any, what: str, field: str) -> Any:
    if not isinstance(value, types):
        raise InvalidConfig(f"expected {what}, got {type(value).__name__}", field)
    return value


def _check_address(value: object, field: str) -> IPInterface | None:
    if value is None:
        return None
    addr = _check_type(
        value, (ipaddress.IPv4Interface, ipaddress.IPv6Interface), "an IPv4Interface or IPv6Interface", field
    )
    if getattr(addr, "scope_id", None):
        raise InvalidConfig("an interface address has no zone", field)
    return addr  # type: ignore[no-any-return]


def _check_network(value: object, field: str) -> IPNetwork:
    net = _check_type(
        value, (ipaddress.IPv4Network, ipaddress.IPv6Network), "an IPv4Network or IPv6Network", field
    )
    if "%" in str(net):
        raise InvalidConfig("an allowed IP range has no zone", field)
    return net  # type: ignore[no-any-return]


def _check_ip(value: object, field: str) -> IPAddress:
    ip = _check_type(
        value, (ipaddress.IPv4Address, ipaddress.IPv6Address), "an IPv4Address or IPv6Address", field
    )
    if getattr(ip, "scope_id", None):
        raise InvalidConfig("an internal IP has no zone", field)
    return ip  # type: ignore[no-any-return]


T = TypeVar("T")


def _check_seq(value: object, field: str, check: Callable[[object, str], T]) -> tuple[T, ...]:
    if not isinstance(value, list | tuple):
        raise InvalidConfig(f"expected a list or tuple, got {type(value).__name__}", field)
    return tuple(check(item, f"{field}[{i}]") for i, item in enumerate(value))


def _check_instance(cls: type[T]) -> Callable[[object, str], T]:
    def check(value: object, field: str) -> T:
        if not isinstance(value, cls):
            raise InvalidConfig(f"expected a {cls.__name__}, got {type(value).__name__}", field)
        return value

    return check


def _check_time(value: object, field: str) -> datetime | None:
    """None, or an aware datetime normalised to UTC; Go's zero time becomes None."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidConfig(f"expected a datetime, got {type(value).__name__}", field)
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidConfig("a datetime must be timezone-aware (UTC)", field)
    try:
        utc = value.astimezone(UTC)
    except OverflowError:
        raise InvalidConfig("the time is out of range in UTC", field) from None
    return None if utc == _ZERO_TIME else utc


def _check_unique_peers(peers: tuple[Any, ...]) -> None:
    seen: dict[bytes, int] = {}
    for i, peer in enumerate(peers):
        raw = bytes(peer.public_key)
        if raw in seen:
            raise InvalidConfig(
                f"duplicate peer public key (same as peers[{seen[raw]}])", f"peers[{i}].publicKey"
            )
        seen[raw] = i


# --- times ---------------------------------------------------------------------------------

_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]{1,9}))?(Z|[+-][0-9]{2}:[0-9]{2})"
)


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC as Go's time.Time.MarshalJSON writes it (RFC3339Nano); ``value``
    must be timezone-aware."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("format_time needs a timezone-aware datetime")
    utc = value.astimezone(UTC)
    text = f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}"
    if utc.microsecond:
        text += "." + f"{utc.microsecond:06d}".rstrip("0")
    return text + "Z"


def parse_time(text: str) -> datetime | None:
    """An RFC 3339 time as an aware UTC datetime; Go's zero time gives None. Digits past
    microseconds are truncated. Raises :class:`InvalidConfig` (field "")."""
    m = _RFC3339.fullmatch(text)
    if not m:
        raise InvalidConfig(f"expected an RFC 3339 time like 2026-11-25T10:00:00Z, got {text!r}")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    micro = int((m.group(7) or "").ljust(9, "0")[:6])
    zone = m.group(8)
    if zone == "Z":
        tz = UTC
    else:
        zh, zm = int(zone[1:3]), int(zone[4:6])
        if zh > 23 or zm > 59:
            raise InvalidConfig(f"invalid UTC offset in {text!r}")
        sign = 1 if zone[0] == "+" else -1
        tz = timezone(sign * timedelta(hours=zh, minutes=zm))
    try:
        value = datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
    except ValueError as exc:
        raise InvalidConfig(f"invalid time {text!r}: {exc}") from None
    return _check_time(value, "")


def _time_or_null(value: datetime | None) -> str | None:
    return None if value is None else format_time(value)


# --- endpoints -----------------------------------------------------------------------------

_PORT = re.compile(r"0|[1-9][0-9]{0,4}")


@dataclass(frozen=True, repr=False)
class Endpoint:
    """A UDP endpoint (Go's ``*net.UDPAddr``): an IP literal and a port 1..65535.
    ``str()`` gives ``"host:port"`` / ``"[v6]:port"``; :meth:`parse` reads that form."""

    host: IPAddress
    port: int

    def __post_init__(self) -> None:
        host = _check_type(self.host, (ipaddress.IPv4Address, ipaddress.IPv6Address), "an IP address", "")
        if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None and not host.scope_id:
            _set(self, "host", host.ipv4_mapped)
        _check_int(self.port, "", 1, _U16)

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """``"192.0.2.1:51820"``, ``"[2001:db8::1]:51820"``, ``"[fe80::1%eth0]:51820"``;
        raises :class:`InvalidConfig` (field "")."""
        if not isinstance(text, str):
            raise InvalidConfig(f"expected a string, got {_json_type(text)}")
        host_text, sep, port_text = text.rpartition(":")
        if not sep or not _PORT.fullmatch(port_text):
            raise InvalidConfig(f"expected host:port or [v6]:port with a decimal port, got {text!r}")
        bracketed = host_text.startswith("[") and host_text.endswith("]")
        if ":" in host_text and not bracketed:
            raise InvalidConfig(f"an IPv6 endpoint is written [v6]:port, got {text!r}")
        host: IPAddress
        try:
            host = ipaddress.IPv6Address(host_text[1:-1]) if bracketed else ipaddress.IPv4Address(host_text)
        except ValueError:
            raise InvalidConfig(f"the host of an endpoint is an IP address, got {host_text!r}") from None
        return cls(host=host, port=int(port_text))

    def __repr__(self) -> str:
        return f"Endpoint({str(self)!r})"

    def __str__(self) -> str:
        if isinstance(self.host, ipaddress.IPv6Address):
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


# --- JSON reading ----------------------------------------------------------------------------


class _JsonObject(dict[str, Any]):
    """A JSON object as read by from_json, remembering duplicated field names."""

    duplicates: list[str]


def _pairs_hook(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject()
    obj.duplicates = []
    for k, v in pairs:
        if k in obj:
            obj.duplicates.append(k)
        obj[k] = v
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_Decoder = Callable[[object, str], Any]


class _Obj:
    """One JSON object being read: checks the shape up front, then hands out fields."""

    def __init__(self, data: object, path: str, fields: tuple[str, ...]) -> None:
        if not isinstance(data, dict):
            raise InvalidConfig(f"expected a JSON object, got {_json_type(data)}", path)
        for name in getattr(data, "duplicates", ()):
            raise InvalidConfig("field given more than once", _join(path, name))
        for name in data:
            if name not in fields:
                if not isinstance(name, str):
                    raise InvalidConfig(f"field names are strings, got {_json_type(name)}", path)
                raise InvalidConfig(f"unknown field (known: {', '.join(fields)})", _join(path, name))
        self.data = data
        self.path = path

    def need(self, name: str, decode: _Decoder) -> Any:
        if name not in self.data:
            raise InvalidConfig("missing required field", _join(self.path, name))
        return decode(self.data[name], _join(self.path, name))

    def get(self, name: str, decode: _Decoder, default: Any) -> Any:
        if name not in self.data:
            return default
        return decode(self.data[name], _join(self.path, name))


def _wrong(expected: str, value: object, path: str) -> InvalidConfig:
    return InvalidConfig(f"expected {expected}, got {_json_type(value)}", path)


def _d_str(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise _wrong("a string", value, path)
    return value


def _d_int(value: object, path: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _wrong("an integer", value, path)
    return value


def _d_bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise _wrong("a boolean", value, path)
    return value


def _nullable(decode: _Decoder) -> _Decoder:
    def d(value: object, path: str) -> Any:
        return None if value is None else decode(value, path)

    return d


def _list(decode: _Decoder) -> Callable[[object, str], tuple[Any, ...]]:
    def d(value: object, path: str) -> tuple[Any, ...]:
        if value is None:  # Go's nil slice
            return ()
        if not isinstance(value, list | tuple):
            raise _wrong("an array", value, path)
        return tuple(decode(item, f"{path}[{i}]") for i, item in enumerate(value))

    return d


def _d_key(value: object, path: str) -> Key:
    if not isinstance(value, str):
        raise _wrong("a base64 key string", value, path)
    if value != value.strip():
        raise InvalidConfig("a key has no surrounding whitespace", path)
    try:
        return Key.parse(value)
    except InvalidKey as exc:
        raise InvalidConfig(str(exc), path) from None


def _split_cidr(value: object, path: str) -> tuple[IPAddress, int]:
    if not isinstance(value, str):
        raise _wrong("a CIDR string", value, path)
    addr_text, sep, plen_text = value.partition("/")
    if not sep or not re.fullmatch(r"0|[1-9][0-9]{0,2}", plen_text) or "%" in addr_text:
        raise InvalidConfig(f"expected CIDR notation like 10.0.0.1/24 or fd00::1/64, got {value!r}", path)
    try:
        addr = ipaddress.ip_address(addr_text)
    except ValueError:
        raise InvalidConfig(f"{addr_text!r} is not an IP address", path) from None
    plen = int(plen_text)
    if plen > addr.max_prefixlen:
        raise InvalidConfig(f"prefix length {plen} is out of range 0..{addr.max_prefixlen}", path)
    return addr, plen


def _d_address(value: object, path: str) -> IPInterface:
    addr, plen = _split_cidr(value, path)
    if isinstance(addr, ipaddress.IPv4Address):
        return ipaddress.IPv4Interface((addr, plen))
    return ipaddress.IPv6Interface((addr, plen))


def _d_network(value: object, path: str) -> IPNetwork:
    addr, plen = _split_cidr(value, path)
    if isinstance(addr, ipaddress.IPv4Address):
        return ipaddress.IPv4Network((addr, plen), strict=False)
    return ipaddress.IPv6Network((addr, plen), strict=False)


def _d_ip(value: object, path: str) -> IPAddress:
    if not isinstance(value, str):
        raise _wrong("an IP address string", value, path)
    if "%" in value:
        raise InvalidConfig(f"an internal IP has no zone, got {value!r}", path)
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise InvalidConfig(f"{value!r} is not an IP address", path) from None


def _d_endpoint(value: object, path: str) -> Endpoint:
    if not isinstance(value, str):
        raise _wrong("an endpoint string", value, path)
    try:
        return Endpoint.parse(value)
    except InvalidConfig as exc:
        raise _rebase(exc, path) from None


def _d_node_endpoint(value: object, path: str) -> Endpoint | None:
    if value == "":
        return None
    return _d_endpoint(value, path)


def _d_time(value: object, path: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _wrong("an RFC 3339 time string or null", value, path)
    try:
        return parse_time(value)
    except InvalidConfig as exc:
        raise _rebase(exc, path) from None


def _d_required_time(value: object, path: str) -> datetime:
    if not isinstance(value, str):
        raise _wrong("an RFC 3339 time string", value, path)
    t = _d_time(value, path)
    if t is None:
        raise InvalidConfig("must not be the zero time", path)
    return t


M = TypeVar("M", bound="_Model")


def _build(cls: type[M], path: str, **kwargs: Any) -> M:
    try:
        return cls(**kwargs)
    except InvalidConfig as exc:
        raise _rebase(exc, path) from None


# --- JSON writing ----------------------------------------------------------------------------

_GO_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def _dumps(data: object, indent: int | None) -> str:
    if indent is None:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    else:
        text = json.dumps(data, ensure_ascii=False, indent=indent, separators=(",", ": "))
    return text.translate(_GO_ESCAPES)


# --- the types -------------------------------------------------------------------------------


class _Model:
    """JSON and repr shared by the types below."""

    def to_dict(self, *, include_secrets: bool = False) -> dict[str, Any]:
        """The JSON object as Python values (str/int/bool/None/list/dict)."""
        raise NotImplementedError

    def to_json(self, *, include_secrets: bool = False, indent: int | None = 2) -> str:
        """JSON as Go's json.MarshalIndent(v, "", "  ") writes it (indent=None:
        json.Marshal). Secrets only with include_secrets=True."""
        return _dumps(self.to_dict(include_secrets=include_secrets), indent)

    @classmethod
    def _from_obj(cls, data: object, path: str) -> Self:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: object) -> Self:
        """Strict reading of a decoded JSON object; raises :class:`InvalidConfig`."""
        return cls._from_obj(data, "")

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        """Strict reading of JSON text; raises :class:`InvalidConfig`."""
        try:
            data = json.loads(text, object_pairs_hook=_pairs_hook, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            raise InvalidConfig(f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        except (ValueError, TypeError, RecursionError) as exc:
            raise InvalidConfig(f"invalid JSON: {exc}") from None
        return cls._from_obj(data, "")

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.metadata.get("secret"):
                shown = "None" if value is None else "<hidden>"
            elif isinstance(value, Key):  # only public keys reach here
                shown = f"Key({value.to_base64()!r})"
            else:
                shown = repr(value)
            parts.append(f"{f.name}={shown}")
        return f"{type(self).__name__}({', '.join(parts)})"


@dataclass(frozen=True, kw_only=True, repr=False)
class WireGuardPeer(_Model):
    """A remote peer. ``preshared_key`` None means none; ``endpoint`` None means unknown;
    ``persistent_keepalive`` is seconds (0 = off); ``last_handshake`` None means never."""

    public_key: Key
    preshared_key: Key | None = field(default=None, metadata=_SECRET)
    endpoint: Endpoint | None = None
    allowed_ips: tuple[IPNetwork, ...] = ()
    persistent_keepalive: int = 0
    last_handshake: datetime | None = None

    JSON_FIELDS: ClassVar[tuple[str, ...]] = (
        "publicKey",
        "presharedKey",
        "endpoint",
        "allowedIps",
        "persistentKeepalive",
        "lastHandshake",
    )

    def __post_init__(self) -> None:
        _check_peer_key(self.public_key, "publicKey")
        _set(self, "preshared_key", _check_opt_key(self.preshared_key, "presharedKey"))
        if self.endpoint is not None:
            _check_type(self.endpoint, Endpoint, "an Endpoint", "endpoint")
        _set(self, "allowed_ips", _check_seq(self.allowed_ips, "allowedIps", _check_network))
        _check_int(self.persistent_keepalive, "persistentKeepalive", 0, _U16)
        _set(self, "last_handshake", _check_time(self.last_handshake, "lastHandshake"))

    def to_dict(self, *, include_secrets: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {"publicKey": self.public_key.to_base64()}
        if include_secrets and self.preshared_key is not None:
            d["presharedKey"] = self.preshared_key.to_base64()
        if self.endpoint is not None:
            d["endpoint"] = str(self.endpoint)
        d["allowedIps"] = [str(net) for net in self.allowed_ips]
        d["persistentKeepalive"] = self.persistent_keepalive
        d["lastHandshake"] = _time_or_null(self.last_handshake)
        return d

    @classmethod
    def _from_obj(cls, data: object, path: str) -> Self:
        o = _Obj(data, path, cls.JSON_FIELDS)
        return _build(
            cls,
            path,
            public_key=o.need("publicKey", _d_key),
            preshared_key=o.get("presharedKey", _nullable(_d_key), None),
            endpoint=o.get("endpoint", _nullable(_d_endpoint), None),
            allowed_ips=o.get("allowedIps", _list(_d_network), ()),
            persistent_keepalive=o.get("persistentKeepalive", _d_int, 0),
            last_handshake=o.get("lastHandshake", _d_time, None),
        )


def _peers(value: object, path: str) -> tuple[WireGuardPeer, ...]:
    return _list(WireGuardPeer._from_obj)(value, path)


@dataclass(frozen=True, kw_only=True, repr=False)
class WireGuardInterface(_Model):
    """A WireGuard interface as the manager reports it. ``public_key`` is derived from
    ``private_key`` when that is given (and must match it if both are); both None when the
    interface has no key. ``address`` None: unknown/none. ``mtu`` 0: the default."""

    name: str
    private_key: Key | None = field(default=None, metadata=_SECRET)
    public_key: Key | None = None
    listen_port: int = 0
    fw_mark: int = 0
    peers: tuple[WireGuardPeer, ...] = ()
    address: IPInterface | None = None
    mtu: int = 0

    JSON_FIELDS: ClassVar[tuple[str, ...]] = (
        "name",
        "privateKey",
        "publicKey",
        "listenPort",
        "fwMark",
        "peers",
        "address",
        "mtu",
    )

    def __post_init__(self) -> None:
        validate_interface_name(self.name)
        private = _check_opt_key(self.private_key, "privateKey")
        public = _check_opt_key(self.public_key, "publicKey")
        if private is not None:
            derived = private.public_key()
            if public is None:
                public = derived
            elif public != derived:
                raise InvalidConfig("does not match privateKey", "publicKey")
        _set(self, "private_key", private)
        _set(self, "public_key", public)
        _check_int(self.listen_port, "listenPort", 0, _U16)
        _check_int(self.fw_mark, "fwMark", 0, _U32)
        _set(self, "peers", _check_seq(self.peers, "peers", _check_instance(WireGuardPeer)))
        _check_unique_peers(self.peers)
        _set(self, "address", _check_address(self.address, "address"))
        _check_mtu(self.mtu)

    def to_dict(self, *, include_secrets: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        if include_secrets and self.private_key is not None:
            d["privateKey"] = self.private_key.to_base64()
        d["publicKey"] = None if self.public_key is None else self.public_key.to_base64()
        d["listenPort"] = self.listen_port
        if self.fw_mark:
            d["fwMark"] = self.fw_mark
        d["peers"] = [p.to_dict(include_secrets=include_secrets) for p in self.peers]
        d["address"] = None if self.address is None else str(self.address)
        d["mtu"] = self.mtu
        return d

    @classmethod
    def _from_obj(cls, data: object, path: str) -> Self:
        o = _Obj(data, path, cls.JSON_FIELDS)
        return _build(
            cls,
            path,
            name=o.need("name", _d_str),
            private_key=o.get("privateKey", _nullable(_d_key), None),
            public_key=o.get("publicKey", _nullable(_d_key), None),
            listen_port=o.get("listenPort", _d_int, 0),
            fw_mark=o.get("fwMark", _d_int, 0),
            peers=o.get("peers", _peers, ()),
            address=o.get("address", _nullable(_d_address), None),
            mtu=o.get("mtu", _d_int, 0),
        )


def _check_mtu(value: object) -> None:
    mtu = _check_int(value, "mtu", 0, MTU_MAX)
    if mtu and mtu < MTU_MIN:
        raise InvalidConfig(f"{mtu} is out of range {MTU_MIN}..{MTU_MAX} (or 0 for the default)", "mtu")


@dataclass(frozen=True, kw_only=True, repr=False)
class InterfaceConfig(_Model):
    """What ``create_interface`` takes. ``private_key`` None means not given (e.g. read
    from JSON written without secrets); ``listen_port`` 0: pick one; ``address`` None:
    assign none; ``mtu`` 0: the default (1420). A peer's ``last_handshake`` is ignored."""

    name: str
    private_key: Key | None = field(default=None, metadata=_SECRET)
    listen_port: int = 0
    fw_mark: int = 0
    peers: tuple[WireGuardPeer, ...] = ()
    address: IPInterface | None = None
    mtu: int = 0

    JSON_FIELDS: ClassVar[tuple[str, ...]] = (
        "name",
        "privateKey",
        "listenPort",
        "fwMark",
        "peers",
        "address",
        "mtu",
    )

    def __post_init__(self) -> None:
        validate_interface_name(self.name)
        _set(self, "private_key", _check_opt_key(self.private_key, "privateKey"))
        _check_int(self.listen_port, "listenPort", 0, _U16)
        _check_int(self.fw_mark, "fwMark", 0, _U32)
        _set(self, "peers", _check_seq(self.peers, "peers", _check_instance(WireGuardPeer)))
        _check_unique_peers(self.peers)
        _set(self, "address", _check_address(self.address, "address"))
        _check_mtu(self.mtu)

    @property
    def public_key(self) -> Key | None:
        """The public key of ``private_key`` (not part of the JSON)."""
        return None if self.private_key is None else self.private_key.public_key()

    def to_dict(self, *, include_secrets: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name}
        if include_secrets and self.private_key is not None:
            d["privateKey"] = self.private_key.to_base64()
        d["listenPort"] = self.listen_port
        if self.fw_mark:
            d["fwMark"] = self.fw_mark
        d["peers"] = [p.to_dict(include_secrets=include_secrets) for p in self.peers]
        d["address"] = None if self.address is None else str(self.address)
        d["mtu"] = self.mtu
        return d

    @classmethod
    def _from_obj(cls, data: object, path: str) -> Self:
        o = _Obj(data, path, cls.JSON_FIELDS)
        return _build(
            cls,
            path,
            name=o.need("name", _d_str),
            private_key=o.get("privateKey", _nullable(_d_key), None),
            listen_port=o.get("listenPort", _d_int, 0),
            fw_mark=o.get("fwMark", _d_int, 0),
            peers=o.get("peers", _peers, ()),
            address=o.get("address", _nullable(_d_address), None),
            mtu=o.get("mtu", _d_int, 0),
        )


@dataclass(frozen=True, kw_only=True, repr=False)
class PeerStats(_Model):
    """One peer's counters. ``handshakes``: completed handshakes since the interface came
    up, None when the backend does not count them (UAPI reports only the latest time);
    ``latency_us``: round-trip latency in microseconds, None when not measured."""

    public_key: Key
    endpoint: Endpoint | None = None
    last_handshake: datetime | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    handshakes: int | None = None
    latency_us: int | None = None

    JSON_FIELDS: ClassVar[tuple[str, ...]] = (
        "publicKey",
        "endpoint",
        "lastHandshake",
        "rxBytes",
        "txBytes",
        "handshakes",
        "latencyUs",
    )

    def __post_init__(self) -> None:
        _check_peer_key(self.public_key, "publicKey")
        if self.endpoint is not None:
            _check_type(self.endpoint, Endpoint, "an Endpoint", "endpoint")
        _set(self, "last_handshake", _check_time(self.last_handshake, "lastHandshake"))
        _check_int(self.rx_bytes, "rxBytes", 0, _U64)
        _check_int(self.tx_bytes, "txBytes", 0, _U64)
        _check_opt_int(self.handshakes, "handshakes", 0, _U64)
        _check_opt_int(self.latency_us, "latencyUs", 0, _I64)

    def to_dict(self, *, include_secrets: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {"publicKey": self.public_key.to_base64()}
        if self.endpoint is not None:
            d["endpoint"] = str(self.endpoint)
        d["lastHandshake"] = _time_or_null(self.last_handshake)
        d["rxBytes"] = self.rx_bytes
        d["txBytes"] = self.tx_bytes
        if self.handshakes is not None:
            d["handshakes"] = self.handshakes
        if self.latency_us is not None:
            d["latencyUs"] = self.latency_us
        return d

    @classmethod
    def _from_obj(cls, data: object, path: str) -> Self:
        o = _Obj(data, path, cls.JSON_FIELDS)
        return _build(
            cls,
            path,
            public_key=o.need("publicKey", _d_key),
            endpoint=o.get("endpoint", _nullable(_d_endpoint), None),
            last_handshake=o.get("lastHandshake", _d_time, None),
            rx_bytes=o.get("rxBytes", _d_int, 0),
            tx_bytes=o.get("txBytes", _d_int, 0),
            handshakes=o.get("handshakes", _nullable(_d_int), None),
            latency_us=o.get("latencyUs", _nullable(_d_int), None),
        )


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, kw_only=True, repr=False)
class InterfaceStats(_Model):
    """An interface's counters at ``collected_at`` (default: now), one PeerStats a peer."""

    name: str
    public_key: Key | None = None
    listen_port: int = 0
    collected_at: datetime = field(default_factory=_now)
    peers: tuple[PeerStats, ...] = ()

    JSON_FIELDS: ClassVar[tuple[str, ...]] = ("name", "publicKey", "listenPort", "collectedAt", "peers")

    def __post_init__(self) -> None:
        validate_interface_name(self.name)
        _set(self, "public_key", _check_opt_key(self.public_key, "publicKey"))
        _check_int(self.listen_port, "listenPort", 0, _U16)
        if self.collected_at is None:
            raise InvalidConfig("expected a datetime, got None", "collectedAt")
        collected = _check_time(self.collected_at, "collectedAt")
        if collected is None:
            raise InvalidConfig("must not be the zero time", "collectedAt")
        _set(self, "collected_at", collected)
        _set(self, "peers", _check_seq(self.peers, "peers", _check_instance(PeerStats)))
        _check_unique_peers(self.peers)

    @property
    def rx_bytes(self) -> int:
        """Bytes received from all peers."""
        return sum(p.rx_bytes for p in self.peers)

    @property
    def tx_bytes(self) -> int:
        """Bytes sent to all peers."""
        return sum(p.tx_bytes for p in self.peers)

    def to_dict(self, *, include_secrets: bool = False) -> dict[str, Any]:
        return {
            "name": self.name,
            "publicKey": None if self.public_key is None else self.public_key.to_base64(),
            "listenPort": self.listen_port,
            "collectedAt": format_time(self.collected_at),
            "peers": [p.to_dict() for p in self.peers],
        }

    @classmethod
    def _from_obj(cls, data: object, path: str) -> Self:
        o = _Obj(data, path, cls.JSON_FIELDS)
        return _build(
            cls,
            path,
            name=o.need("name", _d_str),
            public_key=o.get("publicKey", _nullable(_d_key), None),
            listen_port=o.get("listenPort", _d_int, 0),
            collected_at=o.need("collectedAt", _d_required_time),
            peers=o.get("peers", _list(PeerStats._from_obj), ()),
        )


class ConnectionStatus(enum.StrEnum):
    CONNECTING = "connecting"  # handshake under way, no session yet
    CONNECTED = "connected"  # a session is up and handshakes are fresh
    DISCONNECTED = "disconnected"  # no session (handshakes failing or peer gone)


@dataclass(frozen=True, kw_only=True, repr=False)
class MeshNode(_Model):
    """An agent in the mesh. ``endpoint`` None (JSON ``""``): not known yet."""

    id: str
    public_key: Key
    endpoint: Endpoint | None = None
    internal_ip: IPAddress
    region: str = ""

    JSON_FIELDS: ClassVar[tuple[str, ...]] = ("id", "publicKey", "endpoint", "internalIp", "region")

    def __post_init__(self) -> None:
        _check_text(self.id, "id", nonempty=True)
        _check_peer_key(self.public_key, "publicKey")
        if self.endpoint is not None:
            _check_type(self.endpoint, Endpoint, "an Endpoint", "endpoint")
        _check_ip(self.internal_ip, "internalIp")
        _check_text(self.region, "region")

    def to_dict(self, *, include_secrets: bool = False) -> dict[str, Any]:
        return {
            "id": self.id,
            "publicKey": self.public_key.to_base64(),
            "endpoint": "" if self.endpoint is None else str(self.endpoint),
            "internalIp": str(self.internal_ip),
            "region": self.region,
        }

    @classmethod
    def _from_obj(cls, data: object, path: str) -> Self:
        o = _Obj(data, path, cls.JSON_FIELDS)
        return _build(
            cls,
            path,
            id=o.need("id", _d_str),
            public_key=o.need("publicKey", _d_key),
            endpoint=o.get("endpoint", _d_node_endpoint, None),
            internal_ip=o.need("internalIp", _d_ip),
            region=o.get("region", _d_str, ""),
        )


def _d_status(value: object, path: str) -> ConnectionStatus:
    if not isinstance(value, str):
        raise _wrong("a status string", value, path)
    try:
        return ConnectionStatus(value)
    except ValueError:
        known = ", ".join(s.value for s in ConnectionStatus)
        raise InvalidConfig(f"unknown status {value!r} (known: {known})", path) from None


@dataclass(frozen=True, kw_only=True, repr=False)
class MeshConnection(_Model):
    """The tunnel between two nodes as node ``from_node`` reports it (JSON ``from``/``to``
    hold MeshNode ids). ``via_relay``: traffic goes through a DERP relay instead of
    directly; ``latency_us``: round-trip microseconds, None when not measured."""

    from_node: str
    to_node: str
    status: ConnectionStatus
    via_relay: bool = False
    latency_us: int | None = None

    JSON_FIELDS: ClassVar[tuple[str, ...]] = ("from", "to", "status", "viaRelay", "latencyUs")

    def __post_init__(self) -> None:
        _check_text(self.from_node, "from", nonempty=True)
        _check_text(self.to_node, "to", nonempty=True)
        if self.from_node == self.to_node:
            raise InvalidConfig("a connection joins two different nodes", "to")
        if not isinstance(self.status, ConnectionStatus):
            if isinstance(self.status, str):
                _set(self, "status", _d_status(self.status, "status"))
            else:
                raise InvalidConfig(
                    f"expected a ConnectionStatus, got {type(self.status).__name__}", "status"
                )
        _check_bool(self.via_relay, "viaRelay")
        _check_opt_int(self.latency_us, "latencyUs", 0, _I64)

    def to_dict(self, *, include_secrets: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "from": self.from_node,
            "to": self.to_node,
            "status": self.status.value,
            "viaRelay": self.via_relay,
        }
        if self.latency_us is not None:
            d["latencyUs"] = self.latency_us
        return d

    @classmethod
    def _from_obj(cls, data: object, path: str) -> Self:
        o = _Obj(data, path, cls.JSON_FIELDS)
        return _build(
            cls,
            path,
            from_node=o.need("from", _d_str),
            to_node=o.need("to", _d_str),
            status=o.need("status", _d_status),
            via_relay=o.get("viaRelay", _d_bool, False),
            latency_us=o.get("latencyUs", _nullable(_d_int), None),
        )


def _first(seen: dict[Any, int], value: object, i: int, name: str) -> None:
    if value in seen:
        raise InvalidConfig(f"duplicate {name} (same as nodes[{seen[value]}])", f"nodes[{i}].{name}")
    seen[value] = i


@dataclass(frozen=True, kw_only=True, repr=False)
class MeshTopology(_Model):
    """The mesh: nodes, the connections between them, and the coordinator's node id
    (``""``: none)."""

    nodes: tuple[MeshNode, ...] = ()
    connections: tuple[MeshConnection, ...] = ()
    coordinator: str = ""

    JSON_FIELDS: ClassVar[tuple[str, ...]] = ("nodes", "connections", "coordinator")

    def __post_init__(self) -> None:
        nodes = _check_seq(self.nodes, "nodes", _check_instance(MeshNode))
        conns = _check_seq(self.connections, "connections", _check_instance(MeshConnection))
        _set(self, "nodes", nodes)
        _set(self, "connections", conns)
        _check_text(self.coordinator, "coordinator")
        ids: dict[str, int] = {}
        keys: dict[object, int] = {}
        ips: dict[object, int] = {}
        for i, node in enumerate(nodes):
            _first(ids, node.id, i, "id")
            _first(keys, bytes(node.public_key), i, "publicKey")
            _first(ips, node.internal_ip, i, "internalIp")
        pairs: dict[tuple[str, str], int] = {}
        for i, conn in enumerate(conns):
            for name, node_id in (("from", conn.from_node), ("to", conn.to_node)):
                if node_id not in ids:
                    raise InvalidConfig(f"no node has id {node_id!r}", f"connections[{i}].{name}")
            pair = (conn.from_node, conn.to_node)
            if pair in pairs:
                raise InvalidConfig(
                    f"duplicate connection (same as connections[{pairs[pair]}])", f"connections[{i}]"
                )
            pairs[pair] = i
        if self.coordinator and self.coordinator not in ids:
            raise InvalidConfig(f"no node has id {self.coordinator!r}", "coordinator")

    def node(self, node_id: str) -> MeshNode | None:
        """The node with this id, or None."""
        return next((n for n in self.nodes if n.id == node_id), None)

    def to_dict(self, *, include_secrets: bool = False) -> dict[str, Any]:
        return {
            "nodes": [n.to_dict() for n in self.nodes],
            "connections": [c.to_dict() for c in self.connections],
            "coordinator": self.coordinator,
        }

    @classmethod
    def _from_obj(cls, data: object, path: str) -> Self:
        o = _Obj(data, path, cls.JSON_FIELDS)
        return _build(
            cls,
            path,
            nodes=o.get("nodes", _list(MeshNode._from_obj), ()),
            connections=o.get("connections", _list(MeshConnection._from_obj), ()),
            coordinator=o.get("coordinator", _d_str, ""),
        )
