"""Contracts are frozen, slotted, and survive a msgpack round trip unchanged."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from haif import contracts as c
from haif import wire
from haif.runtime.messages import Announce, InferReply, SubmitReply

RECORD = c.RequestRecord(
    request_id="r1",
    tenant="acme",
    model="llama-3-8b",
    origin_region="us-east",
    served_region="eu-west",
    worker_id="w1",
    gpu_class="A100-80G",
    arrival_s=1.5,
    admitted_s=1.6,
    first_token_s=1.7,
    finish_s=2.5,
    prompt_tokens=100,
    output_tokens=20,
    attempts=2,
    status="ok",
    reason=None,
    cold_start=False,
    cost=0.001,
)
SNAP = c.WorkerSnapshot(
    "w1", "us-east", "H100-80G", 80.0, ("m",), ("m", "n"), 3, 2, 8, 1000, True, 12.0, 4.0
)
SAMPLES = [
    c.Request(
        "r1",
        "acme",
        "m",
        10,
        5,
        0.5,
        "us-east",
        0,
        9.5,
        True,
        "key",
        "v1",
        "lora",
        "hello",
        (1, 2, 3),
    ),
    SNAP,
    c.Submit(c.Request("r2", "t", "m", 1, 1, 0.0)),
    c.Heartbeat(SNAP),
    c.WorkerGone("w1"),
    c.AttemptResult("r1", 1, "w1", False, 1.0, 2.0, None, 0, "worker_crashed", True, False, 0.0),
    c.Dispatch("r1", "w1", 1, "us-east", "H100-80G"),
    c.Reject("r1", 429, "tenant_requests_per_min", 1.5),
    c.RetryAt("r1", 2, 3.25, "connection_error"),
    c.Cancel("r1", "w1", 1, "deadline"),
    c.DeadLetter("r1", "attempts_exhausted:timeout", 3),
    RECORD,
    c.Finalize(RECORD),
    Announce(SNAP, "http://127.0.0.1:9000"),
    InferReply("a b", 2, 0.01, 0.05),
    SubmitReply(RECORD, "text", c.Reject("r1", 503, "no_eligible_worker", 1.0)),
]


@pytest.mark.parametrize("obj", SAMPLES, ids=lambda o: type(o).__name__)
def test_round_trip(obj: object) -> None:
    back = wire.decode(wire.encode(obj))
    assert back == obj
    assert type(back) is type(obj)


@pytest.mark.parametrize("cls", c.WIRE_TYPES, ids=lambda t: t.__name__)
def test_contracts_are_frozen_and_slotted(cls: type) -> None:
    assert dataclasses.is_dataclass(cls)
    assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert "__slots__" in vars(cls)


def test_frozen_means_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RECORD.status = "failed"  # type: ignore[misc]


def test_unknown_type_is_refused() -> None:
    payload = msgpack.packb({"_t": "os.system", "cmd": "true"})
    with pytest.raises(wire.WireError, match="unknown message type"):
        wire.decode(payload)


def test_bad_fields_are_refused() -> None:
    payload = msgpack.packb({"_t": "Cancel", "request_id": "r"})
    with pytest.raises(wire.WireError, match="bad Cancel"):
        wire.decode(payload)


def test_garbage_is_refused() -> None:
    with pytest.raises(wire.WireError):
        wire.decode(b"\xc1\xff\x00")


@given(
    rid=st.text(max_size=20),
    tokens=st.integers(min_value=0, max_value=2**40),
    t=st.floats(allow_nan=False),
    hashes=st.lists(st.integers(min_value=-(2**63), max_value=2**64 - 1), max_size=5),
)
def test_request_round_trip_property(rid: str, tokens: int, t: float, hashes: list[int]) -> None:
    req = c.Request(rid, "t", "m", tokens, tokens, t, prefix_hashes=tuple(hashes))
    assert wire.decode(wire.encode(req)) == req
