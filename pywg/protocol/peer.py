"""One peer's protocol state: handshakes it initiates, sessions, staged packets, timers.

Timer hooks follow wireguard-go's contracts (timers.go), each named for the event that
calls it. The owning Dispatcher provides the device context (static key, index table,
randomness, drop counting) through the small DeviceContext protocol.

A packet may be accounted for after packets that went after it: the C hop sends and
receives on two threads, each accounting afterwards (pywg.device.hop). So the hooks take
the time the packet went (``at``) and the timers follow the order of those times, not of
the calls: a send accounted late does not cancel the passive keepalive owed for data that
arrived after it, nor does it start the "no answer" handshake timer when an answer
arrived after it; a receive accounted late likewise. Called in the order of their times
(every path but the hop's), the hooks do exactly as wireguard-go's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .actions import (
    Action,
    DeliverPacket,
    Drop,
    DropReason,
    Endpoint,
    EndpointChanged,
    HandshakeCompleted,
    PeerUnreachable,
    SendDatagram,
    SessionExpired,
)
from .constants import (
    KEEPALIVE_TIMEOUT,
    KEY_ZEROING_TIME,
    MAX_STAGED_PACKETS,
    MAX_TIMER_HANDSHAKES,
    PADDING_MULTIPLE,
    REJECT_AFTER_MESSAGES,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ON_RECEIVE_AGE,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    TRANSPORT_HEADER_SIZE,
)
from .cookie import CookieGenerator
from .crypto import CryptoError, PrivateKey, load_public_key, tai64n
from .inner import inner_length
from .keypair import Keypair, Keypairs
from .messages import Initiation, Response, transport_header
from .noise import ZERO_PSK, ConsumedInitiation, SymmetricState, create_initiation, create_response
from .timers import Timer, Timers

_TIMER_NEW_HANDSHAKE = Timer.NEW_HANDSHAKE
_TIMER_SEND_KEEPALIVE = Timer.SEND_KEEPALIVE
_TIMER_PERSISTENT_KEEPALIVE = Timer.PERSISTENT_KEEPALIVE
_NEVER = float("-inf")  # the time of a packet that has not gone yet


Buffer = bytes | memoryview


class DeviceContext(Protocol):
    static_key: PrivateKey | None  # the device's static private key, imported once
    mtu: int | None

    def random_bytes(self, n: int) -> bytes: ...
    def allocate_index(self, peer: Peer) -> int: ...
    def bind_index(self, index: int, peer: Peer, keypair: Keypair) -> None: ...
    def free_index(self, index: int) -> None: ...
    def wall_time_ns(self, now: float) -> int: ...
    def drop(self, reason: DropReason, peer: Peer | None = None) -> Drop: ...


@dataclass(slots=True, repr=False)
class PendingInitiation:
    """Our initiation awaiting a response."""

    state: SymmetricState
    ephemeral_private: PrivateKey  # kept imported for consume_response
    local_index: int
    # The device's static key this initiation was made with (the response is consumed with
    # it, even if the device promoted another key meanwhile); None: the device's current.
    static_key: PrivateKey | None = None


@dataclass(slots=True, repr=False)
class SendReservation:
    """Counters reserved for a batch the caller seals: key, receiver index, first counter."""

    send_key: bytes
    remote_index: int
    first_counter: int
    endpoint: Endpoint


def padded_length(length: int, mtu: int | None) -> int:
    """Plaintext length after padding to PADDING_MULTIPLE, not beyond the MTU."""
    if mtu is None:
        return -(-length // PADDING_MULTIPLE) * PADDING_MULTIPLE
    last = length % mtu if length > mtu else length
    padded = -(-last // PADDING_MULTIPLE) * PADDING_MULTIPLE
    return length + min(padded, mtu) - last


class Peer:
    def __init__(self, device: DeviceContext, public_key: bytes, *,
                 preshared_key: bytes | None = None, endpoint: Endpoint | None = None,
                 persistent_keepalive: int = 0) -> None:
        self._device = device
        self.public_key = public_key
        self.preshared_key = preshared_key or ZERO_PSK
        self.endpoint = endpoint
        self.persistent_keepalive = persistent_keepalive
        self.static_static: bytes | None = None
        # DH(device secondary key, S_peer) while the device accepts a second static key
        # (key rotation, Dispatcher.add_static_key); set by the dispatcher.
        self.secondary_static_static: bytes | None = None
        self.public_key_loaded = load_public_key(public_key)  # for DH es (initiator) and se (responder)
        self.cookies = CookieGenerator(public_key)
        self.keypairs = Keypairs()
        self.handshake: PendingInitiation | None = None
        self.last_timestamp = bytes(12)
        self.last_initiation_consumed: float | None = None
        self.last_initiation_sent: float | None = None
        self.handshake_attempts = 0
        self.need_another_keepalive = False
        self.sent_last_minute_handshake = False
        self.staged: deque[bytes] = deque()
        self.timers = Timers()
        # When the latest packets went (the engine's clock), for the hooks: any authenticated
        # packet, and data; and what the pending timers answer: the arrival of the data the
        # passive keepalive (SEND_KEEPALIVE) is owed for, the departure of the data
        # NEW_HANDSHAKE waits for an answer to.
        self._sent_at = self._received_at = _NEVER
        self._data_sent_at = self._data_received_at = _NEVER
        self._keepalive_owed_for = self._answer_awaited_for = _NEVER
        self.last_handshake: float | None = None
        # Counters (plain integers, read under the device lock by pywg.device.metrics):
        # wire bytes and datagrams of authenticated transport messages, keepalives included.
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.rx_packets = 0
        self.tx_packets = 0
        self.handshakes_initiated = 0  # initiations sent (retries included)
        self.handshakes_completed = 0
        self.handshakes_timed_out = 0  # initiations unanswered after REKEY_TIMEOUT
        self.sessions_expired = 0  # keys forgotten at ZERO_KEY_MATERIAL
        self.unreachable = 0  # handshakes given up after MAX_TIMER_HANDSHAKES retries
        self.static_key_changed()

    def static_key_changed(self) -> None:
        """The device's static key is new (or gone): precompute DH(s, S_peer) again, and
        end the sessions and handshake made with the old key."""
        self.static_static = self.static_static_with(self._device.static_key)
        self.zero_key_material()
        self.last_initiation_sent = None

    def static_static_with(self, key: PrivateKey | None) -> bytes | None:
        """DH(key, S_peer): the ``ss`` of a handshake between ``key`` and this peer."""
        if key is None:
            return None
        try:
            return key.exchange(self.public_key_loaded)
        except CryptoError:  # a low-order peer key: refused by Dispatcher.add_peer already
            return None

    def change_public_key(self, public_key: bytes, *, static_key: PrivateKey | None,
                          secondary_key: PrivateKey | None) -> None:
        """The peer rotated its static key (Dispatcher.rename_peer): answer to ``public_key``
        from now on. Sessions, timers, endpoint and counters stay (a session does not
        depend on the static keys once made); the handshake in flight, made for the old
        key, is dropped, so the next initiation goes to the new key at once."""
        self.public_key = public_key
        self.public_key_loaded = load_public_key(public_key)
        self.cookies = CookieGenerator(public_key)
        self.static_static = self.static_static_with(static_key)
        self.secondary_static_static = self.static_static_with(secondary_key)
        if self.handshake is not None:
            self._device.free_index(self.handshake.local_index)
            self.handshake = None
        self.last_initiation_sent = None

    def __repr__(self) -> str:
        return f"Peer(public_key={self.public_key.hex()[:16]}..., endpoint={self.endpoint})"

    # --- outbound ---------------------------------------------------------------

    def send_packet(self, packet: bytes, now: float) -> list[Action]:
        """Stage an outbound IP packet and send what can be sent."""
        actions: list[Action] = []
        if len(self.staged) >= MAX_STAGED_PACKETS:
            self.staged.popleft()
            actions.append(self._device.drop(DropReason.STAGED_QUEUE_FULL, self))
        self.staged.append(packet)
        actions += self.send_staged(now)
        return actions

    def send_staged(self, now: float) -> list[Action]:
        keypair = self.keypairs.current
        if keypair is None or not keypair.can_send(now):
            return self.initiate(now, retry=False) if self.staged else []
        if self.endpoint is None:
            return [self._device.drop(DropReason.NO_ENDPOINT, self)]
        actions: list[Action] = []
        while self.staged:
            actions.append(self._seal(keypair, self.staged.popleft(), now))
        actions += self._keep_key_fresh_sending(keypair, now)
        return actions

    def send_keepalive(self, now: float) -> list[Action]:
        if self.staged:
            return self.send_staged(now)
        keypair = self.keypairs.current
        if keypair is None or not keypair.can_send(now):
            return self.initiate(now, retry=False)  # no session: a handshake first (as the kernel)
        if self.endpoint is None:
            return []
        return [self._seal(keypair, b"", now)]

    def _seal(self, keypair: Keypair, packet: bytes, now: float) -> SendDatagram:
        assert self.endpoint is not None
        counter = keypair.send_counter
        keypair.send_counter = counter + 1
        padded = packet.ljust(padded_length(len(packet), self._device.mtu), b"\x00")
        data = transport_header(keypair.remote_index, counter) + keypair.send.seal(counter, padded)
        self.tx_bytes += len(data)
        self.tx_packets += 1
        self._any_authenticated_packet_traversal(now)
        self._any_authenticated_packet_sent(now)
        if packet:
            self._data_sent(now)
        return SendDatagram(data, self.endpoint)

    def _keep_key_fresh_sending(self, keypair: Keypair, now: float) -> list[Action]:
        if keypair.send_counter > REKEY_AFTER_MESSAGES or (
            keypair.initiator and now - keypair.created >= REKEY_AFTER_TIME
        ):
            return self.initiate(now, retry=False)
        return []

    # --- handshake initiation ---------------------------------------------------

    def initiate(self, now: float, *, retry: bool) -> list[Action]:
        """Send a handshake initiation (rate-limited to one per REKEY_TIMEOUT unless a retry)."""
        if not retry:
            self.handshake_attempts = 0
            if self.last_initiation_sent is not None and now - self.last_initiation_sent < REKEY_TIMEOUT:
                return []
        if self.endpoint is None:
            return [self._device.drop(DropReason.NO_ENDPOINT, self)]
        device = self._device
        if self.static_static is None or device.static_key is None:
            return [device.drop(DropReason.NO_PRIVATE_KEY, self)]
        if self.handshake is not None:
            device.free_index(self.handshake.local_index)
        ephemeral = PrivateKey(device.random_bytes(32))  # X25519 clamps the random bytes
        local_index = device.allocate_index(self)
        state = SymmetricState()
        fields = create_initiation(
            state, static_private=device.static_key, remote_static=self.public_key,
            ephemeral_private=ephemeral, payload=tai64n(device.wall_time_ns(now)),
            static_static=self.static_static, remote_static_key=self.public_key_loaded,
        )
        self.handshake = PendingInitiation(state, ephemeral, local_index, device.static_key)
        message = Initiation(local_index, fields.ephemeral, fields.encrypted_static,
                             fields.encrypted_payload).pack()
        message = self.cookies.add_macs(message, now)
        self.last_initiation_sent = now
        self.handshakes_initiated += 1
        self._any_authenticated_packet_traversal(now)
        self._any_authenticated_packet_sent(now)
        self.timers.set(Timer.RETRANSMIT_HANDSHAKE, now + REKEY_TIMEOUT + self._jitter())
        return [SendDatagram(message, self.endpoint)]

    def cookie_received(self, receiver_index: int, now: float) -> list[Action]:
        """Call after a cookie reply to one of our messages was consumed.

        If it answers the pending initiation, and that initiation carried no mac2, the
        initiation is sent again at once, now with mac2, instead of a REKEY_TIMEOUT later:
        under load the responder consumes only initiations that prove the cookie. One
        resend per initiation made without a cookie, so replies cannot make us loop."""
        pending = self.handshake
        if pending is None or pending.local_index != receiver_index or self.cookies.last_had_mac2:
            return []
        return self.initiate(now, retry=True)

    def complete_as_initiator(self, keypair: Keypair, source: Endpoint, now: float) -> list[Action]:
        """Our initiation was answered: ``keypair`` derived from the response."""
        self.handshake = None
        moved = self._moved(source) if source != self.endpoint else []
        self._install(keypair)
        self._any_authenticated_packet_traversal(now)
        self._any_authenticated_packet_received(now)
        self._session_derived(now)
        self._handshake_complete(now)
        actions: list[Action] = [HandshakeCompleted(self.public_key, initiator=True)]
        actions += self.send_keepalive(now)  # sends staged packets, or confirms the session
        actions += moved
        return actions

    def force_handshake(self, now: float) -> list[Action]:
        """A new handshake now, whatever the rate limit (after a static key change: the
        session made with the new key replaces the old one at once)."""
        self.last_initiation_sent = None
        return self.initiate(now, retry=False)

    # --- responder ----------------------------------------------------------------

    def respond(self, consumed: ConsumedInitiation, sender_index: int, source: Endpoint,
                now: float) -> list[Action]:
        """Answer a validated initiation; the new keypair waits in ``next`` for confirmation."""
        device = self._device
        moved = self._moved(source) if source != self.endpoint else []
        self._any_authenticated_packet_traversal(now)
        self._any_authenticated_packet_received(now)
        if self.handshake is not None:
            device.free_index(self.handshake.local_index)
            self.handshake = None
        ephemeral = PrivateKey(device.random_bytes(32))  # X25519 clamps the random bytes
        local_index = device.allocate_index(self)
        e_pub, sealed = create_response(consumed, ephemeral_private=ephemeral, psk=self.preshared_key,
                                        remote_static_key=self.public_key_loaded)
        message = self.cookies.add_macs(Response(local_index, sender_index, e_pub, sealed).pack(), now)
        initiator_key, responder_key = consumed.state.split()
        keypair = Keypair(responder_key, initiator_key, local_index=local_index,
                          remote_index=sender_index, created=now, initiator=False)
        self._install(keypair)
        self._any_authenticated_packet_traversal(now)
        self._any_authenticated_packet_sent(now)
        self._session_derived(now)
        return [SendDatagram(message, source), *moved]

    def _moved(self, source: Endpoint) -> list[Action]:
        """The endpoint becomes ``source`` (it differs): the event that says so."""
        self.endpoint = source
        return [EndpointChanged(self.public_key, source)]

    def _install(self, keypair: Keypair) -> None:
        self._device.bind_index(keypair.local_index, self, keypair)
        for old in self.keypairs.install(keypair):
            self._device.free_index(old.local_index)

    # --- inbound transport --------------------------------------------------------

    def receive_transport(self, keypair: Keypair, counter: int, data: bytes, source: Endpoint,
                          now: float) -> list[Action]:
        device = self._device
        if keypair.expired(now):
            return [device.drop(DropReason.KEY_EXPIRED, self)]
        try:
            plaintext = keypair.receive.open(counter, data[TRANSPORT_HEADER_SIZE:])
        except CryptoError:
            return [device.drop(DropReason.DECRYPT_FAILED, self)]
        if not keypair.replay.validate(counter):
            return [device.drop(DropReason.REPLAYED_COUNTER, self)]
        actions = self._authenticated(keypair, source, now)
        self.rx_bytes += len(data)
        self.rx_packets += 1
        if not plaintext:
            return actions  # keepalive
        self._data_received(now)
        length = inner_length(plaintext)
        if length is None:
            actions.append(device.drop(DropReason.INVALID_PACKET, self))
        else:
            actions.append(DeliverPacket(plaintext[:length], self.public_key))
        return actions

    def _authenticated(self, keypair: Keypair, source: Endpoint, now: float,
                       at: float | None = None) -> list[Action]:
        """An authenticated, fresh packet arrived on ``keypair`` from ``source`` (at ``at``,
        accounted at ``now``)."""
        actions: list[Action] = []
        moved = source != self.endpoint
        if moved:  # roaming: the newest authenticated source wins
            self.endpoint = source
        if keypair is self.keypairs.next:  # else confirm() is a no-op: skip it per packet
            promoted, dropped = self.keypairs.confirm(keypair)
            if dropped is not None:
                self._device.free_index(dropped.local_index)
            if promoted:
                self._handshake_complete(now)
                actions.append(HandshakeCompleted(self.public_key, initiator=False))
                actions += self.send_staged(now)
        actions += self._keep_key_fresh_receiving(now)
        self._any_authenticated_packet_traversal(now)
        self._any_authenticated_packet_received(now if at is None else at)
        if moved:
            actions.append(EndpointChanged(self.public_key, source))
        return actions

    # --- batches sealed and opened outside the engine (the native fast path) ----------

    def reserve_send(self, count: int, wire_bytes: int, now: float) -> tuple[SendReservation | None, list[Action]]:
        """Counters for ``count`` packets to be sealed by the caller on the current session,
        with the timer hooks of a data packet sent. None (send them one by one through
        send_packet instead) when there is no usable session or packets are staged."""
        reservation = self.reserve_counters(count, now)
        if reservation is None:
            return None, []
        return reservation, self.sent(self.keypairs.current, wire_bytes, now, count)  # type: ignore[arg-type]

    def reserve_counters(self, count: int, now: float) -> SendReservation | None:
        """reserve_send's counters alone, without its timer hooks: for a caller that seals
        later, and reports each packet it sends with sent(). Unused counters are gaps."""
        keypair = self.keypairs.current
        if (self.staged or keypair is None or self.endpoint is None or not keypair.can_send(now)
                or keypair.send_counter + count > REJECT_AFTER_MESSAGES):
            return None
        first = keypair.send_counter
        keypair.send_counter = first + count
        return SendReservation(keypair.send_key, keypair.remote_index, first, self.endpoint)

    def sent(self, keypair: Keypair, wire_bytes: int, now: float, packets: int = 1,
             at: float | None = None) -> list[Action]:
        """Data sent on ``keypair`` with counters reserved beforehand (``packets`` datagrams,
        ``wire_bytes`` in all; the last left at ``at``, accounted for at ``now``): the timer
        hooks of a data packet sent, and the rekey a sender owes."""
        self.tx_bytes += wire_bytes
        self.tx_packets += packets
        if at is None:
            at = now
        self._any_authenticated_packet_traversal(now)
        self._any_authenticated_packet_sent(at)
        self._data_sent(at)
        return self._keep_key_fresh_sending(keypair, now)

    def accept_run(self, keypair: Keypair, wire_bytes: int, carried_data: bool, source: Endpoint,
                   now: float, packets: int = 1, at: float | None = None) -> list[Action]:
        """A run of ``packets`` datagrams on ``keypair`` that authenticated and passed the
        replay filter as a whole (ReplayFilter.validate_run; the last arrived at ``at``,
        accounted for at ``now``): account for it as for one packet."""
        if at is None:
            at = now
        actions = self._authenticated(keypair, source, now, at)
        self.rx_bytes += wire_bytes
        self.rx_packets += packets
        if carried_data:
            self._data_received(at)
        return actions

    def accept_batch(self, keypair: Keypair, counters: list[int], plaintexts: Sequence[Buffer | None],
                     sizes: list[int], source: Endpoint, now: float) -> tuple[list[Buffer], list[Action]]:
        """Datagrams on ``keypair`` opened by the caller (None: authentication failed):
        replay-check them and account for them as receive_transport does for one. Returns
        the inner packets to deliver and the actions."""
        device = self._device
        actions: list[Action] = []
        packets: list[Buffer] = []
        accepted = 0
        datagrams = 0
        data_seen = False
        replay = keypair.replay
        for counter, plaintext, size in zip(counters, plaintexts, sizes, strict=True):
            if plaintext is None:
                actions.append(device.drop(DropReason.DECRYPT_FAILED, self))
                continue
            if not replay.validate(counter):
                actions.append(device.drop(DropReason.REPLAYED_COUNTER, self))
                continue
            accepted += size
            datagrams += 1
            if not plaintext:
                continue  # keepalive
            data_seen = True
            length = inner_length(plaintext)
            if length is None:
                actions.append(device.drop(DropReason.INVALID_PACKET, self))
            else:
                packets.append(plaintext[:length] if length != len(plaintext) else plaintext)
        if accepted:
            actions += self._authenticated(keypair, source, now)
            self.rx_bytes += accepted
            self.rx_packets += datagrams
            if data_seen:
                self._data_received(now)
        return packets, actions

    def _keep_key_fresh_receiving(self, now: float) -> list[Action]:
        current = self.keypairs.current
        if (current is not None and current.initiator and not self.sent_last_minute_handshake
                and now - current.created >= REKEY_ON_RECEIVE_AGE):
            self.sent_last_minute_handshake = True
            return self.initiate(now, retry=False)
        return []

    # --- timers -------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self.timers.next_deadline()

    def tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        expired = self.timers.pop_expired(now)
        if Timer.ZERO_KEY_MATERIAL in expired:
            # A late tick: forget the old keys first, so that a handshake started by
            # another timer in this same tick is not forgotten with them.
            expired.remove(Timer.ZERO_KEY_MATERIAL)
            if self.keypairs.all():
                self.sessions_expired += 1
                actions.append(SessionExpired(self.public_key))
            self.zero_key_material()
        for timer in expired:
            actions += self._on_timer(timer, now)
        return actions

    def _on_timer(self, timer: Timer, now: float) -> list[Action]:
        if timer is Timer.RETRANSMIT_HANDSHAKE:
            self.handshakes_timed_out += 1
            if self.handshake_attempts > MAX_TIMER_HANDSHAKES:
                return self._give_up(now)
            self.handshake_attempts += 1
            return self.initiate(now, retry=True)
        if timer is Timer.SEND_KEEPALIVE:
            actions = self.send_keepalive(now)
            if self.need_another_keepalive:
                self.need_another_keepalive = False
                self._keepalive_owed_for = now
                self.timers.set(Timer.SEND_KEEPALIVE, now + KEEPALIVE_TIMEOUT)
            return actions
        if timer is Timer.NEW_HANDSHAKE:
            return self.initiate(now, retry=False)
        if self.persistent_keepalive:  # Timer.PERSISTENT_KEEPALIVE
            return self.send_keepalive(now)
        return []

    def _give_up(self, now: float) -> list[Action]:
        """No answer after MAX_TIMER_HANDSHAKES retries: drop what waited, forget keys later."""
        self.timers.clear(Timer.SEND_KEEPALIVE)
        self.unreachable += 1
        actions: list[Action] = [PeerUnreachable(self.public_key)]
        if self.staged:
            actions += [self._device.drop(DropReason.HANDSHAKE_GAVE_UP, self) for _ in self.staged]
            self.staged.clear()
        if not self.timers.pending(Timer.ZERO_KEY_MATERIAL):
            self.timers.set(Timer.ZERO_KEY_MATERIAL, now + KEY_ZEROING_TIME)
        return actions

    def zero_key_material(self) -> None:
        for keypair in self.keypairs.clear():
            self._device.free_index(keypair.local_index)
        if self.handshake is not None:
            self._device.free_index(self.handshake.local_index)
            self.handshake = None

    def _jitter(self) -> float:
        return int.from_bytes(self._device.random_bytes(4), "little") / 2**32 * REKEY_TIMEOUT_JITTER_MAX

    # Hooks, named for the event that calls them (wireguard-go timers.go), given the time
    # the packet went (see the module's docstring: a packet may be accounted for after
    # packets that went after it; on a tie the later call is the later packet). The
    # per-packet ones use the module-level _TIMER_* aliases: reading Timer.X goes through
    # the enum metaclass (about 80 ns a lookup), a global is a dict hit.
    def _data_sent(self, at: float) -> None:
        self._data_sent_at = max(self._data_sent_at, at)
        if at < self._received_at:
            return  # answered already: a packet arrived after this one left
        if not self.timers.pending(_TIMER_NEW_HANDSHAKE):
            self._await_answer_for(at)

    def _data_received(self, at: float) -> None:
        self._data_received_at = max(self._data_received_at, at)
        if at < self._sent_at:
            return  # answered already: a packet left after this one arrived
        if not self.timers.pending(_TIMER_SEND_KEEPALIVE):
            self._keepalive_owed_for = at
            self.timers.set(_TIMER_SEND_KEEPALIVE, at + KEEPALIVE_TIMEOUT)
        else:
            self.need_another_keepalive = True

    def _any_authenticated_packet_sent(self, at: float) -> None:
        self._sent_at = max(self._sent_at, at)
        if self._keepalive_owed_for > at or not self.timers.pending(_TIMER_SEND_KEEPALIVE):
            return  # (the keepalive is owed for data that arrived after this packet left)
        if self._data_received_at > self._sent_at:
            # Owed for data that arrived before this packet left, but more arrived after it
            # (accounted for first): owed for that now (the deadline later than the first
            # such data's by at most the time this packet waited to be accounted for).
            self._keepalive_owed_for = self._data_received_at
            self.timers.set(_TIMER_SEND_KEEPALIVE, self._data_received_at + KEEPALIVE_TIMEOUT)
        else:
            self.timers.clear(_TIMER_SEND_KEEPALIVE)

    def _any_authenticated_packet_received(self, at: float) -> None:
        self._received_at = max(self._received_at, at)
        if self._answer_awaited_for > at or not self.timers.pending(_TIMER_NEW_HANDSHAKE):
            return  # (the data awaiting an answer left after this packet arrived)
        if self._data_sent_at > self._received_at:  # as for the keepalive above
            self._await_answer_for(self._data_sent_at)
        else:
            self.timers.clear(_TIMER_NEW_HANDSHAKE)

    def _await_answer_for(self, at: float) -> None:
        """Data left at ``at``: a new handshake unless something arrives in time."""
        self._answer_awaited_for = at
        self.timers.set(_TIMER_NEW_HANDSHAKE, at + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter())

    def _any_authenticated_packet_traversal(self, now: float) -> None:
        if self.persistent_keepalive:
            self.timers.set(_TIMER_PERSISTENT_KEEPALIVE, now + self.persistent_keepalive)

    def _handshake_complete(self, now: float) -> None:
        self.timers.clear(Timer.RETRANSMIT_HANDSHAKE)
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False
        self.last_handshake = now
        self.handshakes_completed += 1

    def _session_derived(self, now: float) -> None:
        self.timers.set(Timer.ZERO_KEY_MATERIAL, now + KEY_ZEROING_TIME)


