"""The cross-platform WireGuard configuration protocol (UAPI), sans I/O.

This is the text protocol that ``wg(8)`` speaks to a userspace implementation over
``/var/run/wireguard/IFNAME.sock`` (https://www.wireguard.com/xplatform/), written from a
reading of wireguard-go's ``device/uapi.go`` and ``ipc/uapi_unix.go`` and checked against
the installed wireguard-go (tests/test_uapi_wireguard_go.py). Nothing here touches a
socket, a clock or the device: bytes and lines in, typed values and text out.

Wire format::

    get=1\\n\\n                 ->  key=value lines ... errno=0\\n\\n
    set=1\\nkey=value\\n ... \\n   ->  errno=0\\n\\n   (or errno=-22\\n\\n ...)

``errno`` is written as wireguard-go writes it: the *negative* errno value (``-22``).
``wg`` depends on that sign after a set (it returns the number as a negative errno); the
xplatform page only says "an errno.h integer".

Pieces:

* ``RequestReader``: incremental framing of the byte stream into ``Request`` values, with
  limits; mirrors how wireguard-go's ``IpcHandle`` reads (op line, then ``\\n`` for get,
  then lines up to a blank one for set, a trailing ``\\r`` dropped, at most 65535 bytes a
  line).
* ``parse_set``: validates a whole set request into a ``SetRequest`` before anything is
  applied, raising ``UapiError`` with wireguard-go's errno for the *first* bad line.
  Unlike wireguard-go (which applies lines one by one, so a bad line leaves the earlier
  ones applied) the device layer applies a ``SetRequest`` all or nothing.
* ``format_get`` / ``parse_get``: the get response, in wireguard-go's order and
  conditions; ``format_set`` writes a request for talking to another implementation.

pywg extensions (key rotation without loss; see ``PYWG_DEVICE_KEYS``/``PYWG_PEER_KEYS``).
These set keys are pywg's own: wireguard-go and the kernel answer -22 for them, as for
any unknown key, and the get response never shows them (it stays exactly as
wireguard-go's). Device keys:

* ``pywg_secondary_private_key=HEX``: also accept handshake initiations addressed to this
  key (while still initiating with ``private_key``); all-zero hex drops it (ends the
  overlap). Clamped like ``private_key``.
* ``pywg_promote_secondary=true``: the secondary key becomes the private key, the old
  private key stays accepted as the secondary. Sessions are kept (unlike a new
  ``private_key``, which ends every session and drops the secondary).

Peer keys (in a ``public_key=`` section):

* ``pywg_rename_to=HEX``: the peer rotated its key; the same peer (sessions, endpoint,
  allowed IPs, counters) answers to the new public key from now on.
* ``pywg_rekey=true``: start a new handshake with the peer now.

Device keys are applied in this order: ``private_key``, ``pywg_secondary_private_key``,
``pywg_promote_secondary``; then the peer sections, each renamed after its other changes.

What is left to the device layer (it needs state or I/O): the peer whose public key is
the device's own is ignored; ``update_only`` means "no effect unless the peer already
existed"; binding ``listen_port``/``fwmark`` (failure: ``IPC_ERROR_PORT_IN_USE``);
resolving an IPv6 zone name to an interface index (wireguard-go's Linux bind answers
-22 for an unknown interface); the limit on the number of peers.
"""

from __future__ import annotations

import base64
import enum
import errno as _errno
import ipaddress
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NamedTuple

from pywg.protocol.endpoint import Endpoint as UdpEndpoint
from pywg.protocol.endpoint import format_address

# --- errno values, as written on the wire (wireguard-go ipc/uapi_unix.go) --------------

ERRNO_OK: Final = 0
IPC_ERROR_IO: Final = -_errno.EIO  # -5: reading the request failed (line too long, limits)
IPC_ERROR_PROTOCOL: Final = -_errno.EPROTO  # -71: a set line without '=', an unknown operation
IPC_ERROR_INVALID: Final = -_errno.EINVAL  # -22: bad key, bad value, key in the wrong section
IPC_ERROR_PORT_IN_USE: Final = -_errno.EADDRINUSE  # -98: binding listen_port/fwmark failed
IPC_ERROR_UNKNOWN: Final = -55  # "ENOANO" in wireguard-go, hard-coded on every platform

# --- framing ---------------------------------------------------------------------------

OP_GET: Final = b"get=1\n"
OP_SET: Final = b"set=1\n"
GET_REQUEST: Final = "get=1\n\n"
KEY_LEN: Final = 32
# wireguard-go reads set lines with a bufio.Scanner: a line and its "\n" must fit in 64 KiB.
MAX_LINE_BYTES: Final = 65535
MAX_REQUEST_BYTES: Final = 1 << 20
MAX_REQUEST_LINES: Final = 1 << 16

DEVICE_KEYS: Final = frozenset({"private_key", "listen_port", "fwmark", "replace_peers"})
PEER_KEYS: Final = frozenset({
    "remove", "update_only", "preshared_key", "endpoint", "persistent_keepalive_interval",
    "replace_allowed_ips", "allowed_ip", "protocol_version",
})
# pywg extensions (key rotation), see the module docstring; unknown to wireguard-go (-22).
PYWG_DEVICE_KEYS: Final = frozenset({"pywg_secondary_private_key", "pywg_promote_secondary"})
PYWG_PEER_KEYS: Final = frozenset({"pywg_rename_to", "pywg_rekey"})

_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_DIGITS = re.compile(r"[0-9]+")
_PREFIX_BITS = re.compile(r"0|[1-9][0-9]{0,2}")
# An IPv6 zone: a Linux interface name (at most 15 bytes, no '/', ':' or blank) or index.
# wireguard-go takes any text there, then fails with -22 on names no interface has.
_ZONE = re.compile(r"(?:(?![/:\[\]%])[!-~]){1,15}")

Endpoint = tuple[str, int]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UapiError(Exception):
    """A request that cannot be carried out; ``errno`` is the (negative) wire value.

    ``fatal`` means the byte stream cannot be resynchronised: the server answers (or, for
    an unknown operation, does not; wireguard-go just hangs up) and closes the connection.
    Messages name the key and, except for keys, show the offending value.
    """

    def __init__(self, errno: int, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message
        self.fatal = fatal

    def __str__(self) -> str:
        return f"{self.message} (errno={self.errno})"

    def __repr__(self) -> str:
        return f"UapiError({self.errno}, {self.message!r}, fatal={self.fatal})"

    def response(self) -> str:
        """The reply a server writes for this error."""
        return format_errno(self.errno)


def format_errno(errno: int) -> str:
    """The status trailer: ``errno=N`` and the blank line that ends every response."""
    return f"errno={errno}\n\n"


class Unchanged(enum.Enum):
    """Marks a key that a set request did not mention (``None`` means "clear it")."""

    UNCHANGED = "unchanged"

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = Unchanged.UNCHANGED


def _key_id(key: bytes) -> str:
    """A public key abbreviated the way wireguard-go's logs show peers."""
    text = base64.b64encode(key).decode()
    return f"{text[:4]}…{text[-5:-1]}" if len(key) == KEY_LEN else f"<{len(key)} bytes>"


def _secret(value: bytes | None | Unchanged) -> str:
    if value is UNCHANGED:
        return "UNCHANGED"
    return "None" if value is None else "<redacted>"


def _show(value: str, limit: int = 64) -> str:
    """A value quoted for an error message, cut short."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "…"


def _invalid(message: str) -> UapiError:
    return UapiError(IPC_ERROR_INVALID, message)


# --- typed set request -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AllowedIPChange:
    """One ``allowed_ip`` line: add ``network``, or remove it (``allowed_ip=-CIDR``)."""

    network: IPNetwork
    remove: bool = False

    def __str__(self) -> str:
        return ("-" if self.remove else "") + format_prefix(self.network)


@dataclass(frozen=True, slots=True)
class DeviceChanges:
    """Device-level keys of a set request; ``None``/``UNCHANGED`` for keys not given.

    ``private_key``: ``UNCHANGED``, ``None`` (all-zero hex: remove the key) or the new key,
    already clamped as wireguard-go stores it. ``listen_port`` 0 asks for a random port;
    ``fwmark`` 0 clears the mark.

    pywg extensions: ``secondary_private_key`` (``pywg_secondary_private_key``: UNCHANGED,
    None to drop it, or the clamped key) and ``promote_secondary``.
    """

    private_key: bytes | None | Unchanged = UNCHANGED
    listen_port: int | None = None
    fwmark: int | None = None
    replace_peers: bool = False
    secondary_private_key: bytes | None | Unchanged = UNCHANGED
    promote_secondary: bool = False

    def __repr__(self) -> str:
        extensions = ""
        if self.secondary_private_key is not UNCHANGED or self.promote_secondary:
            extensions = (f", secondary_private_key={_secret(self.secondary_private_key)}, "
                          f"promote_secondary={self.promote_secondary}")
        return (f"DeviceChanges(private_key={_secret(self.private_key)}, listen_port={self.listen_port}, "
                f"fwmark={self.fwmark}, replace_peers={self.replace_peers}{extensions})")

    @property
    def uses_extensions(self) -> bool:
        return self.secondary_private_key is not UNCHANGED or self.promote_secondary


@dataclass(frozen=True, slots=True)
class PeerChanges:
    """One peer section (from ``public_key=`` to the next one), in effect order.

    After ``remove=true`` wireguard-go ignores the rest of the section (still validating
    it), so a removal carries no other change. ``replace_allowed_ips`` drops the
    ``allowed_ip`` lines that came before it, so ``allowed_ips`` holds only what is applied
    after the replacement. ``preshared_key`` ``None`` clears it (all-zero hex).

    pywg extensions: ``rename_to`` (``pywg_rename_to``: the peer's new public key, applied
    after the section's other changes) and ``rekey`` (``pywg_rekey``: a handshake now).
    """

    public_key: bytes
    remove: bool = False
    update_only: bool = False
    preshared_key: bytes | None | Unchanged = UNCHANGED
    endpoint: Endpoint | None = None
    persistent_keepalive: int | None = None
    replace_allowed_ips: bool = False
    allowed_ips: tuple[AllowedIPChange, ...] = ()
    rename_to: bytes | None = None
    rekey: bool = False

    def __repr__(self) -> str:
        extensions = ""
        if self.uses_extensions:
            rename = _key_id(self.rename_to) if self.rename_to is not None else None
            extensions = f", rename_to={rename}, rekey={self.rekey}"
        return (f"PeerChanges(public_key={_key_id(self.public_key)}, remove={self.remove}, "
                f"update_only={self.update_only}, preshared_key={_secret(self.preshared_key)}, "
                f"endpoint={self.endpoint!r}, persistent_keepalive={self.persistent_keepalive}, "
                f"replace_allowed_ips={self.replace_allowed_ips}, "
                f"allowed_ips={[str(a) for a in self.allowed_ips]!r}{extensions})")

    @property
    def uses_extensions(self) -> bool:
        return self.rename_to is not None or self.rekey


@dataclass(frozen=True, slots=True)
class SetRequest:
    """A whole, validated set request: apply all of it or none of it."""

    device: DeviceChanges = field(default_factory=DeviceChanges)
    peers: tuple[PeerChanges, ...] = ()

    @property
    def uses_extensions(self) -> bool:
        """Whether any pywg extension key is in the request."""
        return self.device.uses_extensions or any(p.uses_extensions for p in self.peers)


# --- get snapshot ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerSnapshot:
    """One peer as the get response shows it.

    ``preshared_key`` None is written as all zeros (wireguard-go always writes the line);
    ``last_handshake_ns`` is UNIX time in nanoseconds, None for never (written as 0, 0).
    ``allowed_ips`` are written verbatim: make them with ``format_prefix`` (Go's text).
    """

    public_key: bytes
    preshared_key: bytes | None = None
    endpoint: Endpoint | None = None
    last_handshake_ns: int | None = None
    tx_bytes: int = 0
    rx_bytes: int = 0
    persistent_keepalive: int = 0
    allowed_ips: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return (f"PeerSnapshot(public_key={_key_id(self.public_key)}, "
                f"preshared_key={_secret(self.preshared_key)}, endpoint={self.endpoint!r}, "
                f"last_handshake_ns={self.last_handshake_ns}, tx_bytes={self.tx_bytes}, "
                f"rx_bytes={self.rx_bytes}, persistent_keepalive={self.persistent_keepalive}, "
                f"allowed_ips={self.allowed_ips!r})")


@dataclass(frozen=True, slots=True)
class DeviceSnapshot:
    """The device as the get response shows it (0 port/fwmark and no key are omitted)."""

    private_key: bytes | None = None
    listen_port: int = 0
    fwmark: int = 0
    peers: list[PeerSnapshot] = field(default_factory=list)

    def __repr__(self) -> str:
        return (f"DeviceSnapshot(private_key={_secret(self.private_key)}, listen_port={self.listen_port}, "
                f"fwmark={self.fwmark}, peers={self.peers!r})")


# --- value codecs ----------------------------------------------------------------------


def _parse_key(value: str, what: str) -> bytes:
    """32 bytes from 64 hex digits, either case (Go's hex.DecodeString). Never echoes it."""
    if not _HEX_KEY.fullmatch(value):
        raise _invalid(f"{what}: expected 64 hex digits, got {len(value)} characters")
    return bytes.fromhex(value)


def _parse_uint(value: str, bits: int, what: str, errno: int = IPC_ERROR_INVALID) -> int:
    """An unsigned decimal like Go's strconv.ParseUint(value, 10, bits): digits only."""
    if not _DIGITS.fullmatch(value):
        raise UapiError(errno, f"{what}: expected a decimal number, got {_show(value)}")
    digits = value.lstrip("0") or "0"
    if len(digits) > 20 or int(digits) >= 1 << bits:
        raise UapiError(errno, f"{what}: {_show(value)} is out of range 0..{(1 << bits) - 1}")
    return int(digits)


def _parse_true(value: str, what: str) -> None:
    if value != "true":
        raise _invalid(f"{what}: the only accepted value is 'true', got {_show(value)}")


def _clamp(key: bytes) -> bytes:
    clamped = bytearray(key)
    clamped[0] &= 248
    clamped[31] = (clamped[31] & 127) | 64
    return bytes(clamped)


def format_ip(address: IPAddress) -> str:
    """An address as Go's netip prints it (IPv4-mapped IPv6 as ``::ffff:a.b.c.d``)."""
    return format_address(address)


def format_prefix(network: IPNetwork) -> str:
    return f"{format_ip(network.network_address)}/{network.prefixlen}"


def format_endpoint(endpoint: Endpoint) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_ip(text: str, what: str, *, zone: bool) -> IPAddress:
    try:
        if ":" not in text:
            return ipaddress.IPv4Address(text)
        address = ipaddress.IPv6Address(text)
    except ValueError:
        raise _invalid(f"{what}: {_show(text)} is not an IP address") from None
    if address.scope_id is not None:
        if not zone:
            raise _invalid(f"{what}: an IPv6 zone is not allowed here: {_show(text)}")
        if not _ZONE.fullmatch(address.scope_id):
            raise _invalid(f"{what}: zone {_show(address.scope_id)} is not an interface name or index")
    return address


def parse_endpoint(value: str) -> Endpoint:
    """``IPv4:port`` or ``[IPv6]:port`` (zone allowed), like Go's netip.ParseAddrPort.

    Host names are refused: ``wg`` resolves them before it talks to the daemon, and
    wireguard-go answers -22 for one. Returns the address in canonical text.
    """
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text:
        raise _invalid(f"endpoint: expected IP:port or [IPv6]:port, got {_show(value)}")
    bracketed = host.startswith("[")
    if bracketed:
        if len(host) < 2 or not host.endswith("]"):
            raise _invalid(f"endpoint: missing ']' in {_show(value)}")
        host = host[1:-1]
    port = _parse_uint(port_text, 16, "endpoint port")
    address = _parse_ip(host, "endpoint", zone=True)
    if bracketed and address.version == 4:
        raise _invalid(f"endpoint: square brackets are for IPv6 addresses only: {_show(value)}")
    if not bracketed and address.version == 6:
        raise _invalid(f"endpoint: an IPv6 address must be in square brackets: {_show(value)}")
    return UdpEndpoint(format_ip(address), port)


def parse_prefix(value: str) -> IPNetwork:
    """``ADDR/BITS`` like Go's netip.ParsePrefix; host bits are masked off (as the trie does)."""
    address_text, sep, bits_text = value.rpartition("/")
    if not sep:
        raise _invalid(f"allowed_ip: expected ADDRESS/BITS, got {_show(value)}")
    if not _PREFIX_BITS.fullmatch(bits_text):
        raise _invalid(f"allowed_ip: bad prefix length in {_show(value)}")
    address = _parse_ip(address_text, "allowed_ip", zone=False)
    bits = int(bits_text)
    if bits > address.max_prefixlen:
        raise _invalid(f"allowed_ip: prefix length {bits} is out of range for {_show(value)}")
    return ipaddress.ip_network((address, bits), strict=False)


def _parse_allowed_ip(value: str) -> AllowedIPChange:
    remove = value.startswith("-")
    return AllowedIPChange(parse_prefix(value[1:] if remove else value), remove)


# --- set -------------------------------------------------------------------------------


def _split_line(item: str | tuple[str, str], number: int) -> tuple[str, str]:
    if isinstance(item, tuple):
        return item
    key, sep, value = item.partition("=")
    if not sep:  # not echoed: it may be a pasted key
        raise UapiError(IPC_ERROR_PROTOCOL, f"line {number} of the set request has no '='")
    return key, value


class _PeerSection:
    """A peer section being read; turned into PeerChanges when the next one starts."""

    def __init__(self, public_key: bytes) -> None:
        self.public_key = public_key
        self.remove = False
        self.update_only = False
        self.preshared_key: bytes | None | Unchanged = UNCHANGED
        self.endpoint: Endpoint | None = None
        self.keepalive: int | None = None
        self.replace_allowed_ips = False
        self.allowed_ips: list[AllowedIPChange] = []
        self.rename_to: bytes | None = None
        self.rekey = False

    def line(self, key: str, value: str) -> None:
        # Every value is validated, even after remove=true, as wireguard-go does.
        if key == "remove":
            _parse_true(value, key)
            self.remove = True
        elif key == "update_only":
            _parse_true(value, key)
            self.update_only = True
        elif key == "preshared_key":
            psk = _parse_key(value, key)
            self.preshared_key = None if psk == bytes(KEY_LEN) else psk
        elif key == "endpoint":
            self.endpoint = parse_endpoint(value)
        elif key == "persistent_keepalive_interval":
            self.keepalive = _parse_uint(value, 16, key)
        elif key == "replace_allowed_ips":
            _parse_true(value, key)
            self.replace_allowed_ips = True
            self.allowed_ips.clear()
        elif key == "allowed_ip":
            change = _parse_allowed_ip(value)
            if not self.remove:
                self.allowed_ips.append(change)
        elif key == "protocol_version":
            if value != "1":
                raise _invalid(f"protocol_version: only 1 is supported, got {_show(value)}")
        elif key == "pywg_rename_to":
            new = _parse_key(value, key)
            if new == bytes(KEY_LEN):
                raise _invalid(f"{key}: the all-zero key is not a public key")
            self.rename_to = new
        elif key == "pywg_rekey":
            _parse_true(value, key)
            self.rekey = True
        elif key in DEVICE_KEYS or key in PYWG_DEVICE_KEYS:
            raise _invalid(f"device key {key!r} after a peer section (device keys come first)")
        else:
            raise _invalid(f"invalid UAPI peer key: {_show(key, 24)}")

    def changes(self) -> PeerChanges:
        if self.remove:
            return PeerChanges(self.public_key, remove=True)
        return PeerChanges(
            self.public_key, update_only=self.update_only, preshared_key=self.preshared_key,
            endpoint=self.endpoint, persistent_keepalive=self.keepalive,
            replace_allowed_ips=self.replace_allowed_ips, allowed_ips=tuple(self.allowed_ips),
            rename_to=self.rename_to, rekey=self.rekey,
        )


def parse_set(lines: Iterable[str | tuple[str, str]]) -> SetRequest:
    """Validate the body of a set request (the lines between ``set=1`` and the blank line).

    ``lines`` are ``"key=value"`` strings or ``(key, value)`` pairs (``RequestReader``
    yields pairs). Raises ``UapiError`` carrying wireguard-go's errno for the first bad
    line; nothing is returned, so nothing can be half-applied.
    """
    if isinstance(lines, (str, bytes)):
        raise TypeError("parse_set takes an iterable of lines or (key, value) pairs, not one string")
    private_key: bytes | None | Unchanged = UNCHANGED
    listen_port: int | None = None
    fwmark: int | None = None
    replace_peers = False
    secondary: bytes | None | Unchanged = UNCHANGED
    promote = False
    sections: list[_PeerSection] = []
    for number, item in enumerate(lines, 1):
        key, value = _split_line(item, number)
        if key == "public_key":
            sections.append(_PeerSection(_parse_key(value, key)))
        elif sections:
            sections[-1].line(key, value)
        elif key == "private_key":
            secret = _parse_key(value, key)
            private_key = None if secret == bytes(KEY_LEN) else _clamp(secret)
        elif key == "listen_port":
            listen_port = _parse_uint(value, 16, key)
        elif key == "fwmark":
            fwmark = _parse_uint(value, 32, key)
        elif key == "replace_peers":
            _parse_true(value, key)
            replace_peers = True
        elif key == "pywg_secondary_private_key":
            secret = _parse_key(value, key)
            secondary = None if secret == bytes(KEY_LEN) else _clamp(secret)
        elif key == "pywg_promote_secondary":
            _parse_true(value, key)
            promote = True
        elif key in PEER_KEYS or key in PYWG_PEER_KEYS:
            raise _invalid(f"peer key {key!r} before any public_key line")
        else:
            raise _invalid(f"invalid UAPI device key: {_show(key, 24)}")
    device = DeviceChanges(private_key, listen_port, fwmark, replace_peers, secondary, promote)
    return SetRequest(device, tuple(section.changes() for section in sections))


def format_set(request: SetRequest) -> str:
    """A complete set request (``set=1`` ... blank line) that ``parse_set`` reads back equal."""
    out = ["set=1"]
    dev = request.device
    if dev.private_key is not UNCHANGED:
        out.append(f"private_key={(dev.private_key or bytes(KEY_LEN)).hex()}")
    if dev.listen_port is not None:
        out.append(f"listen_port={dev.listen_port}")
    if dev.fwmark is not None:
        out.append(f"fwmark={dev.fwmark}")
    if dev.replace_peers:
        out.append("replace_peers=true")
    if dev.secondary_private_key is not UNCHANGED:
        out.append(f"pywg_secondary_private_key={(dev.secondary_private_key or bytes(KEY_LEN)).hex()}")
    if dev.promote_secondary:
        out.append("pywg_promote_secondary=true")
    for peer in request.peers:
        out.append(f"public_key={peer.public_key.hex()}")
        if peer.remove:
            out.append("remove=true")
            continue
        if peer.update_only:
            out.append("update_only=true")
        if peer.preshared_key is not UNCHANGED:
            out.append(f"preshared_key={(peer.preshared_key or bytes(KEY_LEN)).hex()}")
        if peer.endpoint is not None:
            out.append(f"endpoint={format_endpoint(peer.endpoint)}")
        if peer.persistent_keepalive is not None:
            out.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
        if peer.replace_allowed_ips:
            out.append("replace_allowed_ips=true")
        out.extend(f"allowed_ip={change}" for change in peer.allowed_ips)
        if peer.rename_to is not None:
            out.append(f"pywg_rename_to={peer.rename_to.hex()}")
        if peer.rekey:
            out.append("pywg_rekey=true")
    return "\n".join(out) + "\n\n"


# --- get -------------------------------------------------------------------------------


def _key_hex(key: bytes, what: str) -> str:
    if len(key) != KEY_LEN:
        raise ValueError(f"{what} must be {KEY_LEN} bytes, not {len(key)}")
    return key.hex()


def _check_range(value: int, bits: int, what: str) -> int:
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{what}={value} is out of range 0..{(1 << bits) - 1}")
    return value


def format_get(snapshot: DeviceSnapshot) -> str:
    """The full get response, ``errno=0`` trailer included, in wireguard-go's order.

    Device: ``private_key`` (when set), ``listen_port`` (when not 0), ``fwmark`` (when not
    0). Each peer: ``public_key``, ``preshared_key`` (always; zeros when none),
    ``protocol_version=1``, ``endpoint`` (when known), ``last_handshake_time_sec``,
    ``last_handshake_time_nsec``, ``tx_bytes``, ``rx_bytes``,
    ``persistent_keepalive_interval``, then one ``allowed_ip`` per prefix. Raises
    ValueError for a snapshot no device could hold (wrong key size, numbers out of range).
    """
    out: list[str] = []
    if snapshot.private_key is not None:
        out.append(f"private_key={_key_hex(snapshot.private_key, 'private_key')}")
    if _check_range(snapshot.listen_port, 16, "listen_port"):
        out.append(f"listen_port={snapshot.listen_port}")
    if _check_range(snapshot.fwmark, 32, "fwmark"):
        out.append(f"fwmark={snapshot.fwmark}")
    for peer in snapshot.peers:
        out.append(f"public_key={_key_hex(peer.public_key, 'public_key')}")
        out.append(f"preshared_key={_key_hex(peer.preshared_key or bytes(KEY_LEN), 'preshared_key')}")
        out.append("protocol_version=1")
        if peer.endpoint is not None:
            out.append(f"endpoint={format_endpoint(peer.endpoint)}")
        nanos = _check_range(peer.last_handshake_ns or 0, 63, "last_handshake_ns")
        out.append(f"last_handshake_time_sec={nanos // 1_000_000_000}")
        out.append(f"last_handshake_time_nsec={nanos % 1_000_000_000}")
        out.append(f"tx_bytes={_check_range(peer.tx_bytes, 64, 'tx_bytes')}")
        out.append(f"rx_bytes={_check_range(peer.rx_bytes, 64, 'rx_bytes')}")
        out.append(f"persistent_keepalive_interval={_check_range(peer.persistent_keepalive, 32, 'keepalive')}")
        out.extend(f"allowed_ip={prefix}" for prefix in peer.allowed_ips)
    out.append(f"errno={ERRNO_OK}")
    return "\n".join(out) + "\n\n"


def _protocol(message: str) -> UapiError:
    return UapiError(IPC_ERROR_PROTOCOL, message)


def parse_get(text: str) -> DeviceSnapshot:
    """Read a get response (as wireguard-go writes it) back into a ``DeviceSnapshot``.

    The ``errno=N`` trailer and final blank line may be present or not; a nonzero errno
    raises ``UapiError`` carrying it. Malformed output (unknown or repeated keys, bad
    values) raises ``UapiError`` with ``IPC_ERROR_PROTOCOL``.
    """
    if not text.endswith("\n"):
        raise _protocol("get response: does not end with a newline")
    lines = text[:-1].split("\n")
    if lines[-1] == "":
        lines.pop()  # the blank line that ends the response
    if lines and lines[-1].startswith("errno="):
        code_text = lines.pop()[len("errno="):]
        negative = code_text.startswith("-")
        code = _parse_uint(code_text[negative:], 31, "get response: errno", IPC_ERROR_PROTOCOL)
        if code:
            raise UapiError(-code if negative else code, "the device answered get=1 with an error")
    device: dict[str, Any] = {}
    peers: list[dict[str, Any]] = []
    for line in lines:
        key, sep, value = line.partition("=")
        if not sep:
            raise _protocol("get response: a line has no '='")
        try:
            if key == "public_key":
                peers.append({"public_key": _parse_key(value, key), "allowed_ips": []})
                continue
            target = peers[-1] if peers else device
            name, parsed = _get_peer_value(key, value) if peers else _get_device_value(key, value)
        except UapiError as exc:
            raise _protocol(f"get response: {exc.message}") from None
        if name == "allowed_ips":
            target[name].append(parsed)
        elif name in target:
            raise _protocol(f"get response: {key} given twice")
        else:
            target[name] = parsed
    return DeviceSnapshot(peers=[_peer_snapshot(fields) for fields in peers], **device)


def _get_device_value(key: str, value: str) -> tuple[str, Any]:
    if key == "private_key":
        secret = _parse_key(value, key)
        return key, None if secret == bytes(KEY_LEN) else secret
    if key == "listen_port":
        return key, _parse_uint(value, 16, key)
    if key == "fwmark":
        return key, _parse_uint(value, 32, key)
    raise _protocol(f"unknown device key {_show(key)}")


def _get_peer_value(key: str, value: str) -> tuple[str, Any]:
    if key == "preshared_key":
        psk = _parse_key(value, key)
        return key, None if psk == bytes(KEY_LEN) else psk
    if key == "protocol_version":
        if value != "1":
            raise _protocol(f"protocol_version {_show(value)} is not 1")
        return key, 1
    if key == "endpoint":
        return key, parse_endpoint(value)
    if key in ("last_handshake_time_sec", "last_handshake_time_nsec"):
        return key, _parse_uint(value, 63, key)
    if key in ("tx_bytes", "rx_bytes"):
        return key, _parse_uint(value, 64, key)
    if key == "persistent_keepalive_interval":
        return "persistent_keepalive", _parse_uint(value, 32, key)
    if key == "allowed_ip":
        return "allowed_ips", format_prefix(parse_prefix(value))
    raise _protocol(f"unknown peer key {_show(key)}")


def _peer_snapshot(fields: dict[str, Any]) -> PeerSnapshot:
    seconds = fields.pop("last_handshake_time_sec", 0)
    nanos = fields.pop("last_handshake_time_nsec", 0)
    fields.pop("protocol_version", None)
    if nanos >= 1_000_000_000:
        raise _protocol(f"get response: last_handshake_time_nsec={nanos} is not below 10^9")
    total = seconds * 1_000_000_000 + nanos
    if total >= 1 << 63:
        raise _protocol("get response: last handshake time out of range")
    return PeerSnapshot(last_handshake_ns=total or None, **fields)


# --- framing of the byte stream --------------------------------------------------------


class Request(NamedTuple):
    """One complete request: ``("get", [])`` or ``("set", [(key, value), ...])``.

    It compares equal to the plain tuple. Its repr names the keys only: values may be
    secrets.
    """

    op: Literal["get", "set"]
    pairs: list[tuple[str, str]]

    def __repr__(self) -> str:
        return f"Request(op={self.op!r}, keys={[key for key, _ in self.pairs]!r})"


class _State(enum.Enum):
    OP = "op"  # waiting for get=1 / set=1
    GET_END = "get_end"  # after get=1\n: the next byte must be \n
    SET_BODY = "set_body"  # reading key=value lines up to a blank one


class RequestReader:
    """Turns the bytes of one UAPI connection into ``Request`` values, sans I/O.

    ``feed(data)`` buffers the bytes and returns an iterator over the requests now
    complete; ``feed_eof()`` does the same at end of stream. Both raise ``UapiError``:

    * fatal (``exc.fatal``): an operation line other than ``get=1``/``set=1`` (-71;
      wireguard-go hangs up without a reply), a set line over ``max_line_bytes`` (-5, as
      wireguard-go's scanner), a request over ``max_request_bytes`` or
      ``max_request_lines`` (-5). Every later call raises the same error again.
    * not fatal: a byte other than ``\\n`` after ``get=1\\n`` (-22; the byte is consumed),
      a set line without ``=`` (-71, or the errno of an earlier bad line, as wireguard-go
      would answer; the whole request is consumed). Reply and go on: ``feed(b"")`` (or
      ``feed_eof()`` again, after end of stream) yields the requests still buffered.

    Like wireguard-go, a trailing ``\\r`` is dropped from set lines, and end of stream in
    the middle of a set request completes it (``printf 'set=1\\nfwmark=1' | socat``).
    """

    def __init__(self, *, max_line_bytes: int = MAX_LINE_BYTES, max_request_bytes: int = MAX_REQUEST_BYTES,
                 max_request_lines: int = MAX_REQUEST_LINES) -> None:
        self.max_line_bytes = max_line_bytes
        self.max_request_bytes = max_request_bytes
        self.max_request_lines = max_request_lines
        self._buffer = bytearray()
        self._state = _State.OP
        self._pairs: list[tuple[str, str]] = []
        self._bad_line: int | None = None  # line number of the first line without '='
        self._lines = 0
        self._bytes = 0
        self._error: UapiError | None = None
        self._eof = False

    def feed(self, data: bytes) -> Iterator[Request]:
        """Buffer ``data`` (now) and iterate over the requests it completes."""
        self._check_usable()
        self._buffer += data
        return self._drain()

    def feed_eof(self) -> Iterator[Request]:
        """End of stream: iterate over what is still buffered, an unterminated set included.

        May be called again (after a non-fatal error, to go on draining); ``feed`` may not.
        """
        if self._error is not None:
            raise self._again()
        self._eof = True
        return self._drain()

    def next_request(self) -> Request | None:
        """The next complete request, or None until more bytes arrive."""
        if self._error is not None:
            raise self._again()
        try:
            return self._step()
        except UapiError as exc:
            if exc.fatal:
                self._error = exc
                self._buffer.clear()
                self._pairs = []
            raise

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._again()
        if self._eof:
            raise RuntimeError("RequestReader: fed after feed_eof()")

    def _again(self) -> UapiError:
        assert self._error is not None
        return UapiError(self._error.errno, self._error.message, fatal=True)

    def _drain(self) -> Iterator[Request]:
        while (request := self.next_request()) is not None:
            yield request

    def _fatal(self, errno: int, message: str) -> UapiError:
        return UapiError(errno, message, fatal=True)

    def _step(self) -> Request | None:
        buffer = self._buffer
        while True:
            if self._state is _State.OP:
                end = buffer.find(b"\n", 0, len(OP_GET))
                if end < 0:
                    if not (OP_GET.startswith(buffer) or OP_SET.startswith(buffer)):
                        raise self._fatal(IPC_ERROR_PROTOCOL, f"invalid UAPI operation: {bytes(buffer[:16])!r}")
                    if self._eof:
                        buffer.clear()  # wireguard-go hangs up on a partial operation line
                    return None
                op = bytes(buffer[:end + 1])
                del buffer[:end + 1]
                if op == OP_GET:
                    self._state = _State.GET_END
                elif op == OP_SET:
                    self._state = _State.SET_BODY
                    self._pairs, self._bad_line, self._lines, self._bytes = [], None, 0, 0
                else:
                    raise self._fatal(IPC_ERROR_PROTOCOL, f"invalid UAPI operation: {op!r}")
            elif self._state is _State.GET_END:
                if not buffer:
                    return None
                byte = buffer[0]
                del buffer[0]
                self._state = _State.OP
                if byte != ord("\n"):
                    raise UapiError(IPC_ERROR_INVALID, f"trailing character after get=1: {bytes([byte])!r}")
                return Request("get", [])
            else:
                end = buffer.find(b"\n", 0, self.max_line_bytes + 1)
                if end < 0:
                    if len(buffer) > self.max_line_bytes:
                        raise self._fatal(IPC_ERROR_IO, f"set line longer than {self.max_line_bytes} bytes")
                    if not self._eof:
                        return None
                    raw = bytes(buffer)  # end of stream: the partial line is the last one
                    buffer.clear()
                    self._take_line(raw, len(raw))
                    self._state = _State.OP
                    return self._finish_set()
                raw = bytes(buffer[:end])
                del buffer[:end + 1]
                if not self._take_line(raw, end + 1):
                    self._state = _State.OP
                    return self._finish_set()

    def _take_line(self, raw: bytes, size: int) -> bool:
        """Account for and store one set line; False for the blank line that ends it."""
        self._bytes += size
        if self._bytes > self.max_request_bytes:
            raise self._fatal(IPC_ERROR_IO, f"set request larger than {self.max_request_bytes} bytes")
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw:
            return False
        self._lines += 1
        if self._lines > self.max_request_lines:
            raise self._fatal(IPC_ERROR_IO, f"set request longer than {self.max_request_lines} lines")
        if self._bad_line is None:
            line = raw.decode("utf-8", "surrogateescape")
            key, sep, value = line.partition("=")
            if sep:
                self._pairs.append((key, value))
            else:
                self._bad_line = self._lines
        return True

    def _finish_set(self) -> Request:
        pairs, bad, self._pairs, self._bad_line = self._pairs, self._bad_line, [], None
        if bad is not None:
            parse_set(pairs)  # the lines before it: an earlier bad one is what wireguard-go reports
            raise UapiError(IPC_ERROR_PROTOCOL, f"line {bad} of the set request has no '='")
        return Request("set", pairs)
