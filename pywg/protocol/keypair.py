"""Transport keypairs (paper, 5.4.6) and the current/previous/next rotation."""

from __future__ import annotations

from .constants import REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME
from .crypto import AeadKey
from .replay import ReplayFilter


class Keypair:
    """One session's pair of transport keys, its indices and counters."""

    __slots__ = (
        "created",
        "initiator",
        "local_index",
        "receive",
        "receive_key",
        "remote_index",
        "replay",
        "send",
        "send_counter",
        "send_key",
    )

    def __init__(self, send_key: bytes, receive_key: bytes, *, local_index: int,
                 remote_index: int, created: float, initiator: bool) -> None:
        self.send = AeadKey(send_key)
        self.receive = AeadKey(receive_key)
        self.send_key = send_key  # raw, for batch sealing outside the engine (native fast path)
        self.receive_key = receive_key
        self.local_index = local_index
        self.remote_index = remote_index
        self.created = created
        self.initiator = initiator
        self.send_counter = 0
        self.replay = ReplayFilter()

    def __repr__(self) -> str:
        return f"Keypair(local_index={self.local_index:#x}, initiator={self.initiator})"

    def expired(self, now: float) -> bool:
        return now - self.created >= REJECT_AFTER_TIME

    def can_send(self, now: float) -> bool:
        # expired() spelled out: this runs once per packet sent.
        return now - self.created < REJECT_AFTER_TIME and self.send_counter < REJECT_AFTER_MESSAGES


class Keypairs:
    """current (in use), previous (still accepted), next (responder's, unconfirmed)."""

    __slots__ = ("current", "next", "previous")

    def __init__(self) -> None:
        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self.next: Keypair | None = None

    def all(self) -> list[Keypair]:
        return [k for k in (self.current, self.previous, self.next) if k is not None]

    def install(self, keypair: Keypair) -> list[Keypair]:
        """Add a freshly derived keypair; returns the keypairs that fell out."""
        dropped: list[Keypair] = []
        if keypair.initiator:
            if self.next is not None:
                dropped += [k for k in (self.previous, self.current) if k is not None]
                self.previous, self.next = self.next, None
            else:
                if self.previous is not None:
                    dropped.append(self.previous)
                self.previous = self.current
            self.current = keypair
        else:
            if self.next is not None:
                dropped.append(self.next)
            self.next = keypair
        return dropped

    def confirm(self, keypair: Keypair) -> tuple[bool, Keypair | None]:
        """A packet arrived on ``keypair``: if it is ``next``, promote it to current.

        Returns (promoted, the keypair that fell out, if any).
        """
        if keypair is not self.next:
            return False, None
        dropped = self.previous
        self.previous, self.current, self.next = self.current, keypair, None
        return True, dropped

    def clear(self) -> list[Keypair]:
        dropped = self.all()
        self.current = self.previous = self.next = None
        return dropped
