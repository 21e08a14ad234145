"""Group commit for the event loop: concurrent requests gathered into batches.

A :class:`GroupCommit` hands the items submitted to it to one batch function at a time.
An item submitted while no batch runs starts one at the next turn of the loop (so the items
of the same turn go together, and a lone request waits for nothing); items submitted while a
batch runs wait for it and go together in the next one, at most ``max_batch`` each. The
batch function returns one outcome per item, a result or the exception that item alone
raises; an exception raised by the batch function itself goes to every item of the batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

I = TypeVar("I")  # an item
R = TypeVar("R")  # an item's result

MAX_BATCH = 256


class GroupCommit(Generic[I, R]):
    def __init__(self, run_batch: Callable[[list[I]], Awaitable[Sequence[R | BaseException]]],
                 max_batch: int = MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._waiting: list[tuple[I, asyncio.Future[R]]] = []
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0  # batches run so far
        self.largest = 0  # the largest batch so far

    async def submit(self, item: I) -> R:
        """``item``'s result (or its exception) once the batch it joined has run."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(), name="pywg-group-commit")
        return await future

    async def _work(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[:self._max_batch], self._waiting[self._max_batch:]
            self.batches += 1
            self.largest = max(self.largest, len(batch))
            try:
                outcomes = await self._run_batch([item for item, _ in batch])
                if len(outcomes) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} got {len(outcomes)} outcomes")
            except asyncio.CancelledError:  # the loop is shutting down: nobody waits forever
                for _, future in batch + self._waiting:
                    future.cancel()
                self._waiting = []
                raise
            except Exception as exc:  # noqa: BLE001  # handed to every item of the batch
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():  # its request was cancelled (the client went away)
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
