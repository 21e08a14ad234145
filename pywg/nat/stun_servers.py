"""A list of STUN servers as a user writes it: ``HOST:PORT[,HOST:PORT...]``, HOST an IPv4
address or a bracketed IPv6 one (``203.0.113.1:3478,[2001:db8::1]:3478``).

The coordinator takes it (``pywg coordinator serve --stun``) and hands it to agents as
``"stunServers": ["203.0.113.1:3478", "[2001:db8::1]:3478"]``, the form :func:`format_server`
writes and :func:`parse_server_list` reads back; the agent takes the same list in
``pywg agent up --stun``. The one parser of STUN server lists.
"""

from __future__ import annotations

import ipaddress

from pywg.nat.stun import TransportAddress

MAX_SERVERS = 16


class BadServerList(ValueError):
    """A list that cannot be used; the message names the bad value."""


def parse_server(text: str) -> TransportAddress:
    """``IPv4:PORT`` or ``[IPv6]:PORT`` (port 1-65535)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise BadServerList(f"expected HOST:PORT (IPv6: [ADDR]:PORT), got {text!r}")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 0xFFFF:
        raise BadServerList(f"the port is 1-65535, got {port!r} in {text!r}")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise BadServerList(f"the host is an IP address, got {host!r} in {text!r}") from None
    if ip.version == 6 and not bracketed:
        raise BadServerList(f"an IPv6 address goes in brackets ([ADDR]:PORT), got {text!r}")
    if ip.version == 4 and bracketed:
        raise BadServerList(f"only an IPv6 address goes in brackets, got {text!r}")
    if ip.is_unspecified or ip.is_multicast:
        raise BadServerList(f"{ip} cannot be a STUN server's address (in {text!r})")
    return TransportAddress.of(ip, int(port))


def parse_servers(text: str) -> tuple[TransportAddress, ...]:
    """A comma-separated list of :func:`parse_server` values (no duplicates, at most MAX_SERVERS)."""
    items = text.split(",")
    if len(items) > MAX_SERVERS:
        raise BadServerList(f"at most {MAX_SERVERS} servers, got {len(items)}")
    servers: list[TransportAddress] = []
    for item in items:
        if not item.strip():
            raise BadServerList(f"an empty entry in {text!r}")
        server = parse_server(item)
        if server in servers:
            raise BadServerList(f"{item.strip()!r} is given twice")
        servers.append(server)
    return tuple(servers)


def parse_server_list(items: object, what: str = "stunServers") -> tuple[TransportAddress, ...]:
    """The JSON form (``["203.0.113.1:3478", "[2001:db8::1]:3478"]``, as the coordinator hands
    it out): a list of :func:`parse_server` strings (no duplicates, at most MAX_SERVERS); the
    message names ``what`` and the bad entry."""
    if not isinstance(items, list):
        raise BadServerList(f"{what}: expected a list of HOST:PORT strings, got {type(items).__name__}")
    if len(items) > MAX_SERVERS:
        raise BadServerList(f"{what}: at most {MAX_SERVERS} servers, got {len(items)}")
    servers: list[TransportAddress] = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise BadServerList(f"{what}[{i}]: expected a HOST:PORT string, got {type(item).__name__}")
        try:
            server = parse_server(item)
        except BadServerList as exc:
            raise BadServerList(f"{what}[{i}]: {exc}") from None
        if server in servers:
            raise BadServerList(f"{what}[{i}]: {item.strip()!r} is given twice")
        servers.append(server)
    return tuple(servers)


def format_server(server: TransportAddress) -> str:
    """``203.0.113.1:3478`` / ``[2001:db8::1]:3478``."""
    return str(server)
