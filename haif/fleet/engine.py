"""Continuous batching as a sans-I/O state machine that both shells drive.

Theory of operation
-------------------
:class:`BatchingEngine` is vLLM's scheduler reduced to what decides time:
a FIFO queue, a running batch of at most ``max_batch`` sequences, a KV
cache of ``kv_capacity_tokens`` that can also keep prompt prefix blocks
(vLLM's automatic prefix caching over the request's blocks: a trace's
512-token ``hash_ids``, a live prompt's hashes of the model's KV blocks),
one loaded model. It has no clock: inputs carry ``now``
(:meth:`~BatchingEngine.add`, :meth:`~BatchingEngine.cancel`,
:meth:`~BatchingEngine.crash`, :meth:`~BatchingEngine.restart`) and the
driver calls :meth:`~BatchingEngine.on_timer` when
:meth:`~BatchingEngine.next_deadline` comes. The simulator drives it with
SimPy timeouts (:mod:`haif.sim.engine`), the live synthetic engine with
``loop.call_at`` (:mod:`haif.runtime.batching`): one model, two drivers.

Rules, in the order the engine applies them:

- A request reaches the queue ``api_overhead_s`` (x ``slow``) after it
  reached the engine (tokenize, schedule).
- Admission is FIFO while the batch has room and the KV cache can hold the
  head's prompt with room for the next token of every running sequence
  and its own first (``kv_used + len(batch) + prompt + 1 <= capacity``):
  every running sequence always has a KV slot for the token its next step
  emits, so no step ever overfills the cache. A prompt that can never fit
  an empty cache fails (``context_too_long``).
- Prefix cache (``prefix_cache``): it lives in the KV pool. A request's
  blocks are its ``prefix_hashes`` that hold prompt tokens. At admission
  its leading blocks are looked up in order, up to the first miss; the
  tokens they hold are not prefilled (all but the prompt's last token,
  which is always computed). A sequence *pins* the blocks it hit, and all
  its blocks once its prompt is prefilled (the blocks are then cached:
  later admissions hit them even while it runs). When it leaves the batch
  (done, cancelled, preempted) the blocks no other running sequence pins
  become *evictable*: free memory that still holds the prefix, ordered by
  when they were freed (a sequence's last block first, as vLLM frees in
  reverse so that a prefix's tail goes before its head). Sharing is not
  modelled: every running sequence counts its whole context in
  ``kv_used`` (``kv_used`` stays the sum of the running contexts), even
  the blocks it shares with another running sequence, so a hit saves
  prefill compute, not memory. This is conservative and small: on
  ``scenarios/prefix_cache.yaml`` 63% of the hit blocks are held by another
  running sequence, and counting them once for the cache's room moves the
  hit ratio by 0.01 points. Admission and decode growth treat evictable
  blocks as free (``kv_used`` and ``free_kv_tokens`` do not count them);
  whenever the running sequences' KV grows, the least recently freed
  blocks are evicted until ``kv_used + evictable tokens <=
  kv_capacity_tokens`` (a block counts its request's whole
  ``prefix_block_tokens``, a partial block a whole one), so a full pool
  shrinks the cache and the cache never adds memory.
  ``prefix_cache_max_tokens`` (None: the pool decides) caps the evictable
  blocks' tokens. A pinned block is never evicted. A crash or a
  swap to another model empties the cache.
- A request for another model waits until the batch drains, then the
  weights load (``load_time_s``); every request that waited is a cold start.
  :meth:`~BatchingEngine.restart` loads the current model the same way.
- A step either prefills (prefill-only steps, vLLM v0) or, with
  ``chunked_prefill_tokens``, decodes every running sequence plus prompt
  chunks up to the token budget (Sarathi / vLLM v1); it takes
  ``profile.step_time(N, C, B)`` x ``slow``. A token is emitted at the end of
  the step that produced it (the first at the end of the prompt's last chunk).
- When the running sequences' next tokens would not fit the KV cache, the
  newest is preempted: it goes back to the head of the queue and is later
  recomputed (prompt plus the tokens it had), as vLLM's recompute mode.
- Between composition changes the batch only decodes and the step time
  grows linearly with the context (``c·C``), so ``k`` steps take a closed
  form: the engine advances a whole *segment* as one deadline (at most
  ``max_segment_steps`` steps; a streaming driver asks for 1 and
  ``track_progress``). A request
  that becomes admissible mid-segment cuts it at the next step boundary.
- A cancelled sequence leaves at once and frees its KV; the step in flight
  credits tokens only to the sequences still running.

Each GPU-second is charged (``price_per_hour``) to the sequences of the step
that used it, in equal shares.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from typing import Protocol, TypeVar

from haif.contracts import TRACE_BLOCK_TOKENS, ErrorKind, Request
from haif.fleet.profiles import PerfProfile

BLOCK_TOKENS = TRACE_BLOCK_TOKENS  # Mooncake's prefix-hash block size (a trace's default)


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
    along (with chunked prefill only), and the step's duration.
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
    """The KV pool's cached prefix blocks: vLLM's automatic prefix caching.

    A block (a ``prefix_hashes`` value) is *pinned* while running sequences
    hold it (``refs``: hash -> how many) and *evictable* once none does
    (``free``: hash -> the tokens it holds, least recently freed first;
    ``free_tokens`` their sum). A block holds its request's
    ``prefix_block_tokens`` (a trace's 512, a live prompt's model block
    size). The engine keeps the pool's accounting: see the module docstring.
    ``max_tokens`` caps the evictable blocks' tokens (None: the KV pool alone
    bounds them). ``query_tokens`` counts the prompt tokens of every
    admission that looked blocks up and ``hit_tokens`` those it did not
    prefill thanks to a hit (vLLM's ``prefix_cache_queries`` / ``_hits``).
    """

    __slots__ = (
        "evictions",
        "free",
        "free_tokens",
        "hit_tokens",
        "hits",
        "lookups",
        "max_tokens",
        "query_tokens",
        "refs",
    )

    def __init__(self, max_tokens: int | None = None) -> None:
        self.max_tokens = max_tokens
        self.refs: dict[int, int] = {}
        self.free: OrderedDict[int, int] = OrderedDict()
        self.free_tokens = 0
        self.hits = 0  # blocks found, over every admission
        self.lookups = 0  # blocks looked up
        self.hit_tokens = 0  # prompt tokens not prefilled thanks to the hits
        self.query_tokens = 0  # prompt tokens of the admissions that looked blocks up
        self.evictions = 0

    def __len__(self) -> int:
        """Blocks cached, pinned or evictable."""
        return len(self.refs) + len(self.free)

    def acquire(self, hashes: Sequence[int]) -> int:
        """Pin the leading ``hashes`` that are cached (in order, up to the first miss)."""
        refs, free = self.refs, self.free
        n = 0
        for h in hashes:
            held = refs.get(h)
            if held is not None:
                refs[h] = held + 1
            elif h in free:
                self.free_tokens -= free.pop(h)
                refs[h] = 1
            else:
                break
            n += 1
        self.hits += n
        self.lookups += len(hashes)
        return n

    def pin(self, hashes: Sequence[int]) -> None:
        """Pin ``hashes`` (a prefilled prompt's blocks), caching those that were not."""
        refs, free = self.refs, self.free
        for h in hashes:
            held = refs.get(h)
            if held is not None:
                refs[h] = held + 1
            else:
                if h in free:
                    self.free_tokens -= free.pop(h)
                refs[h] = 1

    def release(self, hashes: Sequence[int], block_tokens: int = BLOCK_TOKENS) -> None:
        """Unpin ``hashes`` (blocks of ``block_tokens``): those no sequence holds become
        evictable, the last block first (vLLM frees a sequence's blocks in reverse, so
        its tail is evicted first)."""
        refs, free = self.refs, self.free
        for h in reversed(hashes):
            held = refs[h]
            if held == 1:
                del refs[h]
                free[h] = block_tokens
                self.free_tokens += block_tokens
            else:
                refs[h] = held - 1

    def trim(self, room_tokens: int) -> None:
        """Evict the least recently freed blocks until the evictable ones fit in
        ``room_tokens`` (and the cap)."""
        free = self.free
        most = max(0, room_tokens)
        if self.max_tokens is not None and self.max_tokens < most:
            most = self.max_tokens
        while self.free_tokens > most:
            self.free_tokens -= free.popitem(last=False)[1]
            self.evictions += 1

    def clear(self) -> None:
        self.refs.clear()
        self.free.clear()
        self.free_tokens = 0


class Seq:
    """One request's attempt at an engine: its progress, times and cost.

    ``generated`` counts the whole response (it starts at the tokens a
    resumed attempt was given, which are recomputed with the prompt). The
    engine sets ``first_token_s`` / ``finish_s`` on its own clock, ``done``
    when the last token is out, ``error`` (an ``ErrorKind`` value) when it
    fails the sequence.
    """

    __slots__ = (
        "begin_s",
        "blocks",
        "cancelled",
        "cold_start",
        "context",
        "cost",
        "done",
        "error",
        "finish_s",
        "first_token_s",
        "generated",
        "prompt_left",
        "request",
        "resumed",
        "scale",
        "step_s",
        "ttft_s",
    )

    def __init__(self, request: Request, generated: int = 0) -> None:
        self.request = request
        self.resumed = generated  # tokens an earlier attempt produced
        self.generated = generated
        self.prompt_left = request.prompt_tokens + generated
        self.context = 0
        self.blocks: tuple[int, ...] = ()  # the prefix-cache blocks it pins (while running)
        self.first_token_s: float | None = None
        self.finish_s: float | None = None
        self.cost = 0.0
        self.cold_start = False
        self.done = False
        self.cancelled = False
        self.error: str | None = None
        # Request level: when its slot's service began, its time to first
        # token and per-token step (unscaled), and the slowdown at the start.
        self.begin_s: float | None = None
        self.ttft_s = 0.0
        self.step_s = 0.0
        self.scale = 1.0

    def due_s(self, index: int) -> float:
        """Request level: when token ``index`` comes out (once service began)."""
        assert self.begin_s is not None
        return self.begin_s + (self.ttft_s + (index - self.resumed) * self.step_s) * self.scale


# What the engine is doing between two deadlines.
_IDLE, _LOAD, _PREFILL, _DECODE, _DOWN = range(5)


class _EngineBase:
    """What both engine models hold: the profiles, the loaded model, the slots, the clock."""

    def __init__(
        self,
        profiles: Mapping[str, PerfProfile],
        warm: str,
        max_batch: int | None,
        price_per_hour: float,
        track_progress: bool,
    ) -> None:
        if warm not in profiles:
            raise ValueError(f"warm model {warm!r} has no profile (have: {', '.join(profiles)})")
        self.profiles = dict(profiles)
        self.active = warm
        self.max_batch = max_batch or profiles[warm].max_batch
        self.price_per_hour = price_per_hour
        self.slow = 1.0  # gray-failure factor: every step and overhead takes this much longer
        self.clock = 0.0  # when the engine last changed
        # With track_progress: every sequence that got tokens (or, at request
        # level, whose service began) since the driver last emptied the list;
        # a streaming driver wakes their readers.
        self.progressed: list[Seq] | None = [] if track_progress else None
        self._order = itertools.count()


class BatchingEngine(_EngineBase):
    """Continuous batching over one GPU (see the module docstring). Not thread-safe."""

    def __init__(
        self,
        profiles: Mapping[str, PerfProfile],
        warm: str,
        *,
        max_batch: int | None = None,
        chunked_prefill_tokens: int | None = None,
        prefix_cache: bool = False,
        prefix_cache_max_tokens: int | None = None,
        price_per_hour: float = 0.0,
        max_segment_steps: int | None = None,
        track_progress: bool = False,
    ) -> None:
        super().__init__(profiles, warm, max_batch, price_per_hour, track_progress)
        self.chunk = chunked_prefill_tokens
        self.kv_capacity = profiles[warm].kv_capacity_tokens
        check_prefix_cache_max_tokens(prefix_cache_max_tokens, prefix_cache)
        self.prefix: PrefixCache | None = None
        if prefix_cache:
            cap = prefix_cache_max_tokens
            self.prefix = PrefixCache(cap)
        self.max_segment_steps = max_segment_steps or math.inf
        self.pending: list[tuple[float, int, Seq]] = []  # in the API overhead, by ready time
        self.waiting: deque[Seq] = deque()
        self.batch: list[Seq] = []
        self.kv_used = 0
        self.steps = 0
        self.preemptions = 0
        self._phase = _IDLE
        self._end = 0.0  # when the phase in progress ends
        # The phase's work: a prefill step's chunks and decoding members, or a
        # decode segment's (start, base, inc, steps, batch size).
        self._chunks: list[tuple[Seq, int]] = []
        self._riders: list[Seq] = []
        self._step_s = 0.0
        self._segment = (0.0, 0.0, 0.0, 0, 0)

    # ------------------------------------------------------------ views

    @property
    def profile(self) -> PerfProfile:
        return self.profiles[self.active]

    @property
    def busy(self) -> bool:
        """A step (or decode segment) is running on the GPU."""
        return self._phase == _PREFILL or self._phase == _DECODE

    def loading(self, now: float) -> bool:
        """Weights are loading at ``now`` (a swap, or a restart)."""
        return self._phase == _LOAD and now < self._end

    def warm_models(self, now: float) -> tuple[str, ...]:
        return () if self.loading(now) or self._phase == _DOWN else (self.active,)

    def free_kv_tokens(self) -> int:
        return self.kv_capacity - self.kv_used

    def sequences(self) -> list[Seq]:
        """Every sequence the engine holds (in the overhead, queued or running)."""
        return [*(s for _, _, s in self.pending if not s.cancelled), *self.waiting, *self.batch]

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` must next be called (None: nothing to time)."""
        due = self.pending[0][0] if self.pending else None
        if self._phase == _IDLE or self._phase == _DOWN:
            return due
        return self._end if due is None or self._end < due else due

    # ------------------------------------------------------------ inputs

    def add(self, seq: Seq, now: float) -> None:
        """``seq`` reached the engine at ``now``; it queues after the API overhead."""
        ready = now + self.profiles[seq.request.model].api_overhead_s * self.slow
        if ready <= now and self._phase != _IDLE:
            self._arrive(seq, now)  # joins the queue; a busy engine looks at it at its deadline
        else:
            heapq.heappush(self.pending, (ready, next(self._order), seq))

    def queue_depth(self) -> int:
        return len(self.waiting)

    def running(self) -> int:
        return len(self.batch)

    def cancel(self, seq: Seq, now: float) -> None:
        """The caller went away: ``seq`` leaves now and frees what it holds."""
        if seq.done or seq.cancelled:
            return
        seq.cancelled = True
        batch = self.batch
        for i, s in enumerate(batch):
            if s is seq:
                del batch[i]
                self.kv_used -= seq.context + seq.prompt_left
                if self.prefix is not None:
                    self._release(seq)
                return
        for s in self.waiting:
            if s is seq:
                self.waiting.remove(seq)
                return
        # Still in the API overhead: skipped when it comes due.

    def crash(self, now: float) -> None:
        """The GPU's process died at ``now``: everything is lost until :meth:`restart`.

        The decode segment in progress credits the steps completed by ``now``
        (their tokens were streamed before the crash).
        """
        if self._phase == _DECODE:
            start, base, inc, _k, _b = self._segment
            done = steps_within(now - start, base, inc)
            for seq in self.batch:
                seq.generated += done
        self.pending.clear()
        self.waiting.clear()
        for seq in self.batch:
            seq.blocks = ()
        self.batch.clear()
        self.kv_used = 0
        if self.prefix is not None:
            self.prefix.clear()  # the KV pool is gone
        self._phase = _DOWN
        self.clock = now

    def restart(self, now: float, loaded_s: float = 0.0) -> None:
        """Started again at ``now``, ``loaded_s`` of the load already done: load the weights."""
        self.clock = now
        self._load(self.active, now, loaded_s)

    def stall(self, now: float) -> None:
        """The process could not run until ``now`` (it was stopped): work resumes from there."""
        if self.busy or self._phase == _LOAD:
            self._end = max(self._end, now)
        self.clock = max(self.clock, now)

    # ------------------------------------------------------------ time

    def on_timer(self, now: float) -> list[Seq]:
        """Advance to ``now``; the sequences that left (``done``, or failed with ``error``)."""
        left: list[Seq] = []
        pending = self.pending
        while True:
            phase = self._phase
            timed = phase != _IDLE and phase != _DOWN
            if timed and self._end <= now and (not pending or self._end <= pending[0][0]):
                self.clock = self._end
                self._complete(left)
                self._arrivals(self.clock)
                self._begin(left)
            elif pending and pending[0][0] <= now:
                t = max(pending[0][0], self.clock)
                self.clock = t
                self._arrivals(t)
                if self._phase == _IDLE:
                    self._begin(left)
            else:
                return left

    # ------------------------------------------------------------ internals

    def _arrivals(self, now: float) -> None:
        pending = self.pending
        while pending and pending[0][0] <= now:
            seq = heapq.heappop(pending)[2]
            if not seq.cancelled:
                self._arrive(seq, now)

    def _arrive(self, seq: Seq, now: float) -> None:
        self.waiting.append(seq)
        if self._phase == _LOAD:
            seq.cold_start = True
        elif self._phase == _DECODE and self._admissible():
            self._cut(now)

    def _cut(self, now: float) -> None:
        """End the decode segment at the first step boundary after ``now``."""
        start, base, inc, k, b = self._segment
        done = min(k, steps_within(now - start, base, inc) + 1)
        if done < k:
            self._segment = (start, base, inc, done, b)
            self._end = start + _elapsed(done, base, inc)

    def _need(self, seq: Seq) -> int:
        return seq.prompt_left + seq.context + 1

    def _admissible(self) -> bool:
        """Would the head of the queue change the batch at the next step boundary?"""
        if not self.waiting or len(self.batch) >= self.max_batch:
            return False
        head = self.waiting[0]
        if head.request.model != self.active:
            return not self.batch  # a swap can start once the batch is empty
        need = self._need(head)
        # A prompt that can never fit is admissible too: admission fails it.
        return self.kv_used + len(self.batch) + need <= self.kv_capacity or need > self.kv_capacity

    def _begin(self, left: list[Seq]) -> None:
        """Start what comes next at ``self.clock``: a load, a step, a segment, or idle."""
        self._phase = _IDLE
        while True:
            waiting = self.waiting
            if waiting and not self.batch and waiting[0].request.model != self.active:
                self._load(waiting[0].request.model, self.clock)
                return
            self._admit(left)
            if not self._make_room():
                break
        if not self.batch:
            return
        for seq in self.batch:
            if seq.prompt_left > 0:
                self._start_prefill()
                return
        self._start_decode()

    def _admit(self, left: list[Seq]) -> None:
        waiting, batch, capacity = self.waiting, self.batch, self.kv_capacity
        while waiting and len(batch) < self.max_batch:
            head = waiting[0]
            if head.request.model != self.active:
                break
            need = self._need(head)
            if self.kv_used + len(batch) + need > capacity:
                if not batch and need > capacity:
                    # Can never fit: fail it rather than block the queue forever.
                    waiting.popleft()
                    head.error = ErrorKind.CONTEXT_TOO_LONG
                    left.append(head)
                    continue
                break
            waiting.popleft()
            prefix = self.prefix
            if prefix is not None and head.context == 0:
                hashes = _prompt_blocks(head.request)
                hits = prefix.acquire(hashes)
                prefix.query_tokens += head.prompt_left
                if hits:
                    head.blocks = hashes[:hits]
                    cached = min(hits * head.request.prefix_block_tokens, head.prompt_left - 1)
                    if cached > 0:
                        head.prompt_left -= cached
                        head.context += cached
                        prefix.hit_tokens += cached
            # KV is reserved for the whole prompt at admission (vLLM allocates
            # the prompt's blocks up front); each generated token adds one.
            self.kv_used += head.prompt_left + head.context
            batch.append(head)
            if prefix is not None and prefix.free_tokens > capacity - self.kv_used:
                prefix.trim(capacity - self.kv_used)  # make the room: evict

    def _make_room(self) -> bool:
        """Preempt the newest sequences until every one left has room for its next token."""
        batch = self.batch
        preempted = False
        while batch and self.kv_used + len(batch) > self.kv_capacity:
            preempted = True
            victim = batch.pop()
            self.kv_used -= victim.context + victim.prompt_left
            if self.prefix is not None:
                self._release(victim)  # its blocks stay cached, evictable
            victim.prompt_left = victim.request.prompt_tokens + victim.generated
            victim.context = 0
            self.waiting.appendleft(victim)
            self.preemptions += 1
        return preempted

    def _release(self, seq: Seq) -> None:
        """``seq`` left the batch: the blocks it pinned become evictable unless shared."""
        prefix = self.prefix
        assert prefix is not None
        if seq.blocks:
            prefix.release(seq.blocks, seq.request.prefix_block_tokens)
            seq.blocks = ()
            prefix.trim(self.kv_capacity - self.kv_used)  # the cap; a partial last block

    def _load(self, model: str, now: float, loaded_s: float = 0.0) -> None:
        if self.prefix is not None and model != self.active:
            self.prefix.clear()  # the other model's KV (the batch has drained: none pinned)
        self.active = model
        self._phase = _LOAD
        self._end = now + max(0.0, self.profiles[model].load_time_s - loaded_s)
        for seq in self.waiting:
            seq.cold_start = True

    def _start_prefill(self) -> None:
        chunks, riders, duration = plan_prefill_step(self.profile, self.batch, self.chunk)
        self._chunks, self._riders = chunks, riders
        self._step_s = duration * self.slow
        self._phase = _PREFILL
        self._end = self.clock + self._step_s

    def _start_decode(self) -> None:
        profile, batch = self.profile, self.batch
        b = len(batch)
        c0 = 0
        steps_left = self.max_segment_steps
        for seq in batch:
            c0 += seq.context
            left = seq.request.max_tokens - seq.generated
            if left < steps_left:
                steps_left = left
        kv_steps = (self.kv_capacity - self.kv_used) // b  # >= 1 (see _make_room)
        k = int(min(steps_left, kv_steps))
        if self._admissible():
            k = 1  # a change is waiting: only the step that starts now
        # Decode step j takes base + inc * j (the context grows by b each step).
        base = profile.step_time(0, c0, b) * self.slow
        inc = profile.step_time(0, c0 + b, b) * self.slow - base
        self._segment = (self.clock, base, inc, k, b)
        self._phase = _DECODE
        self._end = self.clock + _elapsed(k, base, inc)

    def _complete(self, left: list[Seq]) -> None:
        """The phase in progress ended at ``self.clock``."""
        phase, now = self._phase, self.clock
        self._phase = _IDLE
        if phase == _PREFILL:
            self._complete_prefill(now)
        elif phase == _DECODE:
            self._complete_decode()
        else:
            return  # a load: nothing to credit
        prefix = self.prefix
        if prefix is not None:
            # The step's tokens took their room before anyone left: evict for them.
            room = self.kv_capacity - self.kv_used
            if prefix.free_tokens > room:
                prefix.trim(room)
        if any(s.generated >= s.request.max_tokens for s in self.batch):
            still: list[Seq] = []
            for seq in self.batch:
                if seq.generated >= seq.request.max_tokens:
                    self.kv_used -= seq.context
                    seq.finish_s = now
                    seq.done = True
                    left.append(seq)
                    if prefix is not None:
                        self._release(seq)
                else:
                    still.append(seq)
            self.batch = still
        self._make_room()

    def _complete_prefill(self, now: float) -> None:
        self.steps += 1
        members = len(self._chunks) + len(self._riders)
        share = self._step_s * self.price_per_hour / 3600.0 / max(1, members)
        for seq, n in self._chunks:
            seq.cost += share
            if seq.cancelled:
                continue  # left during the step: its work is discarded
            seq.prompt_left -= n
            seq.context += n
            if seq.prompt_left == 0:
                self._emit(seq, now)
                if self.prefix is not None:
                    self._register(seq)
        for seq in self._riders:
            seq.cost += share
            if not seq.cancelled:
                self._emit(seq, now)
        self._chunks, self._riders = [], []

    def _register(self, seq: Seq) -> None:
        """``seq``'s prompt is prefilled: all its blocks are cached, pinned by it."""
        prefix = self.prefix
        assert prefix is not None
        hashes = _prompt_blocks(seq.request)
        held = len(seq.blocks)
        if held < len(hashes):
            prefix.pin(hashes[held:])
            seq.blocks = hashes

    def _emit(self, seq: Seq, now: float) -> None:
        if self.progressed is not None:
            self.progressed.append(seq)
        seq.generated += 1
        seq.context += 1
        self.kv_used += 1
        if seq.first_token_s is None:
            seq.first_token_s = now

    def _complete_decode(self) -> None:
        _start, base, inc, done, b = self._segment
        self.steps += done
        # Credit the sequences running now: one cancelled during the segment
        # left with its KV and gets nothing (its share goes unbilled).
        share = _elapsed(done, base, inc) * self.price_per_hour / 3600.0 / b
        for seq in self.batch:
            seq.generated += done
            seq.context += done
            seq.cost += share
        self.kv_used += done * len(self.batch)
        if self.progressed is not None:
            self.progressed.extend(self.batch)


class RequestLevelEngine(_EngineBase):
    """The fast approximation: one service time per request over ``max_batch`` slots.

    A request holds a slot, FIFO, for ``ttft + (output - 1) x decode_step``
    with ``ttft = load + api_overhead_s + prefill_time(prompt)`` and the
    decode step timed at the slots in use when its service begins and the
    context ``prompt + output // 2``; its first token comes ``ttft`` after
    that, the others evenly, the last when it frees the slot. A request for
    another model swaps the weights in and is charged the load. After a
    :meth:`restart` the slots granted before the weights are in wait for
    them (cold starts). No KV limit, preemption or prefill/decode interference:
    ``bench/sim_speed.py`` measures how far it is from :class:`BatchingEngine`.
    """

    def __init__(
        self,
        profiles: Mapping[str, PerfProfile],
        warm: str,
        *,
        max_batch: int | None = None,
        price_per_hour: float = 0.0,
        track_progress: bool = False,
    ) -> None:
        super().__init__(profiles, warm, max_batch, price_per_hour, track_progress)
        self.queue: deque[Seq] = deque()
        self.holders: dict[Seq, float] = {}  # slot holders -> when they free it (inf: loading)
        self.in_service = 0  # holders whose service began
        self.loading_until = 0.0
        self.down = False
        self._finishes: list[tuple[float, int, Seq]] = []
        self._bills: dict[Seq, float] = {}

    # ------------------------------------------------------------ views

    @property
    def busy(self) -> bool:
        return self.in_service > 0

    def warm_models(self, now: float) -> tuple[str, ...]:
        return () if self.down or now < self.loading_until else (self.active,)

    def queue_depth(self) -> int:
        return len(self.queue)

    def running(self) -> int:
        return len(self.holders)

    def free_kv_tokens(self) -> int:
        return 0

    def sequences(self) -> list[Seq]:
        return [*self.holders, *self.queue]

    def next_deadline(self) -> float | None:
        finishes, holders = self._finishes, self.holders
        while finishes:
            at, _, seq = finishes[0]
            held = holders.get(seq)
            if held == at or held == math.inf:
                return at
            heapq.heappop(finishes)  # it left early (cancelled)
        return None

    # ------------------------------------------------------------ inputs

    def add(self, seq: Seq, now: float) -> None:
        self.queue.append(seq)
        self._fill(now)

    def cancel(self, seq: Seq, now: float) -> None:
        if seq.done or seq.cancelled:
            return
        seq.cancelled = True
        held = self.holders.pop(seq, None)
        self._bills.pop(seq, None)
        if held is None:
            with contextlib.suppress(ValueError):  # not queued either: lost in a crash
                self.queue.remove(seq)
            return
        if held != math.inf:
            self.in_service -= 1
        self._fill(now)

    def crash(self, now: float) -> None:
        self.queue.clear()
        self.holders.clear()
        self._finishes.clear()
        self._bills.clear()
        self.in_service = 0
        self.down = True
        self.clock = now

    def restart(self, now: float, loaded_s: float = 0.0) -> None:
        self.down = False
        self.clock = now
        self.loading_until = now + self.profiles[self.active].load_time_s - loaded_s

    def stall(self, now: float) -> None:
        self.clock = max(self.clock, now)  # token times are fixed when service begins

    # ------------------------------------------------------------ time

    def on_timer(self, now: float) -> list[Seq]:
        left: list[Seq] = []
        while True:
            at = self.next_deadline()
            if at is None or at > now:
                return left
            seq = heapq.heappop(self._finishes)[2]
            self.clock = at
            if self.holders[seq] == math.inf:  # held a slot while the weights loaded
                self._start(seq, at, len(self.holders))
                continue
            del self.holders[seq]
            self.in_service -= 1
            seq.generated = seq.request.max_tokens
            seq.cost += self._bills.pop(seq)
            seq.done = True
            left.append(seq)
            self._fill(at)

    # ------------------------------------------------------------ internals

    def _fill(self, now: float) -> None:
        queue, holders = self.queue, self.holders
        while queue and len(holders) < self.max_batch:
            seq = queue.popleft()
            if now < self.loading_until:
                # Restarted: it holds a slot now and begins when the weights are in,
                # timed by the slots in use then.
                holders[seq] = math.inf
                seq.cold_start = True
                heapq.heappush(self._finishes, (self.loading_until, next(self._order), seq))
            else:
                self._start(seq, now, len(holders) + 1)  # the slots in use, this one included

    def _start(self, seq: Seq, now: float, batch: int) -> None:
        req = seq.request
        profile = self.profiles[req.model]
        load = 0.0
        if req.model != self.active:
            # Swap weights in (the approximation charges the load to this request).
            self.active = req.model
            seq.cold_start = True
            load = profile.load_time_s
        prefill = profile.prefill_time(seq.prompt_left, 1)  # prompt (+ resumed tokens)
        context = req.prompt_tokens + req.max_tokens // 2
        decode_steps = max(0, req.max_tokens - seq.generated - 1)
        seq.step_s = profile.decode_step_time(batch, context)
        seq.ttft_s = load + profile.api_overhead_s + prefill
        seq.scale = self.slow
        seq.begin_s = now
        total = (seq.ttft_s + decode_steps * seq.step_s) * self.slow
        seq.first_token_s = seq.due_s(seq.resumed)
        seq.finish_s = now + total
        self.holders[seq] = seq.finish_s
        self.in_service += 1
        # The GPU's cost is shared by the requests in service together; it is
        # charged when the request completes (a crash loses the attempt's bill).
        self._bills[seq] = total * self.price_per_hour / 3600.0 / self.in_service
        heapq.heappush(self._finishes, (seq.finish_s, next(self._order), seq))
        if self.progressed is not None:
            self.progressed.append(seq)


Engine = BatchingEngine | RequestLevelEngine


def _prompt_blocks(request: Request) -> tuple[int, ...]:
    """The request's prefix blocks that hold prompt tokens (hashes beyond it are ignored)."""
    hashes = request.prefix_hashes
    size = request.prefix_block_tokens
    if size < 1:
        return ()  # no block size: the hashes cannot be placed in the prompt
    n = -(-request.prompt_tokens // size)
    return hashes if len(hashes) <= n else hashes[:n]


def check_prefix_cache_max_tokens(value: object, prefix_cache: bool = True) -> int | None:
    """``prefix_cache_max_tokens`` as given (None, or a whole number >= 0 with a prefix
    cache); a :class:`ValueError` naming the field otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"prefix_cache_max_tokens: expected a whole number of tokens >= 0 or null, "
            f"got {value!r}"
        )
    if not prefix_cache:
        raise ValueError("prefix_cache_max_tokens: needs prefix_cache: true")
    return value


def _elapsed(steps: int, base: float, inc: float) -> float:
    """Duration of ``steps`` decode steps, step j taking ``base + inc * j``."""
    return steps * base + inc * steps * (steps - 1) / 2.0


def steps_within(elapsed: float, base: float, inc: float) -> int:
    """Largest s >= 0 with s*base + inc*s*(s-1)/2 <= elapsed."""
    if elapsed <= 0 or base <= 0:
        return 0
    if abs(inc) < 1e-15:
        s = int(elapsed // base)
    else:
        a, b = inc / 2.0, base - inc / 2.0
        s = int((-b + math.sqrt(b * b + 4 * a * elapsed)) / (2 * a))
    while s > 0 and s * base + inc * s * (s - 1) / 2.0 > elapsed:
        s -= 1
    while (s + 1) * base + inc * (s + 1) * s / 2.0 <= elapsed:
        s += 1
    return s
