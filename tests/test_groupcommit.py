"""GroupCommit: concurrent submissions gathered into batches, each item answered on its own."""

from __future__ import annotations

import asyncio

import pytest

from pywg.mesh.groupcommit import GroupCommit


class Recorder:
    """A batch function that records its batches, doubles numbers and refuses negatives;
    ``gate`` holds a batch until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(items)
        if self.gate is not None:
            await self.gate.wait()
        if 13 in items:
            raise OSError("the database is gone")
        return [ValueError(f"negative: {i}") if i < 0 else 2 * i for i in items]


def test_a_lone_item_runs_at_once_and_items_of_one_turn_share_a_batch():
    async def main() -> None:
        rec = Recorder()
        commit: GroupCommit[int, int] = GroupCommit(rec)
        assert await asyncio.wait_for(commit.submit(1), 1.0) == 2
        assert await asyncio.gather(*(commit.submit(i) for i in range(2, 7))) == [4, 6, 8, 10, 12]
        assert rec.batches == [[1], [2, 3, 4, 5, 6]]
        assert (commit.batches, commit.largest) == (2, 5)

    asyncio.run(main())


def test_items_arriving_during_a_batch_go_together_in_the_next_at_most_max_batch_each():
    async def main() -> None:
        rec = Recorder()
        rec.gate = asyncio.Event()
        commit: GroupCommit[int, int] = GroupCommit(rec, max_batch=3)
        first = asyncio.ensure_future(commit.submit(0))
        await asyncio.sleep(0.01)  # batch [0] is running, held at the gate
        later = [asyncio.ensure_future(commit.submit(i)) for i in range(1, 8)]
        await asyncio.sleep(0.01)
        assert rec.batches == [[0]]
        rec.gate.set()
        assert await first == 0 and await asyncio.gather(*later) == [2, 4, 6, 8, 10, 12, 14]
        assert rec.batches == [[0], [1, 2, 3], [4, 5, 6], [7]]

    asyncio.run(main())


def test_an_items_own_error_goes_to_it_alone_and_a_batch_error_to_its_batch_only():
    async def main() -> None:
        rec = Recorder()
        commit: GroupCommit[int, int] = GroupCommit(rec)
        results = await asyncio.gather(*(commit.submit(i) for i in (1, -2, 3)), return_exceptions=True)
        assert results[0] == 2 and results[2] == 6
        assert isinstance(results[1], ValueError) and str(results[1]) == "negative: -2"
        failed = await asyncio.gather(*(commit.submit(i) for i in (5, 13)), return_exceptions=True)
        assert all(isinstance(r, OSError) for r in failed)
        assert await commit.submit(4) == 8  # the next batch is not affected

    asyncio.run(main())


def test_a_cancelled_submitter_does_not_disturb_the_others():
    async def main() -> None:
        rec = Recorder()
        rec.gate = asyncio.Event()
        commit: GroupCommit[int, int] = GroupCommit(rec)
        tasks = [asyncio.ensure_future(commit.submit(i)) for i in range(4)]
        await asyncio.sleep(0.01)
        tasks[1].cancel()
        rec.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[1], asyncio.CancelledError)
        assert [results[0], results[2], results[3]] == [0, 4, 6]

    asyncio.run(main())


def test_a_batch_function_answering_the_wrong_number_of_outcomes_fails_its_batch():
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    async def main() -> None:
        commit: GroupCommit[int, int] = GroupCommit(short)
        results = await asyncio.gather(commit.submit(1), commit.submit(2), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "got 1 outcomes" in str(r) for r in results)

    asyncio.run(main())
    with pytest.raises(ValueError, match="at least 1"):
        GroupCommit(short, max_batch=0)
