"""GroupCommit on its own: batching, per-caller results, splitting, lanes, limits.

The ``commit`` callables here are plain functions standing in for a
transaction (the store's real ones are covered on both databases by
``tests/test_store_contract.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from haif.runtime.store.group_commit import Failed, GroupCommit


class Ledger:
    """A toy transactional store: a batch commits all its ops or none."""

    def __init__(self) -> None:
        self.committed: list[int] = []
        self.batches: list[list[int]] = []
        self.running = 0
        self.most_running = 0
        self.gate: asyncio.Event | None = None

    async def commit(self, ops: Sequence[int]) -> list[object]:
        self.batches.append(list(ops))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await asyncio.sleep(0)
            if any(op < 0 for op in ops):
                raise ValueError(f"negative op in {list(ops)}")
            self.committed.extend(ops)
            return [op * 10 for op in ops]
        finally:
            self.running -= 1


async def test_concurrent_submits_share_a_batch_and_get_their_own_results() -> None:
    ledger = Ledger()
    gc: GroupCommit[int] = GroupCommit(ledger.commit)
    results = await asyncio.gather(*(gc.submit(i) for i in range(1, 21)))
    assert results == [i * 10 for i in range(1, 21)]
    # The first finds the slot free and nothing queued: it commits at once, alone.
    assert ledger.batches == [[1], list(range(2, 21))]
    assert (gc.stats.batches, gc.stats.operations, gc.stats.largest) == (2, 20, 19)


async def test_a_failed_batch_is_retried_one_by_one() -> None:
    ledger = Ledger()
    gc: GroupCommit[int] = GroupCommit(ledger.commit)
    results = await asyncio.gather(*(gc.submit(i) for i in (1, 2, -3, 4)), return_exceptions=True)
    assert results[:2] == [10, 20] and results[3] == 40
    assert isinstance(results[2], ValueError)
    assert sorted(ledger.committed) == [1, 2, 4]
    assert ledger.batches == [[1], [2, -3, 4], [2], [-3], [4]]
    assert gc.stats.split == 1


async def test_an_op_that_failed_alone_fails_only_its_caller() -> None:
    async def commit(ops: Sequence[int]) -> list[object]:
        await asyncio.sleep(0)  # a transaction takes a while: the others queue meanwhile
        return [Failed(ValueError(f"bad {op}")) if op < 0 else op * 10 for op in ops]

    gc: GroupCommit[int] = GroupCommit(commit)
    results = await asyncio.gather(*(gc.submit(i) for i in (1, -2, 3)), return_exceptions=True)
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad -2"
    assert (gc.stats.batches, gc.stats.split) == (2, 0)  # [1], then [-2, 3]: it stood


async def test_batches_are_capped_and_in_flight_limited() -> None:
    ledger = Ledger()
    ledger.gate = asyncio.Event()
    gc: GroupCommit[int] = GroupCommit(ledger.commit, max_batch=3, max_in_flight=2)
    calls = [asyncio.create_task(gc.submit(i)) for i in range(10)]
    await asyncio.sleep(0.01)
    assert ledger.batches == [[0], [1]]  # two in flight (each alone), the rest waits
    ledger.gate.set()
    assert await asyncio.gather(*calls) == [i * 10 for i in range(10)]
    assert ledger.batches[2:] == [[2, 3, 4], [5, 6, 7], [8, 9]]
    assert ledger.most_running == 2 and gc.stats.largest == 3


async def test_a_batch_holds_one_lane_oldest_first() -> None:
    ledger = Ledger()
    gc: GroupCommit[int] = GroupCommit(ledger.commit, lane=lambda op: op % 2)
    results = await asyncio.gather(*(gc.submit(i) for i in (1, 2, 3, 4, 5)))
    assert results == [10, 20, 30, 40, 50]
    assert ledger.batches == [[1], [2, 4], [3, 5]]


@pytest.mark.parametrize(("per_lane", "first_round"), [(False, [[1]]), (True, [[1], [2]])])
async def test_per_lane_slots(per_lane: bool, first_round: list[list[int]]) -> None:
    ledger = Ledger()
    ledger.gate = asyncio.Event()
    gc: GroupCommit[int] = GroupCommit(ledger.commit, lane=lambda op: op % 2, per_lane=per_lane)
    calls = [asyncio.create_task(gc.submit(i)) for i in (1, 2, 3)]
    await asyncio.sleep(0.01)
    assert ledger.batches == first_round  # per lane: the even lane need not wait
    ledger.gate.set()
    assert await asyncio.gather(*calls) == [10, 20, 30]
    assert ledger.most_running == len(first_round)


async def test_a_caller_cancelled_before_its_batch_drops_its_op() -> None:
    ledger = Ledger()
    gc: GroupCommit[int] = GroupCommit(ledger.commit)
    keep = asyncio.create_task(gc.submit(1))
    drop = asyncio.create_task(gc.submit(2))
    await asyncio.sleep(0)  # both queued; the batch has not started
    drop.cancel()
    assert await keep == 10
    with pytest.raises(asyncio.CancelledError):
        await drop
    assert ledger.committed == [1]


async def test_close_commits_what_is_queued_and_refuses_more() -> None:
    ledger = Ledger()
    gc: GroupCommit[int] = GroupCommit(ledger.commit)
    calls = [asyncio.create_task(gc.submit(i)) for i in range(5)]
    await asyncio.sleep(0)
    await gc.close()
    assert [c.result() for c in calls] == [0, 10, 20, 30, 40]
    with pytest.raises(RuntimeError, match="closed"):
        await gc.submit(9)


def test_limits_must_be_positive() -> None:
    async def commit(ops: Sequence[int]) -> list[object]:
        return list(ops)

    with pytest.raises(ValueError, match="max_batch"):
        GroupCommit(commit, max_batch=0)
    with pytest.raises(ValueError, match="max_in_flight"):
        GroupCommit(commit, max_in_flight=0)


async def test_a_lingering_lane_gathers_writes_submitted_apart() -> None:
    ledger = Ledger()
    gc: GroupCommit[int] = GroupCommit(ledger.commit, lane=lambda op: op % 2, linger_s={0: 30.0})
    later = [asyncio.create_task(gc.submit(i)) for i in (2, 4)]
    await asyncio.sleep(0.01)
    later.append(asyncio.create_task(gc.submit(6)))  # another turn, same batch
    assert await gc.submit(1) == 10  # the other lane does not linger
    await asyncio.sleep(0.01)
    assert ledger.batches == [[1]] and not any(t.done() for t in later)
    await gc.drain()  # does not wait for the timer
    assert [t.result() for t in later] == [20, 40, 60]
    assert ledger.batches == [[1], [2, 4, 6]]


async def test_a_lingering_batch_goes_when_its_timer_fires_or_it_is_full() -> None:
    ledger = Ledger()
    gc: GroupCommit[int] = GroupCommit(ledger.commit, max_batch=3, linger_s={None: 0.02})
    assert await asyncio.gather(*(gc.submit(i) for i in range(4))) == [0, 10, 20, 30]
    assert ledger.batches == [[0, 1, 2], [3]]  # full at once; the fourth on its timer
    assert await gc.submit(5) == 50  # a new timer for the next write
    assert ledger.batches[-1] == [5]
    slow: GroupCommit[int] = GroupCommit(ledger.commit, max_batch=2, linger_s={None: 30.0})
    assert list(await asyncio.gather(slow.submit(7), slow.submit(8))) == [70, 80]  # full: no wait


async def test_close_does_not_wait_for_a_lingering_timer() -> None:
    ledger = Ledger()
    gc: GroupCommit[int] = GroupCommit(ledger.commit, linger_s={None: 30.0})
    call = asyncio.create_task(gc.submit(3))
    await asyncio.sleep(0)
    await asyncio.wait_for(gc.close(), 5.0)
    assert call.result() == 30 and not gc._timers


def test_linger_must_be_sane() -> None:
    async def commit(ops: Sequence[int]) -> list[object]:
        return list(ops)

    with pytest.raises(ValueError, match="linger_s"):
        GroupCommit(commit, linger_s={None: 120.0})
