"""Facts about the inner IP packets a tunnel carries (no parsing beyond what routing needs)."""

from __future__ import annotations

import ipaddress

IPV4_HEADER_MIN = 20
IPV6_HEADER = 40


def inner_length(packet: bytes | memoryview) -> int | None:
    """The length an IPv4/IPv6 header claims, or None if the packet is not valid IP."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= IPV4_HEADER_MIN:
        length = int.from_bytes(packet[2:4], "big")
        if IPV4_HEADER_MIN <= length <= len(packet):
            return length
    elif version == 6 and len(packet) >= IPV6_HEADER:
        length = IPV6_HEADER + int.from_bytes(packet[4:6], "big")
        if length <= len(packet):
            return length
    return None


def source_address(packet: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Source address of a packet already validated by inner_length."""
    if packet[0] >> 4 == 4:
        return ipaddress.IPv4Address(packet[12:16])
    return ipaddress.IPv6Address(packet[8:24])


def destination_address(packet: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if packet[0] >> 4 == 4:
        return ipaddress.IPv4Address(packet[16:20])
    return ipaddress.IPv6Address(packet[24:40])
