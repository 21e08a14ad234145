"""The Internet checksum (RFC 1071), in pure Python: ICMP echoes, IPv4 headers, and the
offload code's fallback when the native module is missing."""

from __future__ import annotations

import struct


def internet_checksum(data: bytes) -> int:
    """The one's-complement sum of ``data``'s 16-bit big-endian words (an odd byte padded
    with zero), folded and inverted: 0 over data that carries its own correct checksum."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
