"""Usage that survives a crash: an append-only, fsynced journal of settlements.

The orchestrator sends a request's last byte only once its usage is durable
(the end of the answer is what tells a client it was served, so it must not
arrive before the bill is safe). The store's commit stays off the hot path —
batched by group commit, retried while the store is out — so durability
comes from here: the request's settlement (job status, stored reply, usage,
record) is appended and fsynced before the answer goes out. Appends that
arrive while an fsync runs share the next one, so under load one fsync
covers many requests. Once the store has committed a settlement, it is
*settled* here.

Once the answer has been handed to its callers, a :class:`Delivered`
marker follows the settlement (written with the next fsync, not waited
for), and only then is the settlement written to the store: so the store
never bills a request whose answer did not leave the process.

When the orchestrator starts, :meth:`Journal.open` returns every settlement
of earlier runs with whether it was delivered. The orchestrator writes the
delivered ones to the store again (``finalize`` is exactly-once by request
id: one the store already has changes nothing); one that was not delivered
— the process died between the fsync and the answer — is recorded as failed
and billed nothing, as its client got an error. A segment file is deleted
once its settlements and those of every earlier segment are settled, so a
marker is never deleted before its settlement; the journal stays small while
the store keeps up.

Format: segment files ``usage-<n>.journal``; each entry is a 4-byte
big-endian length, the CRC32 of the body, then the body (a msgpack
:class:`Settlement`). A torn tail — the process died mid-write — fails its
length or CRC and is skipped with a warning: it was never fsynced, so it was
never acknowledged to anyone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from haif.contracts import RequestRecord
from haif.wire import WireError, decode, encode, register

log = logging.getLogger("haif.orchestrator")

_HEADER = struct.Struct(">II")  # body length, CRC32 of the body
_SEGMENT = re.compile(r"usage-(\d+)\.journal")
#: A new segment starts after this many entries, so settled ones can be deleted.
SEGMENT_ENTRIES = 10_000
#: An fsync slower than this is logged: every answer waiting on it waited as long.
SLOW_SYNC_S = 1.0


@register
@dataclass(frozen=True, slots=True)
class Settlement:
    """What the store must hold once a request is over: its job, reply, usage and record."""

    job_id: str  # the job row's id (the record's request id)
    tenant: str
    idempotency_key: str | None
    body_hash: str
    record: RequestRecord
    reply: bytes  # the encoded SubmitReply a resend is answered with
    at_s: float  # the wall clock when it was decided


@register
@dataclass(frozen=True, slots=True)
class Delivered:
    """The answer of the settlement of ``job_id`` was handed to its callers."""

    job_id: str


@dataclass(frozen=True, slots=True)
class Found:
    """A settlement of an earlier run, its segment, and whether its answer left."""

    segment: int
    settlement: Settlement
    delivered: bool


@dataclass
class _Segment:
    path: Path
    entries: int = 0  # appended (or found at open)
    settled: int = 0
    closed: bool = False


class Journal:
    """Append settlements durably; forget them once the store has them."""

    def __init__(
        self,
        directory: str | Path,
        *,
        segment_entries: int = SEGMENT_ENTRIES,
        fsync: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.segment_entries = segment_entries
        #: False: written (the page cache survives the process's crash, not the
        #: machine's) but not fsynced: no device wait on the answer's path.
        self.fsync = fsync
        self._segments: dict[int, _Segment] = {}
        self._active: int | None = None
        self._file: int | None = None  # the active segment's descriptor
        self._writer: _Writer | None = None  # started by the first fsynced append
        self._written = 0  # settlements written without fsync (``fsync=False``)

    # ------------------------------------------------------------ lifecycle

    def open(self) -> list[Found]:
        """Read earlier runs' segments; start a fresh one. Returns what they hold, in order."""
        self.directory.mkdir(parents=True, exist_ok=True)
        numbers = sorted(
            int(m.group(1)) for p in self.directory.iterdir() if (m := _SEGMENT.fullmatch(p.name))
        )
        settled: list[tuple[int, Settlement]] = []
        delivered: set[str] = set()
        for number in numbers:
            path = self._path(number)
            entries = _read(path)
            mine = [e for e in entries if isinstance(e, Settlement)]
            delivered.update(e.job_id for e in entries if isinstance(e, Delivered))
            self._segments[number] = _Segment(path, len(mine), closed=True)
            settled.extend((number, e) for e in mine)
        self._roll(numbers[-1] + 1 if numbers else 1)
        self._drop_settled()
        found = [Found(seg, s, s.job_id in delivered) for seg, s in settled]
        if found:
            log.warning(
                "journal %s: %d settlement(s) of an earlier run (%d not delivered)",
                self.directory,
                len(found),
                sum(not f.delivered for f in found),
            )
        return found

    async def close(self) -> int:
        """Flush, close the active segment, delete the settled ones; return the unsettled."""
        if self._file is not None:
            self._retire(self._file)
            self._file = None
        if self._writer is not None:
            await self._writer.stop()
            self._writer = None
        self._active = None
        for seg in self._segments.values():
            seg.closed = True
        self._drop_settled()
        return sum(s.entries - s.settled for s in self._segments.values())

    # ------------------------------------------------------------ appends

    async def append(self, settlement: Settlement) -> int:
        """Durably append ``settlement``; return its segment (to :meth:`settle` it later)."""
        assert self._active is not None, "open() the journal first"
        segment = self._active
        seg = self._segments[segment]
        seg.entries += 1
        future: asyncio.Future[None] | None = None
        if self.fsync:
            future = asyncio.get_running_loop().create_future()
        self._buffer_entry(settlement, future)
        if seg.entries >= self.segment_entries:
            self._roll(segment + 1)  # later appends go to the next segment
        if future is not None:
            await future
        return segment

    def delivered(self, job_id: str) -> None:
        """Mark a settlement's answer as handed over (written with the next fsync)."""
        self._buffer_entry(Delivered(job_id), None)

    def _buffer_entry(
        self, entry: Settlement | Delivered, future: asyncio.Future[None] | None
    ) -> None:
        body = encode(entry)
        framed = _HEADER.pack(len(body), zlib.crc32(body)) + body
        if not self.fsync:
            assert self._file is not None
            _write_sync(self._file, framed, False)  # a write(2): the page cache has it
            if isinstance(entry, Settlement):
                self._written += 1
            return
        if self._writer is None:
            self._writer = _Writer(asyncio.get_running_loop())
        assert self._file is not None
        self._writer.put(self._file, framed, future)

    def settle(self, segment: int) -> None:
        """The store holds one settlement of ``segment``."""
        seg = self._segments.get(segment)
        if seg is None:
            return
        seg.settled += 1
        self._drop_settled()

    @property
    def unsettled(self) -> int:
        """Settlements journaled and not yet in the store."""
        return sum(s.entries - s.settled for s in self._segments.values())

    # ------------------------------------------------------------ internals

    def _path(self, number: int) -> Path:
        return self.directory / f"usage-{number:08d}.journal"

    def _roll(self, number: int) -> None:
        """Start segment ``number``; the previous active one is closed to appends.

        Every entry lands in the file of the segment it was appended to (the
        old file closes once the writer is done with it), and a delivery
        marker in the same or a later one than its settlement: deleting
        segments oldest first, once settled, never deletes an unsettled entry.
        """
        if self._file is not None:
            self._retire(self._file)
        if self._active is not None:
            self._segments[self._active].closed = True
        path = self._path(number)
        self._file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._segments[number] = _Segment(path)
        self._active = number

    def _retire(self, fd: int) -> None:
        """Close ``fd`` once what was buffered for it is written."""
        if self._writer is None:
            os.close(fd)
        else:
            self._writer.put(fd, b"", None, close=True)

    @property
    def syncs(self) -> int:
        """fsyncs done (for metrics and benchmarks)."""
        return self._writer.syncs if self._writer is not None else 0

    @property
    def appended(self) -> int:
        """Settlements written: fsynced, or with ``fsync=False`` written."""
        return self._written + (self._writer.synced if self._writer is not None else 0)

    def _drop_settled(self) -> None:
        """Delete settled, closed segments from the oldest on, up to the first unsettled one."""
        for oldest in sorted(self._segments):
            seg = self._segments[oldest]
            if oldest == self._active or not seg.closed or seg.settled < seg.entries:
                return
            del self._segments[oldest]
            seg.path.unlink(missing_ok=True)


class _Writer:
    """The journal's writer thread: write and fsync what is buffered, again and again.

    Appends are buffered in the event loop's thread and picked up here as
    soon as the previous fsync is done, without a round trip through the
    loop (an executor call per flush cost a tenth of the orchestrator's CPU
    at 200 requests/s); waiters are resolved in the loop, one callback per
    fsync. Appends that arrive while an fsync runs share the next one.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._cond = threading.Condition()
        # (descriptor, bytes, waiter, close the descriptor after writing)
        self._pending: list[tuple[int, bytes, asyncio.Future[None] | None, bool]] = []
        self._stopping = False
        self.syncs = 0
        self.synced = 0
        self._thread = threading.Thread(target=self._run, name="haif-journal", daemon=True)
        self._thread.start()

    def put(
        self, fd: int, data: bytes, future: asyncio.Future[None] | None, *, close: bool = False
    ) -> None:
        """Write ``data`` to ``fd`` with the next fsync (then resolve ``future``); with
        ``close``, close ``fd`` after it."""
        with self._cond:
            self._pending.append((fd, data, future, close))
            self._cond.notify()

    async def stop(self) -> None:
        """Write what is pending, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending, []
            self._write(batch)

    def _write(self, batch: list[tuple[int, bytes, asyncio.Future[None] | None, bool]]) -> None:
        error: OSError | None = None
        order: list[int] = []  # descriptors in the order first written
        chunks: dict[int, list[bytes]] = {}
        for fd, data, _, _ in batch:
            if data:
                if fd not in chunks:
                    order.append(fd)
                    chunks[fd] = []
                chunks[fd].append(data)
        started = time.monotonic()
        try:
            for fd in order:
                _write_sync(fd, b"".join(chunks[fd]), True)
        except OSError as exc:
            log.error("journal: writing failed: %s", exc)
            error = exc
        took = time.monotonic() - started
        if took > SLOW_SYNC_S:
            log.warning(
                "journal: writing and fsyncing %d settlement(s) took %.1f s; their answers "
                "waited as long (the disk is slow or busy)",
                len(batch),
                took,
            )
        for fd, _, _, close in batch:
            if close:
                os.close(fd)
        waiters = [f for _, _, f, _ in batch if f is not None]
        if error is None and order:
            self.syncs += 1
            self.synced += len(waiters)
        if waiters:
            self._loop.call_soon_threadsafe(_resolve, waiters, error)


def _resolve(waiters: list[asyncio.Future[None]], error: OSError | None) -> None:
    for w in waiters:
        if not w.done():
            if error is None:
                w.set_result(None)
            else:
                w.set_exception(error)


def _write_sync(fd: int, data: bytes, sync: bool) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    if sync:
        os.fdatasync(fd)


def _read(path: Path) -> list[Settlement | Delivered]:
    """The intact entries of one segment, in order; a torn tail is skipped."""
    data = path.read_bytes()
    out: list[Settlement | Delivered] = []
    pos = 0
    while pos + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, pos)
        body = data[pos + _HEADER.size : pos + _HEADER.size + length]
        if len(body) < length or zlib.crc32(body) != crc:
            break
        try:
            entry = decode(body)
        except WireError:
            break
        if isinstance(entry, Settlement | Delivered):
            out.append(entry)
        pos += _HEADER.size + length
    if pos < len(data):
        log.warning("journal %s: %d torn byte(s) at the end skipped", path, len(data) - pos)
    return out
