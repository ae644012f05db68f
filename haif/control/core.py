"""The orchestrator's decision loop as a pure state machine (events in, decisions out).

Theory of operation
-------------------
Both shells own one :class:`ControlCore`. They feed it events — a request
was submitted, a worker's heartbeat arrived, an attempt finished, a worker
left — together with the time on their own clock, and execute the decisions
it returns, in order. They also ask :meth:`ControlCore.next_deadline` when
to call :meth:`ControlCore.on_timer` next. The core never reads a clock,
never does I/O and draws randomness only from the ``random.Random`` it was
given, so the SimPy driver and the aiohttp driver make identical decisions
from identical inputs (``tests/test_parity.py``).

A request's life::

    submit -> shed? -> throttle? -> quota? -> [admitted] -> place
    place  -> eligible workers (healthy, fresh, breakers closed, room, model)
           -> strategy.choose -> reserve (breaker permits, outstanding + 1)
           -> Dispatch
    result ok   -> Finalize(ok), release quota
    result fail -> retry policy: RetryAt (backoff) -> place elsewhere later
                                 | DeadLetter + Finalize(dead_lettered)
                                 | Finalize(failed)      (not retryable)
    (the error's kind says, by the ``ERROR_KINDS`` table in haif.contracts,
    whether it counts against the worker's breakers and the throttle, and
    whether the default retry policy retries it)
    timers: backoff expiry (place again), attempt timeout (Cancel, retry),
            request deadline (Cancel, Finalize(timeout)).

Every rejected or finished request produces exactly one ``Finalize``.
Results for attempts the core has already given up on (cancelled, or from a
previous attempt) are ignored.

Cost per decision does not grow with the fleet: which workers are eligible
(and the fleet's utilization, which admission reads) is kept incrementally
by :class:`~haif.control.eligibility.EligibilityIndex` as heartbeats,
dispatches, results and breaker changes arrive, and placement reads a view
of it (``weighted_score`` and ``locality`` its groups of workers alike but
for load, :class:`~haif.policy.placement.CandidateGroup`). The candidates,
their order and hence every decision are what the exhaustive walk over the
fleet gave. The index's own deadlines (a worker
going stale, a breaker half-opening) are applied at the ``now`` of the next
event that reads it; they are not part of :meth:`ControlCore.next_deadline`,
since nothing is decided at them.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from haif.contracts import (
    AttemptResult,
    Cancel,
    ClientGone,
    DeadLetter,
    Decision,
    Dispatch,
    ErrorKind,
    Event,
    Finalize,
    Heartbeat,
    Reject,
    Request,
    RequestRecord,
    RetryAt,
    Submit,
    WorkerGone,
    WorkerSnapshot,
    is_worker_fault,
)
from haif.control.config import CoreConfig
from haif.control.eligibility import EligibilityIndex
from haif.policy.admission import AdaptiveThrottle, PriorityShedder
from haif.policy.breaker import CircuitBreaker, Permit
from haif.policy.placement import Candidate, make_placement
from haif.policy.ratelimit import QuotaManager
from haif.policy.retry import RetryPolicy

_OVERLOAD_RETRY_S = 1.0
# The kinds the core itself reports, as the plain strings its records carry.
_NO_ELIGIBLE_WORKER = ErrorKind.NO_ELIGIBLE_WORKER.value
_TIMEOUT = ErrorKind.TIMEOUT.value
_DEADLINE = ErrorKind.DEADLINE.value
_CANCELLED = ErrorKind.CANCELLED.value


@dataclass(slots=True)
class _Attempt:
    number: int
    worker_id: str
    region: str
    gpu_class: str
    started_s: float
    worker_permit: Permit
    route_permit: Permit
    route: tuple[str, str]
    # The breakers the permits came from (the core never drops a breaker, so these
    # are the ones its maps hold): recorded on without looking them up again.
    worker_breaker: CircuitBreaker
    route_breaker: CircuitBreaker


@dataclass(slots=True)
class _Job:
    request: Request
    admitted_s: float
    deadline_s: float | None
    attempts: int = 0  # dispatches so far
    placement_failures: int = 0
    running: _Attempt | None = None
    tried: list[str] = field(default_factory=list)
    last_delay: float | None = None
    retry_at: float | None = None
    cold_start: bool = False
    cost: float = 0.0
    last: _Attempt | None = None
    resumed: int = 0  # response tokens already produced by failed attempts
    first_token_s: float | None = None  # the first token any attempt produced


class _Timer(NamedTuple):
    # A tuple, heap-ordered by (at, seq); seq is unique, so no comparison goes further.
    at: float
    seq: int
    kind: str  # "retry" | "attempt_timeout" | "deadline"
    request_id: str
    attempt: int


class _Stream(random.Random):
    """The draws of ``random.Random(key)``, seeded on the first draw rather than when made.

    Seeding a Mersenne Twister from a string costs microseconds, and most
    choices never draw (round robin, a minimum without a tie, a throttle at
    zero), so a stream is seeded only if it is read.
    """

    def __init__(self, key: str) -> None:  # nothing seeded yet (see _start)
        self._key: str | None = key
        self.gauss_next = None

    def _start(self) -> None:
        key, self._key = self._key, None
        if key is not None:
            super().seed(key)

    def seed(  # type: ignore[override]  # as typeshed's own random.Random.seed
        self, a: int | float | str | bytes | bytearray | None = None, version: int = 2
    ) -> None:
        self._key = None
        super().seed(a, version)

    def random(self) -> float:
        if self._key is not None:
            self._start()
        return super().random()

    def getrandbits(self, k: int, /) -> int:
        if self._key is not None:
            self._start()
        return super().getrandbits(k)

    def getstate(self) -> tuple[Any, ...]:
        if self._key is not None:
            self._start()
        return super().getstate()

    def setstate(self, state: tuple[Any, ...]) -> None:
        self._key = None
        super().setstate(state)


class ControlCore:
    """One orchestrator's decisions. Not thread-safe; drive it from one task."""

    def __init__(self, config: CoreConfig, rng: random.Random) -> None:
        self.config = config
        # Each random choice draws from its own stream, keyed by what it is about
        # (see _rng_for), not from one shared sequence: two cores given the same
        # state make the same choice even if their earlier draws differed (a
        # throttle draw, a retry's jitter), so the simulated and the live core
        # part ways only where their states do.
        self._seed = rng.getrandbits(64)
        self._stream_prefix = f"{self._seed}:"  # of every stream's key (_rng_for)
        self._placement = make_placement(config.placement, config.placement_params)
        self._retry = RetryPolicy(config.retry)
        self._quotas = QuotaManager(
            config.tenant_quotas, default=config.default_quota, global_=config.global_quota
        )
        self._throttle = AdaptiveThrottle(config.throttle)
        self._shedder = PriorityShedder(config.shedding)
        self._worker_breakers: dict[str, CircuitBreaker] = {}
        self._route_breakers: dict[tuple[str, str], CircuitBreaker] = {}
        # Registered workers (heartbeats, stamped with the receiver's clock),
        # outstanding counts, and who is eligible for what.
        self._index = EligibilityIndex(
            stale_after_s=config.stale_after_s,
            max_queue_factor=config.max_queue_factor,
            worker_breakers=self._worker_breakers,
            route_breakers=self._route_breakers,
            rtt_ms=config.rtt,
            orders=getattr(self._placement, "indexed_orders", ()),
        )
        self._jobs: dict[str, _Job] = {}
        self._timers: list[_Timer] = []
        self._seq = 0

    # ------------------------------------------------------------ inputs

    def handle(self, event: Event, now: float) -> list[Decision]:
        """Feed one event; return the decisions to execute, in order."""
        if isinstance(event, Heartbeat):  # by far the most frequent
            self.on_heartbeat(event.snapshot, now)
            return []
        if isinstance(event, Submit):
            return self.submit(event.request, now)
        if isinstance(event, AttemptResult):
            return self.on_result(event, now)
        if isinstance(event, WorkerGone):
            self.on_worker_gone(event.worker_id)
            return []
        if isinstance(event, ClientGone):
            return self.on_client_gone(event, now)
        raise TypeError(f"unknown event {event!r}")

    def on_heartbeat(self, snapshot: WorkerSnapshot, now: float) -> None:
        """Refresh the discovery snapshot, stamped with the receiver's clock."""
        self._index.heartbeat(snapshot, now)

    def on_heartbeats(self, reports: Iterable[tuple[WorkerSnapshot, float]]) -> None:
        """:meth:`on_heartbeat` for each ``(snapshot, received at)``, in order."""
        self._index.heartbeats(reports)

    def on_worker_gone(self, worker_id: str) -> None:
        """Forget a departed worker; its in-flight attempts fail via results."""
        self._index.gone(worker_id)

    def on_client_gone(self, event: ClientGone, now: float) -> list[Decision]:
        """Every caller left: cancel a running attempt, finalize as ``cancelled``.

        Billed for the tokens generated until then; the worker's slot is
        freed without an outcome against it (it did nothing wrong). A
        request already finished, or never admitted, is left alone.
        """
        job = self._jobs.get(event.request_id)
        if job is None:
            return []
        out: list[Decision] = []
        attempt = job.running
        if attempt is not None:
            job.running = None
            self._release_worker(
                attempt, ok=False, duration=now - attempt.started_s, error=_CANCELLED, now=now
            )
            out.append(
                Cancel(job.request.request_id, attempt.worker_id, attempt.number, "client_gone")
            )
        out.append(
            self._finish(job, now, "cancelled", "client_gone", None, output=event.output_tokens)
        )
        return out

    def submit(self, request: Request, now: float) -> list[Decision]:
        """Admission, then placement."""
        rid = request.request_id
        if rid in self._jobs:
            return [Reject(rid, 409, "duplicate_request_id")]
        index = self._index
        if index.knows_workers() and not index.serves(request.model):
            return self._refuse(request, now, Reject(rid, 404, "model_not_found", 0.0))
        if self._shedder.should_shed(request.priority, self.utilization(now)):
            return self._refuse(request, now, Reject(rid, 529, "overloaded", _OVERLOAD_RETRY_S))
        # AdaptiveThrottle.should_reject, with the stream made only when it is drawn from.
        p = self._throttle.reject_probability(now)
        if p > 0.0 and self._rng_for("throttle", rid, 0).random() < p:
            return self._refuse(request, now, Reject(rid, 529, "throttled", _OVERLOAD_RETRY_S))
        quota = self._quotas.admit(request.tenant, request.prompt_tokens + request.max_tokens, now)
        if not quota.allowed:
            reject = Reject(
                rid,
                429,
                quota.reason or "quota",
                quota.retry_after,
                quota.limit_requests,
                quota.remaining_requests,
                quota.reset_requests,
                quota.limit_tokens,
                quota.remaining_tokens,
                quota.reset_tokens,
            )
            return self._refuse(request, now, reject)
        self._retry.record_request(now)
        deadline = request.deadline_s
        if deadline is None and self.config.default_timeout_s is not None:
            deadline = request.arrival_s + self.config.default_timeout_s
        job = _Job(request=request, admitted_s=now, deadline_s=deadline)
        self._jobs[rid] = job
        if deadline is not None:
            self._arm(deadline, "deadline", rid, 0)
        return self._place(job, now)

    def on_result(self, result: AttemptResult, now: float) -> list[Decision]:
        """An attempt finished (well or badly)."""
        job = self._jobs.get(result.request_id)
        if job is None or job.running is None or job.running.number != result.attempt:
            return []  # an attempt we already gave up on
        attempt = job.running
        job.running = None
        self._release_worker(
            attempt,
            ok=result.ok,
            duration=result.finish_s - result.started_s,
            error=result.error,
            now=now,
        )
        # SRE "accepts": the backend took the request (a client error counts).
        self._throttle.record(now, accepted=result.ok or not is_worker_fault(result.error))
        job.cost += result.cost
        job.cold_start = job.cold_start or result.cold_start
        # Time to first token means one thing in both shells: the first token any
        # attempt produced, which is what a streaming client received first (the
        # gateway passes a failed attempt's tokens on and skips them in the retry's
        # stream, whether or not the retry resumes from them).
        if job.first_token_s is None and result.output_tokens > job.resumed:
            job.first_token_s = result.first_token_s
        if not result.ok and self.config.resume_partial and result.output_tokens > job.resumed:
            job.resumed = min(result.output_tokens, job.request.max_tokens - 1)
        if result.ok:
            return [self._finish(job, now, "ok", None, result)]
        # Records carry plain strings, whatever str subclass (ErrorKind) the shell sent.
        error = str(result.error) if result.error else "failed"
        return self._after_failure(job, error, result.retryable, now, result)

    # ------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` must next be called (None: no timer armed)."""
        while self._timers and not self._timer_live(self._timers[0]):
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def on_timer(self, now: float) -> list[Decision]:
        """Fire every timer due at ``now``."""
        out: list[Decision] = []
        while self._timers and self._timers[0][0] <= now:
            timer = heapq.heappop(self._timers)
            if not self._timer_live(timer):
                continue
            job = self._jobs[timer.request_id]
            if timer.kind == "retry":
                job.retry_at = None
                out.extend(self._place(job, now))
            elif timer.kind == "attempt_timeout":
                out.extend(self._attempt_timed_out(job, now))
            else:
                out.extend(self._deadline_passed(job, now))
        return out

    # ------------------------------------------------------------ views

    def utilization(self, now: float) -> float:
        """Load over capacity of the fresh, healthy fleet.

        0 when no worker is known: an empty fleet is unavailability, which
        placement answers (retry, then 503), not overload.
        """
        return self._index.utilization(now)

    def outstanding(self, worker_id: str) -> int:
        return self._index.outstanding(worker_id)

    def in_flight(self) -> int:
        """Admitted requests not yet finalized."""
        return len(self._jobs)

    def breaker_state(self, worker_id: str, now: float) -> str:
        br = self._worker_breakers.get(worker_id)
        return br.state(now) if br else "closed"

    # ------------------------------------------------------------ internals

    def _arm(self, at: float, kind: str, request_id: str, attempt: int) -> None:
        self._seq += 1
        heapq.heappush(self._timers, _Timer(at, self._seq, kind, request_id, attempt))

    def _timer_live(self, timer: _Timer) -> bool:
        job = self._jobs.get(timer.request_id)
        if job is None:
            return False
        if timer.kind == "retry":
            return job.retry_at == timer.at and job.running is None
        if timer.kind == "attempt_timeout":
            return job.running is not None and job.running.number == timer.attempt
        return True

    def _worker_breaker(self, worker_id: str) -> CircuitBreaker:
        br = self._worker_breakers.get(worker_id)
        if br is None:
            br = self._worker_breakers[worker_id] = CircuitBreaker(self.config.worker_breaker)
        return br

    def _route_breaker(self, route: tuple[str, str]) -> CircuitBreaker:
        br = self._route_breakers.get(route)
        if br is None:
            br = self._route_breakers[route] = CircuitBreaker(self.config.route_breaker)
        return br

    def _candidates(self, job: _Job, now: float) -> Sequence[Candidate]:
        """The eligible workers in worker-id order, those the request tried left out
        when there is an elsewhere (a view of the index, not a list)."""
        req = job.request
        return self._index.candidates(req.model, req.origin_region, job.tried, now)

    def _rng_for(self, purpose: str, request_id: str, n: int) -> random.Random:
        """The random stream of one choice (``n``: the try it is for); stable across processes."""
        return _Stream(f"{self._stream_prefix}{purpose}:{request_id}:{n}")

    def _place(self, job: _Job, now: float) -> list[Decision]:
        req = job.request
        rng = self._rng_for("place", req.request_id, job.attempts + job.placement_failures)
        chosen = self._placement.choose(req, self._candidates(job, now), now, rng)
        if chosen is None:
            job.placement_failures += 1
            return self._after_failure(job, _NO_ELIGIBLE_WORKER, True, now, None)
        wid = chosen.worker_id
        route = (req.model, chosen.region)
        worker_breaker = self._worker_breakers.get(wid)
        if worker_breaker is None:
            worker_breaker = self._worker_breaker(wid)
        route_breaker = self._route_breakers.get(route)
        if route_breaker is None:
            route_breaker = self._route_breaker(route)
        worker_permit = worker_breaker.acquire(now)
        route_permit = route_breaker.acquire(now)
        assert isinstance(worker_permit, Permit) and isinstance(route_permit, Permit)
        job.attempts += 1
        job.tried.append(wid)
        attempt = _Attempt(
            job.attempts,
            wid,
            chosen.region,
            chosen.gpu_class,
            now,
            worker_permit,
            route_permit,
            route,
            worker_breaker,
            route_breaker,
        )
        job.running = job.last = attempt
        self._index.dispatched(wid, route, now)
        if self.config.attempt_timeout_s is not None:
            self._arm(
                now + self.config.attempt_timeout_s,
                "attempt_timeout",
                req.request_id,
                attempt.number,
            )
        return [
            Dispatch(
                req.request_id,
                chosen.worker_id,
                attempt.number,
                chosen.region,
                chosen.gpu_class,
                job.resumed,
            )
        ]

    def _release_worker(
        self, attempt: _Attempt, *, ok: bool, duration: float, error: str | None, now: float
    ) -> None:
        wid = attempt.worker_id
        # A request-caused error (bad input, deadline) says nothing about the worker
        # (ERROR_KINDS in haif.contracts says which kinds are the worker's fault).
        recorded = ok or is_worker_fault(error)
        if recorded:
            attempt.worker_breaker.record(attempt.worker_permit, ok, duration, now)
            attempt.route_breaker.record(attempt.route_permit, ok, duration, now)
        self._index.released(wid, attempt.route, now, breakers_used=recorded)

    def _after_failure(
        self, job: _Job, error: str, retryable: bool, now: float, result: AttemptResult | None
    ) -> list[Decision]:
        tries = job.attempts + job.placement_failures
        rng = self._rng_for("retry", job.request.request_id, tries)
        verdict = self._retry.decide(tries, error, retryable, now, rng, job.last_delay)
        rid = job.request.request_id
        if verdict.retry:
            at = now + verdict.delay
            if job.deadline_s is None or at < job.deadline_s:
                job.last_delay = verdict.delay
                job.retry_at = at
                self._arm(at, "retry", rid, tries + 1)
                return [RetryAt(rid, job.attempts + 1, at, error)]
        if job.attempts == 0:
            # Never ran anywhere: nothing can serve it (HTTP 503).
            return [
                Reject(rid, 503, error, _OVERLOAD_RETRY_S),
                self._finish(job, now, "rejected", error, None),
            ]
        if not retryable or verdict.reason == "not_retryable":
            return [self._finish(job, now, "failed", error, result)]
        reason = f"{verdict.reason}:{error}"
        return [
            DeadLetter(rid, reason, job.attempts),
            self._finish(job, now, "dead_lettered", reason, result),
        ]

    def _attempt_timed_out(self, job: _Job, now: float) -> list[Decision]:
        attempt = job.running
        assert attempt is not None
        job.running = None
        self._release_worker(
            attempt, ok=False, duration=now - attempt.started_s, error=_TIMEOUT, now=now
        )
        self._throttle.record(now, accepted=not is_worker_fault(_TIMEOUT))
        cancel = Cancel(
            job.request.request_id, attempt.worker_id, attempt.number, "attempt_timeout"
        )
        return [cancel, *self._after_failure(job, _TIMEOUT, True, now, None)]

    def _deadline_passed(self, job: _Job, now: float) -> list[Decision]:
        out: list[Decision] = []
        attempt = job.running
        if attempt is not None:
            job.running = None
            # The deadline is the request's, not the worker's fault: free the
            # slot, but do not count an outcome against the worker.
            self._release_worker(
                attempt, ok=False, duration=now - attempt.started_s, error=_DEADLINE, now=now
            )
            out.append(
                Cancel(job.request.request_id, attempt.worker_id, attempt.number, "deadline")
            )
        out.append(self._finish(job, now, "timeout", "deadline_exceeded", None))
        return out

    def _refuse(self, request: Request, now: float, reject: Reject) -> list[Decision]:
        rec = RequestRecord.never_served(request, now, "rejected", reject.reason)
        return [reject, Finalize(rec)]

    def _finish(
        self,
        job: _Job,
        now: float,
        status: str,
        reason: str | None,
        result: AttemptResult | None,
        *,
        output: int | None = None,
    ) -> Finalize:
        """The request's record; ``output``: its response tokens when no result says."""
        req = job.request
        del self._jobs[req.request_id]
        if output is None:
            output = result.output_tokens if result is not None else 0
        self._quotas.release(req.tenant, now, unused_tokens=max(0, req.max_tokens - output))
        last = job.last
        rec = RequestRecord(
            request_id=req.request_id,
            tenant=req.tenant,
            model=req.model,
            origin_region=req.origin_region,
            served_region=last.region if last else None,
            worker_id=last.worker_id if last else None,
            gpu_class=last.gpu_class if last else None,
            arrival_s=req.arrival_s,
            admitted_s=job.admitted_s,
            first_token_s=(job.first_token_s or result.first_token_s)
            if result is not None and result.ok
            else None,
            finish_s=now,
            prompt_tokens=result.prompt_tokens
            if result is not None and result.ok and result.prompt_tokens is not None
            else req.prompt_tokens,
            output_tokens=output,
            attempts=job.attempts,
            status=status,
            reason=reason,
            cold_start=job.cold_start,
            cost=job.cost,
        )
        return Finalize(rec)


def run_events(
    core: ControlCore, events: Iterable[tuple[float, Event]]
) -> list[tuple[float, Decision]]:
    """Feed time-ordered events, firing timers in between; for tests and tools."""
    log: list[tuple[float, Decision]] = []
    for t, event in events:
        deadline = core.next_deadline()
        while deadline is not None and deadline <= t:
            log.extend((deadline, d) for d in core.on_timer(deadline))
            deadline = core.next_deadline()
        log.extend((t, d) for d in core.handle(event, t))
    deadline = core.next_deadline()
    while deadline is not None:
        log.extend((deadline, d) for d in core.on_timer(deadline))
        deadline = core.next_deadline()
    return log
