"""The device-level engine: one static key, many peers, one index table.

Inbound datagrams are routed by their receiver index (responses, cookie replies,
transport) or, for initiations, by the static key they decrypt to. Every method takes
``now`` and returns a list of actions for the caller to carry out; nothing here
blocks, sleeps or touches a socket.

Key rotation without loss (a pywg extension; the wire protocol is unchanged):

- on the rotating node, ``add_static_key(new)`` makes the device accept handshake
  initiations addressed to either key (mac1 tells which: it is keyed by the receiver's
  public key) while it still initiates with the old one; ``promote_static_key()`` makes
  the new key the one it initiates with, the old one still accepted; and
  ``drop_secondary_key()`` ends the overlap. None of them ends a session.
- on every peer of that node, ``rename_peer(old, new)``: the same Peer (sessions,
  timers, endpoint, counters, allowed IPs) answers to the new key.
"""

from __future__ import annotations

import secrets
from collections import Counter, deque
from collections.abc import Callable

from .actions import Action, Drop, DropReason, Endpoint, SendDatagram
from .constants import (
    HANDSHAKE_INITIATION_RATE,
    INDEX_FREE,
    INDEX_PENDING,
    INDEX_SESSION,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    REJECT_AFTER_TIME,
    TRANSPORT_MIN_SIZE,
)
from .cookie import CookieChecker
from .crypto import CryptoError, PrivateKey, is_low_order
from .endpoint import RelayEndpoint
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
from .ratelimiter import RateLimiter

# Above this many handshake messages in one second the device is under load and
# requires mac2 (a cookie round trip) before it spends a DH on a handshake.
UNDER_LOAD_HANDSHAKES_PER_SECOND = 128
UNDER_LOAD_HOLD = 1.0
# A rotation's second static key is accepted at most this long (sessions made with it are
# zeroed after as long anyway: KEY_ZEROING_TIME).
SECONDARY_KEY_LIFETIME = 3 * REJECT_AFTER_TIME

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
        # A second static key accepted for inbound handshakes (rotation overlap).
        self._secondary_private: bytes | None = None
        self._secondary_expires: float | None = None
        self.secondary_key: PrivateKey | None = None
        self.secondary_public: bytes | None = None
        self.secondary_cookie_checker: CookieChecker | None = None
        self.wall_offset = wall_offset
        self.mtu = mtu
        self._random = random_bytes
        self.peers: dict[bytes, Peer] = {}
        self._indices: dict[int, tuple[Peer, Keypair | None]] = {}
        self.drops: Counter[DropReason] = Counter()
        self.rate_limiter = RateLimiter()  # per-source handshakes, applied under load after mac2
        # A screen ahead of the engine (the C hop's) keeps a copy of the receiver indices
        # and mac1 keys: index_listener(index, INDEX_*) after every change of an index,
        # keys_listener() after every change of the static keys.
        self.index_listener: Callable[[int, int], None] | None = None
        self.keys_listener: Callable[[], None] | None = None
        self.index_changes = 0  # every change of the index table (a session made, freed, ...)
        self.under_load = False  # set by the caller to force cookie replies
        self._recent_handshakes: deque[float] = deque()
        self._under_load_until = float("-inf")
        self.set_private_key(private_key)

    def __repr__(self) -> str:
        public = self.static_public.hex()[:16] + "..." if self.static_public else None
        secondary = f", secondary_public_key={self.secondary_public.hex()[:16]}..." if self.secondary_public else ""
        return f"Dispatcher(public_key={public}{secondary}, peers={len(self.peers)})"

    @property
    def static_private(self) -> bytes | None:
        """The private key. Change it with set_private_key: static_key, static_public, the
        cookie checker and every peer's static_static are derived from it once."""
        return self._static_private

    def set_private_key(self, private_key: bytes | None) -> list[bytes]:
        """Change the static key (None: remove it). Sessions of every peer end; a peer whose
        public key is the new own public key is removed (returned), as in wireguard-go.
        A secondary key (add_static_key) is dropped. Setting the key already held changes
        nothing."""
        if private_key is not None and len(private_key) != 32:
            raise ValueError("private key must be 32 bytes")
        if private_key == self._static_private:
            return []
        self.drop_secondary_key()
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
        self._keys_changed()
        return removed

    # --- key rotation (sessions survive all of these) -------------------------------

    @property
    def secondary_private(self) -> bytes | None:
        """The second static key accepted for inbound handshakes, if any."""
        return self._secondary_private

    def add_static_key(self, private_key: bytes, now: float | None = None) -> None:
        """Accept handshake initiations addressed to ``private_key``'s public key too,
        while still initiating with the primary key. Replaces an earlier secondary key;
        adding the one held changes nothing. ValueError when there is no primary key, when
        it is the primary key, or when a peer has its public key. With ``now``, the
        secondary key is dropped by tick() after SECONDARY_KEY_LIFETIME at the latest (a
        safety net should whoever rotates never end the overlap)."""
        if len(private_key) != 32:
            raise ValueError("private key must be 32 bytes")
        if self.static_key is None:
            raise ValueError("the device has no private key: set one before adding a second")
        if private_key == self._secondary_private:
            return
        key = PrivateKey(private_key)
        public = key.public
        if public == self.static_public:
            raise ValueError("the key is already this device's private key")
        if public in self.peers:
            raise ValueError("a peer has this key's public key: remove the peer first")
        self._secondary_private = private_key
        self._secondary_expires = None if now is None else now + SECONDARY_KEY_LIFETIME
        self.secondary_key = key
        self.secondary_public = public
        self.secondary_cookie_checker = CookieChecker(public, self._random)
        for peer in self.peers.values():
            peer.secondary_static_static = peer.static_static_with(key)
        self._keys_changed()

    def promote_static_key(self, now: float | None = None) -> None:
        """The secondary key becomes the primary (own initiations use it from now on) and
        the old primary stays accepted as the secondary (until SECONDARY_KEY_LIFETIME after
        ``now`` at the latest, when given). Sessions and handshakes in flight are kept
        (each pending initiation remembers the key it was made with). ValueError when there
        is no secondary key."""
        if self.secondary_key is None or self.static_key is None:
            raise ValueError("no secondary key to promote (add_static_key first)")
        self._secondary_expires = None if now is None else now + SECONDARY_KEY_LIFETIME
        self._static_private, self._secondary_private = self._secondary_private, self._static_private
        self.static_key, self.secondary_key = self.secondary_key, self.static_key
        self.static_public, self.secondary_public = self.secondary_public, self.static_public
        self.cookie_checker, self.secondary_cookie_checker = self.secondary_cookie_checker, self.cookie_checker
        for peer in self.peers.values():
            peer.static_static, peer.secondary_static_static = peer.secondary_static_static, peer.static_static
        self._keys_changed()

    def drop_secondary_key(self) -> None:
        """Stop accepting the secondary key (the end of a rotation's overlap); from now on
        an initiation addressed to it fails mac1 and is counted as BAD_MAC1. Nothing
        happens when there is none."""
        self._secondary_expires = None
        if self.secondary_key is None:
            return
        self._secondary_private = None
        self.secondary_key = self.secondary_public = self.secondary_cookie_checker = None
        for peer in self.peers.values():
            peer.secondary_static_static = None
        self._keys_changed()

    def rename_peer(self, old_public: bytes, new_public: bytes) -> Peer:
        """The peer ``old_public`` rotated its key: the same Peer (sessions, keypairs,
        timers, endpoint, counters, and so its allowed IPs) answers to ``new_public`` from
        now on, keeping its place among the peers; a RelayEndpoint to its old key now names
        the new one (its DERP node key is its key). A handshake in flight with the old key
        is dropped; the sessions keep carrying packets until the next handshake replaces
        them. KeyError: no such peer; ValueError: the new key is unusable or taken."""
        peer = self.peers[old_public]
        if new_public == old_public:
            return peer
        if len(new_public) != 32:
            raise ValueError("peer public key must be 32 bytes")
        if new_public in (self.static_public, self.secondary_public):
            raise ValueError("the new peer public key is one of this device's own public keys")
        if new_public in self.peers:
            raise ValueError("another peer already has the new public key")
        if is_low_order(new_public):
            raise ValueError("the new peer public key is a low-order point: no handshake could succeed")
        peer.change_public_key(new_public, static_key=self.static_key, secondary_key=self.secondary_key)
        if isinstance(peer.endpoint, RelayEndpoint) and peer.endpoint.node_key == old_public:
            peer.endpoint = RelayEndpoint(peer.endpoint.region, new_public)  # its DERP node key is its key
        entries = [(new_public if key == old_public else key, p) for key, p in self.peers.items()]
        self.peers.clear()  # the same dict, rebuilt in the same order
        self.peers.update(entries)
        return peer

    def force_handshake(self, peer_public_key: bytes, now: float) -> list[Action]:
        """Send a handshake initiation now, whatever the rate limit (e.g. after a key
        change, so that the new key is in use at once)."""
        return self.peers[peer_public_key].force_handshake(now)

    # --- configuration ------------------------------------------------------------

    def add_peer(self, public_key: bytes, *, preshared_key: bytes | None = None,
                 endpoint: Endpoint | None = None, persistent_keepalive: int = 0) -> Peer:
        if len(public_key) != 32:
            raise ValueError("peer public key must be 32 bytes")
        if public_key == self.static_public:
            raise ValueError("peer public key is this device's own public key")
        if public_key == self.secondary_public:
            raise ValueError("peer public key is this device's secondary public key")
        if public_key in self.peers:
            raise ValueError("peer already exists")
        if is_low_order(public_key):
            raise ValueError("peer public key is a low-order point: no handshake could succeed")
        peer = Peer(self, public_key, preshared_key=preshared_key, endpoint=endpoint,
                    persistent_keepalive=persistent_keepalive)
        if self.secondary_key is not None:
            peer.secondary_static_static = peer.static_static_with(self.secondary_key)
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
                self.index_changes += 1
                if self.index_listener is not None:
                    self.index_listener(index, INDEX_PENDING)
                return index

    def bind_index(self, index: int, peer: Peer, keypair: Keypair) -> None:
        self._indices[index] = (peer, keypair)
        self.index_changes += 1
        if self.index_listener is not None:
            self.index_listener(index, INDEX_SESSION)

    def free_index(self, index: int) -> None:
        if self._indices.pop(index, None) is not None:
            self.index_changes += 1
            if self.index_listener is not None:
                self.index_listener(index, INDEX_FREE)

    def live_indices(self) -> list[tuple[int, int]]:
        """Every receiver index given out, with its state (INDEX_PENDING or INDEX_SESSION):
        what a screen ahead of the engine starts from before it follows index_listener."""
        return [(index, INDEX_PENDING if keypair is None else INDEX_SESSION)
                for index, (_, keypair) in self._indices.items()]

    def mac1_keys(self) -> tuple[bytes | None, bytes | None]:
        """The mac1 keys of the static key and of the secondary one (None where absent):
        a handshake message whose mac1 is keyed by neither is dropped as BAD_MAC1."""
        primary, secondary = self.cookie_checker, self.secondary_cookie_checker
        return (primary.mac1_key if primary else None, secondary.mac1_key if secondary else None)

    def _keys_changed(self) -> None:
        if self.keys_listener is not None:
            self.keys_listener()

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
        if self._secondary_expires is not None and now >= self._secondary_expires:
            self.drop_secondary_key()
        actions: list[Action] = []
        for peer in list(self.peers.values()):
            actions += peer.tick(now)
        self.rate_limiter.expire(now)
        return actions

    def next_deadline(self) -> float | None:
        deadlines = [d for p in self.peers.values() if (d := p.next_deadline()) is not None]
        if self._secondary_expires is not None:
            deadlines.append(self._secondary_expires)
        return min(deadlines, default=None)

    def is_under_load(self, now: float) -> bool:
        return self.under_load or now < self._under_load_until

    def note_load(self, now: float) -> None:
        """The caller's handshake backlog is filling: under load (cookies required before
        a DH) for UNDER_LOAD_HOLD from ``now``."""
        self._under_load_until = max(self._under_load_until, now + UNDER_LOAD_HOLD)

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
        secondary = False
        if not checker.check_mac1(data):
            # mac1 is keyed by the receiver's public key: during a rotation's overlap it
            # may be addressed to the secondary key.
            checker = self.secondary_cookie_checker
            if checker is None or not checker.check_mac1(data):
                return [self.drop(DropReason.BAD_MAC1)]
            secondary = True
        message = parse(data)
        if mtype == MESSAGE_RESPONSE and message.receiver_index not in self._indices:  # type: ignore[union-attr]
            return [self.drop(DropReason.UNKNOWN_INDEX)]  # nobody here waits for it: not even a cookie
        self._note_handshake(now)
        if self.is_under_load(now):
            if not checker.check_mac2(data, source, now):
                reply = checker.create_reply(data, message.sender_index, source, now)  # type: ignore[union-attr]
                return [SendDatagram(reply.pack(), source), self.drop(DropReason.COOKIE_REQUIRED)]
            # The source proved it receives at its address; now it may cost us a DH at
            # most HANDSHAKES_PER_SECOND times a second.
            if not self.rate_limiter.allow(source if isinstance(source, RelayEndpoint) else source[0], now):
                return [self.drop(DropReason.RATE_LIMITED)]
        if mtype == MESSAGE_INITIATION:
            return self._consume_initiation(message, source, now, secondary=secondary)  # type: ignore[arg-type]
        return self._consume_response(message, source, now)  # type: ignore[arg-type]

    def _note_handshake(self, now: float) -> None:
        recent = self._recent_handshakes
        recent.append(now)
        while recent and recent[0] <= now - 1.0:
            recent.popleft()
        if len(recent) > UNDER_LOAD_HANDSHAKES_PER_SECOND:
            self._under_load_until = now + UNDER_LOAD_HOLD

    def _consume_initiation(self, message: Initiation, source: Endpoint, now: float, *,
                            secondary: bool = False) -> list[Action]:
        fields = InitiationFields(message.ephemeral, message.encrypted_static, message.encrypted_timestamp)
        if secondary:  # addressed to the secondary key (mac1 said so)
            static_key, static_public = self.secondary_key, self.secondary_public
            static_static_for = self._secondary_static_static
        else:
            static_key, static_public, static_static_for = self.static_key, self.static_public, self._static_static
        assert static_key is not None and static_public is not None  # checked by the caller
        try:
            consumed = consume_initiation(
                SymmetricState(), fields, static_private=static_key,
                static_public=static_public, static_static_for=static_static_for,
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

    def _secondary_static_static(self, remote_static: bytes) -> bytes | None:
        peer = self.peers.get(remote_static)
        return peer.secondary_static_static if peer is not None else None

    def _consume_response(self, message: Response, source: Endpoint, now: float) -> list[Action]:
        entry = self._indices.get(message.receiver_index)
        if entry is None:
            return [self.drop(DropReason.UNKNOWN_INDEX)]
        peer = entry[0]
        pending = peer.handshake
        if entry[1] is not None or pending is None or pending.local_index != message.receiver_index:
            return [self.drop(DropReason.UNEXPECTED_RESPONSE, peer)]
        state = pending.state.copy()
        static_key = pending.static_key or self.static_key  # the key the initiation was made with
        assert static_key is not None  # checked by the caller
        try:
            consume_response(
                state, remote_ephemeral=message.ephemeral, encrypted_payload=message.encrypted_nothing,
                ephemeral_private=pending.ephemeral_private, static_private=static_key,
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
        return peer.cookie_received(message.receiver_index, now)
