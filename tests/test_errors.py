"""The one error table (haif.contracts.ERROR_KINDS) and the control core's use of it."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from haif import wire
from haif.contracts import (
    ERROR_KINDS,
    RETRYABLE_ERRORS,
    UNKNOWN_ERROR,
    WORKER_FAULT_ERRORS,
    AttemptResult,
    Dispatch,
    ErrorKind,
    Finalize,
    Heartbeat,
    Request,
    RetryAt,
    WorkerSnapshot,
    error_traits,
    is_retryable,
    is_worker_fault,
)
from haif.control.config import CoreConfig
from haif.control.core import ControlCore
from haif.policy.breaker import BreakerConfig
from haif.policy.retry import DEFAULT_RETRY_ON, RetryConfig, RetryPolicy

MODEL = "m"

# The specification, written out once more by hand: (kind, worker_fault, retryable).
EXPECTED = [
    ("no_eligible_worker", False, True),
    ("store_unavailable", False, True),
    ("worker_crashed", True, True),
    ("connection_error", True, True),
    ("timeout", True, True),
    ("overloaded", True, True),
    ("unavailable", True, True),
    ("internal", True, True),
    ("bad_reply", True, True),
    ("bad_request", False, False),
    ("context_too_long", False, False),
    ("model_not_loaded", False, False),
    ("deadline", False, False),
    ("cancelled", False, False),
]
UNKNOWN = [None, "", "failed", "unknown_method", "bad_signature", "Timeout", "timeout "]


# ------------------------------------------------------------------ the table


def test_every_kind_has_exactly_one_row() -> None:
    assert set(ERROR_KINDS) == set(ErrorKind)
    assert [k.value for k in ErrorKind] == [kind for kind, _, _ in EXPECTED]
    assert all(row.meaning and "\n" not in row.meaning for row in ERROR_KINDS.values())
    with pytest.raises(TypeError):
        ERROR_KINDS[ErrorKind.TIMEOUT] = UNKNOWN_ERROR  # type: ignore[index]


@pytest.mark.parametrize(("kind", "worker_fault", "retryable"), EXPECTED)
def test_table(kind: str, worker_fault: bool, retryable: bool) -> None:
    member = ErrorKind(kind)
    assert member == kind and str(member) == kind and type(member.value) is str
    row = ERROR_KINDS[member]
    assert (row.worker_fault, row.retryable) == (worker_fault, retryable)
    assert error_traits(kind) is error_traits(member) is row
    for k in (kind, member):
        assert is_worker_fault(k) is worker_fault
        assert is_retryable(k) is retryable
    assert (kind in WORKER_FAULT_ERRORS) is worker_fault
    assert (kind in RETRYABLE_ERRORS) is retryable


@pytest.mark.parametrize("kind", UNKNOWN)
def test_unknown_kinds_are_request_errors(kind: str | None) -> None:
    """Conservative: not retried (no retry storm), not held against the worker."""
    assert error_traits(kind) is UNKNOWN_ERROR
    assert not is_worker_fault(kind) and not is_retryable(kind)
    assert (UNKNOWN_ERROR.worker_fault, UNKNOWN_ERROR.retryable) == (False, False)


def test_default_retry_on_is_the_tables_retryable_kinds() -> None:
    assert DEFAULT_RETRY_ON == RETRYABLE_ERRORS == RetryConfig().retry_on
    assert set(DEFAULT_RETRY_ON) == {k for k, _, r in EXPECTED if r}
    assert all(type(k) is str for k in DEFAULT_RETRY_ON)
    # A config naming members keeps plain strings (they are dumped and compared).
    custom = RetryConfig(retry_on=(ErrorKind.TIMEOUT, "my_kind"))
    assert custom.retry_on == ("timeout", "my_kind")
    assert all(type(k) is str for k in custom.retry_on)


@pytest.mark.parametrize(("kind", "worker_fault", "retryable"), EXPECTED)
def test_default_policy_retries_exactly_the_retryable_kinds(
    kind: str, worker_fault: bool, retryable: bool
) -> None:
    policy = RetryPolicy(RetryConfig())
    verdict = policy.decide(1, kind, True, 0.0, random.Random(0))
    assert verdict.retry is retryable
    # The reporter's flag can only veto.
    assert not policy.decide(1, kind, False, 0.0, random.Random(0)).retry


def test_attempt_result_error_travels_as_a_plain_string() -> None:
    result = AttemptResult("r1", 1, "w1", False, 0.0, 1.0, error=ErrorKind.BAD_REPLY)
    back = wire.decode(wire.encode(result))
    assert back == result
    assert isinstance(back, AttemptResult)
    assert back.error == "bad_reply" and type(back.error) is str
    assert back.retryable is True


# ------------------------------------------------------------------ the core


def _core(retry: RetryConfig | None = None, *, strict: bool = False) -> ControlCore:
    """Two workers in region ``a``; ``strict``: one failure opens a breaker."""
    config = CoreConfig(retry=retry or RetryConfig(budget_min_retries=100))
    if strict:
        one = BreakerConfig(window_size=1, min_calls=1, failure_threshold=0.5, open_s=60.0)
        config = replace(config, worker_breaker=one, route_breaker=one)
    c = ControlCore(config, random.Random(1))
    for wid in ("w1", "w2"):
        snap = WorkerSnapshot(
            wid, "a", "A100-80G", models_warm=(MODEL,), models_loadable=(MODEL,), capacity=4
        )
        c.handle(Heartbeat(snap), 0.0)
    return c


def _dispatch(c: ControlCore, rid: str = "r1") -> Dispatch:
    request = Request(rid, "acme", MODEL, 10, 10, 0.0, origin_region="a")
    [d] = c.submit(request, 0.0)
    assert isinstance(d, Dispatch)
    return d


def _failed(d: Dispatch, error: str, retryable: bool = True) -> AttemptResult:
    return AttemptResult(
        d.request_id, d.attempt, d.worker_id, False, 0.0, 0.5, error=error, retryable=retryable
    )


@pytest.mark.parametrize("as_member", [False, True])
@pytest.mark.parametrize(("kind", "worker_fault", "retryable"), EXPECTED)
def test_core_follows_the_table(
    kind: str, worker_fault: bool, retryable: bool, as_member: bool
) -> None:
    """Breakers, throttle and retry each do what the kind's row says."""
    c = _core(strict=True)
    d = _dispatch(c)
    error: str = ErrorKind(kind) if as_member else kind
    out = c.on_result(_failed(d, error), 0.5)
    # Worker and route breakers count only the worker's faults.
    assert c.breaker_state(d.worker_id, 0.5) == ("open" if worker_fault else "closed")
    route = c._route_breakers[(MODEL, "a")]
    assert route.state(0.5) == ("open" if worker_fault else "closed")
    # The throttle counts them as not accepted.
    assert c._throttle.counts(0.5) == (1, 0 if worker_fault else 1)
    # The default retry policy retries exactly the retryable kinds.
    if retryable:
        [retry] = out
        assert isinstance(retry, RetryAt) and retry.reason == kind
        assert type(retry.reason) is str
    else:
        [fin] = out
        assert isinstance(fin, Finalize)
        assert (fin.record.status, fin.record.reason) == ("failed", kind)
        assert type(fin.record.reason) is str


@pytest.mark.parametrize("kind", UNKNOWN)
def test_core_treats_unknown_kinds_as_request_errors(kind: str | None) -> None:
    c = _core(strict=True)
    d = _dispatch(c)
    [fin] = c.on_result(_failed(d, kind), 0.5)  # type: ignore[arg-type]
    assert isinstance(fin, Finalize)
    assert (fin.record.status, fin.record.reason) == ("failed", kind or "failed")
    assert c.breaker_state(d.worker_id, 0.5) == "closed"
    assert c._throttle.counts(0.5) == (1, 1)


@pytest.mark.parametrize("kind", [ErrorKind.INTERNAL, ErrorKind.BAD_REPLY])
def test_internal_and_bad_reply_are_retried_elsewhere(kind: ErrorKind) -> None:
    """Regression: the runtime sends these as retryable, but the default
    ``retry_on`` left them out, so the core failed the request at once."""
    c = _core()
    d1 = _dispatch(c)
    # What the orchestrator reports for an RpcError with this code.
    [retry] = c.on_result(_failed(d1, kind.value, retryable=True), 0.5)
    assert isinstance(retry, RetryAt)
    [d2] = c.on_timer(retry.at)
    assert isinstance(d2, Dispatch) and d2.attempt == 2 and d2.worker_id != d1.worker_id
    done = AttemptResult("r1", 2, d2.worker_id, True, retry.at, retry.at + 1, output_tokens=10)
    [fin] = c.on_result(done, retry.at + 1)
    assert isinstance(fin, Finalize)
    assert (fin.record.status, fin.record.attempts) == ("ok", 2)


def test_reporter_veto_fails_a_retryable_kind() -> None:
    c = _core()
    d = _dispatch(c)
    [fin] = c.on_result(_failed(d, "unavailable", retryable=False), 0.5)
    assert isinstance(fin, Finalize)
    assert (fin.record.status, fin.record.reason) == ("failed", "unavailable")


def test_a_custom_retry_on_still_wins() -> None:
    c = _core(RetryConfig(retry_on=("bad_request",), budget_min_retries=100))
    d = _dispatch(c)
    [retry] = c.on_result(_failed(d, "bad_request"), 0.5)
    assert isinstance(retry, RetryAt)
    c2 = _core(RetryConfig(retry_on=("bad_request",), budget_min_retries=100))
    d2 = _dispatch(c2)
    [fin] = c2.on_result(_failed(d2, "timeout"), 0.5)
    assert isinstance(fin, Finalize) and fin.record.status == "failed"


@pytest.mark.parametrize(
    ("transport", "kind"),
    [
        ("connect", "connection_error"),
        ("timeout", "timeout"),
        ("disconnected", "worker_crashed"),
        ("something_new", "connection_error"),
    ],
)
def test_rpc_failures_map_to_error_kinds(transport: str, kind: str) -> None:
    from haif.runtime.rpc import RpcError, RpcUnavailable

    error = RpcUnavailable("gone", transport).error_kind
    assert error == kind and type(error) is str and error in ERROR_KINDS
    code = RpcError(ErrorKind.MODEL_NOT_LOADED, "not here").code
    assert code == "model_not_loaded" and type(code) is str
