"""The DERP client as a state machine: bytes in, events out, bytes to send.

After the HTTP upgrade (``http.py``) the server speaks first. The client

1. reads ServerKey (magic + server public key), checks it against a pinned key if given;
2. sends ClientInfo: its node public key and ``{"version":2,"CanAckPings":true}`` sealed
   with a NaCl box from its node private key to the server key; then NotePreferred if this
   server is its home. Like the Go client it may send packets right away;
3. reads ServerInfo (sealed from the server to the client) and reports ``Connected``.

In steady state it frames packets to peers, reports packets from peers, answers Ping with
Pong, matches Pongs to its own Pings, and reports KeepAlive, PeerGone, PeerPresent, Health
and Restarting. Frames the server has no business sending (and a late ServerKey, as in fast
start) are ignored and counted. Time comes in as ``now`` (seconds, any monotonic origin).
"""

from __future__ import annotations

import enum
import json
from collections import OrderedDict
from dataclasses import dataclass, field

import nacl.utils

from .frames import (
    MAX_PACKET_SIZE,
    PING_LEN,
    PROTOCOL_VERSION,
    ClientInfo,
    ClosePeer,
    ForwardPacket,
    Frame,
    FrameDecoder,
    FrameError,
    Health,
    KeepAlive,
    NotePreferred,
    PeerGone,
    PeerPresent,
    Ping,
    Pong,
    RecvPacket,
    Restarting,
    SendPacket,
    ServerInfo,
    ServerKey,
    WatchConns,
)
from .keys import NodePrivateKey, NodePublicKey, RandomSource

READ_TIMEOUT = 120.0  # seconds of silence after which the connection counts as dead
KEEP_ALIVE_INTERVAL = 60.0  # what the server sends (plus up to 5 s of jitter)
MAX_PENDING_PINGS = 16
FRAME_OVERHEAD = 5 + 32  # header + key: what the advisory token bucket counts besides the packet


class ClientState(enum.Enum):
    AWAITING_SERVER_KEY = "awaiting_server_key"
    AWAITING_SERVER_INFO = "awaiting_server_info"  # ClientInfo sent; packets may already go
    CONNECTED = "connected"
    CLOSED = "closed"


class ClientErrorReason(enum.Enum):
    FRAME = "frame"  # the frame codec refused the stream (``cause`` has its reason)
    UNEXPECTED_FRAME = "unexpected_frame"  # the first frame was not ServerKey
    SERVER_KEY_MISMATCH = "server_key_mismatch"  # not the pinned server key
    BAD_SERVER_INFO = "bad_server_info"  # the box does not open or the JSON is not an object
    CLOSED = "closed"  # the connection ended
    TIMEOUT = "timeout"  # nothing from the server for READ_TIMEOUT


class ClientError(Exception):
    """The connection is unusable; the caller closes it (and may reconnect)."""

    def __init__(self, reason: ClientErrorReason, detail: str, cause: FrameError | None = None) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.cause = cause
        self.events: list[Event] = []  # what the bytes before the fault meant (deliver them first)


class ClientStateError(RuntimeError):
    """The caller used the client in a state that does not allow it (a programming error)."""


@dataclass(frozen=True, slots=True)
class ServerInfoBody:
    """The decrypted ServerInfo JSON; zero rates mean no advisory limit."""

    version: int = 0
    token_bucket_bytes_per_second: int = 0
    token_bucket_bytes_burst: int = 0


@dataclass(frozen=True, slots=True)
class Connected:
    """ServerInfo arrived and opened: the handshake is complete."""

    server_key: NodePublicKey
    info: ServerInfoBody


@dataclass(frozen=True, slots=True)
class PacketReceived:
    """A packet relayed from the client with key ``src``."""

    src: NodePublicKey
    packet: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class PongReceived:
    """The answer to our ``ping``; ``rtt`` in seconds."""

    data: bytes
    rtt: float


Event = Connected | PacketReceived | PongReceived | KeepAlive | PeerGone | PeerPresent | Health | Restarting


@dataclass
class ClientStats:
    """Plain counters; read them whenever."""

    packets_sent: int = 0
    bytes_sent: int = 0
    packets_received: int = 0
    bytes_received: int = 0
    dropped_rate_limited: int = 0  # sends over the server's advisory token bucket
    pings_answered: int = 0
    pongs_unmatched: int = 0
    keep_alives: int = 0
    ignored_frames: int = 0  # frames a server should not send to a client, or a late ServerKey


def _client_info_json(version: int, can_ack_pings: bool, mesh_key: bytes | None, is_prober: bool,
                      app_name: str | None) -> bytes:
    """The ClientInfo body with Go's spellings, omitting what Go omits (never ``"meshKey":""``)."""
    body: dict[str, object] = {}
    if mesh_key is not None:
        body["meshKey"] = mesh_key.hex()
    if version:
        body["version"] = version
    body["CanAckPings"] = can_ack_pings
    if is_prober:
        body["IsProber"] = True
    if app_name:
        body["AppName"] = app_name
    return json.dumps(body, separators=(",", ":")).encode()


def parse_server_info(plaintext: bytes) -> ServerInfoBody:
    """Decode the ServerInfo JSON case-insensitively, ignoring unknown keys (as Go does)."""
    try:
        body = json.loads(plaintext)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ClientError(ClientErrorReason.BAD_SERVER_INFO, f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ClientError(ClientErrorReason.BAD_SERVER_INFO, "not a JSON object")
    lowered = {str(k).lower(): v for k, v in body.items()}

    def number(key: str) -> int:
        value = lowered.get(key.lower(), 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ClientError(ClientErrorReason.BAD_SERVER_INFO, f"{key} is not a non-negative integer")
        return value

    return ServerInfoBody(number("version"), number("TokenBucketBytesPerSecond"),
                          number("TokenBucketBytesBurst"))


class _TokenBucket:
    def __init__(self, rate: int, burst: int, now: float) -> None:
        self.rate, self.burst = rate, max(burst, 1)
        self.tokens, self.last = float(self.burst), now

    def take(self, cost: int, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < cost:
            return False
        self.tokens -= cost
        return True


class DerpClient:
    """One DERP connection's client side, from the first byte after the HTTP 101."""

    def __init__(self, private_key: NodePrivateKey, *, expected_server_key: NodePublicKey | None = None,
                 preferred: bool = False, can_ack_pings: bool = True, mesh_key: bytes | None = None,
                 is_prober: bool = False, app_name: str | None = None, watch_conns: bool = False,
                 now: float = 0.0,
                 random: RandomSource = nacl.utils.random, read_timeout: float = READ_TIMEOUT) -> None:
        if mesh_key is not None and len(mesh_key) != 32:
            raise ValueError("mesh_key must be 32 bytes")
        self.private_key = private_key
        self.public_key = private_key.public
        self.expected_server_key = expected_server_key
        self.preferred = preferred
        self.watch_conns = watch_conns  # mesh: ask for PeerPresent/PeerGone of every client
        self.state = ClientState.AWAITING_SERVER_KEY
        self.server_key: NodePublicKey | None = None
        self.server_info: ServerInfoBody | None = None
        self.stats = ClientStats()
        self.read_timeout = read_timeout
        self.last_received = now
        self._info = _client_info_json(PROTOCOL_VERSION, can_ack_pings, mesh_key, is_prober, app_name)
        self._random = random
        self._decoder = FrameDecoder()
        self._out: list[bytes] = []
        self._pings: OrderedDict[bytes, float] = OrderedDict()
        self._bucket: _TokenBucket | None = None

    def __repr__(self) -> str:
        return f"DerpClient({self.public_key}, state={self.state.value}, server={self.server_key})"

    # -- bytes from the server ----------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Feed bytes read from the server; return what they mean. Raises ClientError only."""
        if self.state is ClientState.CLOSED:
            raise ClientError(ClientErrorReason.CLOSED, "the connection is closed")
        if data:
            self.last_received = now
        try:
            frames = self._decoder.feed(data)
        except FrameError as exc:
            # Deliver what came before the bad frame, then fail: the stream is lost.
            events = self._handle_all(exc.decoded, now)
            self.state = ClientState.CLOSED
            error = ClientError(ClientErrorReason.FRAME, str(exc), cause=exc)
            error.events = events
            raise error from None
        return self._handle_all(frames, now)

    def connection_closed(self) -> None:
        """The server closed the stream; always raises ClientError(CLOSED)."""
        self.state = ClientState.CLOSED
        raise ClientError(ClientErrorReason.CLOSED, "the server closed the connection")

    def timed_out(self, now: float) -> bool:
        """True once the server has been silent for ``read_timeout`` (it keeps alive every 60 s)."""
        return now - self.last_received >= self.read_timeout

    def _handle_all(self, frames: list[Frame], now: float) -> list[Event]:
        events: list[Event] = []
        for frame in frames:
            event = self._handle(frame, now)
            if event is not None:
                events.append(event)
        return events

    def _handle(self, frame: Frame, now: float) -> Event | None:
        if self.state is ClientState.AWAITING_SERVER_KEY:
            if not isinstance(frame, ServerKey):
                self.state = ClientState.CLOSED
                raise ClientError(ClientErrorReason.UNEXPECTED_FRAME,
                                  f"expected ServerKey first, got {type(frame).__name__}")
            self._on_server_key(frame)
            return None
        if isinstance(frame, RecvPacket):
            self.stats.packets_received += 1
            self.stats.bytes_received += len(frame.packet)
            return PacketReceived(frame.src, frame.packet)
        if isinstance(frame, ServerInfo):
            if self.state is not ClientState.AWAITING_SERVER_INFO:
                self.stats.ignored_frames += 1
                return None
            return self._on_server_info(frame, now)
        if isinstance(frame, KeepAlive):
            self.stats.keep_alives += 1
            return frame
        if isinstance(frame, Ping):
            self._out.append(Pong(frame.data).pack())
            self.stats.pings_answered += 1
            return None
        if isinstance(frame, Pong):
            sent = self._pings.pop(frame.data, None)
            if sent is None:
                self.stats.pongs_unmatched += 1
                return None
            return PongReceived(frame.data, max(0.0, now - sent))
        if isinstance(frame, PeerGone | PeerPresent | Health | Restarting):
            return frame
        self.stats.ignored_frames += 1  # ServerKey again (fast start), or client->server types
        return None

    def _on_server_key(self, frame: ServerKey) -> None:
        if self.expected_server_key is not None and frame.key != self.expected_server_key:
            self.state = ClientState.CLOSED
            raise ClientError(ClientErrorReason.SERVER_KEY_MISMATCH,
                              f"server key {frame.key}, expected {self.expected_server_key}")
        self.server_key = frame.key
        sealed = self.private_key.seal_to(frame.key, self._info, self._random)
        self._out.append(ClientInfo(self.public_key, sealed).pack())
        if self.preferred:
            self._out.append(NotePreferred(True).pack())
        if self.watch_conns:
            self._out.append(WatchConns().pack())
        self.state = ClientState.AWAITING_SERVER_INFO

    def _on_server_info(self, frame: ServerInfo, now: float) -> Connected:
        assert self.server_key is not None
        plaintext = self.private_key.open_from(self.server_key, frame.sealed)
        if plaintext is None:
            self.state = ClientState.CLOSED
            raise ClientError(ClientErrorReason.BAD_SERVER_INFO, "the ServerInfo box does not open")
        try:
            info = parse_server_info(plaintext)
        except ClientError:
            self.state = ClientState.CLOSED
            raise
        self.server_info = info
        if info.token_bucket_bytes_per_second:
            self._bucket = _TokenBucket(info.token_bucket_bytes_per_second, info.token_bucket_bytes_burst,
                                        now)
        self.state = ClientState.CONNECTED
        return Connected(self.server_key, info)

    # -- what the caller sends ----------------------------------------------------------

    def _require_handshake_sent(self) -> None:
        if self.state not in (ClientState.AWAITING_SERVER_INFO, ClientState.CONNECTED):
            raise ClientStateError(f"cannot send in state {self.state.value}")

    def send_packet(self, dst: NodePublicKey, packet: bytes, now: float) -> bool:
        """Frame ``packet`` for the client ``dst``; False when the advisory rate limit drops it."""
        self._require_handshake_sent()
        if len(packet) > MAX_PACKET_SIZE:
            raise ValueError(f"packet of {len(packet)} bytes, the limit is {MAX_PACKET_SIZE}")
        if self._bucket is not None and not self._bucket.take(FRAME_OVERHEAD + len(packet), now):
            self.stats.dropped_rate_limited += 1
            return False
        self._out.append(SendPacket(dst, packet).pack())
        self.stats.packets_sent += 1
        self.stats.bytes_sent += len(packet)
        return True

    def ping(self, now: float) -> bytes:
        """Send a Ping with 8 random bytes; its Pong comes back as PongReceived. Returns the bytes."""
        self._require_handshake_sent()
        data = self._random(PING_LEN)
        self._pings[data] = now
        while len(self._pings) > MAX_PENDING_PINGS:
            self._pings.popitem(last=False)
        self._out.append(Ping(data).pack())
        return data

    def note_preferred(self, preferred: bool) -> None:
        """Tell the server whether it is this client's home region."""
        self._require_handshake_sent()
        self.preferred = preferred
        self._out.append(NotePreferred(preferred).pack())

    def close_peer(self, peer: NodePublicKey) -> None:
        """Mesh (needs the mesh key): ask the server to close every connection of ``peer``."""
        self._require_handshake_sent()
        self._out.append(ClosePeer(peer).pack())

    def forward_packet(self, src: NodePublicKey, dst: NodePublicKey, packet: bytes) -> None:
        """Mesh (needs the mesh key): hand the server a packet from ``src`` for its client ``dst``."""
        self._require_handshake_sent()
        self._out.append(ForwardPacket(src, dst, packet).pack())

    def data_to_send(self) -> bytes:
        """The bytes to write to the server now (empty when there are none)."""
        out = b"".join(self._out)
        self._out.clear()
        return out
