"""Mesh addresses: a node's IPv4 and IPv6 address are the same host offset in the
configured prefixes, so one number (the store's ``addr_offset``) allocates both.

Offset 0 (the network address) is never used, nor, in IPv4, the last address of the
prefix (the broadcast address of a LAN using it).
"""

from __future__ import annotations

import ipaddress
import secrets

from pywg.manage.types import InvalidConfig

DEFAULT_PREFIX4 = ipaddress.IPv4Network("100.64.0.0/10")  # RFC 6598 shared address space


def random_ula_prefix() -> ipaddress.IPv6Network:
    """A random RFC 4193 unique local /48 (fd00::/8 with a 40-bit random global ID)."""
    global_id = secrets.randbits(40)
    return ipaddress.IPv6Network(((0xFD << 120) | (global_id << 80), 48))


def parse_prefix4(text: str, field: str = "prefix4") -> ipaddress.IPv4Network:
    """An IPv4 prefix with room for at least two nodes; raises InvalidConfig naming ``field``."""
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise InvalidConfig(f"expected an IPv4 prefix like 100.64.0.0/10: {exc}", field) from None
    if net.prefixlen > 29:
        raise InvalidConfig("an IPv4 mesh prefix is at most /29", field)
    return net


def parse_prefix6(text: str, field: str = "prefix6") -> ipaddress.IPv6Network:
    """An IPv6 prefix with room for at least two nodes; raises InvalidConfig naming ``field``."""
    try:
        net = ipaddress.IPv6Network(text, strict=True)
    except ValueError as exc:
        raise InvalidConfig(f"expected an IPv6 prefix like fd00:1:2::/48: {exc}", field) from None
    if net.prefixlen > 125:
        raise InvalidConfig("an IPv6 mesh prefix is at most /125", field)
    return net


def capacity(prefix4: ipaddress.IPv4Network, prefix6: ipaddress.IPv6Network) -> int:
    """How many nodes the two prefixes hold together (offsets 1..capacity)."""
    return min(prefix4.num_addresses - 2, prefix6.num_addresses - 1)


def addresses_at(
    offset: int, prefix4: ipaddress.IPv4Network, prefix6: ipaddress.IPv6Network
) -> tuple[ipaddress.IPv4Address, ipaddress.IPv6Address]:
    """The node addresses at ``offset`` (1..capacity)."""
    if not 1 <= offset <= capacity(prefix4, prefix6):
        raise ValueError(f"address offset {offset} is outside the prefixes")
    return prefix4[offset], prefix6[offset]
