"""The inbound demux: which protocol a datagram on the WireGuard port speaks (sans-I/O).

WireGuard, STUN and disco share one UDP socket. ``classify`` names the protocol of one
datagram; the device hands WireGuard to the engine, STUN and disco to handlers other
layers register, and counts the rest as DropReason.UNKNOWN_PROTOCOL. The C screen
(native/screen.c) gives the same answers; tests/test_screen.py feeds both the same input.

Every receive path (the event loop, the threads, the hop's hand-backs, UdpEngine) asks
the demux about every datagram except one that starts with TRANSPORT_TYPE and is at least
TRANSPORT_MIN_SIZE long: that is a transport message (no STUN or disco message is) and
goes straight to the engine. So a datagram's drop has one name on every path: the demux's
verdict first, then the engine's (tests/test_drop_reasons.py).
"""

from __future__ import annotations

import enum

STUN_HEADER = 20
STUN_MAGIC_COOKIE = b"\x21\x12\xa4\x42"  # 0x2112A442, big-endian, at offset 4
DISCO_MAGIC = "TS\U0001F4AC".encode()  # 54 53 f0 9f 92 ac
WIREGUARD_TYPES = frozenset({1, 2, 3, 4})
TRANSPORT_TYPE = b"\x04\x00\x00\x00"  # a transport message's first four bytes


class Protocol(enum.Enum):
    """What a datagram arriving on the WireGuard port is."""

    WIREGUARD = "wireguard"
    STUN = "stun"
    DISCO = "disco"
    UNKNOWN = "unknown"


def is_stun(data: bytes | memoryview) -> bool:
    """True for a STUN message: top two bits zero, the magic cookie at offset 4, and a
    length field covering exactly the rest (no WireGuard message has all three)."""
    return (len(data) >= STUN_HEADER and data[0] & 0xC0 == 0 and data[4:8] == STUN_MAGIC_COOKIE
            and len(data) == STUN_HEADER + (data[2] << 8 | data[3]))


def classify(data: bytes | memoryview) -> Protocol:
    """The protocol of one datagram (checked in the C screen's order: STUN, disco, WireGuard)."""
    if is_stun(data):
        return Protocol.STUN
    if data[:6] == DISCO_MAGIC:
        return Protocol.DISCO
    if len(data) >= 4 and data[0] in WIREGUARD_TYPES and data[1:4] == b"\0\0\0":
        return Protocol.WIREGUARD
    return Protocol.UNKNOWN
