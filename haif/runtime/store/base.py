"""The metadata-store interface, its row types and the SQL both backends share.

One async interface (:class:`MetadataStore`) with two backends that run the
*same* migrations and the same statements: embedded DuckDB (the zero-setup
default) and PostgreSQL via asyncpg. The SQL here is written in the dialect
both engines accept (``TEXT``, ``BIGINT``, ``DOUBLE PRECISION``, ``BOOLEAN``,
``BYTEA``, ``$n`` placeholders, ``INSERT ... ON CONFLICT``, ``RETURNING``), so
a statement cannot drift between the backends.

Times are always passed in (``now``); the store never reads a clock.

Invariants the backends guarantee (and ``tests/test_store_contract.py``
checks on both):

- ``reserve`` creates at most one job per ``(tenant, idempotency_key)``, even
  under concurrent calls (unique constraint + ``ON CONFLICT DO NOTHING`` inside
  a transaction, then read back the row that won).
- ``finalize`` settles a request exactly once: the ``usage`` primary key is the
  arbiter, and the job update, usage row and record upsert commit together.
- usage counters are clamped at zero, so totals never go negative.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple, Self

from haif.contracts import DeadLetter, Request, RequestRecord, WorkerSnapshot
from haif.records import write_parquet
from haif.wire import decode, encode

JobStatus = Literal["reserved", "running", "done", "failed", "expired"]
JOB_STATUSES: tuple[JobStatus, ...] = ("reserved", "running", "done", "failed", "expired")
#: Statuses a job can be reserved in (``reserve``) and that can expire.
OPEN_STATUSES: tuple[JobStatus, ...] = ("reserved", "running")
#: ``set_job_status`` never moves a job out of these (only ``finalize`` settles
#: an expired job, because the work did happen and must be billed).
FINAL_STATUSES: tuple[JobStatus, ...] = ("done", "failed", "expired")
ReserveOutcome = Literal["created", "existing", "conflict"]


@dataclass(frozen=True, slots=True)
class JobRow:
    """One reserved/running/finished request, keyed by ``request_id``.

    ``body_hash`` is the caller's digest of the request body; an idempotent
    resend carries the same ``(tenant, idempotency_key, body_hash)``.
    ``expires_s`` is the lease: past it, :meth:`MetadataStore.expire_reservations`
    reclaims an open job (``None`` = never expires). ``reserve`` stamps
    ``created_s``/``updated_s`` with its ``now``. ``epoch``: the fencing epoch
    of the leader orchestrator that reserved it (``None`` without leadership;
    see :meth:`MetadataStore.acquire_leadership`).
    """

    request_id: str
    tenant: str
    idempotency_key: str | None
    body_hash: str
    status: JobStatus = "reserved"
    worker_id: str | None = None
    created_s: float = 0.0
    updated_s: float = 0.0
    expires_s: float | None = None
    result: bytes | None = None
    epoch: int | None = None


@dataclass(frozen=True, slots=True)
class Reservation:
    """What :meth:`MetadataStore.reserve` decided, with the stored job.

    ``created``: the caller owns the new job and runs it. ``existing``: the
    same key and body is already reserved, running or finished; attach to it
    or replay ``job.result``. ``conflict``: the key is taken by a different
    body (the gateway answers 409).
    """

    outcome: ReserveOutcome
    job: JobRow

    @property
    def created(self) -> bool:
        return self.outcome == "created"


@dataclass(frozen=True, slots=True)
class UsageRow:
    """The finalized usage of one request (written exactly once)."""

    request_id: str
    tenant: str
    prompt_tokens: int
    output_tokens: int
    cost: float
    finalized_s: float


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    """A parked request, with the original :class:`Request` decoded."""

    request_id: str
    reason: str
    attempts: int
    request: Request
    created_s: float


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    """An API key as the store keeps it: its SHA-256 digest, never the key."""

    key_hash: str
    tenant: str
    name: str
    created_s: float
    revoked: bool


class Quota(NamedTuple):
    """A tenant's limits; ``None`` means unlimited."""

    requests_per_min: int | None
    tokens_per_min: int | None
    max_concurrency: int | None


class UsageTotals(NamedTuple):
    """Summed usage of one tenant; never negative."""

    prompt_tokens: int
    output_tokens: int
    cost: float


# ------------------------------------------------------------------ migrations


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


SCHEMA_VERSION_DDL = """
CREATE TABLE IF NOT EXISTS schema_version (
    version BIGINT PRIMARY KEY,
    name TEXT NOT NULL
)
"""
SELECT_SCHEMA_VERSION = "SELECT COALESCE(MAX(version), 0) FROM schema_version"
INSERT_SCHEMA_VERSION = "INSERT INTO schema_version (version, name) VALUES ($1, $2)"
SCHEMA_TABLE_EXISTS = (
    "SELECT COUNT(*) FROM information_schema.tables "
    "WHERE table_name = 'schema_version' AND table_schema = current_schema()"
)

_STATUS_CHECK = ", ".join(f"'{s}'" for s in JOB_STATUSES)

#: Applied in order by ``migrate()``; every statement is idempotent on its own
#: (``IF NOT EXISTS``) so a file written by the pre-migration store upgrades.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "initial schema",
        (
            """
            CREATE TABLE IF NOT EXISTS requests (
                request_id TEXT PRIMARY KEY,
                tenant TEXT NOT NULL,
                model TEXT NOT NULL,
                origin_region TEXT NOT NULL,
                served_region TEXT,
                worker_id TEXT,
                gpu_class TEXT,
                arrival_s DOUBLE PRECISION NOT NULL,
                admitted_s DOUBLE PRECISION,
                first_token_s DOUBLE PRECISION,
                finish_s DOUBLE PRECISION NOT NULL,
                prompt_tokens BIGINT NOT NULL,
                output_tokens BIGINT NOT NULL,
                attempts BIGINT NOT NULL,
                status TEXT NOT NULL,
                reason TEXT,
                cold_start BOOLEAN NOT NULL,
                cost DOUBLE PRECISION NOT NULL
            )
            """,
            f"""
            CREATE TABLE IF NOT EXISTS jobs (
                request_id TEXT PRIMARY KEY,
                tenant TEXT NOT NULL,
                idempotency_key TEXT,
                body_hash TEXT NOT NULL,
                status TEXT NOT NULL CHECK (status IN ({_STATUS_CHECK})),
                worker_id TEXT,
                created_s DOUBLE PRECISION NOT NULL,
                updated_s DOUBLE PRECISION NOT NULL,
                expires_s DOUBLE PRECISION,
                result BYTEA,
                UNIQUE (tenant, idempotency_key)
            )
            """,
            """
            CREATE TABLE IF NOT EXISTS usage (
                request_id TEXT PRIMARY KEY,
                tenant TEXT NOT NULL,
                prompt_tokens BIGINT NOT NULL CHECK (prompt_tokens >= 0),
                output_tokens BIGINT NOT NULL CHECK (output_tokens >= 0),
                cost DOUBLE PRECISION NOT NULL CHECK (cost >= 0),
                finalized_s DOUBLE PRECISION NOT NULL
            )
            """,
            "CREATE INDEX IF NOT EXISTS usage_tenant ON usage (tenant)",
            """
            CREATE TABLE IF NOT EXISTS dead_letters (
                request_id TEXT PRIMARY KEY,
                reason TEXT,
                attempts BIGINT,
                request BYTEA,
                created_s DOUBLE PRECISION
            )
            """,
            """
            CREATE TABLE IF NOT EXISTS api_keys (
                key_hash TEXT PRIMARY KEY,
                tenant TEXT NOT NULL,
                name TEXT NOT NULL,
                created_s DOUBLE PRECISION NOT NULL,
                revoked BOOLEAN NOT NULL DEFAULT FALSE
            )
            """,
            """
            CREATE TABLE IF NOT EXISTS workers (
                worker_id TEXT PRIMARY KEY,
                region TEXT NOT NULL,
                gpu_class TEXT NOT NULL,
                url TEXT NOT NULL,
                snapshot BYTEA NOT NULL,
                last_seen_s DOUBLE PRECISION NOT NULL
            )
            """,
            """
            CREATE TABLE IF NOT EXISTS quotas (
                tenant TEXT PRIMARY KEY,
                requests_per_min BIGINT,
                tokens_per_min BIGINT,
                max_concurrency BIGINT
            )
            """,
        ),
    ),
    Migration(
        2,
        "leadership lease and fencing epochs",
        (
            # One row per leadership (the orchestrators sharing this store): who
            # holds it, until when (wall clock), and its epoch, which grows by one
            # at every change of holder.
            """
            CREATE TABLE IF NOT EXISTS leadership (
                name TEXT PRIMARY KEY,
                holder TEXT NOT NULL,
                epoch BIGINT NOT NULL,
                expires_s DOUBLE PRECISION NOT NULL
            )
            """,
            "ALTER TABLE jobs ADD COLUMN IF NOT EXISTS epoch BIGINT",
        ),
    ),
)
LATEST_VERSION = MIGRATIONS[-1].version

# ------------------------------------------------------------ shared statements

RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RequestRecord))
_RECORD_FLOATS = frozenset(
    name
    for name, hint in typing.get_type_hints(RequestRecord).items()
    if float in (typing.get_args(hint) or (hint,))
)
_RECORD_INTS = frozenset(
    name for name, hint in typing.get_type_hints(RequestRecord).items() if hint is int
)


def values_list(rows: int, width: int, casts: Sequence[str] = ()) -> str:
    """``($1, $2), ($3, $4)``: ``rows`` tuples of ``width`` numbered parameters.

    With ``casts`` (one SQL type per column) each parameter is ``CAST`` to its
    type, which a ``VALUES`` list outside an ``INSERT`` needs in PostgreSQL.
    """
    if rows < 1:
        raise ValueError(f"a VALUES list needs at least one row, got {rows}")

    def param(n: int, column: int) -> str:
        return f"CAST(${n} AS {casts[column]})" if casts else f"${n}"

    return ", ".join(
        "(" + ", ".join(param(r * width + c + 1, c) for c in range(width)) + ")"
        for r in range(rows)
    )


@functools.cache
def values_source(rows: int, width: int, casts: tuple[str, ...] = ()) -> str:
    """The rows of a multi-row statement as parameters: ``VALUES ($1, ...), ...``.

    The statements below take their rows as ``source``, a query yielding
    them, so a backend may pass a large batch another way (DuckDB: an Arrow
    table, ``SELECT * FROM ...``) while the statement stays the same.
    """
    return f"VALUES {values_list(rows, width, casts)}"


@functools.cache
def upsert_records_sql(source: str) -> str:
    """Upsert the records of ``source`` (their request ids must differ)."""
    return (
        f"INSERT INTO requests ({', '.join(RECORD_FIELDS)}) {source} "
        "ON CONFLICT (request_id) DO UPDATE SET "
        + ", ".join(f"{name} = EXCLUDED.{name}" for name in RECORD_FIELDS[1:])
    )


@functools.cache
def insert_records_plain_sql(source: str) -> str:
    """Insert the records of ``source``; fails if one is there (see ``insert_jobs_plain_sql``)."""
    return f"INSERT INTO requests ({', '.join(RECORD_FIELDS)}) {source}"


UPSERT_RECORD = upsert_records_sql(values_source(1, len(RECORD_FIELDS)))
SELECT_RECORDS = f"SELECT {', '.join(RECORD_FIELDS)} FROM requests ORDER BY arrival_s, request_id"

JOB_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(JobRow))
_JOB_COLUMNS = ", ".join(JOB_FIELDS)
# Releases the key of an expired (leaked, reconciled) reservation so that a
# resend with the same key can run; the old row stays for the audit trail.
# A resend of an expired job under its own id, key and body takes the job over
# (the same id, so usage stays unique by it): reserved again, under the
# resender's epoch and lease.
REVIVE_EXPIRED_JOB = (
    "UPDATE jobs SET status = 'reserved', worker_id = NULL, result = NULL, "
    "updated_s = $5, expires_s = $6, epoch = $7 "
    "WHERE request_id = $1 AND tenant = $2 AND idempotency_key = $3 AND body_hash = $4 "
    "AND status = 'expired' "
    f"RETURNING {_JOB_COLUMNS}"
)
RELEASE_EXPIRED_KEY = (
    "UPDATE jobs SET idempotency_key = NULL "
    "WHERE tenant = $1 AND idempotency_key = $2 AND status = 'expired'"
)


@functools.cache
def insert_jobs_sql(source: str, *, keyed: bool = True) -> str:
    """Insert the jobs of ``source``, skipping any that a key or id conflict blocks; return
    the inserted.

    ``keyed=False`` is for jobs without an idempotency key: only their id can
    conflict. (DuckDB's untargeted ``ON CONFLICT`` takes two rows of one
    statement with a NULL key for duplicates and inserts only the first.)
    """
    target = "" if keyed else "(request_id) "
    return (
        f"INSERT INTO jobs ({_JOB_COLUMNS}) {source} "
        f"ON CONFLICT {target}DO NOTHING RETURNING {_JOB_COLUMNS}"
    )


@functools.cache
def insert_jobs_plain_sql(source: str) -> str:
    """Insert the jobs of ``source``; the whole statement fails if any of them conflicts.

    DuckDB runs this in about half the time of ``insert_jobs_sql`` (its
    ``ON CONFLICT ... RETURNING`` is the costly part), so a backend may try
    it first where conflicts are rare (jobs without a key) and fall back.
    """
    return f"INSERT INTO jobs ({_JOB_COLUMNS}) {source}"


INSERT_JOB_IF_ABSENT = insert_jobs_sql(values_source(1, len(JOB_FIELDS)))
SELECT_JOB = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE request_id = $1"
SELECT_JOB_BY_KEY = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE tenant = $1 AND idempotency_key = $2"
_FINAL_LIST = ", ".join(f"'{s}'" for s in FINAL_STATUSES)
_OPEN_LIST = ", ".join(f"'{s}'" for s in OPEN_STATUSES)
#: Column types of the rows of ``set_job_statuses_sql`` and ``finish_jobs_sql``.
STATUS_CASTS = ("TEXT", "TEXT", "DOUBLE PRECISION", "TEXT", "DOUBLE PRECISION")
FINISH_CASTS = ("TEXT", "TEXT", "BYTEA", "DOUBLE PRECISION")

# One job at a time: the plain forms plan faster (DuckDB: about 1 ms less).
SET_JOB_STATUS = (
    "UPDATE jobs SET status = $2, updated_s = $3, worker_id = COALESCE($4, worker_id), "
    "expires_s = COALESCE($5, expires_s) "
    f"WHERE request_id = $1 AND status NOT IN ({_FINAL_LIST}) RETURNING request_id"
)
FINISH_JOB = "UPDATE jobs SET status = $2, result = $3, updated_s = $4 WHERE request_id = $1"


@functools.cache
def set_job_statuses_sql(source: str) -> str:
    """Move open jobs (``source``: ``request_id, status, now, worker_id, expires_s`` rows,
    distinct ids, typed as ``STATUS_CASTS``) to a status; return the ids that moved."""
    return (
        "UPDATE jobs SET status = v.status, updated_s = v.now, "
        "worker_id = COALESCE(v.worker_id, jobs.worker_id), "
        "expires_s = COALESCE(v.expires_s, jobs.expires_s) "
        f"FROM ({source}) AS v (request_id, status, now, worker_id, expires_s) "
        f"WHERE jobs.request_id = v.request_id AND jobs.status NOT IN ({_FINAL_LIST}) "
        "RETURNING jobs.request_id"
    )


@functools.cache
def finish_jobs_sql(source: str) -> str:
    """Settle jobs (``source``: ``request_id, status, result, now`` rows, distinct ids,
    typed as ``FINISH_CASTS``)."""
    return (
        "UPDATE jobs SET status = v.status, result = v.result, updated_s = v.now "
        f"FROM ({source}) AS v (request_id, status, result, now) "
        "WHERE jobs.request_id = v.request_id"
    )


#: Jobs left open by leaders of an older epoch (or none): the new leader's takeover.
EXPIRE_JOBS_BEFORE_EPOCH = (
    "UPDATE jobs SET status = 'expired', updated_s = $2 "
    f"WHERE status IN ({_OPEN_LIST}) AND (epoch IS NULL OR epoch < $1) "
    "RETURNING request_id"
)
#: Take or renew a leadership: only if free, lapsed or already ours; a new holder
#: gets the next epoch. Returns the epoch, or no row when another holds it.
ACQUIRE_LEADERSHIP = (
    "INSERT INTO leadership (name, holder, epoch, expires_s) VALUES ($1, $2, 1, $4) "
    "ON CONFLICT (name) DO UPDATE SET "
    "epoch = CASE WHEN leadership.holder = EXCLUDED.holder "
    "THEN leadership.epoch ELSE leadership.epoch + 1 END, "
    "holder = EXCLUDED.holder, expires_s = EXCLUDED.expires_s "
    "WHERE leadership.holder = EXCLUDED.holder OR leadership.expires_s <= $3 "
    "RETURNING epoch"
)
RELEASE_LEADERSHIP = (
    "UPDATE leadership SET expires_s = $3 WHERE name = $1 AND holder = $2 RETURNING epoch"
)
SELECT_LEADERSHIP = "SELECT holder, epoch, expires_s FROM leadership WHERE name = $1"

EXPIRE_JOBS = (
    "UPDATE jobs SET status = 'expired', updated_s = $1 "
    f"WHERE status IN ({_OPEN_LIST}) AND expires_s IS NOT NULL AND expires_s <= $1 "
    "RETURNING request_id"
)

_USAGE_COLUMNS = "request_id, tenant, prompt_tokens, output_tokens, cost, finalized_s"


@functools.cache
def insert_usage_sql(source: str) -> str:
    """Insert the usage rows of ``source`` unless already there; return the ids inserted."""
    return (
        f"INSERT INTO usage ({_USAGE_COLUMNS}) {source} "
        "ON CONFLICT (request_id) DO NOTHING RETURNING request_id"
    )


@functools.cache
def insert_usage_plain_sql(source: str) -> str:
    """Insert the usage rows of ``source``; fails if one is there already (see
    ``insert_jobs_plain_sql``)."""
    return f"INSERT INTO usage ({_USAGE_COLUMNS}) {source}"


INSERT_USAGE_ONCE = insert_usage_sql(values_source(1, 6))
SELECT_USAGE = f"SELECT {_USAGE_COLUMNS} FROM usage ORDER BY finalized_s, request_id"
SELECT_USAGE_OF = (
    f"SELECT {_USAGE_COLUMNS} FROM usage WHERE tenant = $1 ORDER BY finalized_s, request_id"
)
USAGE_TOTALS = (
    "SELECT CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT), "
    "CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT), "
    "CAST(COALESCE(SUM(cost), 0) AS DOUBLE PRECISION) FROM usage WHERE tenant = $1"
)

UPSERT_DEAD_LETTER = (
    "INSERT INTO dead_letters (request_id, reason, attempts, request, created_s) "
    "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (request_id) DO UPDATE SET "
    "reason = EXCLUDED.reason, attempts = EXCLUDED.attempts, request = EXCLUDED.request, "
    "created_s = EXCLUDED.created_s"
)
_DEAD_COLUMNS = "request_id, reason, attempts, request, created_s"
SELECT_DEAD_LETTERS = f"SELECT {_DEAD_COLUMNS} FROM dead_letters ORDER BY created_s, request_id"
SELECT_DEAD_LETTER = f"SELECT {_DEAD_COLUMNS} FROM dead_letters WHERE request_id = $1"
DELETE_DEAD_LETTER = "DELETE FROM dead_letters WHERE request_id = $1 RETURNING request_id"

INSERT_API_KEY = (
    "INSERT INTO api_keys (key_hash, tenant, name, created_s, revoked) "
    "VALUES ($1, $2, $3, $4, FALSE) ON CONFLICT (key_hash) DO NOTHING RETURNING key_hash"
)
SELECT_TENANT_FOR_KEY = "SELECT tenant FROM api_keys WHERE key_hash = $1 AND NOT revoked"
REVOKE_API_KEY = (
    "UPDATE api_keys SET revoked = TRUE WHERE key_hash = $1 AND NOT revoked RETURNING key_hash"
)
SELECT_API_KEYS = (
    "SELECT key_hash, tenant, name, created_s, revoked FROM api_keys ORDER BY created_s, key_hash"
)

UPSERT_WORKER = (
    "INSERT INTO workers (worker_id, region, gpu_class, url, snapshot, last_seen_s) "
    "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (worker_id) DO UPDATE SET "
    "region = EXCLUDED.region, gpu_class = EXCLUDED.gpu_class, url = EXCLUDED.url, "
    "snapshot = EXCLUDED.snapshot, last_seen_s = EXCLUDED.last_seen_s"
)
SELECT_WORKERS = "SELECT snapshot, url, last_seen_s FROM workers ORDER BY worker_id"

UPSERT_QUOTA = (
    "INSERT INTO quotas (tenant, requests_per_min, tokens_per_min, max_concurrency) "
    "VALUES ($1, $2, $3, $4) ON CONFLICT (tenant) DO UPDATE SET "
    "requests_per_min = EXCLUDED.requests_per_min, tokens_per_min = EXCLUDED.tokens_per_min, "
    "max_concurrency = EXCLUDED.max_concurrency"
)
SELECT_QUOTAS = (
    "SELECT tenant, requests_per_min, tokens_per_min, max_concurrency FROM quotas ORDER BY tenant"
)

# -------------------------------------------------------------- row conversion


def record_params(record: RequestRecord) -> list[Any]:
    """``UPSERT_RECORD`` parameters, coerced to the column types (PostgreSQL is strict)."""
    params: list[Any] = []
    for name in RECORD_FIELDS:
        value = getattr(record, name)
        if value is not None and name in _RECORD_FLOATS:
            value = float(value)
        elif name in _RECORD_INTS:
            value = int(value)
        elif name == "cold_start":
            value = bool(value)
        params.append(value)
    return params


def record_from_row(row: Sequence[Any]) -> RequestRecord:
    return RequestRecord(*row)


def check_job(job: JobRow) -> None:
    if job.status not in OPEN_STATUSES:
        raise ValueError(f"a job is reserved as one of {OPEN_STATUSES}, not {job.status!r}")


def job_params(job: JobRow, now: float) -> list[Any]:
    """``INSERT_JOB_IF_ABSENT`` parameters; ``reserve`` stamps the times with ``now``."""
    check_job(job)
    stamped = dataclasses.replace(job, created_s=float(now), updated_s=float(now))
    params = [getattr(stamped, name) for name in JOB_FIELDS]  # astuple() deep-copies: 10x
    params[JOB_FIELDS.index("expires_s")] = None if job.expires_s is None else float(job.expires_s)
    return params


def job_from_row(row: Sequence[Any]) -> JobRow:
    values = list(row)
    result = values[JOB_FIELDS.index("result")]
    values[JOB_FIELDS.index("result")] = None if result is None else bytes(result)
    return JobRow(*values)


def classify(job: JobRow, existing: JobRow) -> Reservation:
    """``existing`` blocked the insert of ``job``: same request or a conflict?"""
    same = (
        existing.tenant == job.tenant
        and existing.idempotency_key == job.idempotency_key
        and existing.body_hash == job.body_hash
    )
    return Reservation("existing" if same else "conflict", existing)


_STATUS_BY_NAME: dict[str, JobStatus] = {s: s for s in JOB_STATUSES}


def check_status(status: str) -> JobStatus:
    try:
        return _STATUS_BY_NAME[status]
    except KeyError:
        raise ValueError(f"unknown job status {status!r}; expected one of {JOB_STATUSES}") from None


def status_params(
    request_id: str, status: str, now: float, worker_id: str | None, expires_s: float | None
) -> list[Any]:
    """``SET_JOB_STATUS`` parameters (the status is checked)."""
    expires = None if expires_s is None else float(expires_s)
    return [request_id, check_status(status), float(now), worker_id, expires]


def final_job_status(record: RequestRecord) -> JobStatus:
    return "done" if record.status == "ok" else "failed"


def usage_params(request_id: str, record: RequestRecord, now: float) -> list[Any]:
    """``INSERT_USAGE_ONCE`` parameters; counters are clamped at zero."""
    if record.request_id != request_id:
        raise ValueError(f"record {record.request_id!r} finalized as {request_id!r}")
    return [
        request_id,
        record.tenant,
        max(0, int(record.prompt_tokens)),
        max(0, int(record.output_tokens)),
        max(0.0, float(record.cost)),
        float(now),
    ]


def usage_from_row(row: Sequence[Any]) -> UsageRow:
    rid, tenant, prompt, output, cost, finalized = row
    return UsageRow(rid, tenant, int(prompt), int(output), float(cost), float(finalized))


def totals_from_row(row: Sequence[Any] | None) -> UsageTotals:
    if row is None:
        return UsageTotals(0, 0, 0.0)
    prompt, output, cost = row
    return UsageTotals(max(0, int(prompt)), max(0, int(output)), max(0.0, float(cost)))


def dead_letter_from_row(row: Sequence[Any]) -> DeadLetterRow:
    rid, reason, attempts, blob, created = row
    request = decode(bytes(blob))
    if not isinstance(request, Request):
        raise ValueError(f"dead letter {rid!r} does not hold a Request")
    return DeadLetterRow(rid, reason, int(attempts), request, float(created))


def worker_params(snapshot: WorkerSnapshot, url: str, now: float) -> list[Any]:
    return [
        snapshot.worker_id,
        snapshot.region,
        snapshot.gpu_class,
        url,
        encode(snapshot),
        float(now),
    ]


def worker_from_row(row: Sequence[Any]) -> tuple[WorkerSnapshot, str, float]:
    blob, url, last_seen = row
    snapshot = decode(bytes(blob))
    if not isinstance(snapshot, WorkerSnapshot):
        raise ValueError(f"worker row at {url!r} does not hold a WorkerSnapshot")
    return snapshot, url, float(last_seen)


def quota_params(
    tenant: str,
    requests_per_min: int | None,
    tokens_per_min: int | None,
    max_concurrency: int | None,
) -> list[Any]:
    limits = (requests_per_min, tokens_per_min, max_concurrency)
    for value in limits:
        if value is not None and value < 0:
            raise ValueError(f"quota limits must be >= 0 or None, got {limits} for {tenant!r}")
    return [tenant, *(None if v is None else int(v) for v in limits)]


def quota_from_row(row: Sequence[Any]) -> tuple[str, Quota]:
    tenant, rpm, tpm, conc = row
    return tenant, Quota(
        None if rpm is None else int(rpm),
        None if tpm is None else int(tpm),
        None if conc is None else int(conc),
    )


# ------------------------------------------------------------------- interface


class MetadataStore(abc.ABC):
    """The runtime's metadata: records, jobs, usage, dead letters, keys, workers, quotas.

    Usable as an async context manager (``async with store: ...`` closes it).
    """

    # ---------------------------------------------------------- lifecycle

    @abc.abstractmethod
    async def migrate(self) -> int:
        """Apply pending :data:`MIGRATIONS` (idempotent); return the schema version."""

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The highest migration applied (0 for an empty database)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the connection(s); idempotent."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------ records

    @abc.abstractmethod
    async def write_record(self, record: RequestRecord) -> None:
        """Upsert one request record (a record written twice stays one row)."""

    @abc.abstractmethod
    async def records(self) -> list[RequestRecord]:
        """All records, ordered by ``(arrival_s, request_id)``."""

    async def export_parquet(self, path: str | Path) -> Path:
        """Write the records in the simulator's Parquet schema."""
        return write_parquet(await self.records(), path)

    # --------------------------------------------------------------- jobs

    @abc.abstractmethod
    async def reserve(self, job: JobRow, now: float) -> Reservation:
        """Reserve ``job`` unless its ``(tenant, idempotency_key)`` is taken.

        A key held by an *expired* job is released and reserved anew.
        """

    @abc.abstractmethod
    async def set_job_status(
        self,
        request_id: str,
        status: JobStatus,
        now: float,
        worker_id: str | None = None,
        *,
        expires_s: float | None = None,
    ) -> bool:
        """Move an open job to ``status`` (optionally renewing its lease to ``expires_s``).

        Returns False when the job is unknown or already done/failed/expired.
        """

    @abc.abstractmethod
    async def get_job(self, request_id: str) -> JobRow | None: ...

    @abc.abstractmethod
    async def finalize(
        self, request_id: str, record: RequestRecord, result: bytes | None, now: float
    ) -> bool:
        """Settle a request in one transaction: job done/failed + result, usage, record.

        True only for the call that settled it; later calls change nothing.
        """

    @abc.abstractmethod
    async def expire_reservations(self, now: float) -> list[str]:
        """Expire open jobs whose lease ended (``expires_s <= now``); return their ids."""

    # ---------------------------------------------------------- leadership

    @abc.abstractmethod
    async def acquire_leadership(
        self, name: str, holder: str, now: float, expires_s: float
    ) -> int | None:
        """Take or renew the leadership ``name`` for ``holder`` until ``expires_s``.

        Succeeds when nobody holds it, its lease lapsed (``expires_s <= now``)
        or ``holder`` holds it already; returns the fencing epoch (the same on a
        renewal, one more than the last at a change of holder), or ``None``
        while another holder's lease runs.
        """

    @abc.abstractmethod
    async def release_leadership(self, name: str, holder: str, now: float) -> bool:
        """End ``holder``'s lease now (a clean stop: the standby need not wait it out)."""

    @abc.abstractmethod
    async def leadership(self, name: str) -> tuple[str, int, float] | None:
        """``(holder, epoch, expires_s)`` of the leadership ``name``, if ever taken."""

    @abc.abstractmethod
    async def expire_jobs_before_epoch(self, epoch: int, now: float) -> list[str]:
        """Expire the open jobs of older epochs (or none): a new leader's takeover."""

    # -------------------------------------------------------------- usage

    @abc.abstractmethod
    async def usage_totals(self, tenant: str) -> UsageTotals:
        """``(prompt_tokens, output_tokens, cost)`` finalized for ``tenant``."""

    @abc.abstractmethod
    async def list_usage(self, tenant: str | None = None) -> list[UsageRow]:
        """Usage rows (all, or one tenant's), ordered by ``(finalized_s, request_id)``."""

    # ------------------------------------------------------- dead letters

    @abc.abstractmethod
    async def add_dead_letter(self, dead: DeadLetter, request: Request, now: float) -> None: ...

    @abc.abstractmethod
    async def list_dead_letters(self) -> list[DeadLetterRow]: ...

    @abc.abstractmethod
    async def get_dead_letter(self, request_id: str) -> DeadLetterRow | None: ...

    @abc.abstractmethod
    async def remove_dead_letter(self, request_id: str) -> bool: ...

    # ----------------------------------------------------------- api keys

    @abc.abstractmethod
    async def add_api_key(self, key_hash: str, tenant: str, name: str, now: float) -> bool:
        """Store a key *hash*; False (and nothing changes) if the hash exists."""

    @abc.abstractmethod
    async def tenant_for_key(self, key_hash: str) -> str | None:
        """The key's tenant, or None if the key is unknown or revoked."""

    @abc.abstractmethod
    async def revoke_api_key(self, key_hash: str) -> bool:
        """True if an active key was revoked by this call."""

    async def list_api_keys(self) -> list[ApiKeyRow]:
        """Every key (its digest, never the key), oldest first, revoked ones included."""
        raise NotImplementedError(f"{type(self).__name__} cannot list API keys")

    # ------------------------------------------------------------ workers

    @abc.abstractmethod
    async def upsert_worker(self, snapshot: WorkerSnapshot, url: str, now: float) -> None: ...

    @abc.abstractmethod
    async def list_workers(self) -> list[tuple[WorkerSnapshot, str, float]]:
        """``(snapshot, url, last_seen_s)`` per worker, ordered by worker id."""

    # ------------------------------------------------------------- quotas

    @abc.abstractmethod
    async def set_quota(
        self,
        tenant: str,
        requests_per_min: int | None,
        tokens_per_min: int | None,
        max_concurrency: int | None,
    ) -> None: ...

    @abc.abstractmethod
    async def quotas(self) -> dict[str, Quota]: ...
