"""One record, one meaning: how a live run's client view and the cluster's own
record combine, so status, reason and time to first token mean what the
simulator's records mean (issue "Parity that holds beyond its calibration point")."""

from __future__ import annotations

from dataclasses import replace

import pytest

from haif.contracts import Request, RequestRecord
from haif.runtime.replay import join_server_records

REQ = Request("r1", "t", "m", 10, 5, 0.0)


def client(status: str, reason: str | None, first: float | None) -> RequestRecord:
    rec = RequestRecord.never_served(REQ, 2.0, status, reason or "")
    return replace(
        rec, first_token_s=first, output_tokens=5 if status == "ok" else 0, reason=reason
    )


def server(status: str, reason: str | None) -> RequestRecord:
    rec = RequestRecord.never_served(REQ, 1.9, status, reason or "")
    return replace(
        rec,
        served_region="us-east",
        worker_id="w1",
        gpu_class="H100-80G",
        attempts=3,
        cost=0.01,
        reason=reason,
        first_token_s=0.7 if status == "ok" else None,
    )


@pytest.mark.parametrize(
    ("client_view", "cluster_view", "expected"),
    [
        # Served: the client's times, the cluster's where and how.
        (("ok", None, 0.5), ("ok", None), ("ok", None)),
        # The core dead-lettered it: the simulator's word, not the client's 502.
        (
            ("failed", "http_502", None),
            ("dead_lettered", "retries_exhausted"),
            ("dead_lettered", "retries_exhausted"),
        ),
        (("failed", "http_504", None), ("timeout", "deadline"), ("timeout", "deadline")),
        # The cluster served it but the client never got it: the client's failure stands.
        (("timeout", "client_timeout", None), ("ok", None), ("timeout", "client_timeout")),
    ],
)
def test_status_and_reason_are_the_clusters_times_the_clients(
    client_view: tuple[str, str | None, float | None],
    cluster_view: tuple[str, str | None],
    expected: tuple[str, str | None],
) -> None:
    [joined] = join_server_records([client(*client_view)], [server(*cluster_view)])
    assert (joined.status, joined.reason) == expected
    assert joined.first_token_s == client_view[2]  # the client's clock, always
    assert (joined.worker_id, joined.attempts, joined.cost) == ("w1", 3, 0.01)


def test_a_request_the_cluster_never_saw_keeps_the_clients_view() -> None:
    mine = client("failed", "unreachable: ClientConnectorError", None)
    assert join_server_records([mine], []) == [mine]
