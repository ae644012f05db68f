"""LLM engine models timed by GPU x model profiles: iteration-level and request-level.

Iteration level (:class:`BatchingWorker`) — continuous batching as vLLM
does it. Each step runs either the prefill of newly admitted prompts
(``chunked_prefill_tokens`` unset: prefill-only steps, vLLM v0) or, with
chunked prefill, every decoding sequence plus prompt chunks up to the token
budget (Sarathi / vLLM v1). A step takes ``profile.step_time(N, C, B)``.
Admission is FIFO while the batch has room and the KV cache can hold the
prompt; when decoding would overflow the KV cache the newest sequence is
preempted and later recomputed (vLLM's recompute mode). With
``prefix_cache``, leading prompt blocks (trace ``hash_ids``, 512 tokens)
already in the worker's LRU block cache are not prefilled again.

Between composition changes (an arrival that can be admitted, a
completion, a preemption) the batch only decodes, and the step time grows
linearly with the context (``c·C``): the time of ``k`` steps is a closed
form, so the model advances a whole segment with one event instead of one
per token. An arrival in mid-segment ends it at the next step boundary.
A cancelled job leaves the batch and frees its KV at once; the step or
segment in progress then credits tokens (and KV) only to the jobs still in
the batch. The segment keeps its planned step times until it ends.

Request level (:class:`RequestLevelWorker`) — the fast approximation: a
request holds one of ``max_batch`` slots for ``prefill_time(prompt) +
output · decode_step_time(batch, context)``, with the batch taken as the
slots in use when it starts. It ignores KV limits, preemption and the
prefill/decode interference. ``bench/sim_speed.py`` measures how far the
two disagree.

A worker hosts one model at a time; a request for another loadable model
waits until the batch drains, then the weights load (``load_time_s``), as
does a crashed worker when it comes back. Requests that waited for a load
are marked ``cold_start``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping

import simpy

from haif.fleet.engine import BLOCK_TOKENS, PrefixCache, plan_prefill_step
from haif.fleet.profiles import PerfProfile
from haif.sim.fleet import BaseWorker, Job, SlotWorker


class _ModelHost:
    """Which model is loaded, and loading another one."""

    def __init__(self, profiles: Mapping[str, PerfProfile], warm: str) -> None:
        self.profiles = profiles
        self.active: str | None = warm
        self.loading = False

    @property
    def profile(self) -> PerfProfile:
        assert self.active is not None
        return self.profiles[self.active]


class RequestLevelWorker(SlotWorker):
    """One service time per request (see the module docstring)."""

    def __init__(
        self, *args: object, profiles: Mapping[str, PerfProfile], warm: str, **kwargs: object
    ) -> None:
        super().__init__(*args, **kwargs)
        self.host = _ModelHost(profiles, warm)

    def warm_models(self) -> tuple[str, ...]:
        loading = self._restarting_until > self.env.now  # reloading after a restart
        return (self.host.active,) if self.host.active and not loading else ()

    def on_restart(self, elapsed_s: float) -> None:
        self._restarting_until = self.env.now - elapsed_s + self.host.profile.load_time_s

    def busy_fraction_now(self) -> float:
        # The GPU is busy while any request is in the batch (as in the iteration model).
        return 1.0 if self._in_service else 0.0

    def cost_share(self) -> float:
        # The GPU's cost is shared by the requests batched together.
        return 1.0 / max(1, self._in_service)

    def service_times(self, job: Job) -> tuple[float, float]:
        req = job.request
        profile = self.host.profiles[req.model]
        if req.model != self.host.active:
            # Swap weights in (the approximation charges the load to this request).
            self.host.active = req.model
            job.cold_start = True
            load = profile.load_time_s
        else:
            load = 0.0
        batch = max(1, self.slots.count)
        prefill = profile.prefill_time(job.prompt_left, 1)  # prompt (+ resumed tokens)
        context = req.prompt_tokens + req.max_tokens // 2
        decode_steps = max(0, req.max_tokens - job.generated - 1)
        decode = decode_steps * profile.decode_step_time(batch, context)
        api = profile.api_overhead_s
        ttft = load + api + prefill
        return ttft * self.slow, (ttft + decode) * self.slow


class BatchingWorker(BaseWorker):
    """Continuous batching, advanced analytically between composition changes."""

    def __init__(
        self,
        *args: object,
        profiles: Mapping[str, PerfProfile],
        warm: str,
        max_batch: int | None = None,
        chunked_prefill_tokens: int | None = None,
        prefix_cache: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.host = _ModelHost(profiles, warm)
        self.max_batch = max_batch or self.host.profile.max_batch
        self.chunk = chunked_prefill_tokens
        self.kv_capacity = self.host.profile.kv_capacity_tokens
        self.prefix = PrefixCache(self.kv_capacity // BLOCK_TOKENS) if prefix_cache else None
        self.waiting: deque[Job] = deque()
        self.batch: list[Job] = []
        self.kv_used = 0
        self.preemptions = 0
        self.steps = 0
        self._stepping = False
        self._wake: simpy.Event | None = None
        # The decode segment in progress: (start, base, inc), for crediting
        # the steps completed so far if the worker crashes mid-segment.
        self._segment: tuple[float, float, float] | None = None
        self._loop: simpy.Process = self.env.process(self._run(load_first=False))

    # -------------------------------------------------------- BaseWorker hooks

    def warm_models(self) -> tuple[str, ...]:
        host = self.host
        return (host.active,) if host.active is not None and not host.loading else ()

    def queue_depth(self) -> int:
        return len(self.waiting)

    def running(self) -> int:
        return len(self.batch)

    def free_kv_tokens(self) -> int:
        return self.kv_capacity - self.kv_used

    def busy_fraction_now(self) -> float:
        return 1.0 if self._stepping else 0.0

    def start(self, job: Job) -> None:
        # API server overhead (tokenize, schedule) before the engine sees it.
        overhead = self.host.profiles[job.request.model].api_overhead_s
        if overhead > 0:
            timeout = self.env.timeout(overhead * self.slow)
            timeout.callbacks.append(lambda _ev: self._enqueue(job))
        else:
            self._enqueue(job)

    def drop(self, job: Job) -> None:
        if job in self.batch:
            self.batch.remove(job)
            self.kv_used -= job.context + job.prompt_left
        elif job in self.waiting:
            self.waiting.remove(job)

    def go_down(self) -> None:
        if self._segment is not None:
            start, base, inc = self._segment
            done = _steps_within(self.env.now - start, base, inc)
            for job in self.batch:
                job.generated += done  # streamed before the crash
        super().go_down()
        if self._loop.is_alive:
            self._loop.interrupt()
        self.waiting.clear()
        self.batch.clear()
        self.kv_used = 0
        self._stepping = False
        self._segment = None
        if self.prefix is not None:
            self.prefix.clear()

    def on_restart(self, elapsed_s: float) -> None:
        self._loop = self.env.process(self._run(load_first=True, loaded_s=elapsed_s))

    # -------------------------------------------------------- the engine loop

    def _enqueue(self, job: Job) -> None:
        if job.key not in self.jobs or not self.up:
            return  # cancelled or crashed during the API overhead
        self.waiting.append(job)
        if self.host.loading:
            job.cold_start = True
        if self._wake is not None and not self._wake.triggered and self._admissible():
            self._wake.succeed()

    def _admissible(self) -> bool:
        if not self.waiting or len(self.batch) >= self.max_batch:
            return False
        head = self.waiting[0]
        if head.request.model != self.host.active:
            return not self.batch  # a swap can start once the batch is empty
        need = head.prompt_left + head.context + 1
        # A prompt that can never fit is admissible too: admission fails it.
        return self.kv_used + need <= self.kv_capacity or need > self.kv_capacity

    def _admit(self) -> None:
        profile_model = self.host.active
        while self.waiting and len(self.batch) < self.max_batch:
            head = self.waiting[0]
            if head.request.model != profile_model:
                break
            need = head.prompt_left + head.context + 1
            if self.kv_used + need > self.kv_capacity:
                if not self.batch and need > self.kv_capacity:
                    # Can never fit: fail it rather than block the queue forever.
                    self.waiting.popleft()
                    self.jobs.pop(head.key, None)
                    self._result(head, ok=False, error="context_too_long")
                    continue
                break
            self.waiting.popleft()
            if self.prefix is not None and head.context == 0:
                hits = self.prefix.hit_blocks(head.request.prefix_hashes)
                cached = min(hits * BLOCK_TOKENS, head.prompt_left - 1)
                head.prompt_left -= max(0, cached)
                head.context += max(0, cached)
            # KV is reserved for the whole prompt at admission (vLLM allocates
            # the prompt's blocks up front); each generated token adds one.
            self.kv_used += head.prompt_left + head.context
            self.batch.append(head)

    def _run(self, load_first: bool, loaded_s: float = 0.0) -> simpy.events.ProcessGenerator:
        env = self.env
        try:
            if load_first:
                yield from self._load(self.host.active, loaded_s)
            while True:
                if (
                    self.waiting
                    and self.waiting[0].request.model != self.host.active
                    and not self.batch
                ):
                    yield from self._load(self.waiting[0].request.model)
                self._admit()
                if not self.batch:
                    self._wake = env.event()
                    yield self._wake
                    self._wake = None
                    continue
                if any(j.prompt_left > 0 for j in self.batch):
                    yield from self._prefill_step()
                else:
                    yield from self._decode_segment()
        except simpy.Interrupt:
            return

    def _load(self, model: str | None, loaded_s: float = 0.0) -> simpy.events.ProcessGenerator:
        """Load ``model``'s weights (``loaded_s`` of the load already done, while booting)."""
        assert model is not None
        self.host.active = model
        self.host.loading = True
        for job in self.waiting:
            job.cold_start = True
        yield self.env.timeout(max(0.0, self.host.profile.load_time_s - loaded_s))
        self.host.loading = False

    def _step(self, duration: float, jobs: list[Job]) -> simpy.events.ProcessGenerator:
        """Run the GPU for ``duration``, charging its cost to ``jobs`` equally."""
        self._account()
        self._stepping = True
        yield self.env.timeout(duration)
        self._account()
        self._stepping = False
        share = duration * self.price_per_hour / 3600.0 / max(1, len(jobs))
        for job in jobs:
            job.cost += share

    def _prefill_step(self) -> simpy.events.ProcessGenerator:
        chunks, decoding, duration = plan_prefill_step(self.host.profile, self.batch, self.chunk)
        duration *= self.slow
        members = [j for j, _ in chunks] + decoding
        yield from self._step(duration, members)
        self.steps += 1
        now = self.env.now
        # A job cancelled during the step left the batch (its KV went with
        # it): the step's work for it is discarded.
        live = {id(j) for j in self.batch}
        for job, n in chunks:
            if id(job) not in live:
                continue
            job.prompt_left -= n
            job.context += n
            if job.prompt_left == 0:
                self._emit_token(job, now)
                if self.prefix is not None:
                    self.prefix.insert(job.request.prefix_hashes)
        for job in decoding:
            if id(job) in live:
                self._emit_token(job, now)
        self._finish_done()

    def _emit_token(self, job: Job, now: float) -> None:
        job.generated += 1
        job.context += 1
        self.kv_used += 1
        if job.first_token_s is None:
            job.first_token_s = now

    def _finish_done(self) -> None:
        for job in [j for j in self.batch if j.generated >= j.request.max_tokens]:
            self.batch.remove(job)
            self.kv_used -= job.context
            self.complete(job)

    def _decode_segment(self) -> simpy.events.ProcessGenerator:
        env = self.env
        profile = self.host.profile
        batch = self.batch
        b = len(batch)  # at the start: a cancel may shrink the batch mid-segment
        c0 = sum(j.context for j in batch)
        steps_left = min(j.request.max_tokens - j.generated for j in batch)
        kv_steps = (self.kv_capacity - self.kv_used) // b
        if kv_steps < 1:
            self._preempt()
            return
        k = min(steps_left, kv_steps)
        # Decode step j takes base + inc * j (context grows by b each step).
        base = profile.step_time(0, c0, b) * self.slow
        inc = profile.step_time(0, c0 + b, b) * self.slow - base

        def elapsed(steps: int) -> float:
            return steps * base + inc * steps * (steps - 1) / 2.0

        start = env.now
        self._segment = (start, base, inc)
        self._account()
        self._stepping = True
        self._wake = env.event()
        if self._admissible():
            self._wake.succeed()
        yield env.any_of([env.timeout(elapsed(k)), self._wake])
        self._wake = None
        done = k
        if env.now - start < elapsed(k):
            # Interrupted by an admissible arrival: finish the step in progress.
            done = min(k, _steps_within(env.now - start, base, inc) + 1)
            yield env.timeout(max(0.0, start + elapsed(done) - env.now))
        self._segment = None
        self._account()
        self._stepping = False
        self.steps += done
        # Credit the jobs in the batch now: one cancelled during the segment
        # was dropped with its KV and gets nothing (its share goes unbilled).
        share = elapsed(done) * self.price_per_hour / 3600.0 / b
        for job in self.batch:
            job.generated += done
            job.context += done
            job.cost += share
            self.kv_used += done
        self._finish_done()
        if self.batch and self.kv_capacity - self.kv_used < len(self.batch):
            self._preempt()

    def _preempt(self) -> None:
        """KV cache full: the newest sequence goes back to the queue (recompute)."""
        victim = self.batch.pop()
        self.kv_used -= victim.context + victim.prompt_left
        victim.prompt_left = victim.request.prompt_tokens + victim.generated
        victim.context = 0
        self.waiting.appendleft(victim)
        self.preemptions += 1


def _steps_within(elapsed: float, base: float, inc: float) -> int:
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
