"""The sliding-window replay filter for transport counters (RFC 6479, as the kernel)."""

from __future__ import annotations

from .constants import REJECT_AFTER_MESSAGES, REPLAY_BITS_TOTAL, REPLAY_WINDOW_SIZE, REPLAY_WORD_BITS

_WORDS = REPLAY_BITS_TOTAL // REPLAY_WORD_BITS
_WORD_SHIFT = REPLAY_WORD_BITS.bit_length() - 1


class ReplayFilter:
    """Accepts each counter at most once, within a window of REPLAY_WINDOW_SIZE."""

    __slots__ = ("_bitmap", "_greatest", "_limit")

    def __init__(self, limit: int = REJECT_AFTER_MESSAGES) -> None:
        self._limit = limit
        self.reset()

    def reset(self) -> None:
        self._greatest = 0  # one more than the highest counter accepted; 0 = none yet
        self._bitmap = [0] * _WORDS

    def export_state(self) -> tuple[int, list[int]]:
        """The filter's state (the highest counter accepted plus one, the window's words),
        for a native filter to carry on from (import_state takes it back)."""
        return self._greatest, list(self._bitmap)

    def import_state(self, greatest: int, bitmap: list[int]) -> None:
        if len(bitmap) != _WORDS:
            raise ValueError(f"a replay window has {_WORDS} words, not {len(bitmap)}")
        self._greatest = greatest
        self._bitmap = list(bitmap)

    def validate(self, counter: int) -> bool:
        """Return True and record ``counter`` if it is fresh, False if replayed or stale."""
        if self._greatest >= self._limit + 1 or counter >= self._limit:
            return False
        counter += 1
        if counter + REPLAY_WINDOW_SIZE < self._greatest:
            return False
        index = counter >> _WORD_SHIFT
        bitmap = self._bitmap
        if counter > self._greatest:
            current = self._greatest >> _WORD_SHIFT
            top = min(index - current, _WORDS)
            for i in range(1, top + 1):
                bitmap[(i + current) & (_WORDS - 1)] = 0
            self._greatest = counter
        index &= _WORDS - 1
        bit = 1 << (counter & (REPLAY_WORD_BITS - 1))
        if bitmap[index] & bit:
            return False
        bitmap[index] |= bit
        return True

    def validate_run(self, first: int, count: int) -> bool:
        """Record counters ``first .. first + count - 1`` at once when every one of them is
        newer than all seen so far (a batch as a sender seals it) and return True; return
        False, recording nothing, when that does not hold (validate them one by one).
        Leaves the filter exactly as ``count`` calls of validate() in order would."""
        last = first + count - 1
        if count <= 0 or self._greatest >= self._limit + 1 or last >= self._limit or first + 1 <= self._greatest:
            return False
        bitmap = self._bitmap
        low, high = first + 1, last + 1  # the filter numbers counters from 1
        current = self._greatest >> _WORD_SHIFT
        for i in range(1, min((high >> _WORD_SHIFT) - current, _WORDS) + 1):
            bitmap[(i + current) & (_WORDS - 1)] = 0
        self._greatest = high
        for word in range(low >> _WORD_SHIFT, (high >> _WORD_SHIFT) + 1):
            start = max(low, word << _WORD_SHIFT)
            end = min(high, ((word + 1) << _WORD_SHIFT) - 1)
            bitmap[word & (_WORDS - 1)] |= ((1 << (end - start + 1)) - 1) << (start & (REPLAY_WORD_BITS - 1))
        return True
