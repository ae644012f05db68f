"""The control core, driven by hand: events in, decisions out, a hand-advanced clock."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haif.contracts import (
    AttemptResult,
    Cancel,
    DeadLetter,
    Decision,
    Dispatch,
    Finalize,
    Heartbeat,
    Reject,
    Request,
    RetryAt,
    Submit,
    WorkerGone,
    WorkerSnapshot,
)
from haif.control.config import CoreConfig
from haif.control.core import ControlCore, run_events
from haif.policy.admission import ShedConfig, ThrottleConfig
from haif.policy.breaker import BreakerConfig
from haif.policy.placement import placement_names
from haif.policy.ratelimit import QuotaConfig
from haif.policy.retry import Backoff, RetryConfig

MODEL = "llama-3-8b"
CONSTANT = RetryConfig(
    max_attempts=3, backoff=Backoff("constant", 0.5, 0.5), budget_min_retries=100
)


def snap(wid: str, region: str = "a", **kw: object) -> WorkerSnapshot:
    base = WorkerSnapshot(
        worker_id=wid,
        region=region,
        gpu_class="A100-80G",
        models_warm=(MODEL,),
        models_loadable=(MODEL,),
        capacity=4,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def req(rid: str = "r1", t: float = 0.0, **kw: object) -> Request:
    base = Request(
        request_id=rid,
        tenant="acme",
        model=MODEL,
        prompt_tokens=100,
        max_tokens=10,
        arrival_s=t,
        origin_region="a",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def ok(d: Dispatch, started: float, finish: float, tokens: int = 10) -> AttemptResult:
    return AttemptResult(
        d.request_id,
        d.attempt,
        d.worker_id,
        True,
        started,
        finish,
        first_token_s=started + 0.1,
        output_tokens=tokens,
        cost=0.01,
    )


def fail(
    d: Dispatch,
    started: float,
    finish: float,
    error: str = "connection_error",
    retryable: bool = True,
) -> AttemptResult:
    return AttemptResult(
        d.request_id,
        d.attempt,
        d.worker_id,
        False,
        started,
        finish,
        error=error,
        retryable=retryable,
    )


def core(**kw: object) -> ControlCore:
    kw.setdefault("retry", CONSTANT)
    return ControlCore(CoreConfig(**kw), random.Random(1))  # type: ignore[arg-type]


def one_dispatch(decisions: list[Decision]) -> Dispatch:
    """The decisions are exactly one Dispatch; return it."""
    assert len(decisions) == 1 and isinstance(decisions[0], Dispatch), decisions
    return decisions[0]


def only(decisions: list[Decision], cls: type) -> list[Decision]:
    return [d for d in decisions if isinstance(d, cls)]


# ------------------------------------------------------------------ happy path


def test_submit_dispatches_and_result_finalizes() -> None:
    c = core(placement="round_robin")
    c.on_heartbeat(snap("w1"), 0.0)
    d = one_dispatch(c.submit(req(), 1.0))
    assert d == Dispatch("r1", "w1", 1, "a", "A100-80G")
    assert c.outstanding("w1") == 1
    [fin] = c.on_result(ok(d, 1.0, 2.0, tokens=7), 2.0)
    assert isinstance(fin, Finalize)
    rec = fin.record
    assert (rec.status, rec.worker_id, rec.served_region, rec.attempts) == ("ok", "w1", "a", 1)
    assert (rec.arrival_s, rec.admitted_s, rec.first_token_s, rec.finish_s) == (0.0, 1.0, 1.1, 2.0)
    assert rec.output_tokens == 7 and rec.cost == pytest.approx(0.01)
    assert c.outstanding("w1") == 0 and c.in_flight() == 0


def test_a_random_choice_depends_on_the_request_not_on_earlier_draws() -> None:
    """Two cores with one seed choose alike for a request in the same state, whatever
    else each drew before (the simulated and the live core must not drift apart on
    one extra draw)."""
    workers = [snap(f"w{i}") for i in range(8)]

    def placed(before: list[str]) -> dict[str, str]:
        c = core(placement="random")
        for w in workers:
            c.on_heartbeat(w, 0.0)
        out = {}
        for rid in [*before, "r"]:
            d = one_dispatch(c.submit(req(rid), 1.0))
            out[rid] = d.worker_id
            c.on_result(ok(d, 1.0, 1.5), 1.5)  # the same state again: nothing outstanding
        return out

    assert placed([])["r"] == placed(["x1", "x2", "x3"])["r"]
    # Different requests still spread: the choice is random, not fixed.
    assert len(set(placed([f"y{i}" for i in range(20)]).values())) > 3


# ------------------------------------------------------------------ eligibility

ELIGIBILITY = [
    # (snapshot override, heartbeat time, submit time, outcome)
    ({}, 0.0, 3.0, "dispatch"),  # exactly stale_after_s old: still fresh
    ({}, 0.0, 3.01, "wait"),  # stale: wait for a heartbeat (backoff), not fail at once
    ({"healthy": False}, 0.0, 0.5, "wait"),
    ({"models_warm": (), "models_loadable": ()}, 0.0, 0.5, "404"),  # nobody has the model
    ({"models_warm": (), "models_loadable": (MODEL,)}, 0.0, 0.5, "dispatch"),  # cold, loadable
]


@pytest.mark.parametrize("strategy", placement_names())
@pytest.mark.parametrize(("override", "hb_t", "submit_t", "outcome"), ELIGIBILITY)
def test_eligibility(
    override: dict[str, object], hb_t: float, submit_t: float, outcome: str, strategy: str
) -> None:
    c = core(placement=strategy)
    c.on_heartbeat(replace(snap("w1"), **override), hb_t)  # type: ignore[arg-type]
    first = c.submit(req(t=submit_t), submit_t)[0]
    got = {Dispatch: "dispatch", RetryAt: "wait", Reject: "404"}[type(first)]
    assert got == outcome
    if isinstance(first, Reject):
        assert first.status == 404


def test_worker_gone_is_not_placed() -> None:
    c = core()
    c.on_heartbeat(snap("w1"), 0.0)
    c.handle(WorkerGone("w1"), 0.1)
    assert not only(c.submit(req(), 0.2), Dispatch)


def test_full_worker_is_not_placed() -> None:
    c = core(max_queue_factor=1.0)
    c.on_heartbeat(snap("w1", capacity=2), 0.0)
    assert only(c.submit(req("r1"), 0.1), Dispatch)
    assert only(c.submit(req("r2"), 0.1), Dispatch)
    assert not only(c.submit(req("r3"), 0.1), Dispatch)


# ------------------------------------------------------------------ no worker at all


def test_no_worker_retries_then_rejects_503() -> None:
    c = core()
    log = run_events(c, [(0.0, Submit(req()))])
    kinds = [type(d).__name__ for _, d in log]
    assert kinds == ["RetryAt", "RetryAt", "Reject", "Finalize"]
    assert [t for t, _ in log] == [0.0, 0.5, 1.0, 1.0]
    reject = log[2][1]
    assert isinstance(reject, Reject) and reject.status == 503
    fin = log[3][1]
    assert isinstance(fin, Finalize)
    assert (fin.record.status, fin.record.reason) == ("rejected", "no_eligible_worker")


def test_worker_arriving_during_backoff_gets_the_request() -> None:
    c = core(attempt_timeout_s=None)
    log = run_events(c, [(0.0, Submit(req())), (0.2, Heartbeat(snap("w1")))])
    assert [type(d).__name__ for _, d in log] == ["RetryAt", "Dispatch"]
    assert log[1][0] == 0.5


# ------------------------------------------------------------------ failures


def test_failure_retries_elsewhere_after_backoff() -> None:
    c = core(placement="round_robin")
    c.on_heartbeat(snap("w1"), 0.0)
    c.on_heartbeat(snap("w2"), 0.0)
    d1 = one_dispatch(c.submit(req(), 0.0))
    out = c.on_result(fail(d1, 0.0, 0.1), 0.1)
    assert out == [RetryAt("r1", 2, 0.6, "connection_error")]
    assert c.next_deadline() == pytest.approx(0.6)
    assert c.on_timer(0.59) == []
    d2 = one_dispatch(c.on_timer(0.6))
    assert isinstance(d2, Dispatch) and d2.attempt == 2 and d2.worker_id != d1.worker_id
    [fin] = c.on_result(ok(d2, 0.6, 1.0), 1.0)
    assert isinstance(fin, Finalize)
    assert fin.record.attempts == 2 and fin.record.worker_id == d2.worker_id


def test_attempts_exhausted_dead_letters() -> None:
    c = core()
    c.on_heartbeat(snap("w1"), 0.0)
    d = one_dispatch(c.submit(req(), 0.0))
    now = 0.0
    for _ in range(2):
        [retry] = c.on_result(fail(d, now, now + 0.1), now + 0.1)
        assert isinstance(retry, RetryAt)
        now = retry.at
        d = one_dispatch(c.on_timer(now))
    out = c.on_result(fail(d, now, now + 0.1), now + 0.1)
    assert [type(x) for x in out] == [DeadLetter, Finalize]
    dl, fin = out
    assert isinstance(dl, DeadLetter) and dl.attempts == 3
    assert isinstance(fin, Finalize) and fin.record.status == "dead_lettered"
    assert fin.record.reason == "attempts_exhausted:connection_error"


def test_not_retryable_fails_at_once() -> None:
    c = core()
    c.on_heartbeat(snap("w1"), 0.0)
    d = one_dispatch(c.submit(req(), 0.0))
    [fin] = c.on_result(fail(d, 0.0, 0.1, "bad_request", retryable=False), 0.1)
    assert isinstance(fin, Finalize)
    assert (fin.record.status, fin.record.reason) == ("failed", "bad_request")


@pytest.mark.parametrize("error", ["internal", "bad_reply"])
def test_runtime_retryable_errors_are_retried_by_default(error: str) -> None:
    """The runtime reports ``internal`` / ``bad_reply`` as retryable; the default
    ``retry_on`` (the error table's retryable kinds) must retry them too."""
    c = core(placement="round_robin")
    c.on_heartbeat(snap("w1"), 0.0)
    c.on_heartbeat(snap("w2"), 0.0)
    d1 = one_dispatch(c.submit(req(), 0.0))
    [retry] = c.on_result(fail(d1, 0.0, 0.1, error, retryable=True), 0.1)
    assert isinstance(retry, RetryAt) and retry.reason == error
    d2 = one_dispatch(c.on_timer(retry.at))
    assert d2.attempt == 2 and d2.worker_id != d1.worker_id
    [fin] = c.on_result(ok(d2, retry.at, retry.at + 1.0), retry.at + 1.0)
    assert isinstance(fin, Finalize) and fin.record.status == "ok"


def test_request_errors_do_not_trip_the_worker_breaker() -> None:
    brk = BreakerConfig(window_size=2, min_calls=2, failure_threshold=0.5)
    c = core(worker_breaker=brk)
    c.on_heartbeat(snap("w1"), 0.0)
    for i in range(3):
        d = one_dispatch(c.submit(req(f"r{i}"), 0.0))
        c.on_result(fail(d, 0.0, 0.1, "bad_request", retryable=False), 0.1)
    assert c.breaker_state("w1", 0.2) == "closed"


@pytest.mark.parametrize("strategy", placement_names())
def test_open_breaker_excludes_worker_under_every_strategy(strategy: str) -> None:
    brk = BreakerConfig(window_size=2, min_calls=2, failure_threshold=0.5, open_s=10.0)
    c = core(
        placement=strategy,
        worker_breaker=brk,
        throttle=ThrottleConfig(enabled=False),
        retry=RetryConfig(max_attempts=1),
    )
    c.on_heartbeat(snap("bad"), 0.0)
    for i in range(2):
        d = one_dispatch(c.submit(req(f"x{i}"), 0.0))
        c.on_result(fail(d, 0.0, 0.1), 0.1)
    assert c.breaker_state("bad", 0.2) == "open"
    c.on_heartbeat(snap("good"), 0.2)
    c.on_heartbeat(snap("bad"), 0.2)
    for i in range(10):
        out = c.submit(req(f"y{i}"), 0.3)
        assert one_dispatch(out).worker_id == "good"


def test_stale_results_are_ignored() -> None:
    c = core()
    c.on_heartbeat(snap("w1"), 0.0)
    d = one_dispatch(c.submit(req(), 0.0))
    c.on_result(fail(d, 0.0, 0.1), 0.1)
    assert c.on_result(ok(d, 0.0, 0.2), 0.2) == []  # attempt 1 already failed
    assert c.on_result(ok(Dispatch("nope", "w1", 1, "a", "A100-80G"), 0.0, 0.2), 0.2) == []


# ------------------------------------------------------------------ timers


def test_deadline_cancels_and_times_out() -> None:
    c = core()
    c.on_heartbeat(snap("w1"), 0.0)
    d = one_dispatch(c.submit(req(deadline_s=5.0), 0.0))
    assert c.next_deadline() == 5.0
    out = c.on_timer(5.0)
    assert [type(x) for x in out] == [Cancel, Finalize]
    assert out[0] == Cancel("r1", "w1", 1, "deadline")
    fin = out[1]
    assert isinstance(fin, Finalize) and fin.record.status == "timeout"
    assert c.outstanding("w1") == 0
    assert c.on_result(ok(d, 0.0, 6.0), 6.0) == []  # late result ignored
    assert c.next_deadline() is None


def test_attempt_timeout_cancels_and_retries() -> None:
    c = core(attempt_timeout_s=2.0, placement="round_robin")
    c.on_heartbeat(snap("w1"), 0.0)
    c.on_heartbeat(snap("w2"), 0.0)
    d = one_dispatch(c.submit(req(), 0.0))
    out = c.on_timer(2.0)
    assert out == [
        Cancel("r1", d.worker_id, 1, "attempt_timeout"),
        RetryAt("r1", 2, 2.5, "timeout"),
    ]


def test_retry_not_scheduled_past_deadline() -> None:
    c = core()
    c.on_heartbeat(snap("w1"), 0.0)
    d = one_dispatch(c.submit(req(deadline_s=0.3), 0.0))
    out = c.on_result(fail(d, 0.0, 0.1), 0.1)
    assert [type(x) for x in out] == [DeadLetter, Finalize]


def test_default_timeout_applies() -> None:
    c = core(default_timeout_s=7.0)
    c.on_heartbeat(snap("w1"), 0.0)
    c.submit(req(t=1.0), 1.0)
    assert c.next_deadline() == 8.0


# ------------------------------------------------------------------ admission


def test_tenant_quota_rejects_429_and_debits_nothing() -> None:
    c = core(tenant_quotas={"acme": QuotaConfig(requests_per_min=1)})
    c.on_heartbeat(snap("w1"), 0.0)
    assert only(c.submit(req("r1"), 0.0), Dispatch)
    out = c.submit(req("r2"), 1.0)
    rej = out[0]
    assert isinstance(rej, Reject) and rej.status == 429
    assert rej.reason == "tenant_requests_per_min" and rej.retry_after == pytest.approx(59.0)
    # the quota figures the gateway sends as x-ratelimit-*: 1/min, empty, full in 59 s
    assert rej.limit_requests == 1.0 and rej.remaining_requests == pytest.approx(1 / 60)
    assert rej.reset_requests == pytest.approx(59.0)
    assert rej.limit_tokens is None and rej.remaining_tokens is None
    assert isinstance(out[1], Finalize) and out[1].record.status == "rejected"
    assert only(c.submit(req("r3", tenant="other"), 1.0), Dispatch)


def test_concurrency_limit_released_on_finish() -> None:
    c = core(tenant_quotas={"acme": QuotaConfig(max_concurrency=1)})
    c.on_heartbeat(snap("w1"), 0.0)
    d = one_dispatch(c.submit(req("r1"), 0.0))
    assert isinstance(c.submit(req("r2"), 0.0)[0], Reject)
    c.on_result(ok(d, 0.0, 0.5), 0.5)
    assert only(c.submit(req("r3"), 0.6), Dispatch)


def test_priority_shedding() -> None:
    c = core(shedding=ShedConfig(thresholds=(10.0, 1.0, 0.5)))
    c.on_heartbeat(snap("w1", capacity=2, running=1), 0.0)  # utilization 0.5
    out = c.submit(req("s", priority=2), 0.0)
    assert isinstance(out[0], Reject) and out[0].status == 529
    assert only(c.submit(req("n", priority=1), 0.0), Dispatch)


def test_adaptive_throttle_sheds_when_workers_keep_failing() -> None:
    c = core(retry=RetryConfig(max_attempts=1))
    c.on_heartbeat(snap("w1"), 0.0)
    outcomes = []
    for i in range(40):
        out = c.submit(req(f"r{i}"), 0.0)
        if isinstance(out[0], Dispatch):
            c.on_result(fail(out[0], 0.0, 0.0), 0.0)
        outcomes.append(type(out[0]).__name__)
    assert "Reject" in outcomes and "Dispatch" in outcomes


def test_duplicate_request_id_conflicts() -> None:
    c = core()
    c.on_heartbeat(snap("w1"), 0.0)
    c.submit(req(), 0.0)
    assert c.submit(req(), 0.1) == [Reject("r1", 409, "duplicate_request_id")]


# ------------------------------------------------------------------ invariants

op = st.one_of(
    st.tuples(st.just("submit"), st.integers(0, 2)),
    st.tuples(st.just("hb"), st.sampled_from(["w1", "w2", "w3"])),
    st.tuples(st.just("ok"), st.integers(0, 50)),
    st.tuples(st.just("fail"), st.integers(0, 50)),
    st.tuples(st.just("tick"), st.floats(0.01, 5.0)),
)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(op, max_size=60),
    seed=st.integers(0, 2**32),
    strategy=st.sampled_from(placement_names()),
)
def test_every_request_finalized_exactly_once(
    ops: list[tuple[str, object]], seed: int, strategy: str
) -> None:
    c = ControlCore(
        CoreConfig(placement=strategy, default_timeout_s=30.0, attempt_timeout_s=10.0),
        random.Random(seed),
    )
    now = 0.0
    submitted: list[str] = []
    finalized: list[str] = []
    before: float | None = None
    running: list[Dispatch] = []

    def take(decisions: list[Decision]) -> None:
        # The drivers skip re-arming their timer when nothing was decided:
        # the core must only ever arm a timer alongside a decision.
        assert (
            decisions
            or c.next_deadline() in (before, None)
            or (
                before is not None and c.next_deadline() > before  # type: ignore[operator]
            )
        )
        for d in decisions:
            if isinstance(d, Dispatch):
                running.append(d)
            elif isinstance(d, Finalize):
                finalized.append(d.record.request_id)
            elif isinstance(d, Cancel):
                running[:] = [
                    r for r in running if (r.request_id, r.attempt) != (d.request_id, d.attempt)
                ]

    for kind, arg in ops:
        before = c.next_deadline()
        if kind == "submit":
            rid = f"r{len(submitted)}"
            submitted.append(rid)
            take(c.submit(req(rid, now, priority=int(arg)), now))  # type: ignore[call-overload]
        elif kind == "hb":
            c.on_heartbeat(snap(str(arg)), now)
        elif kind in ("ok", "fail") and running:
            d = running.pop(int(arg) % len(running))  # type: ignore[call-overload]
            result = ok(d, now, now) if kind == "ok" else fail(d, now, now)
            take(c.on_result(result, now))
        elif kind == "tick":
            now += float(arg)  # type: ignore[arg-type]
            take(c.on_timer(now))
        for w in ("w1", "w2", "w3"):
            assert c.outstanding(w) >= 0
        deadline = c.next_deadline()
        assert deadline is None or deadline >= 0
    # Drain: every attempt still running succeeds, then all timers fire.
    while running:
        d = running.pop(0)
        take(c.on_result(ok(d, now, now), now))
    while (deadline := c.next_deadline()) is not None:
        now = max(now, deadline)
        take(c.on_timer(now))
        while running:
            d = running.pop(0)
            take(c.on_result(ok(d, now, now), now))
    assert sorted(finalized) == sorted(submitted)
    assert len(finalized) == len(set(finalized))
    assert c.in_flight() == 0


def test_unknown_model_is_404_once_workers_are_known() -> None:
    c = core()
    assert not isinstance(c.submit(req("early", model="nope"), 0.0)[0], Reject)
    c.on_heartbeat(snap("w1"), 0.0)
    out = c.submit(req("r1", model="nope"), 0.1)
    assert isinstance(out[0], Reject) and (out[0].status, out[0].reason) == (404, "model_not_found")


@pytest.mark.parametrize("resume", [False, True])
def test_partial_response_resumes_elsewhere_only_when_configured(resume: bool) -> None:
    """Resumed or not, the record's first token is the first any attempt produced."""
    c = core(placement="round_robin", resume_partial=resume)
    c.on_heartbeat(snap("w1"), 0.0)
    c.on_heartbeat(snap("w2"), 0.0)
    d1 = one_dispatch(c.submit(req(max_tokens=10), 0.0))
    crashed = AttemptResult(
        "r1",
        1,
        d1.worker_id,
        False,
        0.0,
        1.0,
        first_token_s=0.2,
        output_tokens=6,
        error="worker_crashed",
    )
    [retry] = c.on_result(crashed, 1.0)
    assert isinstance(retry, RetryAt)
    d2 = one_dispatch(c.on_timer(retry.at))
    assert d2.resume_tokens == (6 if resume else 0)
    done = AttemptResult(
        "r1", 2, d2.worker_id, True, retry.at, 3.0, first_token_s=2.0, output_tokens=10
    )
    [fin] = c.on_result(done, 3.0)
    assert isinstance(fin, Finalize)
    # The client saw its first token on the first worker, resumed or not (the gateway
    # passes the failed attempt's tokens on and skips them in the retry's stream).
    assert fin.record.first_token_s == 0.2
    assert fin.record.output_tokens == 10 and fin.record.attempts == 2


# ------------------------------------------------------------------ random streams


@pytest.mark.parametrize("key", ["1:place:r1:0", "987654321:throttle:req-42:3", ""])
def test_lazy_stream_draws_what_random_random_draws(key: str) -> None:
    """The core seeds a choice's stream on its first draw; the draws are the same."""
    from haif.control.core import _Stream

    def draws(rng: random.Random) -> list[object]:
        items = list(range(30))
        rng.shuffle(items)
        return [
            rng.random(),
            rng.choice("abcdefghij"),
            rng.sample(range(50), 2),
            rng.sample(range(5), 2),
            rng.randrange(7),
            rng.getrandbits(70),
            rng.uniform(1.0, 2.0),
            rng.gauss(0.0, 1.0),
            items,
        ]

    assert draws(_Stream(key)) == draws(random.Random(key))
    assert _Stream(key).getstate() == random.Random(key).getstate()
    reseeded = _Stream(key)
    reseeded.seed(5)
    assert reseeded.random() == random.Random(5).random()
    restored = _Stream(key)
    restored.setstate(random.Random(9).getstate())
    assert restored.random() == random.Random(9).random()


@pytest.mark.parametrize(("placement", "seeded"), [("round_robin", 0), ("p2c", 1)])
def test_a_choice_that_never_draws_never_seeds(
    placement: str, seeded: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seeding costs microseconds: round robin (and a throttle at zero) never pay it."""
    from haif.control.core import _Stream

    started: list[str | None] = []
    start = _Stream._start

    def spy(self: _Stream) -> None:
        started.append(self._key)
        start(self)

    monkeypatch.setattr(_Stream, "_start", spy)
    c = core(placement=placement)
    c.on_heartbeat(snap("w1"), 0.0)
    c.on_heartbeat(snap("w2"), 0.0)
    one_dispatch(c.submit(req(), 0.1))
    assert len(started) == seeded
