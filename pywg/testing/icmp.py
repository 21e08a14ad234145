"""ICMP echo over IPv4, built and parsed by hand: enough to ping through a tunnel
from an engine that has no TUN device (the interop tests and the demo)."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from pywg.protocol.checksum import internet_checksum

ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
PROTO_ICMP = 1
__all__ = ["Echo", "build_echo", "internet_checksum", "parse_echo", "reply_to"]


@dataclass(frozen=True)
class Echo:
    kind: int  # ICMP_ECHO_REQUEST or ICMP_ECHO_REPLY
    source: str
    destination: str
    identifier: int
    sequence: int
    payload: bytes


def build_echo(echo: Echo, ttl: int = 64) -> bytes:
    """An IPv4 packet carrying ``echo``, with both checksums filled in."""
    body = struct.pack("!BBHHH", echo.kind, 0, 0, echo.identifier, echo.sequence) + echo.payload
    body = body[:2] + struct.pack("!H", internet_checksum(body)) + body[4:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0x4000, ttl, PROTO_ICMP, 0,
                         ipaddress.IPv4Address(echo.source).packed,
                         ipaddress.IPv4Address(echo.destination).packed)
    header = header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]
    return header + body


def parse_echo(packet: bytes) -> Echo | None:
    """The echo in an IPv4 packet, or None if it is not a well-formed ICMP echo."""
    if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != PROTO_ICMP:
        return None
    ihl = (packet[0] & 0x0F) * 4
    total = int.from_bytes(packet[2:4], "big")
    if ihl < 20 or total > len(packet) or total < ihl + 8 or internet_checksum(packet[:ihl]):
        return None
    body = packet[ihl:total]
    if internet_checksum(body):
        return None
    kind, code, _, identifier, sequence = struct.unpack("!BBHHH", body[:8])
    if kind not in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY) or code:
        return None
    return Echo(kind, str(ipaddress.IPv4Address(packet[12:16])), str(ipaddress.IPv4Address(packet[16:20])),
                identifier, sequence, body[8:])


def reply_to(request: Echo) -> Echo:
    return Echo(ICMP_ECHO_REPLY, request.destination, request.source, request.identifier,
                request.sequence, request.payload)
