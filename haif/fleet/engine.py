"""The engine model both shells run: continuous batching's planning and prefix cache."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol, TypeVar

from haif.fleet.profiles import PerfProfile

BLOCK_TOKENS = 512  # Mooncake's prefix-hash block size


class _Sequence(Protocol):
    prompt_left: int  # prompt tokens not yet prefilled
    context: int  # tokens in its KV cache


S = TypeVar("S", bound=_Sequence)


def plan_prefill_step(
    profile: PerfProfile, batch: Sequence[S], chunk: int | None
) -> tuple[list[tuple[S, int]], list[S], float]:
    """One prefill step: what it computes and how long it takes (before any slowdown).

    Returns the prefilling members with the prompt tokens each gets (within
    the ``chunk`` budget, in batch order), the decoding members that ride
    along (with chunked prefill only), and the step's duration. Shared by the
    simulated engine and the runtime's profile-timed mirror
    (:mod:`haif.runtime.batching`), so the two cannot drift.
    """
    prefilling = [s for s in batch if s.prompt_left > 0]
    decoding = [s for s in batch if s.prompt_left == 0] if chunk else []
    budget = (chunk - len(decoding)) if chunk else math.inf
    chunks: list[tuple[S, int]] = []
    for seq in prefilling:
        if budget <= 0:
            break
        n = int(min(seq.prompt_left, budget))
        chunks.append((seq, n))
        budget -= n
    n_tokens = sum(n for _, n in chunks)
    square = float(sum(n * n for _, n in chunks))
    context = sum(s.context for s in decoding)
    duration = profile.step_time(n_tokens, context, len(chunks) + len(decoding), square)
    return chunks, decoding, duration


class PrefixCache:
    """LRU over prefix blocks (a request's leading blocks are looked up in order)."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self.hits = 0
        self.lookups = 0

    def hit_blocks(self, hashes: tuple[int, ...]) -> int:
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            self._blocks.move_to_end(h)
            n += 1
        self.hits += n
        self.lookups += len(hashes)
        return n

    def insert(self, hashes: tuple[int, ...]) -> None:
        for h in hashes:
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()
