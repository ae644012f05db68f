"""Prefix block hashes of a prompt's token ids, and the synthetic model's tokenizer.

Theory of operation
-------------------
A request's ``prefix_hashes`` name the KV-cache blocks its prompt fills, so a
worker's prefix cache (:class:`haif.fleet.engine.PrefixCache`) and a
prefix-aware placement (:class:`haif.policy.placement.PrefixAffinity`) can
tell that two prompts begin with the same tokens without comparing them.
They are chained block hashes as vLLM's automatic prefix caching computes
them (``hash_block_tokens`` in ``vllm/v1/core/kv_cache_utils.py``: ``hash =
H(parent_hash, block_token_ids, extra_keys)``):

- the prompt's token ids are cut into blocks of ``block_tokens`` (the
  model's KV block size, from its profile: :func:`haif.fleet.profiles.ProfileCatalog.block_tokens`);
  only *full* blocks are hashed (a partial last block is never shared);
- block ``i``'s hash is ``SHA-256(parent || ids)`` truncated to 63 bits,
  where ``parent`` is block ``i-1``'s hash (8 bytes, big-endian) and ``ids``
  the block's ids as unsigned 32-bit little-endian integers; so a hash
  stands for the *whole* prefix up to the end of its block, and two prompts
  share exactly their leading hashes up to the first block in which they
  differ;
- the first parent is :func:`prefix_root` of the model (and adapter) — vLLM's
  ``NONE_HASH`` with the LoRA name of its ``extra_keys`` folded in — so
  the same text sent to two models never shares a block.

Deterministic across processes and machines: no Python ``hash()`` (whose
string hashing is randomised per process, as vLLM's builtin-hash default
``NONE_HASH`` was), a fixed byte encoding, SHA-256 (vLLM's default
``--prefix-caching-hash-algo``, there over a pickle; here over fixed bytes,
as its reproducible ``sha256_cbor``). 63 bits keep every hash a
non-negative signed 64-bit integer (msgpack, SQL, Parquet); collisions among
the blocks a fleet holds are negligible (2^-63 per pair).

The synthetic model's tokenizer (:func:`word_token_ids`)
--------------------------------------------------------
The synthetic engine (:mod:`haif.runtime.engines.synthetic`) is a word-level
model: its tokens are the prompt's whitespace-separated words
(``str.split()``), and it answers in words (``tok12 tok7 ...``), one token
each. A word's id is the CRC-32 of its UTF-8 bytes (a 2^32 vocabulary that
needs no table). So its prompt token count is the prompt's word count —
which ``haif replay`` relies on (a trace prompt of ``n`` tokens is sent as
``n`` words) — and a prompt's blocks are runs of ``block_tokens`` words.

Pure: no clock, no I/O, no global randomness.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib
from collections.abc import Sequence

__all__ = [
    "HASH_BITS",
    "MAX_TOKEN_ID",
    "block_hashes",
    "prefix_root",
    "shared_blocks",
    "word_token_ids",
]

HASH_BITS = 63
"""Bits of each block hash (non-negative as a signed 64-bit integer)."""

MAX_TOKEN_ID = 2**32 - 1
"""Largest token id a block can hold (ids are hashed as unsigned 32-bit integers)."""

_MASK = (1 << HASH_BITS) - 1
_DOMAIN = b"haif-prefix-v1\x00"


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") & _MASK


def prefix_root(model: str, adapter: str | None = None) -> int:
    """The chain's first parent for ``model`` (and LoRA ``adapter``): vLLM's ``NONE_HASH``
    with the adapter of its ``extra_keys``."""
    return _digest(_DOMAIN + model.encode("utf-8", "surrogatepass") + b"\x00" + _adapter(adapter))


def _adapter(adapter: str | None) -> bytes:
    return b"" if adapter is None else b"\x01" + adapter.encode("utf-8", "surrogatepass")


@functools.lru_cache(maxsize=64)
def _packer(count: int) -> struct.Struct:
    return struct.Struct(f"<{count}I")


def block_hashes(token_ids: Sequence[int], block_tokens: int, root: int) -> tuple[int, ...]:
    """The chained hashes of the full ``block_tokens``-token blocks of ``token_ids``.

    ``root`` is the first parent (:func:`prefix_root`). A ``ValueError`` for a
    block size below 1, a root outside ``[0, 2^63)`` or a token id outside
    ``[0, 2^32)`` in a full block.
    """
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
        raise ValueError(f"block_tokens must be a whole number >= 1, got {block_tokens!r}")
    if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root <= _MASK:
        raise ValueError(f"root must be an integer in [0, 2^{HASH_BITS}), got {root!r}")
    blocks = len(token_ids) // block_tokens
    if blocks == 0:
        return ()
    used = blocks * block_tokens
    try:
        packed = _packer(used).pack(*token_ids[:used])
    except struct.error:
        bad = next(
            (t for t in token_ids[:used] if not (isinstance(t, int) and 0 <= t <= MAX_TOKEN_ID)),
            None,
        )
        raise ValueError(f"token ids must be integers in [0, 2^32), got {bad!r}") from None
    width = 4 * block_tokens
    sha256 = hashlib.sha256
    out: list[int] = []
    parent = root
    for start in range(0, 4 * used, width):
        digest = sha256(parent.to_bytes(8, "big") + packed[start : start + width]).digest()
        parent = int.from_bytes(digest[:8], "big") & _MASK
        out.append(parent)
    return tuple(out)


def shared_blocks(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading hashes ``a`` and ``b`` have in common."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def word_token_ids(text: str) -> list[int]:
    """The synthetic model's token ids of ``text``: each whitespace-separated word's CRC-32."""
    words = text.split()
    try:
        return list(map(zlib.crc32, map(str.encode, words)))  # UTF-8, all in C
    except UnicodeEncodeError:  # a lone surrogate: its code point's bytes, as any other
        return [zlib.crc32(w.encode("utf-8", "surrogatepass")) for w in words]
