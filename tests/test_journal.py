"""The settlement journal: durable appends, grouped fsyncs, replay after a crash."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from harness.records import ok_record

from haif.runtime.journal import Journal, Settlement


def _settlement(i: int) -> Settlement:
    record = ok_record(f"r{i}", output_tokens=i)
    return Settlement(f"r{i}", "acme", None, "hash", record, b"reply", 1_000.0 + i)


async def test_appends_are_grouped_and_survive_a_crash(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    assert journal.open() == []
    segments = await asyncio.gather(*(journal.append(_settlement(i)) for i in range(50)))
    assert set(segments) == {1}
    assert journal.appended == 50 and journal.syncs < 50  # concurrent appends share fsyncs
    journal.settle(1)  # the store took r0 only
    journal.delivered("r0")
    journal.delivered("r1")
    await asyncio.sleep(0.1)  # markers ride along with the next write
    # A crash: nothing closed. The next run finds all 50 (settling is not persisted).
    again = Journal(tmp_path)
    found = again.open()
    assert [f.settlement for f in found] == [_settlement(i) for i in range(50)]
    assert {f.segment for f in found} == {1} and again.unsettled == 50
    assert [f.settlement.job_id for f in found if f.delivered] == ["r0", "r1"]


async def test_settled_segments_are_deleted(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_entries=3)
    journal.open()
    segments = [await journal.append(_settlement(i)) for i in range(7)]
    assert segments == [1, 1, 1, 2, 2, 2, 3]
    for seg in segments[3:6]:  # segment 2 settled first: kept while 1 is not
        journal.settle(seg)
    assert len(list(tmp_path.iterdir())) == 3
    for seg in segments[:3]:
        journal.settle(seg)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["usage-00000003.journal"]
    journal.settle(segments[6])
    assert journal.unsettled == 0
    assert await journal.close() == 0 and list(tmp_path.iterdir()) == []


async def test_concurrent_appends_land_in_their_own_segment(tmp_path: Path) -> None:
    """Appends racing a roll (pending in the writer) go to the file counted for them."""
    journal = Journal(tmp_path, segment_entries=4)
    journal.open()
    segments = await asyncio.gather(*(journal.append(_settlement(i)) for i in range(10)))
    assert segments == [1] * 4 + [2] * 4 + [3] * 2
    for i in range(10):
        journal.delivered(f"r{i}")
    await journal.close()
    found = Journal(tmp_path).open()
    by_segment = {s: [f.settlement.job_id for f in found if f.segment == s] for s in (1, 2, 3)}
    assert by_segment == {
        1: ["r0", "r1", "r2", "r3"],
        2: ["r4", "r5", "r6", "r7"],
        3: ["r8", "r9"],
    }
    assert all(f.delivered for f in found)


async def test_a_torn_tail_is_skipped(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    for i in range(3):
        await journal.append(_settlement(i))
    path = next(tmp_path.iterdir())
    data = path.read_bytes()
    path.write_bytes(data + data[:20])  # a fourth entry cut short by a crash
    found = Journal(tmp_path).open()
    assert [f.settlement.job_id for f in found] == ["r0", "r1", "r2"]
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF  # the last entry's body corrupted: its CRC fails
    path.write_bytes(bytes(flipped))
    assert [f.settlement.job_id for f in Journal(tmp_path).open()] == ["r0", "r1"]


async def test_earlier_segments_are_kept_until_replayed(tmp_path: Path) -> None:
    first = Journal(tmp_path)
    first.open()
    await first.append(_settlement(1))
    first.delivered("r1")
    assert await first.close() == 1  # unsettled: the file stays, the marker flushed
    second = Journal(tmp_path)
    found = second.open()
    assert [(f.segment, f.settlement.job_id, f.delivered) for f in found] == [(1, "r1", True)]
    await second.append(_settlement(2))
    second.settle(1)  # replayed into the store
    assert sorted(p.name for p in tmp_path.iterdir()) == ["usage-00000002.journal"]


async def test_without_fsync_entries_are_written_at_once(tmp_path: Path) -> None:
    journal = Journal(tmp_path, fsync=False)
    journal.open()
    assert await journal.append(_settlement(1)) == 1
    journal.delivered("r1")
    # No flush, no close: a crash now (the page cache survives the process) finds both.
    found = Journal(tmp_path).open()
    assert [(f.settlement.job_id, f.delivered) for f in found] == [("r1", True)]
    assert journal.syncs == 0 and journal.appended == 1


async def test_a_slow_fsync_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Answers wait for the fsync, so one slower than SLOW_SYNC_S is worth a warning."""
    from haif.runtime import journal as module

    journal = Journal(tmp_path)
    journal.open()
    with caplog.at_level(logging.WARNING, logger="haif.orchestrator"):
        await journal.append(_settlement(0))
        assert not [r for r in caplog.records if "fsyncing" in r.getMessage()]
        monkeypatch.setattr(module, "SLOW_SYNC_S", 0.0)  # every real fsync is "slow" now
        await journal.append(_settlement(1))
    slow = [r.getMessage() for r in caplog.records if "fsyncing" in r.getMessage()]
    assert len(slow) == 1 and "1 settlement(s)" in slow[0], slow
    await journal.close()
