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

Mesh: a client whose ClientInfo carries the server's mesh key (compared in constant time) may
send WatchConns (it then hears a PeerPresent for every client and one PeerPresent or PeerGone
per change), ForwardPacket (delivered here, never forwarded on) and ClosePeer. The server's own
mesh links register as forwarders (``add_forwarder``): a packet for a key that is not connected
here goes to the first link that announced it. Limits: a backed-up receiver holds at most
``send_queue_depth`` packets and ``send_queue_bytes`` bytes; a watcher that falls more than a
whole table behind is closed (it reconnects and gets a fresh flood).
"""

from __future__ import annotations

import enum
import hmac
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
    PeerPresent,
    PeerPresentFlags,
    Ping,
    Pong,
    RecvPacket,
    Restarting,
    SendPacket,
    ServerInfo,
    ServerKey,
    WatchConns,
)
from .keys import KEY_LEN, NONCE_LEN, NodePrivateKey, NodePublicKey, RandomSource
from .mesh import Forwarder, ForwarderTable

SEND_QUEUE_DEPTH = 32  # packets queued per client before the oldest is dropped (derper's depth)
SEND_QUEUE_BYTES = 1 << 20  # and at most this many packet bytes
MESH_KEY_LEN = 32
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
    WATCHER_OVERFLOW = "watcher_overflow"  # a mesh watcher fell a whole table behind
    CLOSE_PEER = "close_peer"  # a mesh peer asked (ClosePeer)


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
    packets_to_mesh: int = 0  # SendPackets handed to a mesh link (ForwardPacket)
    packets_from_mesh: int = 0  # ForwardPackets delivered here
    mesh_handshakes: int = 0  # clients that proved the mesh key
    closed: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)


@dataclass(eq=False)
class _Conn:
    conn_id: int
    state: ConnState = ConnState.AWAITING_CLIENT_INFO
    key: NodePublicKey | None = None
    version: int = 0
    preferred: bool = False
    remote: tuple[str, int] | None = None
    not_ideal: bool = False  # the client sent Ideal-Node: it would rather be on another node
    is_prober: bool = False
    can_mesh: bool = False  # proved the mesh key: WatchConns, ForwardPacket, ClosePeer allowed
    watching: bool = False
    decoder: FrameDecoder = field(default_factory=lambda: FrameDecoder(MAX_CLIENT_INFO_LEN))
    packets: deque[bytes] = field(default_factory=deque)
    queued_bytes: int = 0  # of ``packets``
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
                 send_queue_bytes: int = SEND_QUEUE_BYTES, mesh_key: bytes | None = None,
                 random: RandomSource = nacl.utils.random) -> None:
        if mesh_key is not None and len(mesh_key) != MESH_KEY_LEN:
            raise ValueError(f"mesh_key: must be {MESH_KEY_LEN} bytes")
        self.private_key = private_key
        self.public_key = private_key.public
        self.allow = allow
        self.max_clients = max_clients
        self.send_queue_depth = send_queue_depth
        self.send_queue_bytes = send_queue_bytes
        self.stats = ServerStats()
        self.forwarders = ForwarderTable()
        self._mesh_key = mesh_key
        self._random = random
        self._conns: dict[int, _Conn] = {}
        self._clients: dict[NodePublicKey, _Conn] = {}
        self._watchers: dict[int, _Conn] = {}

    def __repr__(self) -> str:
        return f"DerpServer({self.public_key}, clients={len(self._clients)})"

    @property
    def client_count(self) -> int:
        return len(self._clients)

    @property
    def home_clients(self) -> int:
        """Connected clients that said this server is their home (NotePreferred), as derper's
        home-connections gauge."""
        return sum(1 for conn in self._clients.values() if conn.preferred)

    def is_home_of(self, key: NodePublicKey) -> bool:
        """Whether the client ``key`` is connected and said this server is its home."""
        conn = self._clients.get(key)
        return conn is not None and conn.preferred

    def client_key(self, conn_id: int) -> NodePublicKey | None:
        """The node key a connection proved, or None before the handshake."""
        conn = self._conns.get(conn_id)
        return conn.key if conn is not None else None

    def is_connected(self, key: NodePublicKey) -> bool:
        return key in self._clients

    def is_mesh_peer(self, conn_id: int) -> bool:
        """True once the connection proved the mesh key (exempt from rate limits)."""
        conn = self._conns.get(conn_id)
        return conn is not None and conn.can_mesh

    @property
    def has_mesh_key(self) -> bool:
        return self._mesh_key is not None

    def connection_ids(self) -> list[int]:
        return list(self._conns)

    # -- connections -----------------------------------------------------------------

    def accept(self, conn_id: int, now: float, *, remote: tuple[str, int] | None = None,
               not_ideal: bool = False) -> bytes:
        """A new upgraded stream (from ``remote``); returns the ServerKey frame to write first."""
        if conn_id in self._conns:
            raise ValueError(f"connection {conn_id} already exists")
        self._conns[conn_id] = _Conn(conn_id, last_write=now, remote=remote, not_ideal=not_ideal)
        self.stats.accepted += 1
        return ServerKey(self.public_key).pack()

    def connection_lost(self, conn_id: int) -> Actions:
        """The stream ended (or the caller closed it): forget it, tell whoever sent to it."""
        conn = self._conns.pop(conn_id, None)
        if conn is None:
            return Actions()
        conn.state = ConnState.CLOSED
        self._watchers.pop(conn_id, None)
        wake: set[int] = set()
        close: set[int] = set()
        if conn.key is not None and self._clients.get(conn.key) is conn:
            del self._clients[conn.key]
            gone = PeerGone(conn.key, PeerGoneReason.DISCONNECTED).pack()
            self._tell_watchers(gone, wake, close)
            if conn.key not in self.forwarders:  # still in the region through a mesh peer
                self._tell_senders(conn.key, gone, wake)
        return Actions(frozenset(wake - close), frozenset(close))

    def _tell_senders(self, key: NodePublicKey, gone: bytes, wake: set[int]) -> None:
        for other in self._clients.values():
            if key in other.sent_to:
                other.sent_to.discard(key)
                if self._queue_control(other, gone):
                    wake.add(other.conn_id)

    def _tell_watchers(self, frame: bytes, wake: set[int], close: set[int]) -> None:
        for watcher in list(self._watchers.values()):
            # A watcher may hold a whole table's worth of changes; beyond that it is closed
            # (it reconnects and hears a fresh flood) rather than silently missing some.
            if len(watcher.control) >= 2 * self.max_clients + CONTROL_QUEUE_DEPTH:
                del self._watchers[watcher.conn_id]
                close.add(self._close(watcher, CloseReason.WATCHER_OVERFLOW))
                continue
            watcher.control.append(frame)
            wake.add(watcher.conn_id)

    def _present(self, conn: _Conn) -> bytes:
        flags = PeerPresentFlags(0)
        if conn.is_prober:
            flags |= PeerPresentFlags.IS_PROBER
        if conn.can_mesh:
            flags |= PeerPresentFlags.IS_MESH_PEER
        if conn.not_ideal:
            flags |= PeerPresentFlags.NOT_IDEAL
        assert conn.key is not None
        return PeerPresent(conn.key, conn.remote or ("::", 0), flags or PeerPresentFlags.IS_REGULAR).pack()

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
            if not conn.can_mesh:
                close.add(self._close(conn, CloseReason.NOT_PERMITTED))  # mesh frames need the key
            elif isinstance(frame, ForwardPacket):
                self._from_mesh(conn, frame, wake)
            elif isinstance(frame, WatchConns):
                self._watch(conn, wake)
            else:
                target = self._clients.get(frame.peer)
                if target is not None and target is not conn:
                    close.add(self._close(target, CloseReason.CLOSE_PEER))
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
        can_mesh = self._proves_mesh_key(body)
        if not can_mesh and self.allow is not None and not self.allow(frame.key):
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
        conn.can_mesh, conn.is_prober = can_mesh, body.get("IsProber") is True
        self.stats.mesh_handshakes += can_mesh
        # A mesh peer may ForwardPacket: two keys before the packet.
        conn.decoder.max_frame_size = MAX_STEADY_FRAME + (KEY_LEN if can_mesh else 0)
        self._clients[frame.key] = conn
        self._tell_watchers(self._present(conn), wake, close)
        info = json.dumps({"version": PROTOCOL_VERSION}, separators=(",", ":")).encode()
        conn.control.append(ServerInfo(self.private_key.seal_to(frame.key, info, self._random)).pack())
        wake.add(conn.conn_id)
        self.stats.handshakes += 1

    def _proves_mesh_key(self, body: dict[str, object]) -> bool:
        if self._mesh_key is None:
            return False
        text = next((v for k, v in body.items() if k.lower() == "meshkey"), None)
        if not isinstance(text, str) or len(text) != 2 * MESH_KEY_LEN:
            return False
        try:
            offered = bytes.fromhex(text)
        except ValueError:
            return False
        return hmac.compare_digest(offered, self._mesh_key)

    def _forward(self, conn: _Conn, frame: SendPacket, wake: set[int]) -> None:
        assert conn.key is not None
        dst = self._clients.get(frame.dst)
        if dst is None:
            link = self.forwarders.lookup(frame.dst)
            if link is not None:
                conn.sent_to.add(frame.dst)
                if link.forward_packet(conn.key, frame.dst, frame.packet):
                    self.stats.packets_to_mesh += 1
                else:
                    self.stats.dropped["mesh_link_full"] += 1
                return
            self._unknown(conn, frame.dst, frame.packet, wake)
            return
        conn.sent_to.add(frame.dst)
        self._deliver(dst, conn.key, frame.packet, wake)

    def _unknown(self, conn: _Conn, dst: NodePublicKey, packet: bytes, wake: set[int]) -> None:
        self.stats.dropped["unknown_destination"] += 1
        gone = PeerGone(dst, PeerGoneReason.NOT_HERE)
        if _looks_like_disco(packet) and self._queue_control(conn, gone.pack()):
            wake.add(conn.conn_id)

    def _deliver(self, dst: _Conn, src: NodePublicKey, packet: bytes, wake: set[int]) -> None:
        frame = RecvPacket(src, packet).pack()
        if not dst.writable:
            while dst.packets and (len(dst.packets) >= self.send_queue_depth
                                   or dst.queued_bytes + len(frame) > self.send_queue_bytes):
                dst.queued_bytes -= len(dst.packets.popleft())
                self.stats.dropped["queue_full"] += 1
        dst.packets.append(frame)
        dst.queued_bytes += len(frame)
        self.stats.packets_forwarded += 1
        self.stats.bytes_forwarded += len(packet)
        wake.add(dst.conn_id)

    def _from_mesh(self, conn: _Conn, frame: ForwardPacket, wake: set[int]) -> None:
        dst = self._clients.get(frame.dst)
        if dst is None:  # never forwarded on: one hop only
            self._unknown(conn, frame.dst, frame.packet, wake)
            return
        self.stats.packets_from_mesh += 1
        self._deliver(dst, frame.src, frame.packet, wake)

    def _watch(self, conn: _Conn, wake: set[int]) -> None:
        if conn.watching:
            return
        conn.watching = True
        self._watchers[conn.conn_id] = conn
        conn.control.extend(self._present(c) for c in self._clients.values())
        wake.add(conn.conn_id)

    # -- the server's own mesh links -----------------------------------------------------

    def add_forwarder(self, key: NodePublicKey, link: Forwarder) -> bool:
        """``link`` (a mesh peer) has a client ``key``; False when the table is full."""
        if key == self.public_key:
            return False
        return self.forwarders.add(key, link)

    def remove_forwarder(self, key: NodePublicKey, link: Forwarder) -> Actions:
        """``link`` says ``key`` left it; PeerGone to our senders when it left the region."""
        wake: set[int] = set()
        if self.forwarders.remove(key, link) and key not in self._clients:
            self._tell_senders(key, PeerGone(key, PeerGoneReason.DISCONNECTED).pack(), wake)
        return Actions(frozenset(wake))

    def remove_link(self, link: Forwarder) -> Actions:
        """The mesh link broke: forget everything it announced."""
        wake: set[int] = set()
        for key in self.forwarders.remove_link(link):
            if key not in self._clients:
                self._tell_senders(key, PeerGone(key, PeerGoneReason.DISCONNECTED).pack(), wake)
        return Actions(frozenset(wake))

    def restarting(self, reconnect_in_ms: int, try_for_ms: int) -> Actions:
        """Tell every client the server is going away and when to come back (graceful stop)."""
        frame = Restarting(reconnect_in_ms, try_for_ms).pack()
        wake = {conn.conn_id for conn in self._clients.values() if self._queue_control(conn, frame)}
        return Actions(frozenset(wake))

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
            while not writable and conn.packets and (len(conn.packets) > self.send_queue_depth
                                                     or conn.queued_bytes > self.send_queue_bytes):
                conn.queued_bytes -= len(conn.packets.popleft())
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
        conn.queued_bytes = 0
        conn.last_write = now
        return out
