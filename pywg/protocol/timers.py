"""Per-peer protocol timers as data: named deadlines in the caller's ``now`` units."""

from __future__ import annotations

import enum


class Timer(str, enum.Enum):
    RETRANSMIT_HANDSHAKE = "retransmit_handshake"  # no response to our initiation yet
    SEND_KEEPALIVE = "send_keepalive"  # data received, nothing sent back yet
    NEW_HANDSHAKE = "new_handshake"  # data sent, nothing received back
    ZERO_KEY_MATERIAL = "zero_key_material"  # no new session for 3 x REJECT_AFTER_TIME
    PERSISTENT_KEEPALIVE = "persistent_keepalive"


class Timers:
    __slots__ = ("_deadlines",)

    def __init__(self) -> None:
        self._deadlines: dict[Timer, float] = {}

    def __repr__(self) -> str:
        return f"Timers({ {t.value: d for t, d in self._deadlines.items()} })"

    def set(self, timer: Timer, deadline: float) -> None:
        self._deadlines[timer] = deadline

    def clear(self, timer: Timer) -> None:
        self._deadlines.pop(timer, None)

    def clear_all(self) -> None:
        self._deadlines.clear()

    def pending(self, timer: Timer) -> bool:
        return timer in self._deadlines

    def deadline(self, timer: Timer) -> float | None:
        return self._deadlines.get(timer)

    def next_deadline(self) -> float | None:
        return min(self._deadlines.values(), default=None)

    def pop_expired(self, now: float) -> list[Timer]:
        """Remove and return the timers due at ``now``, earliest first."""
        due = sorted((d, t) for t, d in self._deadlines.items() if d <= now)
        for _, timer in due:
            del self._deadlines[timer]
        return [t for _, t in due]
