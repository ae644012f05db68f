"""CPU per request of the gateway's prompt measure: tokenize with the model's tokenizer, hash.

What :meth:`haif.runtime.prompt_tokens.PromptTokens.measure` costs on the
gateway's event loop for one request, by tokenizer and prompt length, next
to what the gateway did before (count the words): the synthetic model's
word tokenizer, and the tiny transformers artifact's tokenizer (``haif
artifacts make-tiny``, a byte-level BPE; needs ``haif[torch]``) for a
completion and for a chat rendered with its chat template. Each figure is
the median over ``--repeat`` rounds of the mean over ``--calls`` calls;
"share at 200/s" is that cost times 200 requests a second, as a fraction of
one core. A script, not a test: it prints figures (``--json PATH`` writes
them).

    .venv/bin/python bench/prompt_tokens.py [--calls 200] [--repeat 7]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from haif.contracts import ChatTurn
from haif.fleet.prefix import block_hashes, prefix_root, word_token_ids
from haif.runtime.prompt_tokens import ArtifactTokenizer, PromptTokens

LENGTHS = (100, 1000, 4000)  # prompt words


def _text(words: int) -> str:
    return " ".join(f"word{i % 997}" for i in range(words))


def _time(calls: int, repeat: int, fn: Callable[..., object], *args: Any) -> float:
    """Median over ``repeat`` rounds of the mean seconds per call of ``fn(*args)``."""
    rounds = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        rounds.append((time.perf_counter() - start) / calls)
    return statistics.median(rounds)


def _count_words(text: str) -> int:
    return len(text.split())


def _tiny(tmp: Path) -> ArtifactTokenizer | None:
    try:
        from haif.runtime.artifacts_cli import make_tiny
    except ImportError:
        return None
    try:
        make_tiny(tmp / "store", tmp / "keys" / "cluster.key")
    except Exception as exc:  # torch / transformers missing
        print(f"(no tiny artifact: {exc})", file=sys.stderr)
        return None
    tokenizer = ArtifactTokenizer(tmp / "store", "tiny-gpt2:1", tmp / "keys")
    asyncio.run(tokenizer.load())
    return tokenizer


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--no-artifact", action="store_true", help="skip the tiny model")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []

    def add(kind: str, words: int, seconds: float, tokens: int, blocks: int) -> None:
        rows.append(
            {
                "case": kind,
                "prompt_words": words,
                "tokens": tokens,
                "blocks": blocks,
                "us_per_request": seconds * 1e6,
                "core_share_at_200_per_s": seconds * 200,
            }
        )

    words_only = PromptTokens()
    root = prefix_root("llama-3-8b")
    for n in LENGTHS:
        text = _text(n)
        ids = word_token_ids(text)
        blocks = len(ids) // 16
        add(
            "before: count words",
            n,
            _time(args.calls, args.repeat, _count_words, text),
            n,
            0,
        )
        add(
            "words: tokenize",
            n,
            _time(args.calls, args.repeat, word_token_ids, text),
            n,
            0,
        )
        add(
            "words: hash blocks",
            n,
            _time(args.calls, args.repeat, block_hashes, ids, 16, root),
            n,
            blocks,
        )
        add(
            "words: measure (both)",
            n,
            _time(args.calls, args.repeat, words_only.measure, "llama-3-8b", text),
            n,
            blocks,
        )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = None if args.no_artifact else _tiny(Path(tmp))
        if tokenizer is not None:
            tiny = PromptTokens({"tiny-gpt2": tokenizer})
            for n in LENGTHS:
                text = _text(n)
                got = tiny.measure("tiny-gpt2", text)
                add(
                    "tiny BPE: measure completion",
                    n,
                    _time(args.calls, args.repeat, tiny.measure, "tiny-gpt2", text),
                    got.tokens,
                    len(got.prefix_hashes),
                )
                chat = (ChatTurn("system", "be brief"), ChatTurn("user", text))
                got = tiny.measure("tiny-gpt2", None, chat)
                add(
                    "tiny BPE: measure chat (template)",
                    n,
                    _time(args.calls, args.repeat, tiny.measure, "tiny-gpt2", None, chat),
                    got.tokens,
                    len(got.prefix_hashes),
                )
    head = f"{'case':36s} {'words':>6s} {'tokens':>7s} {'blocks':>6s} {'us/req':>9s}"
    print(f"{head} {'share@200/s':>11s}")
    for r in rows:
        print(
            f"{r['case']:36s} {r['prompt_words']:6d} {r['tokens']:7d} {r['blocks']:6d} "
            f"{r['us_per_request']:9.1f} {r['core_share_at_200_per_s']:11.4f}"
        )
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    report = {"command": "bench/prompt_tokens.py " + " ".join(argv or sys.argv[1:]), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
