"""What the engine asks its caller to do: frozen, slotted events (h11 style)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .endpoint import RelayEndpoint

UdpAddress = tuple[str, int]  # (host, port) as sockets give it; pywg.protocol.endpoint.Endpoint is one
Endpoint = UdpAddress | RelayEndpoint  # where a peer is reached: UDP, or a DERP relay


class DropReason(str, enum.Enum):
    """Why an inbound datagram or outbound packet was dropped (each is counted), the one
    vocabulary of every path: the engine, the device, the threads and the C hop.

    A datagram gets the same name on every receive path: the demux's verdict first
    (UNKNOWN_PROTOCOL for whatever is not WireGuard, STUN nor disco: empty, 1-3 bytes, a
    type field other than 1-4 in its four bytes, a TLS record), then the engine's checks
    (BAD_SIZE for a WireGuard type of the wrong length, then mac1, index, ...)."""

    BAD_SIZE = "bad_size"
    BAD_MAC1 = "bad_mac1"
    COOKIE_REQUIRED = "cookie_required"  # under load without valid mac2: a cookie reply went out
    BAD_MAC2 = "bad_mac2"
    HANDSHAKE_DECRYPT = "handshake_decrypt"
    UNKNOWN_PEER = "unknown_peer"
    REPLAYED_TIMESTAMP = "replayed_timestamp"
    INITIATION_FLOOD = "initiation_flood"
    RATE_LIMITED = "rate_limited"  # under load, over the source's handshakes per second
    UNKNOWN_INDEX = "unknown_index"
    UNEXPECTED_RESPONSE = "unexpected_response"
    BAD_COOKIE_REPLY = "bad_cookie_reply"
    DECRYPT_FAILED = "decrypt_failed"
    REPLAYED_COUNTER = "replayed_counter"
    KEY_EXPIRED = "key_expired"
    NO_ENDPOINT = "no_endpoint"
    STAGED_QUEUE_FULL = "staged_queue_full"
    HANDSHAKE_GAVE_UP = "handshake_gave_up"
    INVALID_PACKET = "invalid_packet"
    NO_PRIVATE_KEY = "no_private_key"  # the device has no key (yet): no handshakes
    UNKNOWN_PROTOCOL = "unknown_protocol"  # the demux: not WireGuard, STUN nor disco
    NO_HANDLER = "no_handler"  # STUN or disco, but no layer registered a handler for it
    HANDLER_FAILED = "handler_failed"  # a STUN/disco handler raised (caught, counted)
    HANDLER_BUSY = "handler_busy"  # too many STUN/disco datagrams waiting for their handler
    # The device's (``Device.drops``, "device_drops" in ``pywg stats``): around the engine.
    NO_ROUTE = "no_route"  # a packet from the TUN to an address no peer's allowed IPs cover
    INVALID_TUN_PACKET = "invalid_tun_packet"  # from the TUN, not an IPv4/IPv6 packet
    INVALID_TUN_FRAME = "invalid_tun_frame"  # from the TUN, a virtio-net frame that cannot be split
    SOURCE_NOT_ALLOWED = "source_not_allowed"  # decrypted, from an address not in the peer's allowed IPs
    TUN_FULL = "tun_full"  # the TUN's queue was full: a decrypted packet lost
    TUN_WRITE_FAILED = "tun_write_failed"  # the TUN refused a write (interface down: EIO, ...)
    FILTERED_OUTBOUND = "filtered_outbound"  # from the TUN, the peer's packet filter said drop
    FILTERED_INBOUND = "filtered_inbound"  # opened, the peer's packet filter said drop
    NO_SOCKET_FOR_ENDPOINT = "no_socket_for_endpoint"  # no UDP socket of the endpoint's family
    UDP_SEND_FULL = "udp_send_full"  # the UDP socket's send buffer was full
    UDP_SEND_ERROR = "udp_send_error"  # the kernel refused the send (unreachable, ...)
    RELAY_MISSING = "relay_missing"  # to a RelayEndpoint, but the device has no relay (set_relay)
    RELAY_SEND_DROPPED = "relay_send_dropped"  # the relay refused it (its own stats say why)
    RELAY_UNKNOWN_SOURCE = "relay_unknown_source"  # over DERP from a node key that is no peer's
    RELAY_BACKLOG_FULL = "relay_backlog_full"  # relayed datagrams waiting for the inbound thread
    HANDSHAKE_BACKLOG_FULL = "handshake_backlog_full"  # handshake messages waiting for the inbound thread: too many


@dataclass(frozen=True, slots=True)
class SendDatagram:
    """Send ``data`` as one UDP datagram to ``endpoint``."""

    data: bytes
    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class DeliverPacket:
    """A decrypted inner IP packet from the peer with static key ``peer``."""

    packet: bytes
    peer: bytes


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    peer: bytes
    initiator: bool


@dataclass(frozen=True, slots=True)
class Drop:
    reason: DropReason
    peer: bytes | None = None


@dataclass(frozen=True, slots=True)
class EndpointChanged:
    """The peer's endpoint moved to ``endpoint`` (a handshake or an authenticated packet
    came from there: roaming; or the first endpoint learnt)."""

    peer: bytes
    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class SessionExpired:
    """The peer's session keys were forgotten (KEY_ZEROING_TIME after the last handshake
    without a new one): no traffic until the next handshake."""

    peer: bytes


@dataclass(frozen=True, slots=True)
class PeerUnreachable:
    """The handshake gave up: MAX_TIMER_HANDSHAKES retries went unanswered."""

    peer: bytes


Event = HandshakeCompleted | EndpointChanged | SessionExpired | PeerUnreachable
"""What a device tells its observers (``Device.on_event``), on the event loop."""

Action = SendDatagram | DeliverPacket | HandshakeCompleted | Drop | EndpointChanged | SessionExpired | PeerUnreachable
