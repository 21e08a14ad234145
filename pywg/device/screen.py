"""The screen ahead of the engine, in C (native/screen.c): datagrams that cannot be ours are
dropped and counted before any Python runs, so that floods of them never delay transport.

``Screen.follow(dispatcher)`` keeps the screen's copy of the receiver indices and mac1 keys
in step with the engine (which stays the authority: every verdict of the screen is one the
engine would give, and tests/test_screen.py checks that on the same datagrams). The hop
consults it for each datagram it would hand back to Python.
"""

from __future__ import annotations

from typing import Any

from pywg.protocol.actions import DropReason
from pywg.protocol.dispatcher import Dispatcher

try:
    from pywg import _fastpath  # type: ignore[attr-defined]
except ImportError:  # no C extensions: the engine drops these itself
    _fastpath = None

# The screen's drop verdicts, as the engine names them.
VERDICT_REASONS: dict[str, DropReason] = {
    "PYWG_SCREEN_UNKNOWN_PROTOCOL": DropReason.UNKNOWN_PROTOCOL,
    "PYWG_SCREEN_BAD_SIZE": DropReason.BAD_SIZE,
    "PYWG_SCREEN_BAD_MAC1": DropReason.BAD_MAC1,
    "PYWG_SCREEN_UNKNOWN_INDEX": DropReason.UNKNOWN_INDEX,
}


def available() -> bool:
    return _fastpath is not None


class Screen:
    """One C screen; free it (close) after whatever consults it (the hop)."""

    def __init__(self) -> None:
        if _fastpath is None:
            raise RuntimeError("the screen needs pywg's C extension")
        self._ffi, self._lib = _fastpath.ffi, _fastpath.lib
        self.handle: Any = self._ffi.gc(self._lib.pywg_screen_new(), self._lib.pywg_screen_free)
        if self.handle == self._ffi.NULL:
            raise MemoryError("pywg_screen_new")
        self._codes = {getattr(self._lib, name): reason for name, reason in VERDICT_REASONS.items()}
        self._dispatcher: Dispatcher | None = None

    def follow(self, dispatcher: Dispatcher) -> None:
        """Take the engine's indices and keys now, and every change from now on."""
        if self._dispatcher is not None and self._dispatcher is not dispatcher:
            self._dispatcher.index_listener = self._dispatcher.keys_listener = None
        self._dispatcher = dispatcher
        self._lib.pywg_screen_clear_indices(self.handle)
        for index, state in dispatcher.live_indices():
            self.index_changed(index, state)
        dispatcher.index_listener = self.index_changed
        dispatcher.keys_listener = self.keys_changed
        self.keys_changed()

    def index_changed(self, index: int, state: int) -> None:
        """Call after the engine gave out, bound or freed a receiver index."""
        if self._lib.pywg_screen_index(self.handle, index, state) != 0:
            raise MemoryError("pywg_screen_index")

    def keys_changed(self) -> None:
        """Call after the engine's static keys changed."""
        assert self._dispatcher is not None
        primary, secondary = self._dispatcher.mac1_keys()
        self._lib.pywg_screen_set_mac1_keys(self.handle, primary or self._ffi.NULL, secondary or self._ffi.NULL)

    def verdict(self, data: bytes) -> DropReason | None:
        """The screen's verdict on one datagram: the reason it would be dropped, or None
        (it passes, to the engine or to the STUN/disco handlers). Not counted."""
        code = self._lib.pywg_screen_verdict(self.handle, data, len(data))
        return self._codes.get(code)

    def drops(self) -> dict[DropReason, int]:
        """What the screen dropped so far, by the engine's reasons (read at scrape time)."""
        out = self._ffi.new("uint64_t[]", self._lib.PYWG_SCREEN_VERDICTS)
        self._lib.pywg_screen_counts(self.handle, out)
        return {reason: int(out[code]) for code, reason in self._codes.items() if out[code]}

    def close(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.index_listener = self._dispatcher.keys_listener = None
            self._dispatcher = None
