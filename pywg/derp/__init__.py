"""Tailscale's DERP relay protocol, sans-I/O: frames, the client state machine, the HTTP
upgrade, the DERP map.

Never imports asyncio, socket, os, select, time or threading; ``pywg.device.derp_client``
runs it over TCP/TLS.
"""

from .client import (
    ClientError,
    ClientErrorReason,
    ClientState,
    ClientStateError,
    Connected,
    DerpClient,
    Event,
    PacketReceived,
    PongReceived,
    ServerInfoBody,
)
from .derpmap import DerpMap, DerpMapError, DerpNode, DerpRegion, parse_derp_map
from .frames import (
    MAGIC,
    MAX_PACKET_SIZE,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    FrameError,
    FrameErrorReason,
    FrameType,
    PeerGoneReason,
    PeerPresentFlags,
)
from .http import (
    UpgradeError,
    UpgradeErrorReason,
    UpgradeResponse,
    UpgradeResponseParser,
    build_upgrade_request,
)
from .keys import KeyFormatError, NodePrivateKey, NodePublicKey
from .server import Actions, CloseReason, DerpServer, ServerStats

__all__ = [
    "MAGIC",
    "MAX_PACKET_SIZE",
    "PROTOCOL_VERSION",
    "Actions",
    "ClientError",
    "ClientErrorReason",
    "ClientState",
    "ClientStateError",
    "CloseReason",
    "Connected",
    "DerpClient",
    "DerpMap",
    "DerpMapError",
    "DerpNode",
    "DerpRegion",
    "DerpServer",
    "Event",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "FrameErrorReason",
    "FrameType",
    "KeyFormatError",
    "NodePrivateKey",
    "NodePublicKey",
    "PacketReceived",
    "PeerGoneReason",
    "PeerPresentFlags",
    "PongReceived",
    "ServerInfoBody",
    "ServerStats",
    "UpgradeError",
    "UpgradeErrorReason",
    "UpgradeResponse",
    "UpgradeResponseParser",
    "build_upgrade_request",
    "parse_derp_map",
]
