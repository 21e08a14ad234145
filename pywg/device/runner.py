"""Carrying out the engine's actions on an event loop, and keeping its timers.

A runner owns a Dispatcher and the monotonic clock (plus a ``clock_skew`` that tests
move forward to reach REKEY_AFTER_TIME without waiting). Subclasses say how a datagram is
sent and where a decrypted packet goes. ``lock`` guards the engine: data-path threads
share it with the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from pywg.protocol.actions import (
    Action,
    DeliverPacket,
    Drop,
    DropReason,
    EndpointChanged,
    Event,
    HandshakeCompleted,
    PeerUnreachable,
    SendDatagram,
    SessionExpired,
)
from pywg.protocol.actions import Endpoint as AnyEndpoint
from pywg.protocol.demux import Protocol, classify
from pywg.protocol.dispatcher import Dispatcher

log = logging.getLogger(__name__)

# Wake a hair after a deadline so the engine sees it as expired.
TIMER_SLACK = 0.001

# STUN and disco datagrams waiting for their handler on the loop, at most (more: dropped).
HANDLER_BACKLOG = 1024

Handler = Callable[[bytes, AnyEndpoint], None]
"""A STUN or disco handler: (datagram, the endpoint it came from: a UDP address, or a
RelayEndpoint for what came over DERP); runs on the event loop."""

Observer = Callable[[Event], None]
"""Told of each event (HandshakeCompleted, EndpointChanged, SessionExpired, PeerUnreachable)
once, on the event loop; what it raises is logged, never raised into the data path."""

EVENTS = (HandshakeCompleted, EndpointChanged, SessionExpired, PeerUnreachable)


class Runner:
    def __init__(self, dispatcher: Dispatcher, *, clock_skew: float = 0.0) -> None:
        self.dispatcher = dispatcher
        self.clock_skew = clock_skew
        self.loop = asyncio.get_running_loop()
        self.lock = threading.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.handlers: dict[Protocol, Handler] = {}
        self._handler_backlog = 0  # guarded by lock
        self.observers: list[Observer] = []

    # --- the inbound demux ------------------------------------------------------------

    def register_handler(self, protocol: Protocol, handler: Handler | None) -> None:
        """Give STUN or disco datagrams arriving on the WireGuard port to ``handler`` (None:
        drop them again, counted as NO_HANDLER). Handlers run on the event loop, off the
        data path; what they raise is logged and counted (HANDLER_FAILED)."""
        if protocol not in (Protocol.STUN, Protocol.DISCO):
            raise ValueError(f"protocol: only STUN and disco take handlers, not {protocol.value}")
        if handler is None:
            self.handlers.pop(protocol, None)
        else:
            self.handlers[protocol] = handler

    def demux_other(self, data: bytes | memoryview, source: AnyEndpoint) -> bool:
        """With the lock held, for a datagram that is not a transport message: True if it
        is not WireGuard (then handed to its handler or counted as dropped here), False if
        the engine takes it."""
        protocol = classify(data)
        if protocol is Protocol.WIREGUARD:
            return False
        drops = self.dispatcher.drops
        handler = self.handlers.get(protocol)
        if protocol is Protocol.UNKNOWN:
            drops[DropReason.UNKNOWN_PROTOCOL] += 1
        elif handler is None:
            drops[DropReason.NO_HANDLER] += 1
        elif self._handler_backlog >= HANDLER_BACKLOG:
            drops[DropReason.HANDLER_BUSY] += 1
        else:
            self._handler_backlog += 1
            self.loop.call_soon_threadsafe(self._run_handler, handler, bytes(data), source)
        return True

    def _run_handler(self, handler: Handler, data: bytes, source: AnyEndpoint) -> None:
        with self.lock:
            self._handler_backlog -= 1
        try:
            handler(data, source)
        except Exception:
            log.exception("STUN/disco handler %r failed", handler)
            with self.lock:
                self.dispatcher.drops[DropReason.HANDLER_FAILED] += 1

    # --- events ------------------------------------------------------------------------

    def add_observer(self, observer: Observer) -> None:
        """Tell ``observer`` of every event from now on (on the event loop)."""
        self.observers.append(observer)

    def remove_observer(self, observer: Observer) -> None:
        if observer in self.observers:
            self.observers.remove(observer)

    def emit(self, event: Event) -> None:
        """Tell the observers of ``event`` (event-loop thread)."""
        for observer in list(self.observers):
            try:
                observer(event)
            except Exception:
                log.exception("event observer %r failed on %s", observer, type(event).__name__)

    # --- what subclasses provide ----------------------------------------------------

    def send_datagram(self, data: bytes, endpoint: AnyEndpoint) -> None:
        raise NotImplementedError

    def deliver(self, delivered: DeliverPacket) -> None:
        raise NotImplementedError

    def engine_changing(self) -> None:
        """Called with the lock held before the engine changes outside the data path (a
        timer, a configuration): a copy of its state kept elsewhere is stale from now."""

    def handshake_completed(self, event: HandshakeCompleted) -> None:
        log.info("handshake completed with %s (%s)", event.peer.hex()[:8],
                 "we initiated" if event.initiator else "they initiated")

    # --- clock ------------------------------------------------------------------------

    def now(self) -> float:
        """Seconds on CLOCK_MONOTONIC (the clock of loop.time()), readable from any thread."""
        return time.monotonic() + self.clock_skew

    def advance_clock(self, seconds: float) -> None:
        """Jump this engine's clock forward (its wall clock for timestamps moves too)."""
        self.clock_skew += seconds
        self.cancel_timer()
        with self.lock:
            self.engine_changing()
            actions = self.dispatcher.tick(self.now())
        self.carry(actions)

    # --- carrying out actions -----------------------------------------------------------

    def carry(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendDatagram):
                self.send_datagram(action.data, action.endpoint)
            elif isinstance(action, DeliverPacket):
                self.deliver(action)
            elif isinstance(action, HandshakeCompleted):
                self.handshake_completed(action)
                self.emit(action)
            elif isinstance(action, EVENTS):
                self.emit(action)
            elif isinstance(action, Drop):
                log.debug("drop: %s", action.reason.value)
        self.schedule()

    def schedule(self) -> None:
        """(Re)arm the loop timer for the engine's next deadline (event-loop thread only)."""
        with self.lock:
            deadline = self.dispatcher.next_deadline()
        if deadline == self._timer_at:
            return
        self.cancel_timer()
        if deadline is not None:
            self._timer_at = deadline
            self._timer = self.loop.call_at(deadline - self.clock_skew + TIMER_SLACK, self._on_timer)

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = None

    def timers_may_have_changed(self) -> None:
        """From any thread: the engine may now have an earlier deadline than the one armed."""
        with self.lock:
            deadline = self.dispatcher.next_deadline()
        armed = self._timer_at
        if deadline is not None and (armed is None or deadline < armed):
            self.loop.call_soon_threadsafe(self.schedule)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        with self.lock:
            self.engine_changing()
            actions = self.dispatcher.tick(self.now())
        self.carry(actions)
