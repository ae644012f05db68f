"""`haif up` serving a real (tiny, locally built) transformers model from a signed artifact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from harness.require import require

from haif.configfile import ConfigError
from haif.runtime.cluster import free_port, load_cluster


def test_engine_settings_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("workers: [{id: w, region: r, engine: transformers}]\n")
    with pytest.raises(ConfigError, match=r"workers\.0\.artifact_store: required"):
        load_cluster(path)
    path.write_text("workers: [{id: w, region: r, engine: tensorflow}]\n")
    with pytest.raises(ConfigError, match=r"workers\.0\.engine"):
        load_cluster(path)


@pytest.mark.cluster
@pytest.mark.slow
def test_haif_up_serves_the_tiny_model(tmp_path: Path) -> None:
    require("torch")
    require("transformers")
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    haif = [sys.executable, "-m", "haif"]
    subprocess.run(
        [*haif, "artifacts", "make-tiny", "--store", "art", "--key", "keys/cluster.key"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
    )
    port = free_port()
    (tmp_path / "cluster.yaml").write_text(
        f"gateway_port: {port}\n"
        "workers:\n"
        "  - {id: t1, region: local, models: [tiny-gpt2], engine: transformers,\n"
        "     artifact_store: art, model_ref: 'tiny-gpt2:1', keyring: keys, capacity: 2}\n"
    )
    proc = subprocess.Popen(
        [*haif, "up", "cluster.yaml", "--data-dir", "d"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "haif cluster up" in line, line + proc.stdout.read()
        # ignore_eos: exactly max_tokens, even where the sampled text would end sooner.
        body = json.dumps(
            {"model": "tiny-gpt2", "prompt": "hello", "max_tokens": 8, "ignore_eos": True}
        ).encode()
        answer = None
        for _ in range(50):  # the first heartbeat follows the model load
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    answer = json.loads(resp.read())
                    break
            except urllib.error.HTTPError:
                time.sleep(0.2)
        assert answer is not None
        assert answer["usage"]["completion_tokens"] == 8
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["choices"][0]["text"].strip()
        chat_with_the_template(port)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


def chat_with_the_template(port: int) -> None:
    """The ``openai`` SDK's chat, JSON and streamed, rendered with the tiny model's template.

    Greedy with ``ignore_eos``, a chat generates exactly what a completion of
    its rendered text (the template's output) generates.
    """
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0)
    greedy: dict[str, Any] = {"temperature": 0, "max_tokens": 6, "extra_body": {"ignore_eos": True}}
    # Text parts are joined with newlines (as vLLM joins them); the template
    # (TINY_CHAT_TEMPLATE) writes "role; content<|endoftext|>", then "assistant;".
    messages: list[Any] = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Hello world,"},
                {"type": "text", "text": "how are you?"},
            ],
        },
    ]
    rendered = (
        "system; Be brief.<|endoftext|>user; Hello world,\nhow are you?<|endoftext|>assistant;"
    )
    plain = sdk.completions.create(model="tiny-gpt2", prompt=rendered, **greedy)
    expected = plain.choices[0].text
    assert expected.strip()
    chat = sdk.chat.completions.create(model="tiny-gpt2", messages=messages, **greedy)
    assert chat.choices[0].message.content == expected
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage is not None and chat.usage.completion_tokens == 6
    stream = sdk.chat.completions.create(
        model="tiny-gpt2", messages=messages, stream=True, **greedy
    )
    parts = [c for c in stream if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in parts) == expected
    assert parts[-1].choices[0].finish_reason == "length"
    bad: list[Any] = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    ]
    try:
        sdk.chat.completions.create(model="tiny-gpt2", messages=bad)
    except openai.BadRequestError as exc:
        assert isinstance(exc.body, dict) and exc.body["param"] == "messages[0].content[0].type"
    else:
        raise AssertionError("an image part was accepted")
