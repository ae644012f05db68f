"""Simulated workers: slots, service times, heartbeats, crashes.

A worker serves up to ``capacity`` requests at once and queues the rest in
arrival order. It tells the orchestrator about itself only through
heartbeats (every ``interval_s``, each lost with probability ``loss``), so
the control core sees the same stale picture it would see in production.
While a worker is down it sends nothing; a request sent to it fails after
the connect timeout, and requests running on it when it goes down fail with
``worker_crashed``, one network hop later.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import simpy

from haif.contracts import AttemptResult, Event, Heartbeat, Request, WorkerSnapshot
from haif.sim.scenario import WorkerGroup

Deliver = Callable[[float, Event], None]  # (delay, event) -> schedule at orchestrator


@dataclass(frozen=True, slots=True)
class _Crash:
    reason: str


class SimWorker:
    def __init__(
        self,
        env: simpy.Environment,
        worker_id: str,
        group: WorkerGroup,
        *,
        one_way_s: float,
        connect_timeout_s: float,
        deliver: Deliver,
        rng: random.Random,
    ) -> None:
        self.env = env
        self.worker_id = worker_id
        self.group = group
        self.one_way_s = one_way_s
        self.connect_timeout_s = connect_timeout_s
        self._deliver = deliver
        self._rng = rng
        self.slots = simpy.Resource(env, capacity=group.capacity)
        self.up = True
        self._running: dict[tuple[str, int], simpy.Process] = {}
        self.served = 0

    # -------------------------------------------------------------- control

    def dispatch(self, request: Request, attempt: int) -> None:
        """The orchestrator sent attempt ``attempt`` of ``request`` (now)."""
        key = (request.request_id, attempt)
        self._running[key] = self.env.process(self._serve(request, attempt, self.env.now))

    def cancel(self, request_id: str, attempt: int) -> None:
        proc = self._running.pop((request_id, attempt), None)
        if proc is not None and proc.is_alive:
            proc.interrupt(None)

    def go_down(self) -> None:
        self.up = False
        for proc in list(self._running.values()):
            if proc.is_alive:
                proc.interrupt(_Crash("worker_crashed"))
        self._running.clear()

    def come_up(self) -> None:
        self.up = True

    def snapshot(self) -> WorkerSnapshot:
        g = self.group
        return WorkerSnapshot(
            worker_id=self.worker_id,
            region=g.region,
            gpu_class=g.gpu_class,
            vram_gb=g.vram_gb,
            models_warm=g.models,
            models_loadable=g.models,
            queue_depth=len(self.slots.queue),
            running=self.slots.count,
            capacity=g.capacity,
            healthy=True,
            price_per_hour=g.price_per_hour,
        )

    def heartbeats(self, interval_s: float, loss: float) -> simpy.events.ProcessGenerator:
        # Announce at start-up (workers are up before traffic), then beat
        # with a random phase so workers are not synchronised.
        if self.up:
            self._deliver(self.one_way_s, Heartbeat(self.snapshot()))
        yield self.env.timeout(self._rng.uniform(0, interval_s))
        while True:
            if self.up and self._rng.random() >= loss:
                self._deliver(self.one_way_s, Heartbeat(self.snapshot()))
            yield self.env.timeout(interval_s)

    # -------------------------------------------------------------- service

    def _service_time(self) -> float:
        svc = self.group.service
        if svc.kind == "fixed":
            return svc.mean_s
        return self._rng.expovariate(1.0 / svc.mean_s)

    def _serve(
        self, request: Request, attempt: int, sent_s: float
    ) -> simpy.events.ProcessGenerator:
        env = self.env
        rid = request.request_id
        if not self.up:
            yield env.timeout(self.connect_timeout_s)
            self._running.pop((rid, attempt), None)
            self._deliver(0.0, self._failure(rid, attempt, sent_s, "connection_error"))
            return
        try:
            yield env.timeout(self.one_way_s)
            with self.slots.request() as slot:
                yield slot
                service = self._service_time()
                first_token = env.now + min(self.group.service.ttft_s, service)
                start = env.now
                yield env.timeout(service)
        except simpy.Interrupt as stop:
            if isinstance(stop.cause, _Crash):
                self._deliver(
                    self.one_way_s, self._failure(rid, attempt, sent_s, stop.cause.reason)
                )
            return
        self._running.pop((rid, attempt), None)
        self.served += 1
        hop = self.one_way_s
        cost = (env.now - start) * self.group.price_per_hour / 3600.0 / self.group.capacity
        self._deliver(
            hop,
            AttemptResult(
                request_id=rid,
                attempt=attempt,
                worker_id=self.worker_id,
                ok=True,
                started_s=sent_s,
                finish_s=env.now + hop,
                first_token_s=first_token + hop,
                output_tokens=request.max_tokens,
                cost=cost,
            ),
        )

    def _failure(self, rid: str, attempt: int, sent_s: float, error: str) -> AttemptResult:
        hop = self.one_way_s if error == "worker_crashed" else 0.0
        return AttemptResult(
            request_id=rid,
            attempt=attempt,
            worker_id=self.worker_id,
            ok=False,
            started_s=sent_s,
            finish_s=self.env.now + hop,
            error=error,
            retryable=True,
        )
