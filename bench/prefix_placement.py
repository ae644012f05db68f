"""Prefix-aware placement on live traffic: prefix cache hits of a multi-turn chat workload.

Starts ``haif up`` twice, with the same cluster but for ``policy.placement``
(``least_outstanding``, then ``prefix_affinity``): synthetic workers timed by
the simulator's iteration-level engine (``timing: profile``, llama-3-8b on
an A100-80G) with a prefix cache in their KV pool (``prefix_cache: true``).
Clients hold chat conversations through the gateway's
``/v1/chat/completions``: every conversation has its own system prompt, and
each turn sends the whole conversation so far (the system prompt, every
earlier question and answer, a new question), so a turn's prompt begins with
the previous turn's; before each turn the user thinks (exponential, mean
``--think-s``), so the conversations do not move in lockstep. The gateway
tokenizes each prompt with the model's tokenizer (the synthetic model's
words), hashes its full 16-token KV blocks (the profile catalog's
``kv_block_tokens``) and sends the hashes with the request; the placement
policy decides where it runs; each worker's engine looks the blocks up in
its own cache. Afterwards the workers' counters
(``haif_worker_prefix_cache_{queries,hits}_total``) say how many prompt
tokens were looked up and how many were found there, not prefilled.

``ideal``: the hit tokens if every turn ran where its conversation's
previous turn did: that turn's full prompt blocks. A script, not a test: it
prints figures (``--json PATH`` writes them); ``tests/test_live_prefix.py``
runs a small configuration and asserts the comparison.

    .venv/bin/python bench/prefix_placement.py [--workers 4] [--conversations 12] [--turns 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from haif.analysis.parity import wait_all_fresh
from haif.fleet.profiles import load_catalog
from haif.runtime.cluster import free_port

MODEL = "llama-3-8b"
POLICIES = ("least_outstanding", "prefix_affinity")
_COUNTER = re.compile(r"^haif_worker_prefix_cache_(queries|hits)_total (\S+)$", re.M)


@dataclass
class Outcome:
    """One policy's run: what the workers counted and what the clients saw."""

    placement: str
    requests: int = 0
    ok: int = 0
    query_tokens: int = 0
    hit_tokens: int = 0
    ideal_tokens: int = 0
    prompt_tokens: int = 0  # billed (usage.prompt_tokens), summed
    words: int = 0  # the prompts' words, summed (the synthetic tokenizer's count)
    wall_s: float = 0.0
    per_worker: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def hit_ratio(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


def cluster_yaml(placement: str, ports: list[int], gateway_port: int) -> str:
    workers = "".join(
        f"  - {{id: w{i}, region: local, port: {port}, gpu_class: A100-80G, models: [{MODEL}],\n"
        "     timing: profile, prefix_cache: true, heartbeat_s: 0.2}\n"
        for i, port in enumerate(ports, start=1)
    )
    # Plain loopback HTTP: the workers' /metrics are read without the monitor certificate.
    return (
        f"internal_tls: false\ngateway_port: {gateway_port}\n"
        f"policy: {{placement: {placement}}}\nworkers:\n{workers}"
    )


def _words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(5000)}" for _ in range(n))


async def _conversation(
    session: aiohttp.ClientSession,
    gateway: str,
    c: int,
    turns: int,
    seed: int,
    outcome: Outcome,
    block: int,
    think_s: float,
) -> None:
    rng = random.Random(f"{seed}:{c}")
    messages = [{"role": "system", "content": f"conversation {c}: " + _words(rng, 150)}]
    previous = 0  # the last turn's prompt, in tokens
    for turn in range(turns):
        # The user reads and types (the first turn: the conversations start spread out).
        await asyncio.sleep(rng.expovariate(1.0 / think_s) if think_s > 0 else 0.0)
        messages.append({"role": "user", "content": _words(rng, 40)})
        body = {"model": MODEL, "messages": messages, "max_tokens": 16, "ignore_eos": True}
        headers = {"x-request-id": f"chat-{seed}-{c}-{turn}"}
        async with session.post(
            f"{gateway}/v1/chat/completions", json=body, headers=headers
        ) as resp:
            answer = await resp.json()
        outcome.requests += 1
        words = sum(len(m["content"].split()) for m in messages)
        outcome.words += words
        if resp.status != 200:
            raise RuntimeError(f"turn {turn} of conversation {c}: {resp.status} {answer}")
        outcome.ok += 1
        outcome.prompt_tokens += answer["usage"]["prompt_tokens"]
        if turn:
            outcome.ideal_tokens += (previous // block) * block
        previous = words
        messages.append(
            {"role": "assistant", "content": answer["choices"][0]["message"]["content"]}
        )


async def _drive(gateway: str, args: argparse.Namespace, outcome: Outcome) -> None:
    block = load_catalog().block_tokens(MODEL)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        started = time.perf_counter()
        await asyncio.gather(
            *(
                _conversation(
                    session, gateway, c, args.turns, args.seed, outcome, block, args.think_s
                )
                for c in range(args.conversations)
            )
        )
        outcome.wall_s = time.perf_counter() - started
        for i, port in enumerate(args.worker_ports, start=1):
            async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                text = await resp.text()
            found = {name: int(float(value)) for name, value in _COUNTER.findall(text)}
            outcome.per_worker[f"w{i}"] = (found.get("queries", 0), found.get("hits", 0))
    outcome.query_tokens = sum(q for q, _ in outcome.per_worker.values())
    outcome.hit_tokens = sum(h for _, h in outcome.per_worker.values())


def run(
    placement: str,
    *,
    workers: int = 4,
    conversations: int = 12,
    turns: int = 5,
    seed: int = 0,
    think_s: float = 0.3,
    log_dir: Path | None = None,
) -> Outcome:
    """One ``haif up`` with ``placement``, the conversations through it; its figures."""
    outcome = Outcome(placement)
    with tempfile.TemporaryDirectory() as tmp:
        ports = [free_port() for _ in range(workers)]
        gateway_port = free_port()
        config = Path(tmp) / "cluster.yaml"
        config.write_text(cluster_yaml(placement, ports, gateway_port))
        log = (log_dir / f"up-{placement}.log").open("wb") if log_dir else subprocess.DEVNULL
        proc = subprocess.Popen(
            [sys.executable, "-m", "haif", "up", str(config), "--data-dir", str(Path(tmp) / "d")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            gateway = f"http://127.0.0.1:{gateway_port}"
            wait_all_fresh(gateway, workers, proc)
            args = argparse.Namespace(
                turns=turns,
                conversations=conversations,
                seed=seed,
                worker_ports=ports,
                think_s=think_s,
            )
            asyncio.run(_drive(gateway, args, outcome))
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if log_dir:
                assert not isinstance(log, int)
                log.close()
    return outcome


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--think-s", type=float, default=0.3, help="mean pause before each turn (exponential)"
    )
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    outcomes = [
        run(
            p,
            workers=args.workers,
            conversations=args.conversations,
            turns=args.turns,
            seed=args.seed,
            think_s=args.think_s,
        )
        for p in POLICIES
    ]
    print(
        f"{args.conversations} conversations x {args.turns} turns on {args.workers} synthetic "
        f"workers (profile timing, prefix cache), {MODEL}, 16-token blocks, "
        f"think time {args.think_s} s:"
    )
    print(
        f"  {'placement':18s} {'ok':>5s} {'queried':>9s} {'hit':>9s} {'ratio':>6s} {'of ideal':>8s}"
    )
    for o in outcomes:
        of_ideal = o.hit_tokens / o.ideal_tokens if o.ideal_tokens else 0.0
        print(
            f"  {o.placement:18s} {o.ok:5d} {o.query_tokens:9d} {o.hit_tokens:9d} "
            f"{o.hit_ratio:6.3f} {of_ideal:8.3f}"
        )
    ideal = outcomes[0].ideal_tokens
    print(f"  ideal hit tokens (every turn where its conversation's last ran): {ideal}")
    print(f"  {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    report = {
        "command": "bench/prefix_placement.py " + " ".join(argv or sys.argv[1:]),
        "outcomes": [asdict(o) | {"hit_ratio": o.hit_ratio} for o in outcomes],
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
