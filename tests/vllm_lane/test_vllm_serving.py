"""Real vLLM under ``haif up``: the ``vllm`` engine in the worker and the ``openai`` engine
in front of a vLLM OpenAI server, both serving the tiny Llama, streamed with the ``openai`` SDK.

The example files ``clusters/tiny-llama-vllm.yaml`` and ``clusters/tiny-llama-openai.yaml``
are started as their comments say (the artifact built by ``haif artifacts make-tiny --arch
llama``, the server's files by ``haif artifacts fetch``), every port given by flag. Greedy
decoding is deterministic on one machine, so the same chat gives the same text through HAIF
as from the vLLM server directly: HAIF renders the chat template as vLLM's server does.
The vLLM lane runs these (``make test-vllm``, in its own environment: ``.ci/vllm-env``).
"""

from __future__ import annotations

import http.client
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from harness.require import require
from harness.up_cli import UpCli, free_ports
from harness.vllm import haif_env
from openai.types.chat import ChatCompletionMessageParam

pytestmark = [pytest.mark.vllm, pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "clusters"
MODEL = "tiny-llama"
CHAT: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello! What is HAIF?"},
]
#: Seconds a vLLM start may take here (about 30 s warm on two cores, more when busy).
LOAD_S = 400.0


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


def chat(base_url: str, max_tokens: int = 24, stream: bool = True, **extra: Any) -> Answer:
    """One greedy chat completion with the ``openai`` SDK (streamed: with the usage chunk)."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    common: dict[str, Any] = {"model": MODEL, "messages": CHAT, "max_tokens": max_tokens}
    if not stream:
        answer = client.chat.completions.create(**common, temperature=0, **extra)
        usage = answer.usage
        assert usage is not None
        choice = answer.choices[0]
        return Answer(
            choice.message.content or "",
            choice.finish_reason,
            usage.prompt_tokens,
            usage.completion_tokens,
        )
    parts: list[str] = []
    reason = prompt = completion = None
    chunks = client.chat.completions.create(
        **common, temperature=0, stream=True, stream_options={"include_usage": True}, **extra
    )
    for chunk in chunks:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            reason = chunk.choices[0].finish_reason or reason
        if chunk.usage is not None:
            prompt, completion = chunk.usage.prompt_tokens, chunk.usage.completion_tokens
    return Answer("".join(parts), reason, prompt, completion)


def wait_ready(up: UpCli) -> None:
    """Until the worker's first heartbeat (after its model load) made the model servable."""
    deadline = time.monotonic() + 60
    while True:
        status, answer = up.post(
            "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 1}
        )
        if status == 200 or time.monotonic() > deadline:
            assert status == 200, answer
            return
        time.sleep(0.2)


def stopped(up: UpCli) -> None:
    out = up.stop()
    assert up.proc.returncode == 0, out


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two example files beside an artifact store built as their comments say."""
    require("vllm", extra="vllm")
    base = tmp_path_factory.mktemp("tiny-llama-example")
    for name in ("tiny-llama-vllm.yaml", "tiny-llama-openai.yaml"):
        shutil.copy(CLUSTERS / name, base / name)
    haif = [sys.executable, "-m", "haif", "artifacts"]
    for args in (
        [
            *("make-tiny", "--arch", "llama", "--store", "tiny-llama/art"),
            *("--key", "tiny-llama/keys/cluster.key"),
        ],
        [
            *("fetch", "--store", "tiny-llama/art", "--name", MODEL, "--version", "1"),
            *("--keyring", "tiny-llama/keys", "--dest", "tiny-llama/files"),
        ],
    ):
        done = subprocess.run(
            [*haif, *args], cwd=base, env=haif_env(), capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
    assert (base / "tiny-llama" / "files" / "model.safetensors").is_file()
    return base


@pytest.fixture(scope="module")
def vllm_server(example_dir: Path) -> Iterator[str]:
    """``python -m vllm.entrypoints.openai.api_server`` on the verified files: its /v1 URL."""
    port = free_ports(1)
    log = (example_dir / "vllm-server.log").open("wb")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "vllm.entrypoints.openai.api_server"),
            *("--model", "tiny-llama/files", "--served-model-name", MODEL, "--enforce-eager"),
            *("--dtype", "float32"),  # bfloat16 is 3-4x slower without AVX-512 BF16
            *("--max-model-len", "1024", "--host", "127.0.0.1", "--port", str(port)),
        ],
        cwd=example_dir,
        env=haif_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + LOAD_S
        while True:
            assert proc.poll() is None, (example_dir / "vllm-server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError, http.client.HTTPException):
                pass  # not listening yet (HTTPException: a connect that met itself)
            assert time.monotonic() < deadline, "the vLLM server did not start"
            time.sleep(0.5)
        yield f"{url}/v1"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def up_vllm(example_dir: Path) -> Iterator[UpCli]:
    """``haif up clusters/tiny-llama-vllm.yaml``: vLLM's engine inside the worker."""
    up = UpCli(
        example_dir / "d-vllm",
        example_dir / "tiny-llama-vllm.yaml",
        workers=1,
        cwd=example_dir,
        env=haif_env(),
        timeout_s=LOAD_S,
    )
    try:
        wait_ready(up)
        yield up
    finally:
        stopped(up)


@pytest.fixture(scope="module")
def up_openai(example_dir: Path, vllm_server: str) -> Iterator[UpCli]:
    """``haif up clusters/tiny-llama-openai.yaml`` with the test's vLLM server upstream."""
    text = (example_dir / "tiny-llama-openai.yaml").read_text()
    assert "http://127.0.0.1:8000/v1" in text
    config = example_dir / "openai-here.yaml"
    config.write_text(text.replace("http://127.0.0.1:8000/v1", vllm_server))
    up = UpCli(example_dir / "d-openai", config, workers=1, cwd=example_dir, env=haif_env())
    try:
        wait_ready(up)
        yield up
    finally:
        stopped(up)


def a_stop_in(text: str) -> str:
    """A stop string from the middle of ``text`` (three characters, not blank)."""
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3 and stop.strip(), text
    return stop


def test_the_vllm_engine_streams_a_chat_with_a_stop_sequence(up_vllm: UpCli) -> None:
    url = f"{up_vllm.url}/v1"
    full = chat(url)
    assert full.finish_reason == "length"
    assert full.completion_tokens == 24
    assert full.text.strip()
    stop = a_stop_in(full.text)
    stopped_answer = chat(url, stop=[stop])
    assert stopped_answer.text == full.text[: full.text.index(stop)]
    assert stopped_answer.finish_reason == "stop"
    # The same answer as JSON (not streamed).
    assert chat(url, stream=False, stop=[stop]).text == stopped_answer.text


def test_the_vllm_worker_renders_chat_as_the_vllm_server(up_vllm: UpCli, vllm_server: str) -> None:
    through_haif = chat(f"{up_vllm.url}/v1", max_tokens=32)
    direct = chat(vllm_server, max_tokens=32)
    assert through_haif.text == direct.text
    assert direct.finish_reason == through_haif.finish_reason == "length"
    # The same prompt tokens too: the chat template's rendering, counted by the model's
    # tokenizer, as vLLM counts it.
    assert through_haif.prompt_tokens == direct.prompt_tokens
    assert direct.prompt_tokens is not None and direct.prompt_tokens > 20


def test_the_openai_engine_relays_a_vllm_server(up_openai: UpCli, vllm_server: str) -> None:
    url = f"{up_openai.url}/v1"
    full = chat(vllm_server)
    stop = a_stop_in(full.text)
    for stream in (True, False):
        direct = chat(vllm_server, stream=stream, stop=[stop])
        relayed = chat(url, stream=stream, stop=[stop])
        assert relayed.text == direct.text == full.text[: full.text.index(stop)]
        assert relayed.finish_reason == direct.finish_reason == "stop"
        # Billed what vLLM counted: the prompt as its chat template rendered it.
        assert (relayed.prompt_tokens, relayed.completion_tokens) == (
            direct.prompt_tokens,
            direct.completion_tokens,
        )
        assert direct.prompt_tokens is not None and direct.prompt_tokens > 20


def vllm_counters(server: str) -> dict[str, float]:
    """The vLLM server's running requests and generated tokens (its Prometheus metrics)."""
    with urllib.request.urlopen(server.removesuffix("/v1") + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for name in ("num_requests_running", "generation_tokens_total"):
        match = re.search(rf"^vllm:{name}\{{[^}}]*\}} (\S+)$", text, re.M)
        assert match is not None, name
        out[name] = float(match.group(1))
    return out


def test_a_client_hanging_up_aborts_the_request_in_the_vllm_server(
    up_openai: UpCli, vllm_server: str
) -> None:
    before = vllm_counters(vllm_server)
    client = openai.OpenAI(base_url=f"{up_openai.url}/v1", api_key="unused", max_retries=0)
    chunks = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=900,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},  # 900 tokens unless aborted
    )
    for got, _chunk in enumerate(chunks, 1):
        if got == 3:
            break
    chunks.close()
    deadline = time.monotonic() + 60
    while (now := vllm_counters(vllm_server))["num_requests_running"] > 0:
        assert time.monotonic() < deadline, now
        time.sleep(0.1)
    generated = now["generation_tokens_total"] - before["generation_tokens_total"]
    # Aborted after a few tokens, not run to its 900.
    assert 0 < generated < 900, generated
