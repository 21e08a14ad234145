"""ICMP and ICMPv6 echo messages as the agent's raw sockets send and receive them.

An IPv4 raw socket (``SOCK_RAW``, ``IPPROTO_ICMP``) sends the ICMP message alone (the
kernel adds the IP header) but receives the whole IP packet; an ICMPv6 raw socket sends
and receives the ICMPv6 message alone, and the kernel computes and checks its checksum
(RFC 3542, section 3.1), so only the IPv4 message carries a checksum made here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

from pywg.protocol.checksum import internet_checksum

ECHO_REQUEST_V4, ECHO_REPLY_V4 = 8, 0
ECHO_REQUEST_V6, ECHO_REPLY_V6 = 128, 129
PROTO_ICMP = 1
HEADER = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence


@dataclass(frozen=True)
class Echo:
    """An echo reply: who sent it is the socket's to say (recvfrom's address)."""

    identifier: int
    sequence: int
    payload: bytes


class Malformed(Enum):
    """Why a received datagram is not an echo reply (each is counted, then dropped)."""

    SHORT = "short"
    NOT_ICMP = "not ICMP"
    CHECKSUM = "bad checksum"
    NOT_A_REPLY = "not an echo reply"


def echo_request(identifier: int, sequence: int, payload: bytes, *, v6: bool) -> bytes:
    """The ICMP (``v6``: ICMPv6) echo request to hand to a raw socket's ``sendto``."""
    kind = ECHO_REQUEST_V6 if v6 else ECHO_REQUEST_V4
    message = HEADER.pack(kind, 0, 0, identifier & 0xFFFF, sequence & 0xFFFF) + payload
    if v6:
        return message  # the kernel fills in the checksum (it covers a pseudo-header)
    return message[:2] + struct.pack("!H", internet_checksum(message)) + message[4:]


def parse_reply(datagram: bytes, *, v6: bool) -> Echo | Malformed:
    """The echo reply in what a raw socket received (``v6``: an ICMPv6 message; else an
    IPv4 packet), or why it is none."""
    if not v6:
        if len(datagram) < 20 or datagram[0] >> 4 != 4:
            return Malformed.SHORT if len(datagram) < 20 else Malformed.NOT_ICMP
        if datagram[9] != PROTO_ICMP:
            return Malformed.NOT_ICMP
        ihl = (datagram[0] & 0x0F) * 4
        total = int.from_bytes(datagram[2:4], "big")
        if ihl < 20 or total < ihl + HEADER.size or total > len(datagram):
            return Malformed.SHORT
        datagram = datagram[ihl:total]
        if internet_checksum(datagram):
            return Malformed.CHECKSUM
    if len(datagram) < HEADER.size:
        return Malformed.SHORT
    kind, code, _, identifier, sequence = HEADER.unpack_from(datagram)
    if kind != (ECHO_REPLY_V6 if v6 else ECHO_REPLY_V4) or code:
        return Malformed.NOT_A_REPLY
    return Echo(identifier, sequence, datagram[HEADER.size:])
