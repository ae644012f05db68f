"""The store's logic, written once for both backends over one primitive.

A backend (:mod:`~haif.runtime.store.duckdb_store`,
:mod:`~haif.runtime.store.postgres_store`) only says how to open a
transaction and a plain connection, each a :class:`Tx` that runs one
statement and returns its rows; every method body, and every statement
(:mod:`~haif.runtime.store.base`), is shared, so the backends cannot drift.

The writes on the request path (``reserve``, ``set_job_status``,
``finalize``, ``write_record``) go through a
:class:`~haif.runtime.store.group_commit.GroupCommit`: concurrent calls are
committed together, one transaction per batch, with one multi-row statement
per kind of write. Reserves with an idempotency key, which a request waits
for before it runs, are batched apart from the other writes, so they never
wait for a finalize in the same transaction; the others (nobody waits for
them) may linger to share a transaction (``linger_s``). Calls in one batch
are concurrent, so any serial order is a valid outcome; the batch applies
reserves, then status changes, then finalizes, then record upserts. Within
a kind, the first call per conflict key (request id, or tenant and
idempotency key) goes into the multi-row statement; a later call with the
same key, and a reserve that the multi-row insert could not place, runs one
by one after it, exactly as it would alone, so the guarantees of
:mod:`~haif.runtime.store.base` hold batch or no batch. A batch that needs a
single statement (the common case: one multi-row insert of reserves, or
status changes only) runs it without ``BEGIN``/``COMMIT``; a reserve that
insert could not place then runs alone in its own transaction.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar, cast

from haif.contracts import DeadLetter, Request, RequestRecord, WorkerSnapshot
from haif.runtime.store import base
from haif.runtime.store.base import (
    DeadLetterRow,
    JobRow,
    JobStatus,
    MetadataStore,
    Quota,
    Reservation,
    UsageRow,
    UsageTotals,
)
from haif.runtime.store.group_commit import BatchStats, Failed, GroupCommit
from haif.wire import encode

__all__ = ["SqlStore", "Tx"]

Row = tuple[Any, ...]
OpT = TypeVar("OpT")
_RESERVE_TRIES = 5


class Tx(abc.ABC):
    """One connection (inside a transaction or not): runs a statement, returns its rows."""

    @abc.abstractmethod
    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    async def fetchrow(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        rows = await self.fetch(sql, params)
        return rows[0] if rows else None

    async def fetch_rows(
        self,
        statement: Callable[[str], str],
        rows: Sequence[Sequence[Any]],
        casts: tuple[str, ...] = (),
    ) -> list[Row]:
        """Run ``statement(source)`` over ``rows`` (a multi-row write, see ``base.values_source``).

        Here ``source`` is a ``VALUES`` list of parameters (``casts``: the
        column types, for a list outside an ``INSERT``); a backend may pass the
        rows another way.
        """
        source = base.values_source(len(rows), len(rows[0]), casts)
        return await self.fetch(statement(source), _flat(rows))


# ------------------------------------------------------------ batched writes


@dataclass(frozen=True, slots=True)
class _Reserve:
    job: JobRow
    params: list[Any]


@dataclass(frozen=True, slots=True)
class _SetStatus:
    params: list[Any]  # base.status_params: request id first


@dataclass(frozen=True, slots=True)
class _Finalize:
    request_id: str
    usage: list[Any]
    finish: list[Any]
    record: list[Any]


@dataclass(frozen=True, slots=True)
class _WriteRecord:
    request_id: str
    record: list[Any]


_Write = _Reserve | _SetStatus | _Finalize | _WriteRecord


def _first_per_key(
    ops: Sequence[OpT], keys: Callable[[OpT], Iterable[Hashable]]
) -> tuple[list[int], list[int]]:
    """Indexes of the ops that share no key with an earlier op, and of the rest."""
    seen: set[Hashable] = set()
    leaders: list[int] = []
    followers: list[int] = []
    for i, op in enumerate(ops):
        mine = list(keys(op))
        if seen.isdisjoint(mine):
            leaders.append(i)
            seen.update(mine)
        else:
            followers.append(i)
    return leaders, followers


def _reserve_keys(op: _Reserve) -> list[Hashable]:
    job = op.job
    keys: list[Hashable] = [("id", job.request_id)]
    if job.idempotency_key is not None:
        keys.append(("key", job.tenant, job.idempotency_key))
    return keys


def _flat(rows: Iterable[Sequence[Any]]) -> list[Any]:
    return [value for row in rows for value in row]


async def _reserve_one(tx: Tx, op: _Reserve) -> Reservation:
    """Reserve one job: release an expired holder of its key, insert, or read the blocker."""
    job = op.job
    for _ in range(_RESERVE_TRIES):
        if job.idempotency_key is not None:
            revived = await tx.fetchrow(base.REVIVE_EXPIRED_JOB, _revive_params(op))
            if revived is not None:
                return Reservation("created", base.job_from_row(revived))
            await tx.fetch(base.RELEASE_EXPIRED_KEY, [job.tenant, job.idempotency_key])
        inserted = await tx.fetchrow(base.INSERT_JOB_IF_ABSENT, op.params)
        if inserted is not None:
            return Reservation("created", base.job_from_row(inserted))
        existing = None
        if job.idempotency_key is not None:
            existing = await tx.fetchrow(base.SELECT_JOB_BY_KEY, [job.tenant, job.idempotency_key])
        if existing is None:
            existing = await tx.fetchrow(base.SELECT_JOB, [job.request_id])
        if existing is not None:
            return base.classify(job, base.job_from_row(existing))
        # The row that blocked us vanished before we read it: try again.
    raise RuntimeError(f"could not reserve job {job.request_id!r}")


def _revive_params(op: _Reserve) -> list[Any]:
    job, now = op.job, op.params[base.JOB_FIELDS.index("updated_s")]
    return [
        *(job.request_id, job.tenant, job.idempotency_key, job.body_hash),
        *(now, op.params[base.JOB_FIELDS.index("expires_s")], job.epoch),
    ]


def _insert_groups(ops: Sequence[_Reserve], leaders: list[int]) -> list[list[int]]:
    """The leaders' multi-row inserts: one with keys, one without (see ``insert_jobs_sql``)."""

    # A stable order across batches makes concurrent PostgreSQL batches lock alike.
    def order(i: int) -> tuple[str, str, int]:
        return ops[i].job.tenant, ops[i].job.idempotency_key or "", i

    ordered = sorted(leaders, key=order)
    groups = [
        [i for i in ordered if (ops[i].job.idempotency_key is not None) == keyed]
        for keyed in (True, False)
    ]
    return [group for group in groups if group]


async def _insert_jobs(
    tx: Tx, ops: Sequence[_Reserve], group: list[int], *, plain: bool = False
) -> dict[str, JobRow]:
    """Insert the jobs of ``group`` in one statement; the created ones by request id.

    ``plain``: with an insert that fails as a whole if one id is taken (cheaper
    in DuckDB; keyless jobs only); the caller then inserts again without.
    """
    params = [ops[i].params for i in group]
    if plain:
        await tx.fetch_rows(base.insert_jobs_plain_sql, params)
        rows: Iterable[Sequence[Any]] = params
    else:
        keyed = ops[group[0]].job.idempotency_key is not None
        rows = await tx.fetch_rows(partial(base.insert_jobs_sql, keyed=keyed), params)
    return {job.request_id: job for job in map(base.job_from_row, rows)}


def _keyless(op: _Reserve) -> bool:
    return op.job.idempotency_key is None


async def _reserve_all(
    tx: Tx, ops: Sequence[_Reserve], *, plain: bool = False
) -> list[Reservation]:
    """Reserve ``ops``; ``plain``: keyless jobs with a plain insert (see ``_insert_jobs``)."""
    leaders, later = _first_per_key(ops, _reserve_keys)
    created: dict[str, JobRow] = {}
    for group in _insert_groups(ops, leaders):
        keyless = _keyless(ops[group[0]])
        created.update(await _insert_jobs(tx, ops, group, plain=plain and keyless))
    out: dict[int, Reservation] = {}
    for i in leaders:
        job = created.get(ops[i].job.request_id)
        if job is None:
            later.append(i)  # blocked (maybe by an expired key): the one-by-one path decides
        else:
            out[i] = Reservation("created", job)
    for i in sorted(later):
        out[i] = await _reserve_one(tx, ops[i])
    return [out[i] for i in range(len(ops))]


async def _set_status_all(tx: Tx, ops: Sequence[_SetStatus]) -> list[bool]:
    leaders, later = _first_per_key(ops, lambda op: [op.params[0]])
    leaders.sort(key=lambda i: str(ops[i].params[0]))  # rows locked in one order
    if len(leaders) == 1:
        rows = await tx.fetch(base.SET_JOB_STATUS, ops[leaders[0]].params)
    else:
        statuses = [ops[i].params for i in leaders]
        rows = await tx.fetch_rows(base.set_job_statuses_sql, statuses, base.STATUS_CASTS)
    moved = {str(row[0]) for row in rows}
    out = {i: ops[i].params[0] in moved for i in leaders}
    for i in later:
        out[i] = await tx.fetchrow(base.SET_JOB_STATUS, ops[i].params) is not None
    return [out[i] for i in range(len(ops))]


async def _finalize_all(tx: Tx, ops: Sequence[_Finalize], *, plain: bool = False) -> list[bool]:
    """Settle each request once: usage row, job done, record.

    ``plain``: with inserts that fail when a usage row or record is there
    already (cheaper in DuckDB); the caller retries the batch without.
    """
    # A later finalize of the same request in the batch settles nothing: the
    # first one either inserted its usage row or found one already there.
    leaders, _ = _first_per_key(ops, lambda op: [op.request_id])
    leaders.sort(key=lambda i: ops[i].request_id)  # rows locked in one order
    usage = [ops[i].usage for i in leaders]
    if plain:
        await tx.fetch_rows(base.insert_usage_plain_sql, usage)
        won = {ops[i].request_id for i in leaders}
    else:
        won = {str(row[0]) for row in await tx.fetch_rows(base.insert_usage_sql, usage)}
    winners = [ops[i] for i in leaders if ops[i].request_id in won]
    if len(winners) == 1:
        await tx.fetch(base.FINISH_JOB, winners[0].finish)
    elif winners:
        finish = [op.finish for op in winners]
        await tx.fetch_rows(base.finish_jobs_sql, finish, base.FINISH_CASTS)
    if winners:
        records = base.insert_records_plain_sql if plain else base.upsert_records_sql
        await tx.fetch_rows(records, [op.record for op in winners])
    settled = {i for i in leaders if ops[i].request_id in won}
    return [i in settled for i in range(len(ops))]


async def _write_records_all(tx: Tx, ops: Sequence[_WriteRecord]) -> list[None]:
    last = {op.request_id: op.record for op in ops}  # the last write of a request wins
    await tx.fetch_rows(base.upsert_records_sql, [last[rid] for rid in sorted(last)])
    return [None] * len(ops)


def _one_statement(ops: Sequence[_Write]) -> bool:
    """Do ``ops`` take a single statement (status changes of distinct jobs, or record writes)?"""
    if all(isinstance(op, _WriteRecord) for op in ops):
        return True
    statuses = [op.params[0] for op in ops if isinstance(op, _SetStatus)]
    return len(statuses) == len(ops) and len(set(statuses)) == len(statuses)


def _lane(op: _Write) -> bool:
    """Is ``op`` on the request path: a reserve with an idempotency key, which the request
    waits for? It commits apart from the writes that nobody waits for (the others)."""
    return isinstance(op, _Reserve) and not _keyless(op)


#: The lane of the writes nobody waits for (see ``linger_s``).
OFF_PATH = False


async def _apply(
    tx: Tx,
    ops: Sequence[_Write],
    kind: type[OpT],
    apply: Callable[[Tx, Sequence[OpT]], Awaitable[Sequence[object]]],
    results: list[object],
) -> None:
    """Apply the ops of one ``kind`` in ``ops``; put their results at their indexes."""
    picked = [(i, op) for i, op in enumerate(ops) if isinstance(op, kind)]
    if picked:
        outcomes = await apply(tx, [op for _, op in picked])
        for (i, _), outcome in zip(picked, outcomes, strict=True):
            results[i] = outcome


# ------------------------------------------------------------------- store


class SqlStore(MetadataStore):
    """:class:`MetadataStore` over :class:`Tx`; a backend supplies the connections."""

    #: Reserve keyless jobs, and finalize, with plain ``INSERT``s first, which
    #: fail if a row is there already; then again with the statements that
    #: skip conflicts (see ``base.insert_jobs_plain_sql``).
    plain_insert_first: bool = False

    def __init__(
        self,
        *,
        max_batch: int = 128,
        max_in_flight: int = 1,
        per_lane: bool = False,
        linger_s: float = 0.0,
    ) -> None:
        self._closed = False
        self.linger_s = linger_s
        self._writes: GroupCommit[_Write] = GroupCommit(
            self._commit,
            max_batch=max_batch,
            max_in_flight=max_in_flight,
            lane=_lane,
            per_lane=per_lane,
            linger_s={OFF_PATH: linger_s},
        )

    @property
    def batch_stats(self) -> BatchStats:
        """How the request-path writes were grouped into transactions so far."""
        return self._writes.stats

    # ------------------------------------------------- backend primitives

    @abc.abstractmethod
    def _transaction(self, *, reserves: bool = False) -> AbstractAsyncContextManager[Tx]:
        """A connection inside a transaction: committed on exit, rolled back on error.

        ``reserves``: for a batch of reserves, which a backend may run on a
        connection of their own so that they do not queue behind other writes.
        """

    @abc.abstractmethod
    def _connection(self, *, reserves: bool = False) -> AbstractAsyncContextManager[Tx]:
        """A connection for one autocommitted statement (``reserves`` as for a transaction)."""

    @abc.abstractmethod
    async def _close_backend(self) -> None:
        """Release the connection(s)."""

    async def _lock_migrations(self, tx: Tx) -> None:
        """Serialise concurrent ``migrate()`` calls (a backend without rivals does nothing)."""

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        async with self._connection() as tx:
            return await tx.fetch(sql, params)

    async def _fetchrow(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        async with self._connection() as tx:
            return await tx.fetchrow(sql, params)

    # ---------------------------------------------------------- lifecycle

    async def migrate(self) -> int:
        async with self._transaction() as tx:
            await self._lock_migrations(tx)
            await tx.fetch(base.SCHEMA_VERSION_DDL)
            row = await tx.fetchrow(base.SELECT_SCHEMA_VERSION)
            current = int(row[0]) if row else 0
            for migration in base.MIGRATIONS:
                if migration.version > current:
                    for statement in migration.statements:
                        await tx.fetch(statement)
                    await tx.fetch(base.INSERT_SCHEMA_VERSION, [migration.version, migration.name])
                    current = migration.version
        return current

    async def schema_version(self) -> int:
        async with self._connection() as tx:
            exists = await tx.fetchrow(base.SCHEMA_TABLE_EXISTS)
            if exists is None or not exists[0]:
                return 0
            row = await tx.fetchrow(base.SELECT_SCHEMA_VERSION)
        return int(row[0]) if row else 0

    async def close(self) -> None:
        if self._closed:
            return
        await self._writes.close()  # queued writes still commit
        await self._close_backend()
        self._closed = True

    async def _commit(self, ops: Sequence[_Write]) -> list[object]:
        """Apply one batch of writes (see the module docstring).

        A batch that takes one statement runs it alone (a statement is atomic,
        and the ``BEGIN``/``COMMIT`` round trips would cost as much as it);
        any other runs in one transaction.
        """
        reserves = [op for op in ops if isinstance(op, _Reserve)]
        if len(reserves) == len(ops):
            fast = await self._reserve_in_one_statement(reserves)
            if fast is not None:
                return fast
        if self.plain_insert_first and any(
            isinstance(op, _Finalize) or (isinstance(op, _Reserve) and _keyless(op)) for op in ops
        ):
            try:
                return await self._apply_all(ops, plain=True)
            except Exception:  # a row was there already (rolled back): decide as below
                pass
        return await self._apply_all(ops)

    async def _apply_all(self, ops: Sequence[_Write], *, plain: bool = False) -> list[object]:
        results: list[object] = [None] * len(ops)
        mine = all(isinstance(op, _Reserve) for op in ops)
        connect = self._connection if _one_statement(ops) else self._transaction
        async with connect(reserves=mine) as tx:
            await _apply(tx, ops, _Reserve, partial(_reserve_all, plain=plain), results)
            await _apply(tx, ops, _SetStatus, _set_status_all, results)
            await _apply(tx, ops, _Finalize, partial(_finalize_all, plain=plain), results)
            await _apply(tx, ops, _WriteRecord, _write_records_all, results)
        return results

    async def _reserve_in_one_statement(self, ops: Sequence[_Reserve]) -> list[object] | None:
        """Reserves that one insert can place, without a transaction; None if it cannot.

        A job the insert skipped (its key is held, maybe by an expired job, or
        its id is taken) is then reserved alone in its own transaction, as a
        lone ``reserve`` would be; its failure is its own.
        """
        leaders, later = _first_per_key(ops, _reserve_keys)
        groups = _insert_groups(ops, leaders)
        if later or len(groups) != 1:
            return None
        group = groups[0]
        plain = self.plain_insert_first and ops[group[0]].job.idempotency_key is None
        try:
            async with self._connection(reserves=True) as tx:
                created = await _insert_jobs(tx, ops, group, plain=plain)
        except Exception:
            if not plain:
                raise
            # An id was taken (autocommitted: nothing was left behind): skip conflicts.
            async with self._connection(reserves=True) as tx:
                created = await _insert_jobs(tx, ops, group)
        results: list[object] = []
        for op in ops:
            job = created.get(op.job.request_id)
            if job is not None:
                results.append(Reservation("created", job))
                continue
            try:
                async with self._transaction(reserves=True) as tx:
                    results.append(await _reserve_one(tx, op))
            except Exception as exc:
                results.append(Failed(exc))
        return results

    # ------------------------------------------------------------ records

    async def write_record(self, record: RequestRecord) -> None:
        await self._writes.submit(_WriteRecord(record.request_id, base.record_params(record)))

    async def records(self) -> list[RequestRecord]:
        return [base.record_from_row(row) for row in await self._fetch(base.SELECT_RECORDS)]

    # --------------------------------------------------------------- jobs

    async def reserve(self, job: JobRow, now: float) -> Reservation:
        op = _Reserve(job, base.job_params(job, now))
        return cast(Reservation, await self._writes.submit(op))

    async def set_job_status(
        self,
        request_id: str,
        status: JobStatus,
        now: float,
        worker_id: str | None = None,
        *,
        expires_s: float | None = None,
    ) -> bool:
        params = base.status_params(request_id, status, now, worker_id, expires_s)
        return cast(bool, await self._writes.submit(_SetStatus(params)))

    async def get_job(self, request_id: str) -> JobRow | None:
        row = await self._fetchrow(base.SELECT_JOB, [request_id])
        return None if row is None else base.job_from_row(row)

    async def finalize(
        self, request_id: str, record: RequestRecord, result: bytes | None, now: float
    ) -> bool:
        op = _Finalize(
            request_id,
            base.usage_params(request_id, record, now),
            [request_id, base.final_job_status(record), result, float(now)],
            base.record_params(record),
        )
        return cast(bool, await self._writes.submit(op))

    async def expire_reservations(self, now: float) -> list[str]:
        async with self._transaction() as tx:
            rows = await tx.fetch(base.EXPIRE_JOBS, [float(now)])
        return sorted(str(row[0]) for row in rows)

    # ---------------------------------------------------------- leadership

    async def acquire_leadership(
        self, name: str, holder: str, now: float, expires_s: float
    ) -> int | None:
        async with self._transaction() as tx:
            row = await tx.fetchrow(
                base.ACQUIRE_LEADERSHIP, [name, holder, float(now), float(expires_s)]
            )
        return None if row is None else int(row[0])

    async def release_leadership(self, name: str, holder: str, now: float) -> bool:
        async with self._transaction() as tx:
            row = await tx.fetchrow(base.RELEASE_LEADERSHIP, [name, holder, float(now)])
        return row is not None

    async def leadership(self, name: str) -> tuple[str, int, float] | None:
        row = await self._fetchrow(base.SELECT_LEADERSHIP, [name])
        return None if row is None else (str(row[0]), int(row[1]), float(row[2]))

    async def expire_jobs_before_epoch(self, epoch: int, now: float) -> list[str]:
        async with self._transaction() as tx:
            rows = await tx.fetch(base.EXPIRE_JOBS_BEFORE_EPOCH, [int(epoch), float(now)])
        return sorted(str(row[0]) for row in rows)

    # -------------------------------------------------------------- usage

    async def usage_totals(self, tenant: str) -> UsageTotals:
        return base.totals_from_row(await self._fetchrow(base.USAGE_TOTALS, [tenant]))

    async def list_usage(self, tenant: str | None = None) -> list[UsageRow]:
        if tenant is None:
            rows = await self._fetch(base.SELECT_USAGE)
        else:
            rows = await self._fetch(base.SELECT_USAGE_OF, [tenant])
        return [base.usage_from_row(row) for row in rows]

    # ------------------------------------------------------- dead letters

    async def add_dead_letter(self, dead: DeadLetter, request: Request, now: float) -> None:
        params = [dead.request_id, dead.reason, int(dead.attempts), encode(request), float(now)]
        await self._fetch(base.UPSERT_DEAD_LETTER, params)

    async def list_dead_letters(self) -> list[DeadLetterRow]:
        rows = await self._fetch(base.SELECT_DEAD_LETTERS)
        return [base.dead_letter_from_row(row) for row in rows]

    async def get_dead_letter(self, request_id: str) -> DeadLetterRow | None:
        row = await self._fetchrow(base.SELECT_DEAD_LETTER, [request_id])
        return None if row is None else base.dead_letter_from_row(row)

    async def remove_dead_letter(self, request_id: str) -> bool:
        return await self._fetchrow(base.DELETE_DEAD_LETTER, [request_id]) is not None

    # ----------------------------------------------------------- api keys

    async def add_api_key(self, key_hash: str, tenant: str, name: str, now: float) -> bool:
        row = await self._fetchrow(base.INSERT_API_KEY, [key_hash, tenant, name, float(now)])
        return row is not None

    async def tenant_for_key(self, key_hash: str) -> str | None:
        row = await self._fetchrow(base.SELECT_TENANT_FOR_KEY, [key_hash])
        return None if row is None else str(row[0])

    async def revoke_api_key(self, key_hash: str) -> bool:
        return await self._fetchrow(base.REVOKE_API_KEY, [key_hash]) is not None

    async def list_api_keys(self) -> list[base.ApiKeyRow]:
        return [
            base.ApiKeyRow(str(r[0]), str(r[1]), str(r[2]), float(r[3]), bool(r[4]))
            for r in await self._fetch(base.SELECT_API_KEYS)
        ]

    # ------------------------------------------------------------ workers

    async def upsert_worker(self, snapshot: WorkerSnapshot, url: str, now: float) -> None:
        await self._fetch(base.UPSERT_WORKER, base.worker_params(snapshot, url, now))

    async def list_workers(self) -> list[tuple[WorkerSnapshot, str, float]]:
        return [base.worker_from_row(row) for row in await self._fetch(base.SELECT_WORKERS)]

    # ------------------------------------------------------------- quotas

    async def set_quota(
        self,
        tenant: str,
        requests_per_min: int | None,
        tokens_per_min: int | None,
        max_concurrency: int | None,
    ) -> None:
        params = base.quota_params(tenant, requests_per_min, tokens_per_min, max_concurrency)
        await self._fetch(base.UPSERT_QUOTA, params)

    async def quotas(self) -> dict[str, Quota]:
        return dict(base.quota_from_row(row) for row in await self._fetch(base.SELECT_QUOTAS))
