"""The device-level engine: one static key, many peers, one index table.

Inbound datagrams are routed by their receiver index (responses, cookie replies,
transport) or, for initiations, by the static key they decrypt to. Every method takes
``now`` and returns a list of actions for the caller to carry out; nothing here
blocks, sleeps or touches a socket.
"""

from __future__ import annotations

import secrets
from collections import Counter, deque
from collections.abc import Callable

from .actions import Action, Drop, DropReason, Endpoint, SendDatagram
from .constants import (
    HANDSHAKE_INITIATION_RATE,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_TRANSPORT,
    TRANSPORT_MIN_SIZE,
)
from .cookie import CookieChecker
from .crypto import CryptoError, PrivateKey, is_low_order
from .keypair import Keypair
from .messages import (
    CookieReply,
    Initiation,
    MessageError,
    Response,
    message_type,
    parse,
    unpack_transport_header,
)
from .noise import InitiationFields, SymmetricState, consume_initiation, consume_response
from .peer import Peer

# Above this many handshake messages in one second the device is under load and
# requires mac2 (a cookie round trip) before it spends a DH on a handshake.
UNDER_LOAD_HANDSHAKES_PER_SECOND = 128
UNDER_LOAD_HOLD = 1.0

_TRANSPORT_TYPE = MESSAGE_TRANSPORT.to_bytes(4, "little")


class Dispatcher:
    """A WireGuard device's protocol state (sans-I/O)."""

    def __init__(self, private_key: bytes | None, *, wall_offset: float = 0.0,
                 random_bytes: Callable[[int], bytes] = secrets.token_bytes,
                 mtu: int | None = None) -> None:
        """``wall_offset``: add to ``now`` to get UNIX time (for handshake timestamps).

        ``private_key`` None: a device without a key yet (``wg`` sets it later); it
        neither sends nor answers handshakes until ``set_private_key``.
        """
        self._static_private: bytes | None = None
        self.static_key: PrivateKey | None = None  # imported once: every DH with it reuses it
        self.static_public: bytes | None = None
        self.cookie_checker: CookieChecker | None = None
        self.wall_offset = wall_offset
        self.mtu = mtu
        self._random = random_bytes
        self.peers: dict[bytes, Peer] = {}
        self._indices: dict[int, tuple[Peer, Keypair | None]] = {}
        self.drops: Counter[DropReason] = Counter()
        self.under_load = False  # set by the caller to force cookie replies
        self._recent_handshakes: deque[float] = deque()
        self._under_load_until = float("-inf")
        self.set_private_key(private_key)

    def __repr__(self) -> str:
        public = self.static_public.hex()[:16] + "..." if self.static_public else None
        return f"Dispatcher(public_key={public}, peers={len(self.peers)})"

    @property
    def static_private(self) -> bytes | None:
        """The private key. Change it with set_private_key: static_key, static_public, the
        cookie checker and every peer's static_static are derived from it once."""
        return self._static_private

    def set_private_key(self, private_key: bytes | None) -> list[bytes]:
        """Change the static key (None: remove it). Sessions of every peer end; a peer whose
        public key is the new own public key is removed (returned), as in wireguard-go.
        Setting the key already held changes nothing."""
        if private_key is not None and len(private_key) != 32:
            raise ValueError("private key must be 32 bytes")
        if private_key == self._static_private:
            return []
        self._static_private = private_key
        if private_key is None:
            self.static_key = self.static_public = self.cookie_checker = None
        else:
            self.static_key = PrivateKey(private_key)
            self.static_public = self.static_key.public
            self.cookie_checker = CookieChecker(self.static_public, self._random)
        removed = [key for key in self.peers if key == self.static_public]
        for key in removed:
            self.remove_peer(key)
        for peer in self.peers.values():
            peer.static_key_changed()
        return removed

    # --- configuration ------------------------------------------------------------

    def add_peer(self, public_key: bytes, *, preshared_key: bytes | None = None,
                 endpoint: Endpoint | None = None, persistent_keepalive: int = 0) -> Peer:
        if len(public_key) != 32:
            raise ValueError("peer public key must be 32 bytes")
        if public_key == self.static_public:
            raise ValueError("peer public key is this device's own public key")
        if public_key in self.peers:
            raise ValueError("peer already exists")
        if is_low_order(public_key):
            raise ValueError("peer public key is a low-order point: no handshake could succeed")
        peer = Peer(self, public_key, preshared_key=preshared_key, endpoint=endpoint,
                    persistent_keepalive=persistent_keepalive)
        self.peers[public_key] = peer
        return peer

    def remove_peer(self, public_key: bytes) -> None:
        peer = self.peers.pop(public_key)
        peer.zero_key_material()
        peer.timers.clear_all()
        peer.staged.clear()

    # --- DeviceContext (used by Peer) ---------------------------------------------

    def random_bytes(self, n: int) -> bytes:
        return self._random(n)

    def allocate_index(self, peer: Peer) -> int:
        while True:
            index = int.from_bytes(self._random(4), "little")
            if index not in self._indices:
                self._indices[index] = (peer, None)
                return index

    def bind_index(self, index: int, peer: Peer, keypair: Keypair) -> None:
        self._indices[index] = (peer, keypair)

    def free_index(self, index: int) -> None:
        self._indices.pop(index, None)

    def wall_time_ns(self, now: float) -> int:
        return int((now + self.wall_offset) * 1e9)

    def drop(self, reason: DropReason, peer: Peer | None = None) -> Drop:
        self.drops[reason] += 1
        return Drop(reason, peer.public_key if peer is not None else None)

    # --- caller API -----------------------------------------------------------------

    def send_packet(self, peer_public_key: bytes, packet: bytes, now: float) -> list[Action]:
        """An outbound IP packet for this peer: sealed now, or staged behind a handshake."""
        return self.peers[peer_public_key].send_packet(packet, now)

    def initiate_handshake(self, peer_public_key: bytes, now: float) -> list[Action]:
        return self.peers[peer_public_key].initiate(now, retry=False)

    def transport_keypair(self, receiver_index: int, now: float) -> tuple[Peer, Keypair] | Drop:
        """For datagrams the caller opens itself: the session a receiver index names."""
        peer, keypair = self._indices.get(receiver_index, (None, None))
        if peer is None or keypair is None:
            return self.drop(DropReason.UNKNOWN_INDEX)
        if keypair.expired(now):
            return self.drop(DropReason.KEY_EXPIRED, peer)
        return peer, keypair

    def send_keepalive(self, peer_public_key: bytes, now: float) -> list[Action]:
        """A keepalive now (a handshake first when there is no session)."""
        return self.peers[peer_public_key].send_keepalive(now)

    def tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for peer in list(self.peers.values()):
            actions += peer.tick(now)
        return actions

    def next_deadline(self) -> float | None:
        deadlines = [d for p in self.peers.values() if (d := p.next_deadline()) is not None]
        return min(deadlines, default=None)

    def is_under_load(self, now: float) -> bool:
        return self.under_load or now < self._under_load_until

    def datagram_received(self, data: bytes, source: Endpoint, now: float) -> list[Action]:
        """Process one inbound UDP datagram. Never raises for remote input."""
        if data[:4] == _TRANSPORT_TYPE and len(data) >= TRANSPORT_MIN_SIZE:
            mtype = MESSAGE_TRANSPORT  # the per-packet case, checked as message_type would
        else:
            try:
                mtype = message_type(data)
            except MessageError as exc:
                return [self.drop(exc.reason)]
        if mtype == MESSAGE_TRANSPORT:
            receiver, counter = unpack_transport_header(data)
            peer, keypair = self._indices.get(receiver, (None, None))
            if peer is None or keypair is None:
                return [self.drop(DropReason.UNKNOWN_INDEX)]
            return peer.receive_transport(keypair, counter, data, source, now)
        if mtype == MESSAGE_COOKIE_REPLY:
            return self._consume_cookie_reply(parse(data), now)  # type: ignore[arg-type]
        return self._receive_handshake(mtype, data, source, now)

    # --- handshake messages ---------------------------------------------------------

    def _receive_handshake(self, mtype: int, data: bytes, source: Endpoint, now: float) -> list[Action]:
        checker = self.cookie_checker
        if checker is None or self.static_key is None:
            return [self.drop(DropReason.NO_PRIVATE_KEY)]
        if not checker.check_mac1(data):
            return [self.drop(DropReason.BAD_MAC1)]
        self._note_handshake(now)
        message = parse(data)
        if self.is_under_load(now) and not checker.check_mac2(data, source, now):
            reply = checker.create_reply(data, message.sender_index, source, now)  # type: ignore[union-attr]
            return [SendDatagram(reply.pack(), source), self.drop(DropReason.COOKIE_REQUIRED)]
        if mtype == MESSAGE_INITIATION:
            return self._consume_initiation(message, source, now)  # type: ignore[arg-type]
        return self._consume_response(message, source, now)  # type: ignore[arg-type]

    def _note_handshake(self, now: float) -> None:
        recent = self._recent_handshakes
        recent.append(now)
        while recent and recent[0] <= now - 1.0:
            recent.popleft()
        if len(recent) > UNDER_LOAD_HANDSHAKES_PER_SECOND:
            self._under_load_until = now + UNDER_LOAD_HOLD

    def _consume_initiation(self, message: Initiation, source: Endpoint, now: float) -> list[Action]:
        fields = InitiationFields(message.ephemeral, message.encrypted_static, message.encrypted_timestamp)
        assert self.static_key is not None and self.static_public is not None  # checked by the caller
        try:
            consumed = consume_initiation(
                SymmetricState(), fields, static_private=self.static_key,
                static_public=self.static_public, static_static_for=self._static_static,
            )
        except CryptoError:
            return [self.drop(DropReason.HANDSHAKE_DECRYPT)]
        peer = self.peers.get(consumed.remote_static)
        if peer is None:
            return [self.drop(DropReason.UNKNOWN_PEER)]
        timestamp = consumed.payload
        if len(timestamp) != 12 or timestamp <= peer.last_timestamp:
            return [self.drop(DropReason.REPLAYED_TIMESTAMP, peer)]
        if (peer.last_initiation_consumed is not None
                and now - peer.last_initiation_consumed <= HANDSHAKE_INITIATION_RATE):
            return [self.drop(DropReason.INITIATION_FLOOD, peer)]
        peer.last_timestamp = timestamp
        peer.last_initiation_consumed = now
        return peer.respond(consumed, message.sender_index, source, now)

    def _static_static(self, remote_static: bytes) -> bytes | None:
        peer = self.peers.get(remote_static)
        return peer.static_static if peer is not None else None

    def _consume_response(self, message: Response, source: Endpoint, now: float) -> list[Action]:
        entry = self._indices.get(message.receiver_index)
        if entry is None:
            return [self.drop(DropReason.UNKNOWN_INDEX)]
        peer = entry[0]
        pending = peer.handshake
        if entry[1] is not None or pending is None or pending.local_index != message.receiver_index:
            return [self.drop(DropReason.UNEXPECTED_RESPONSE, peer)]
        state = pending.state.copy()
        assert self.static_key is not None  # checked by the caller
        try:
            consume_response(
                state, remote_ephemeral=message.ephemeral, encrypted_payload=message.encrypted_nothing,
                ephemeral_private=pending.ephemeral_private, static_private=self.static_key,
                psk=peer.preshared_key,
            )
        except CryptoError:
            return [self.drop(DropReason.HANDSHAKE_DECRYPT, peer)]
        send_key, receive_key = state.split()
        keypair = Keypair(send_key, receive_key, local_index=pending.local_index,
                          remote_index=message.sender_index, created=now, initiator=True)
        return peer.complete_as_initiator(keypair, source, now)

    def _consume_cookie_reply(self, message: CookieReply, now: float) -> list[Action]:
        entry = self._indices.get(message.receiver_index)
        if entry is None:
            return [self.drop(DropReason.UNKNOWN_INDEX)]
        peer = entry[0]
        if not peer.cookies.consume_reply(message, now):
            return [self.drop(DropReason.BAD_COOKIE_REPLY, peer)]
        return []
