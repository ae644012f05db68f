"""`haif up` for real: processes on loopback, HTTP in, msgpack between services."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import pyarrow.parquet as pq
import pytest
from harness.api import post_json
from harness.cluster import Up

from haif.records import FILE_SCHEMA, read_parquet

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module", params=["separate", "colocated"])
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Up]:
    """The default cluster, and one whose gateway runs in the orchestrator's process."""
    data = tmp_path_factory.mktemp("cluster")
    config = None
    if request.param == "colocated":
        config = data / "cluster.yaml"
        config.write_text("colocate_gateway: true\n")
    c = Up(data, config)
    c.wait_ready()
    try:
        yield c
    finally:
        c.stop()


def test_completion_round_trip(cluster: Up) -> None:
    url = cluster.url
    status, headers, body = post_json(
        f"{url}/v1/completions",
        json.dumps({"model": "llama-3-8b", "prompt": "hello there", "max_tokens": 4}).encode(),
        {"x-request-id": "e2e-1"},
    )
    assert status == 200, body
    assert headers["x-request-id"] == "e2e-1"
    assert body["id"] == "e2e-1" and body["object"] == "text_completion"
    assert len(body["choices"][0]["text"].split()) == 4
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}


def test_chat_completion(cluster: Up) -> None:
    url = cluster.url
    status, _, body = post_json(
        f"{url}/v1/chat/completions",
        json.dumps(
            {
                "model": "llama-3-8b",
                "max_tokens": 3,
                "messages": [{"role": "user", "content": "hi"}],
            }
        ).encode(),
        {"x-request-id": "e2e-chat"},
    )
    assert status == 200, body
    assert body["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        (b"{not json", 400, None),
        (b'{"model": "llama-3-8b"}', 400, "prompt"),
        (b'{"model": "llama-3-8b", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
        (b'{"model": "no-such-model", "prompt": "x"}', 404, None),
        (b'{"model": "llama-3-8b", "prompt": "' + b"x" * (2 << 20) + b'"}', 413, None),
    ],
    ids=["bad-json", "missing-prompt", "zero-max-tokens", "unknown-model", "too-large"],
)
def test_bad_requests_get_openai_errors(
    cluster: Up, payload: bytes, status: int, param: str | None
) -> None:
    url = cluster.url
    got, _, body = post_json(f"{url}/v1/completions", payload)
    assert got == status, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if param:
        assert body["error"]["param"] == param


def test_openai_sdk_without_auth_streams(cluster: Up) -> None:
    """The README's example: auth is off in `haif up`, the SDK still sends a key."""
    import openai

    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)
    chunks = list(
        client.completions.create(model="llama-3-8b", prompt="hello", max_tokens=6, stream=True)
    )
    text = "".join(c.choices[0].text for c in chunks)
    assert len(text.split()) == 6


def test_services_and_the_gateway_hop(cluster: Up) -> None:
    """Separate: a gateway process calling the orchestrator over RPC. Colocated: none;
    the orchestrator's process serves the client API and still its RPC port."""
    status, services = cluster.control("GET", "/services")
    assert status == 200, services
    kinds = sorted(row["kind"] for row in services["services"])
    colocated = cluster.config is not None and "colocate_gateway" in cluster.config.read_text()
    gateways = [] if colocated else ["gateway"]
    assert kinds == [*gateways, "orchestrator", "worker", "worker"]
    orchestrator = next(row for row in services["services"] if row["kind"] == "orchestrator")
    # With internal_tls: true the monitor's certificate reads /readyz (else plain HTTP).
    with urllib.request.urlopen(
        f"{orchestrator['url']}/readyz", timeout=10, context=cluster.internal_tls
    ) as resp:
        assert json.loads(resp.read())["ready"] is True
    with urllib.request.urlopen(f"{cluster.url}/v1/models", timeout=10) as resp:
        assert [m["id"] for m in json.loads(resp.read())["data"]] == ["llama-3-8b"]


def test_records_after_shutdown_share_the_simulator_schema(cluster: Up) -> None:
    """Defined last: stops the cluster, which exports the store to Parquet."""
    post_json(
        f"{cluster.url}/v1/completions",
        b'{"model": "llama-3-8b", "prompt": "x", "max_tokens": 2}',
        {"x-request-id": "e2e-record"},
    )
    output = cluster.stop()
    assert cluster.proc.returncode == 0, output
    path = cluster.data / "records.parquet"
    assert path.exists(), output
    assert pq.read_schema(path).remove_metadata() == FILE_SCHEMA
    records = {r.request_id: r for r in read_parquet(path)}
    for rid in ("e2e-1", "e2e-chat", "e2e-record"):
        rec = records[rid]
        assert rec.status == "ok" and rec.attempts == 1
        assert rec.worker_id in ("w1", "w2") and rec.served_region == "local"
        assert rec.admitted_s is not None and rec.first_token_s is not None
        assert rec.admitted_s <= rec.first_token_s <= rec.finish_s
        assert rec.output_tokens > 0 and rec.cost > 0
    assert any(r.status == "rejected" and r.reason == "model_not_found" for r in records.values())
