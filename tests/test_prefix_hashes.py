"""Prefix block hashes (haif/fleet/prefix.py): chained like vLLM's, full blocks, deterministic."""

from __future__ import annotations

import ast
import hashlib
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_purity import violations

from haif.fleet import prefix
from haif.fleet.prefix import (
    MAX_TOKEN_ID,
    block_hashes,
    prefix_root,
    shared_blocks,
    word_token_ids,
)

ROOT = prefix_root("llama-3-8b")


def by_hand(parent: int, ids: list[int]) -> int:
    """The documented encoding written out: SHA-256(parent BE u64 || ids LE u32), 63 bits."""
    data = parent.to_bytes(8, "big") + b"".join(struct.pack("<I", t) for t in ids)
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") & ((1 << 63) - 1)


def chain(ids: list[int], size: int, root: int) -> tuple[int, ...]:
    out: list[int] = []
    parent = root
    for i in range(len(ids) // size):
        parent = by_hand(parent, ids[i * size : (i + 1) * size])
        out.append(parent)
    return tuple(out)


def test_the_encoding_is_the_documented_one() -> None:
    # 63 bits = the first 8 digest bytes with the top bit cleared.
    data = ROOT.to_bytes(8, "big") + struct.pack("<4I", 1, 2, 3, 4)
    first = int.from_bytes(hashlib.sha256(data).digest()[:8], "big") & ((1 << 63) - 1)
    assert block_hashes([1, 2, 3, 4], 4, ROOT) == (first,)


# Golden values: a change of the encoding (or a process-dependent hash) breaks them.
GOLDEN_ROOT = prefix_root("m")


@pytest.mark.parametrize(
    ("ids", "size", "expected_blocks"),
    [
        ([], 4, 0),
        ([1, 2, 3], 4, 0),  # no full block: nothing to share
        ([1, 2, 3, 4], 4, 1),
        ([1, 2, 3, 4, 5, 6, 7], 4, 1),  # the partial last block is not hashed
        ([1, 2, 3, 4, 5, 6, 7, 8], 4, 2),
        (list(range(16)), 16, 1),
        (list(range(33)), 16, 2),
        ([MAX_TOKEN_ID, 0], 1, 2),
        ([7] * 5, 1, 5),
    ],
)
def test_full_blocks_only_chained(ids: list[int], size: int, expected_blocks: int) -> None:
    got = block_hashes(ids, size, GOLDEN_ROOT)
    assert len(got) == expected_blocks
    assert got == chain(ids, size, GOLDEN_ROOT)
    assert all(0 <= h < 2**63 for h in got)


def test_a_repeated_block_hashes_differently_at_each_position() -> None:
    # Chained: block i stands for the whole prefix, not for its own tokens.
    hashes = block_hashes([7] * 5, 1, GOLDEN_ROOT)
    assert len(set(hashes)) == 5


@pytest.mark.parametrize(
    ("ids", "size", "root", "message"),
    [
        ([1], 0, 0, "block_tokens must be a whole number >= 1, got 0"),
        ([1], -16, 0, "block_tokens must be a whole number >= 1, got -16"),
        ([1], True, 0, "block_tokens must be a whole number >= 1, got True"),
        ([1], 2.0, 0, "block_tokens must be a whole number >= 1, got 2.0"),
        ([1], 1, -1, "root must be an integer in"),
        ([1], 1, 2**63, "root must be an integer in"),
        ([1, -1], 1, 0, r"token ids must be integers in \[0, 2\^32\), got -1"),
        ([2**32], 1, 0, r"token ids must be integers in \[0, 2\^32\), got 4294967296"),
        ([1, "a"], 2, 0, "token ids must be integers in .*got 'a'"),
    ],
)
def test_bad_input_is_refused_naming_it(
    ids: list[object], size: object, root: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        block_hashes(ids, size, root)  # type: ignore[arg-type]


def test_an_id_outside_every_full_block_is_not_checked() -> None:
    # The partial last block is never hashed, so its ids are never read.
    assert len(block_hashes([1, 2, -5], 2, 0)) == 1


def test_the_root_separates_models_and_adapters() -> None:
    roots = {
        prefix_root("a"),
        prefix_root("b"),
        prefix_root("a", "lora-1"),
        prefix_root("a", ""),
        prefix_root("a\x00"),
    }
    assert len(roots) == 5
    ids = list(range(64))
    assert (
        shared_blocks(
            block_hashes(ids, 16, prefix_root("a")), block_hashes(ids, 16, prefix_root("b"))
        )
        == 0
    )


def test_hashes_are_the_same_in_another_process() -> None:
    """No Python hash(): another interpreter with another hash seed agrees."""
    code = (
        "from haif.fleet.prefix import block_hashes, prefix_root, word_token_ids\n"
        "ids = word_token_ids('the quick brown fox jumps over the lazy dog ' * 8)\n"
        "print(prefix_root('llama-3-8b', 'x'), *block_hashes(ids, 16, prefix_root('llama-3-8b')))\n"
    )
    here = [prefix_root("llama-3-8b", "x")]
    here += block_hashes(
        word_token_ids("the quick brown fox jumps over the lazy dog " * 8), 16, ROOT
    )
    for seed in ("1", "12345"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.split()
        assert [int(x) for x in out] == here
    assert len(here) == 1 + 72 // 16


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", []),
        ("   ", []),
        ("hello", ["hello"]),
        ("hello world", ["hello", "world"]),
        ("  a\tb\n c  ", ["a", "b", "c"]),
        ("a\u00a0b", ["a", "b"]),  # str.split: Unicode whitespace too
        ("héllo wörld", ["héllo", "wörld"]),
    ],
)
def test_the_synthetic_tokenizer_is_words(text: str, words: list[str]) -> None:
    assert word_token_ids(text) == [zlib.crc32(w.encode()) for w in words]
    assert len(word_token_ids(text)) == len(text.split())


def test_the_module_is_pure() -> None:
    source = Path(prefix.__file__).read_text(encoding="utf-8")
    assert violations(source) == []
    imported = {
        alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert imported <= {"functools", "hashlib", "struct", "zlib"}


ids_st = st.lists(st.integers(0, MAX_TOKEN_ID), max_size=80)


@settings(max_examples=200, deadline=None)
@given(
    common=ids_st,
    a=ids_st,
    b=ids_st,
    size=st.integers(1, 9),
    model=st.sampled_from(["m", "llama-3-8b"]),
)
def test_a_shared_prefix_gives_shared_leading_hashes(
    common: list[int], a: list[int], b: list[int], size: int, model: str
) -> None:
    x, y = common + a, common + b
    lcp = shared_blocks(x, y)  # the ids' longest common prefix
    hx = block_hashes(x, size, prefix_root(model))
    hy = block_hashes(y, size, prefix_root(model))
    # Exactly the blocks that lie inside the common prefix are shared.
    assert shared_blocks(hx, hy) == min(lcp // size, len(hx), len(hy))
    assert shared_blocks(hx, hy) >= len(common) // size
    # Prefix-closed: the hashes of a prefix are a prefix of the hashes.
    assert block_hashes(x[: len(common)], size, prefix_root(model)) == hx[: len(common) // size]
    assert len(hx) == len(x) // size


def test_a_lone_surrogate_is_a_word_too() -> None:
    assert word_token_ids("a \ud800 b") == [
        zlib.crc32(b"a"),
        zlib.crc32("\ud800".encode("utf-8", "surrogatepass")),
        zlib.crc32(b"b"),
    ]
