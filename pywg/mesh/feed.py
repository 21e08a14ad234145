"""The change log as one coordinator process sees it: recent changes in memory and a
wake-up for every watcher when the head revision moves.

One task reads new changes from the store (after this process's own writes, when
:meth:`ChangeFeed.poke` is called, and every ``poll_interval`` for writes by other
processes sharing the store: the CLI, other replicas; at once when the store hears
their commits, see :meth:`Store.on_change`), so a thousand watchers cost one
query per change, not a thousand. A watcher further behind than the window in memory
reads from the store itself.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pywg.mesh.store import Change, Store

log = logging.getLogger(__name__)
T = TypeVar("T")
Runner = Callable[..., Awaitable[Any]]  # run(fn, *args) in the store's worker thread


class ChangeFeed:
    def __init__(self, store: Store, run: Runner, *, window: int = 10_000, poll_interval: float = 0.25) -> None:
        self._store = store
        self._run = run
        self.window = window
        self.poll_interval = poll_interval
        self.head = 0
        self._base = 0  # every change with a revision above _base is in _recent
        self._recent: list[Change] = []
        self._revisions: list[int] = []
        self._moved = asyncio.Event()  # set (and replaced) when the head moves: wakes every watcher at once
        self._reading = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._dirty = False
        self._waker: asyncio.Task[None] | None = None
        self._texts: dict[int, str] = {}  # revision -> its watch message, encoded once

    async def start(self) -> None:
        """Read the head revision and start polling the store."""
        self.head = self._base = await self._run(self._store.head)
        loop = asyncio.get_running_loop()
        # A store that hears other processes' commits (PostgreSQL's NOTIFY) wakes us at once;
        # the poll stays as the fallback.
        def woken() -> None:
            loop.call_soon_threadsafe(self.wake)

        self._store.on_change(woken)
        self._task = asyncio.create_task(self._poll(), name="pywg-change-feed")

    async def stop(self) -> None:
        if self._waker is not None:
            with contextlib.suppress(Exception):
                await self._waker
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                if await self._run(self._store.head) > self.head:
                    await self.poke()
            except Exception:  # the store is busy or gone for a moment: try again next tick
                log.exception("reading the change log failed")

    def wake(self) -> None:
        """Read the new changes soon (writes in flight together share one read). Call after a write."""
        self._dirty = True
        if self._waker is None or self._waker.done():
            self._waker = asyncio.create_task(self._read_while_dirty())

    async def _read_while_dirty(self) -> None:
        while self._dirty:
            self._dirty = False
            try:
                await self.poke()
            except Exception:  # the poll loop retries
                log.exception("reading the change log failed")

    async def poke(self) -> None:
        """Read the changes after the head into memory and wake the watchers. Call after a write."""
        async with self._reading:
            while True:
                batch: list[Change] = await self._run(self._store.changes_since, self.head, 1000)
                if not batch:
                    break
                self._recent.extend(batch)
                self._revisions.extend(c.revision for c in batch)
                self.head = batch[-1].revision
                if len(self._recent) > 2 * self.window:
                    cut = len(self._recent) - self.window
                    self._base = self._revisions[cut - 1]
                    del self._recent[:cut]
                    del self._revisions[:cut]
        # An Event, not a Condition: a Condition's waiters take its lock one after another on
        # wake-up, which at 10,000 watchers was a large part of a push's latency.
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    def text(self, change: Change) -> str:
        """The watch message for ``change``: encoded once in this process, sent to every watcher."""
        text = self._texts.get(change.revision)
        if text is None:
            if len(self._texts) >= self.window:
                self._texts.clear()  # bounded; recent changes are encoded again on demand
            text = self._texts[change.revision] = json.dumps({"type": "change", **change.to_dict()})
        return text

    async def since(self, revision: int, limit: int = 1000) -> list[Change]:
        """The changes after ``revision`` up to this process's head, at most ``limit``."""
        if revision >= self._base:
            i = bisect.bisect_right(self._revisions, revision)
            return self._recent[i:i + limit]
        changes: list[Change] = await self._run(self._store.changes_since, revision, limit)
        return changes

    async def wait_beyond(self, revision: int) -> None:
        """Return once the head is past ``revision``."""
        while self.head <= revision:
            await self._moved.wait()
