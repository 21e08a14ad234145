"""Where a peer is reached: a UDP address (IPv4 or IPv6) or a DERP relay (region + node key).

``Endpoint`` is a named (host, port) tuple, so that it stays interchangeable with the
``(host, port)`` tuples sockets give and take: frozen, hashable, equal to the same tuple.
Hosts are in canonical text; an IPv4-mapped IPv6 address normalises to IPv4 (``unmapped``).
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

NODE_KEY_LENGTH = 32


class EndpointError(ValueError):
    """Text or values that are no endpoint (the message names what is wrong)."""


def format_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Canonical text for an address, as Go's netip prints it: IPv4-mapped IPv6 always as
    ``::ffff:a.b.c.d`` (Python's own ``str`` differs between versions and for ``::ffff:0:0``)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        text = f"::ffff:{address.ipv4_mapped}"
        return f"{text}%{address.scope_id}" if address.scope_id else text
    return str(address)


class Endpoint(NamedTuple):
    """A UDP address: ``host`` an IPv4 or IPv6 address in canonical text (a zone allowed)."""

    host: str
    port: int

    @classmethod
    def of(cls, host: str, port: int) -> Endpoint:
        """The endpoint with ``host`` canonicalised; EndpointError if it is no IP or the port
        is out of range."""
        if not 0 <= port <= 0xFFFF:
            raise EndpointError(f"endpoint port: {port} is not in 0..65535")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise EndpointError(f"endpoint: {host!r} is not an IP address") from None
        return cls(format_address(address), port)

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """``IPv4:port`` or ``[IPv6]:port`` (as ``wg`` writes them); EndpointError otherwise."""
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or not port_text.isdigit():
            raise EndpointError(f"endpoint: expected IP:port or [IPv6]:port, got {text!r}")
        bracketed = host.startswith("[") and host.endswith("]") and len(host) >= 2
        if bracketed:
            host = host[1:-1]
        if (":" in host) != bracketed:
            raise EndpointError(f"endpoint: IPv6 addresses, and only they, go in square brackets: {text!r}")
        return cls.of(host, int(port_text))

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def unmapped(self) -> Endpoint:
        """The IPv4 endpoint for an IPv4-mapped IPv6 one (``::ffff:a.b.c.d``), else itself."""
        if not self.host.startswith("::ffff:"):
            return self
        try:
            mapped = ipaddress.IPv6Address(self.host).ipv4_mapped
        except ValueError:
            return self
        return self if mapped is None else Endpoint(str(mapped), self.port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


class RelayEndpoint(NamedTuple):
    """A peer reached through a DERP relay: the region's id and the peer's node public key."""

    region: int
    node_key: bytes

    @classmethod
    def of(cls, region: int, node_key: bytes) -> RelayEndpoint:
        """Checked: a positive region id and a 32-byte key; EndpointError otherwise."""
        if region <= 0:
            raise EndpointError(f"relay region: {region} is not a positive region id")
        if len(node_key) != NODE_KEY_LENGTH:
            raise EndpointError(f"relay node key: {len(node_key)} bytes, not {NODE_KEY_LENGTH}")
        return cls(region, bytes(node_key))

    def __str__(self) -> str:
        return f"derp:{self.region}/{self.node_key.hex()[:16]}"


AnyEndpoint = Endpoint | RelayEndpoint
