"""Simulated workers: what every worker model shares, and slot-based service.

A worker tells orchestrators about itself only through heartbeats (every
``interval_s``, each lost with probability ``loss``, not at all while it is
down or partitioned away), so the control core sees the same stale picture
it would in production. A request sent to a worker that is down or
unreachable fails after the connect timeout; requests it holds when it
crashes fail with ``worker_crashed`` one network hop later. Results travel
back over the network and are lost if the path is cut (the core's attempt
timeout then notices).

Three service models share this base: :class:`AbstractWorker` (fixed or
exponential service time per slot — with ``c`` slots an M/M/c server),
and, in :mod:`haif.sim.engine`, the request-level and iteration-level
models of an LLM engine timed by GPU x model profiles.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol

import simpy

from haif.contracts import AttemptResult, ErrorKind, Event, Heartbeat, Request, WorkerSnapshot
from haif.fleet.engine import Seq
from haif.sim.heartbeats import HeartbeatClock, call_in


class Send(Protocol):
    """Sends ``event`` from region ``src`` to ``dst``'s orchestrator: after ``delay_s``
    (a request's answer, whose hop was drawn), or the route's fixed one-way delay."""

    def __call__(self, src: str, dst: str, event: Event, delay_s: float | None = None) -> None:
        """Deliver ``event`` (unless the path is cut)."""


# (time sent, heartbeat, draw, loss) -> None: send one beat to every orchestrator, in
# order, each lost when draw() < loss (draw None: none lost, nothing drawn).
PostBeat = Callable[[float, Heartbeat, Callable[[], float] | None, float], None]


class Job(Seq):
    """One attempt of one request while it is at a worker (an engine sequence)."""

    __slots__ = ("attempt", "orchestrator", "process", "sent_s")

    def __init__(
        self, request: Request, attempt: int, orchestrator: str, sent_s: float, generated: int = 0
    ) -> None:
        super().__init__(request, generated)
        self.attempt = attempt
        self.orchestrator = orchestrator  # region of the orchestrator that dispatched it
        self.sent_s = sent_s  # when it was dispatched (orchestrator clock == sim clock)
        self.process: simpy.Process | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.request.request_id, self.attempt)


class Network:
    """RTTs between regions, the cost of a service hop, and the partitions in force.

    A hop costs ``hop_s``, or, with ``draw_hop`` (measured delays,
    :mod:`haif.fleet.hops`), a fresh draw for each hop of a request's path
    (:meth:`request_hop_s`); the other messages (heartbeats) keep ``hop_s``.
    """

    def __init__(
        self,
        rtt: Callable[[str, str], float],
        connect_timeout_s: float,
        hop_s: float = 0.0,
        *,
        refused_when_down: bool = False,
        draw_hop: Callable[[], float] | None = None,
    ) -> None:
        self._rtt = rtt
        self._one_way: dict[tuple[str, str], float] = {}
        self._half_rtt: dict[tuple[str, str], float] = {}
        self.connect_timeout_s = connect_timeout_s
        self.hop_s = hop_s  # per service hop, within a region too
        self._draw_hop = draw_hop
        # A down worker's host refuses connections at once (else they time out).
        self.refused_when_down = refused_when_down
        self.cuts: set[frozenset[str]] = set()

    def one_way_s(self, a: str, b: str) -> float:
        """A message's delay from ``a`` to ``b`` at the fixed hop cost."""
        key = (a, b)
        delay = self._one_way.get(key)
        if delay is None:
            delay = self._one_way[key] = self._rtt(a, b) / 2000.0 + self.hop_s
        return delay

    def request_hop_s(self, a: str, b: str) -> float:
        """A request's (or its answer's) delay from ``a`` to ``b``: its own hop draw when
        the hop cost is a distribution, else :meth:`one_way_s` (nothing drawn)."""
        if self._draw_hop is None:
            return self.one_way_s(a, b)
        key = (a, b)
        half = self._half_rtt.get(key)
        if half is None:
            half = self._half_rtt[key] = self._rtt(a, b) / 2000.0
        return half + self._draw_hop()

    def reachable(self, a: str, b: str) -> bool:
        return a == b or not self.cuts or frozenset((a, b)) not in self.cuts


class BaseWorker(ABC):
    def __init__(
        self,
        env: simpy.Environment,
        worker_id: str,
        region: str,
        gpu_class: str,
        *,
        models: tuple[str, ...],
        capacity: int,
        vram_gb: float,
        price_per_hour: float,
        net: Network,
        send: Send,
        rng: random.Random,
    ) -> None:
        self.env = env
        self.worker_id = worker_id
        self.region = region
        self.gpu_class = gpu_class
        self.models = models
        self.capacity = capacity
        self.vram_gb = vram_gb
        self.price_per_hour = price_per_hour
        self.net = net
        self._send = send
        self.rng = rng  # heartbeat loss and jitter
        # Service-time draws get their own stream, so heartbeat settings never shift them.
        self.service_rng = random.Random(rng.getrandbits(64))
        self.up = True
        self._orchestrators: tuple[str, ...] = ()  # whom heartbeats go to
        self._beat_every: tuple[float, float] | None = None  # (interval_s, loss) once beating
        self._cadence = 0  # the current heartbeat loop (a restart starts a new one)
        # Beating on the fleet's clock (beat_on) rather than with a process of its own.
        self._clock: HeartbeatClock | None = None
        self._post: PostBeat = self._send_each
        self._beat_msg: Heartbeat | None = None  # the last beat sent (reused while unchanged)
        self.slow = 1.0  # gray failure factor
        self.served = 0
        self.jobs: dict[tuple[str, int], Job] = {}
        self._snapshot: WorkerSnapshot | None = None
        self._snapshot_state: tuple[object, ...] = ()
        self._busy_s = 0.0  # integral of busy fraction since the last sample
        self._sampled_at = 0.0

    # -------------------------------------------------------- model hooks

    @abstractmethod
    def start(self, job: Job) -> None:
        """The job reached the worker (it is up)."""

    @abstractmethod
    def drop(self, job: Job) -> None:
        """Forget the job (cancelled or crashed), releasing what it holds."""

    @abstractmethod
    def busy_fraction_now(self) -> float:
        """Busy fraction right now (for the utilization integral)."""

    def warm_models(self, now: float | None = None) -> tuple[str, ...]:
        """The models loaded at ``now`` (default: the environment's time)."""
        return self.models

    def queue_depth(self) -> int:
        return 0

    def running(self) -> int:
        return len(self.jobs)

    def free_kv_tokens(self) -> int:
        return 0

    def on_restart(self, elapsed_s: float) -> None:  # noqa: B027 - optional hook
        """Called when a crashed worker is back up, ``elapsed_s`` after its restart."""

    # -------------------------------------------------------- control

    def dispatch(
        self, request: Request, attempt: int, orchestrator: str, resume_tokens: int = 0
    ) -> None:
        """An orchestrator in region ``orchestrator`` sends an attempt now.

        With ``resume_tokens`` the response continues from that many tokens an
        earlier attempt produced: they are recomputed with the prompt.
        """
        job = Job(request, attempt, orchestrator, self.env.now, generated=resume_tokens)
        reachable = self.net.reachable(orchestrator, self.region)
        if not self.up or not reachable:
            if reachable and self.net.refused_when_down:  # refused; the answer hops back
                wait = self.net.request_hop_s(orchestrator, self.region)
            else:
                wait = self.net.connect_timeout_s
            call_in(self.env, wait, lambda _ev: self._fail_unreached(job))
            return
        call_in(
            self.env,
            self.net.request_hop_s(orchestrator, self.region),
            lambda _ev: self._arrive(job),
        )

    def _arrive(self, job: Job) -> None:
        if not self.up:  # crashed while the request was on the wire
            self._result(job, ok=False, error=ErrorKind.WORKER_CRASHED)
            return
        self.jobs[job.key] = job
        self.start(job)

    def _fail_unreached(self, job: Job) -> None:
        self._send(
            self.region,
            job.orchestrator,
            AttemptResult(
                request_id=job.request.request_id,
                attempt=job.attempt,
                worker_id=self.worker_id,
                ok=False,
                started_s=job.sent_s,
                finish_s=self.env.now,
                error=ErrorKind.CONNECTION_ERROR,
            ),
            self.net.request_hop_s(self.region, job.orchestrator),
        )

    def cancel(self, request_id: str, attempt: int) -> None:
        job = self.jobs.pop((request_id, attempt), None)
        if job is not None:
            self._account()
            self.drop(job)

    def go_down(self) -> None:
        """Crash: every job fails; nothing more is served until :meth:`come_up`."""
        self._account()
        self.up = False
        for job in list(self.jobs.values()):
            del self.jobs[job.key]
            self.drop(job)
            self._result(job, ok=False, error=ErrorKind.WORKER_CRASHED)

    def come_up(self, boot_s: float = 0.0) -> None:
        """Restart now: up, and announced to every orchestrator, ``boot_s`` later.

        Until then it is down (unreachable, silent); its weights load from now
        (:meth:`on_restart` is told how long the boot took).
        """
        if boot_s <= 0:
            self._booted(0.0)
            return
        call_in(self.env, boot_s, lambda _ev: self._booted(boot_s))

    def _booted(self, elapsed_s: float) -> None:
        self._account()
        self.up = True
        self.on_restart(elapsed_s)
        if self._beat_every is None:
            return
        if self._clock is not None:
            self._clock.add(self.env.now + self._new_cadence(), self, self._cadence)
        else:
            self.env.process(self._beating(self._new_cadence()))

    def complete(self, job: Job) -> None:
        """The model finished the job successfully (called by subclasses)."""
        self._account()
        self.jobs.pop(job.key, None)
        self.served += 1
        self._result(job, ok=True)

    def _result(self, job: Job, *, ok: bool, error: str | None = None) -> None:
        hop = self.net.request_hop_s(self.region, job.orchestrator)
        first = job.first_token_s + hop if job.first_token_s is not None else None
        self._send(
            self.region,
            job.orchestrator,
            AttemptResult(
                request_id=job.request.request_id,
                attempt=job.attempt,
                worker_id=self.worker_id,
                ok=ok,
                started_s=job.sent_s,
                finish_s=self.env.now + hop,
                first_token_s=first,
                output_tokens=job.generated,  # so far, on failure too
                error=error,
                cold_start=job.cold_start,
                cost=job.cost,
            ),
            hop,
        )

    # -------------------------------------------------------- telemetry

    def _state(self, now: float) -> tuple[tuple[str, ...], int, int, int]:
        """(warm models, queue depth, running, free KV tokens) at ``now``."""
        return (self.warm_models(now), self.queue_depth(), self.running(), self.free_kv_tokens())

    def snapshot(self, now: float | None = None) -> WorkerSnapshot:
        """What a heartbeat sent at ``now`` (default: the environment's time) says."""
        state = self._state(self.env.now if now is None else now)
        if state != self._snapshot_state or self._snapshot is None:
            # Rebuilt only when something changed since the last beat (it is immutable).
            self._snapshot_state = state
            self._snapshot = WorkerSnapshot(
                worker_id=self.worker_id,
                region=self.region,
                gpu_class=self.gpu_class,
                vram_gb=self.vram_gb,
                models_warm=state[0],
                models_loadable=self.models,
                queue_depth=state[1],
                running=state[2],
                capacity=self.capacity,
                free_kv_tokens=state[3],
                healthy=True,
                price_per_hour=self.price_per_hour,
            )
        return self._snapshot

    def heartbeats(
        self, orchestrators: tuple[str, ...], interval_s: float, loss: float
    ) -> simpy.events.ProcessGenerator:
        """Announce at start-up, then beat every ``interval_s``, as a runtime worker does.

        The first beat after an announcement comes ``interval_s`` plus a
        random phase later, so the fleet's heartbeats spread out; the
        orchestrators' presence estimates each worker's interval from these
        gaps (:mod:`haif.control.presence`), so none may be shorter than
        ``interval_s``. A restart announces anew and starts a new cadence
        (:meth:`_booted`).

        This is the worker's own process (one event per beat); a fleet beats
        on one clock instead (:meth:`beat_on`), with the same beats.
        """
        self._orchestrators = orchestrators
        self._beat_every = (interval_s, loss)
        return self._beating(self._new_cadence())  # announce now, as beat_on does

    def beat_on(
        self,
        clock: HeartbeatClock,
        orchestrators: tuple[str, ...],
        interval_s: float,
        loss: float,
        post: PostBeat,
    ) -> None:
        """Announce now, then beat as :meth:`heartbeats` does, on the fleet's ``clock``
        (:mod:`haif.sim.heartbeats`); ``post`` sends each beat to ``orchestrators``."""
        self._orchestrators = orchestrators
        self._beat_every = (interval_s, loss)
        self._clock = clock
        self._post = post
        clock.add(self.env.now + self._new_cadence(), self, self._cadence)

    def _new_cadence(self) -> float:
        """Start a cadence now: announce; how long until its first tick."""
        assert self._beat_every is not None
        interval_s = self._beat_every[0]
        self._cadence += 1
        self._announce()
        return interval_s + self.rng.uniform(0, interval_s)

    def _beating(self, first: float) -> simpy.events.ProcessGenerator:
        cadence = self._cadence
        yield self.env.timeout(first)
        assert self._beat_every is not None
        interval_s = self._beat_every[0]
        while self.beat(self.env.now, cadence) is not None:
            yield self.env.timeout(interval_s)

    def beat(self, at: float, cadence: int) -> float | None:
        """One tick of heartbeat cadence ``cadence`` at ``at``: a beat to every
        orchestrator if up (each lost with probability ``loss``); when the next
        tick is due, or None if a restart started a new cadence since."""
        if cadence != self._cadence:
            return None
        every = self._beat_every
        assert every is not None
        interval_s, loss = every
        if self.up:
            snapshot = self.snapshot(at)
            msg = self._beat_msg
            if msg is None or msg.snapshot is not snapshot:
                msg = self._beat_msg = Heartbeat(snapshot)
            self._post(at, msg, self.rng.random, loss)
        return at + interval_s

    def _send_each(
        self, _at: float, beat: Heartbeat, draw: Callable[[], float] | None, loss: float
    ) -> None:
        """:data:`PostBeat` through ``send``, now (the worker's own process)."""
        for region in self._orchestrators:
            if draw is None or draw() >= loss:
                self._send(self.region, region, beat)

    def _announce(self) -> None:
        """A heartbeat to every orchestrator, never lost."""
        now = self.env.now
        self._post(now, Heartbeat(self.snapshot(now)), None, 0.0)

    def _account(self) -> None:
        """Integrate the busy fraction up to now (call before any change)."""
        now = self.env.now
        if self.up:
            self._busy_s += self.busy_fraction_now() * (now - self._sampled_at)
        self._sampled_at = now

    def take_busy_s(self) -> float:
        """Busy seconds since the last call (for per-second utilization)."""
        now = self.env.now  # _account(), inlined: it is called for every worker every second
        busy = self._busy_s
        if self.up:
            busy += self.busy_fraction_now() * (now - self._sampled_at)
        self._sampled_at = now
        self._busy_s = 0.0
        return busy


class SlotWorker(BaseWorker):
    """A worker with ``capacity`` slots; a job holds one for its service time."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.slots = simpy.Resource(self.env, capacity=self.capacity)
        self._in_service = 0
        self._restarting_until = 0.0

    @abstractmethod
    def service_times(self, job: Job) -> tuple[float, float]:
        """(time to first token, total service time) for a job starting now."""

    def start(self, job: Job) -> None:
        job.process = self.env.process(self._serve(job))

    def drop(self, job: Job) -> None:
        if job.process is not None and job.process.is_alive:
            job.process.interrupt()

    def busy_fraction_now(self) -> float:
        return self._in_service / self.capacity

    def queue_depth(self) -> int:
        return len(self.slots.queue)

    def running(self) -> int:
        return self.slots.count

    def _serve(self, job: Job) -> simpy.events.ProcessGenerator:
        env = self.env
        try:
            with self.slots.request() as slot:
                yield slot
                if env.now < self._restarting_until:
                    job.cold_start = True
                    yield env.timeout(self._restarting_until - env.now)
                ttft, total = self.service_times(job)
                self._account()
                self._in_service += 1
                share = self.cost_share()
                try:
                    job.first_token_s = env.now + min(ttft, total)
                    yield env.timeout(total)
                finally:
                    self._account()
                    self._in_service -= 1
        except simpy.Interrupt:
            return
        job.generated = job.request.max_tokens
        job.cost = total * self.price_per_hour / 3600.0 * share
        self.complete(job)

    def cost_share(self) -> float:
        """Fraction of the worker's price a job starting now is charged (one slot)."""
        return 1.0 / self.capacity


class AbstractWorker(SlotWorker):
    """Fixed or exponential service times (no GPU profile)."""

    def __init__(
        self, *args: object, kind: str, mean_s: float, ttft_s: float, **kwargs: object
    ) -> None:
        super().__init__(*args, **kwargs)
        self.kind = kind
        self.mean_s = mean_s
        self.ttft_s = ttft_s

    def service_times(self, job: Job) -> tuple[float, float]:
        if self.kind == "fixed":
            total = self.mean_s
        else:
            total = self.service_rng.expovariate(1.0 / self.mean_s)
        return self.ttft_s * self.slow, total * self.slow
