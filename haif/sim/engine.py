"""The simulator's LLM workers: iteration level and request level.

Iteration level (:class:`BatchingWorker`) — continuous batching as vLLM
does it, modelled by :class:`haif.fleet.engine.BatchingEngine` (see its
docstring for the rules); this module only drives it on SimPy's clock. The
live synthetic engine drives the same class on the asyncio clock
(:mod:`haif.runtime.batching`), so both shells time tokens by one model.

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

A worker with a prefix cache remembers, per attempt, how many tokens its
cache saved (:class:`PrefixHitEngine`); :func:`prefix_hits` collects them
for the report (the ``prefix_hit_tokens`` column of the records).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from haif.fleet.engine import BatchingEngine, Engine, RequestLevelEngine, Seq
from haif.fleet.profiles import PerfProfile
from haif.sim.fleet import BaseWorker, Job
from haif.sim.heartbeats import call_in

PrefixHits = dict[tuple[str, int], int]
"""(request id, attempt) -> prompt tokens the worker's prefix cache held for it."""


class EngineWorker(BaseWorker):
    """A worker whose requests an engine of :mod:`haif.fleet.engine` times, on SimPy's clock.

    One SimPy timeout is armed at the engine's next deadline; an input that
    moves the deadline earlier (an arrival that cuts a decode segment) arms
    another, and a timeout that is no longer the engine's deadline does nothing.
    """

    engine: Engine

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._armed: float | None = None
        self._timer = 0  # the generation of the armed timeout

    # -------------------------------------------------------- BaseWorker hooks

    def warm_models(self, now: float | None = None) -> tuple[str, ...]:
        return self.engine.warm_models(self.env.now if now is None else now)

    def _state(self, now: float) -> tuple[tuple[str, ...], int, int, int]:
        engine = self.engine  # the four hooks below, read at once for a heartbeat
        return (
            engine.warm_models(now),
            engine.queue_depth(),
            engine.running(),
            engine.free_kv_tokens(),
        )

    def queue_depth(self) -> int:
        return self.engine.queue_depth()

    def running(self) -> int:
        return self.engine.running()

    def free_kv_tokens(self) -> int:
        return self.engine.free_kv_tokens()

    def busy_fraction_now(self) -> float:
        return 1.0 if self.engine.busy else 0.0

    def start(self, job: Job) -> None:
        self._account()
        self.engine.slow = self.slow
        self.engine.add(job, self.env.now)
        self._arm()

    def drop(self, job: Job) -> None:
        self._account()
        self.engine.cancel(job, self.env.now)
        self._arm()

    def go_down(self) -> None:
        self._account()
        self.engine.crash(self.env.now)
        self._armed = None
        self._timer += 1
        super().go_down()

    def on_restart(self, elapsed_s: float) -> None:
        self.engine.restart(self.env.now, loaded_s=elapsed_s)
        self._arm()

    # -------------------------------------------------------- the driver

    def _arm(self) -> None:
        deadline = self.engine.next_deadline()
        if deadline is None or (self._armed is not None and self._armed <= deadline):
            return
        self._armed = deadline
        self._timer += 1
        timer = self._timer
        call_in(self.env, max(0.0, deadline - self.env.now), lambda _ev: self._fire(timer))

    def _fire(self, timer: int) -> None:
        if timer != self._timer or not self.up:
            return  # superseded by an earlier deadline, or crashed meanwhile
        self._armed = None
        self._account()
        self.engine.slow = self.slow
        for seq in self.engine.on_timer(self.env.now):
            assert isinstance(seq, Job)
            if seq.error is None:
                self.complete(seq)
            elif self.jobs.pop(seq.key, None) is not None:
                self._result(seq, ok=False, error=seq.error)
        self._arm()


class RequestLevelWorker(EngineWorker):
    """One service time per request (:class:`~haif.fleet.engine.RequestLevelEngine`)."""

    engine: RequestLevelEngine

    def __init__(
        self, *args: object, profiles: Mapping[str, PerfProfile], warm: str, **kwargs: object
    ) -> None:
        super().__init__(*args, **kwargs)
        self.engine = RequestLevelEngine(
            profiles, warm, max_batch=self.capacity, price_per_hour=self.price_per_hour
        )


class BatchingWorker(EngineWorker):
    """Continuous batching (:class:`~haif.fleet.engine.BatchingEngine`)."""

    engine: BatchingEngine

    def __init__(
        self,
        *args: object,
        profiles: Mapping[str, PerfProfile],
        warm: str,
        max_batch: int | None = None,
        chunked_prefill_tokens: int | None = None,
        prefix_cache: bool = False,
        prefix_cache_max_tokens: int | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)
        engine = PrefixHitEngine if prefix_cache else BatchingEngine
        self.engine = engine(
            profiles,
            warm,
            max_batch=max_batch,
            chunked_prefill_tokens=chunked_prefill_tokens,
            prefix_cache=prefix_cache,
            prefix_cache_max_tokens=prefix_cache_max_tokens,
            price_per_hour=self.price_per_hour,
        )


class PrefixHitEngine(BatchingEngine):
    """A :class:`~haif.fleet.engine.BatchingEngine` with a prefix cache that remembers
    what the cache saved each attempt.

    A sequence joins the batch with an empty KV cache (a new one, or one
    preempted and reset); admission moves the tokens its prefix cache holds
    from its prompt into its context, so right after admission its context
    *is* the hit. A sequence admitted again after a preemption is looked up
    again, and the last admission counts.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.prefix_hits: PrefixHits = {}

    def _admit(self, left: list[Seq]) -> None:
        first = len(self.batch)  # admission only appends to the batch
        super()._admit(left)
        hits = self.prefix_hits
        for seq in self.batch[first:]:
            if isinstance(seq, Job):
                hits[seq.key] = seq.context


def prefix_hits(workers: Iterable[BaseWorker]) -> dict[str, PrefixHits]:
    """Per worker with a prefix cache: what its cache saved, per attempt."""
    return {
        w.worker_id: w.engine.prefix_hits
        for w in workers
        if isinstance(w, BatchingWorker) and isinstance(w.engine, PrefixHitEngine)
    }
