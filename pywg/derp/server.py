"""The DERP relay server as a state machine: connections in, bytes and actions out.

Each TCP stream after the HTTP 101 is a connection id the caller picks. ``accept`` gives the
ServerKey frame to write; ``receive_data`` feeds what the client sent and returns a
``Actions``: connections with new bytes to write and connections to close (the caller closes
them and then calls ``connection_lost``). The handshake is the client's ClientInfo (its
node key and a NaCl box to the server key holding ``{"version":2,...}``); a box that does not
open proves the client does not own the key and closes it. After ServerInfo, SendPacket to
a connected key becomes RecvPacket there (with the source key); a newer connection for a
key replaces the old one. Every client has a bounded send queue: when it is full the oldest
packet is dropped and counted, as derper does. Any malformed, truncated, oversized or
unexpected frame closes that one client and is counted; nothing here raises on input.
Sans-I/O: no sockets, no clocks (``now`` comes in).
"""

from __future__ import annotations

import enum
import json
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import nacl.utils

from .frames import (
    MAX_CLIENT_INFO_LEN,
    MAX_PACKET_SIZE,
    PROTOCOL_VERSION,
    ClientInfo,
    ClosePeer,
    ForwardPacket,
    Frame,
    FrameDecoder,
    FrameError,
    KeepAlive,
    NotePreferred,
    PeerGone,
    PeerGoneReason,
    Ping,
    Pong,
    RecvPacket,
    SendPacket,
    ServerInfo,
    ServerKey,
    WatchConns,
)
from .keys import KEY_LEN, NONCE_LEN, NodePrivateKey, NodePublicKey, RandomSource

SEND_QUEUE_DEPTH = 32  # packets queued per client before the oldest is dropped (derper's depth)
CONTROL_QUEUE_DEPTH = 32  # Pong / PeerGone / KeepAlive frames queued per client
MAX_CLIENTS = 10_000
MAX_STEADY_FRAME = KEY_LEN + MAX_PACKET_SIZE  # the largest frame a handshaken client may send
DISCO_MAGIC = b"TS\xf0\x9f\x92\xac"
_DISCO_MIN = len(DISCO_MAGIC) + KEY_LEN + NONCE_LEN

ClientFilter = Callable[[NodePublicKey], bool]
"""True when the node key may connect (``--verify-clients``)."""


class ConnState(enum.Enum):
    AWAITING_CLIENT_INFO = "awaiting_client_info"
    CONNECTED = "connected"
    CLOSED = "closed"


class CloseReason(enum.Enum):
    FRAME = "frame"  # the codec refused the stream: malformed, truncated, oversized
    NOT_CLIENT_INFO = "not_client_info"  # the first frame was something else
    BAD_CLIENT_INFO = "bad_client_info"  # the box does not open or its JSON is not an object
    NOT_ALLOWED = "not_allowed"  # the key is not on the allowlist
    SERVER_FULL = "server_full"  # MAX_CLIENTS connected already
    REPLACED = "replaced"  # a newer connection arrived with the same key
    NOT_PERMITTED = "not_permitted"  # a mesh-only frame from a client that cannot mesh
    UNEXPECTED_FRAME = "unexpected_frame"  # a server-to-client frame type from a client


@dataclass(frozen=True, slots=True)
class Actions:
    """What the caller must do after feeding bytes: write to ``wake``, close ``close``."""

    wake: frozenset[int] = frozenset()
    close: frozenset[int] = frozenset()


@dataclass
class ServerStats:
    """Plain counters; ``closed`` and ``dropped`` count by reason."""

    accepted: int = 0
    handshakes: int = 0
    packets_forwarded: int = 0
    bytes_forwarded: int = 0
    pings_answered: int = 0
    closed: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)


@dataclass(eq=False)
class _Conn:
    conn_id: int
    state: ConnState = ConnState.AWAITING_CLIENT_INFO
    key: NodePublicKey | None = None
    version: int = 0
    preferred: bool = False
    decoder: FrameDecoder = field(default_factory=lambda: FrameDecoder(MAX_CLIENT_INFO_LEN))
    packets: deque[bytes] = field(default_factory=deque)
    control: deque[bytes] = field(default_factory=deque)
    sent_to: set[NodePublicKey] = field(default_factory=set)
    last_write: float = 0.0
    writable: bool = True  # the caller's socket takes bytes now: no queue limit within one feed


def _looks_like_disco(packet: bytes) -> bool:
    return len(packet) >= _DISCO_MIN and packet.startswith(DISCO_MAGIC)


class DerpServer:
    """The relay's state: its key, its connections, the table of clients by node key."""

    def __init__(self, private_key: NodePrivateKey, *, allow: ClientFilter | None = None,
                 max_clients: int = MAX_CLIENTS, send_queue_depth: int = SEND_QUEUE_DEPTH,
                 random: RandomSource = nacl.utils.random) -> None:
        self.private_key = private_key
        self.public_key = private_key.public
        self.allow = allow
        self.max_clients = max_clients
        self.send_queue_depth = send_queue_depth
        self.stats = ServerStats()
        self._random = random
        self._conns: dict[int, _Conn] = {}
        self._clients: dict[NodePublicKey, _Conn] = {}

    def __repr__(self) -> str:
        return f"DerpServer({self.public_key}, clients={len(self._clients)})"

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def client_key(self, conn_id: int) -> NodePublicKey | None:
        """The node key a connection proved, or None before the handshake."""
        conn = self._conns.get(conn_id)
        return conn.key if conn is not None else None

    def is_connected(self, key: NodePublicKey) -> bool:
        return key in self._clients

    # -- connections -----------------------------------------------------------------

    def accept(self, conn_id: int, now: float) -> bytes:
        """A new upgraded stream; returns the ServerKey frame to write first."""
        if conn_id in self._conns:
            raise ValueError(f"connection {conn_id} already exists")
        self._conns[conn_id] = _Conn(conn_id, last_write=now)
        self.stats.accepted += 1
        return ServerKey(self.public_key).pack()

    def connection_lost(self, conn_id: int) -> Actions:
        """The stream ended (or the caller closed it): forget it, tell whoever sent to it."""
        conn = self._conns.pop(conn_id, None)
        if conn is None:
            return Actions()
        conn.state = ConnState.CLOSED
        wake: set[int] = set()
        if conn.key is not None and self._clients.get(conn.key) is conn:
            del self._clients[conn.key]
            gone = PeerGone(conn.key, PeerGoneReason.DISCONNECTED).pack()
            for other in self._clients.values():
                if conn.key in other.sent_to:
                    other.sent_to.discard(conn.key)
                    if self._queue_control(other, gone):
                        wake.add(other.conn_id)
        return Actions(frozenset(wake))

    def _close(self, conn: _Conn, reason: CloseReason) -> int:
        self.stats.closed[reason.value] += 1
        conn.state = ConnState.CLOSED
        return conn.conn_id

    # -- input -------------------------------------------------------------------------

    def receive_data(self, conn_id: int, data: bytes, now: float) -> Actions:
        """Feed bytes from a client; the writes and closes they cause. Never raises on input."""
        conn = self._conns.get(conn_id)
        if conn is None or conn.state is ConnState.CLOSED:
            return Actions()
        wake: set[int] = set()
        close: set[int] = set()
        try:
            frames = conn.decoder.feed(data)
        except FrameError as exc:
            self._handle_all(conn, exc.decoded, now, wake, close)
            if conn.state is not ConnState.CLOSED:
                self.stats.dropped[f"frame: {exc.reason.value}"] += 1
                close.add(self._close(conn, CloseReason.FRAME))
            return Actions(frozenset(wake - close), frozenset(close))
        self._handle_all(conn, frames, now, wake, close)
        return Actions(frozenset(wake - close), frozenset(close))

    def _handle_all(self, conn: _Conn, frames: list[Frame], now: float, wake: set[int],
                    close: set[int]) -> None:
        for frame in frames:
            if conn.state is ConnState.CLOSED:
                return
            self._handle(conn, frame, now, wake, close)

    def _handle(self, conn: _Conn, frame: Frame, now: float, wake: set[int], close: set[int]) -> None:
        if conn.state is ConnState.AWAITING_CLIENT_INFO:
            if not isinstance(frame, ClientInfo):
                close.add(self._close(conn, CloseReason.NOT_CLIENT_INFO))
                return
            self._on_client_info(conn, frame, wake, close)
            return
        if isinstance(frame, SendPacket):
            self._forward(conn, frame, wake)
        elif isinstance(frame, Ping):
            if self._queue_control(conn, Pong(frame.data).pack()):
                wake.add(conn.conn_id)
            self.stats.pings_answered += 1
        elif isinstance(frame, NotePreferred):
            conn.preferred = frame.preferred
        elif isinstance(frame, KeepAlive | Pong):
            pass  # a client may answer our pings; nothing to do
        elif isinstance(frame, WatchConns | ClosePeer | ForwardPacket):
            close.add(self._close(conn, CloseReason.NOT_PERMITTED))  # mesh frames; no mesh key here
        else:
            close.add(self._close(conn, CloseReason.UNEXPECTED_FRAME))

    def _on_client_info(self, conn: _Conn, frame: ClientInfo, wake: set[int], close: set[int]) -> None:
        plaintext = self.private_key.open_from(frame.key, frame.sealed)
        body = None
        if plaintext is not None:
            try:
                body = json.loads(plaintext)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                body = None
        if not isinstance(body, dict):
            close.add(self._close(conn, CloseReason.BAD_CLIENT_INFO))
            return
        version = body.get("version", 0)
        if isinstance(version, bool) or not isinstance(version, int):
            close.add(self._close(conn, CloseReason.BAD_CLIENT_INFO))
            return
        if self.allow is not None and not self.allow(frame.key):
            close.add(self._close(conn, CloseReason.NOT_ALLOWED))
            return
        old = self._clients.get(frame.key)
        if old is None and len(self._clients) >= self.max_clients:
            close.add(self._close(conn, CloseReason.SERVER_FULL))
            return
        if old is not None:
            # The newer connection wins; the old one is closed without a PeerGone to anyone.
            old.key = None
            close.add(self._close(old, CloseReason.REPLACED))
        conn.key, conn.version, conn.state = frame.key, version, ConnState.CONNECTED
        conn.decoder.max_frame_size = MAX_STEADY_FRAME
        self._clients[frame.key] = conn
        info = json.dumps({"version": PROTOCOL_VERSION}, separators=(",", ":")).encode()
        conn.control.append(ServerInfo(self.private_key.seal_to(frame.key, info, self._random)).pack())
        wake.add(conn.conn_id)
        self.stats.handshakes += 1

    def _forward(self, conn: _Conn, frame: SendPacket, wake: set[int]) -> None:
        assert conn.key is not None
        dst = self._clients.get(frame.dst)
        if dst is None:
            self.stats.dropped["unknown_destination"] += 1
            gone = PeerGone(frame.dst, PeerGoneReason.NOT_HERE)
            if _looks_like_disco(frame.packet) and self._queue_control(conn, gone.pack()):
                wake.add(conn.conn_id)
            return
        conn.sent_to.add(frame.dst)
        if not dst.writable and len(dst.packets) >= self.send_queue_depth:
            dst.packets.popleft()
            self.stats.dropped["queue_full"] += 1
        dst.packets.append(RecvPacket(conn.key, frame.packet).pack())
        self.stats.packets_forwarded += 1
        self.stats.bytes_forwarded += len(frame.packet)
        wake.add(dst.conn_id)

    def _queue_control(self, conn: _Conn, frame: bytes) -> bool:
        if len(conn.control) >= CONTROL_QUEUE_DEPTH:
            self.stats.dropped["control_queue_full"] += 1
            return False
        conn.control.append(frame)
        return True

    # -- output ------------------------------------------------------------------------

    def set_writable(self, conn_id: int, writable: bool) -> None:
        """The caller's socket to ``conn_id`` is backed up (False) or takes bytes again (True).
        While it is backed up, at most ``send_queue_depth`` packets wait; older ones are dropped.
        While writable, the caller takes ``data_to_send`` after every ``receive_data``, so what
        waits is bounded by the bytes of one feed."""
        conn = self._conns.get(conn_id)
        if conn is not None:
            conn.writable = writable
            while not writable and len(conn.packets) > self.send_queue_depth:
                conn.packets.popleft()
                self.stats.dropped["queue_full"] += 1

    def keep_alive(self, conn_id: int, now: float) -> bool:
        """Queue a KeepAlive (the caller does it every 60 s of idle); False if the conn is gone."""
        conn = self._conns.get(conn_id)
        if conn is None or conn.state is not ConnState.CONNECTED:
            return False
        return self._queue_control(conn, KeepAlive().pack())

    def data_to_send(self, conn_id: int, now: float) -> bytes:
        """The bytes to write to a connection now (control frames first); empty when none."""
        conn = self._conns.get(conn_id)
        if conn is None or not (conn.control or conn.packets):
            return b""
        out = b"".join(conn.control) + b"".join(conn.packets)
        conn.control.clear()
        conn.packets.clear()
        conn.last_write = now
        return out
