"""Dispatch decisions carried out: one task per attempt, streaming from its worker.

Each ``Dispatch`` runs as one task that calls the worker's ``infer_stream``
with the ``resume_tokens`` the core chose and relays its ``TokenChunk``s to
the request's callers (:class:`~haif.runtime.relay.Pending`). Reads use an
idle timeout (the worker sends keepalives while queued), so a worker that
dies or hangs mid-stream becomes a failed ``AttemptResult`` whose error is an
:class:`~haif.contracts.ErrorKind` (``worker_crashed``, ``timeout``,
``connection_error``, or the code the worker answered) and whose
``output_tokens`` is the number of tokens already delivered. What a failure
means — retry, resume elsewhere, dead-letter — is the core's call (its
:data:`~haif.contracts.ERROR_KINDS` table), never this module's. A
``Cancel`` cancels the task, which closes the worker connection and so stops
the generation there.

Times in results are the core's clock (the event loop's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import replace
from typing import Any

import aiohttp
from opentelemetry.trace import Span, SpanKind, StatusCode

from haif.contracts import AttemptResult, Dispatch, Event
from haif.runtime import telemetry
from haif.runtime.cluster_tls import ServiceTls
from haif.runtime.messages import InferCall, InferEnd, TokenChunk
from haif.runtime.relay import Pending
from haif.runtime.rpc import RpcClient, RpcError, RpcUnavailable
from haif.runtime.security import Signer

log = logging.getLogger("haif.orchestrator")


class Attempts:
    """Run, cancel and report the core's attempts."""

    def __init__(
        self,
        *,
        now: Callable[[], float],
        feed: Callable[[Event], None],
        running: Mapping[str, Pending],
        workers: Mapping[str, str],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
        rpc_timeout_s: float,
        idle_timeout_s: float,
        signer: Signer | None = None,
        tls: ServiceTls | None = None,
    ) -> None:
        self._now = now  # the core's clock
        self._feed = feed  # results go back to the core
        self._running = running  # internal id -> its request
        self._workers = workers  # worker id -> base URL, from its heartbeats
        self._spawn = spawn
        self.rpc_timeout_s = rpc_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._signer = signer
        self._tls = tls  # mutual TLS to the workers (their certificates name their ids)
        self._tasks: dict[tuple[str, int], asyncio.Task[None]] = {}
        self.session: aiohttp.ClientSession | None = None

    def open(self) -> None:
        # No connection cap: every running attempt holds one worker connection.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def close(self) -> None:
        """Cancel every attempt (their tasks end with the owner's) and close the session."""
        for task in list(self._tasks.values()):
            task.cancel()
        if self.session is not None:
            await self.session.close()

    def start(self, dispatch: Dispatch) -> None:
        key = (dispatch.request_id, dispatch.attempt)
        self._tasks[key] = self._spawn(self._traced(dispatch))

    def cancel(self, request_id: str, attempt: int) -> None:
        task = self._tasks.pop((request_id, attempt), None)
        if task is not None:
            task.cancel()

    async def _traced(self, dispatch: Dispatch) -> None:
        """One attempt in a span ``orchestrator.dispatch`` of its request's trace."""
        pending = self._running.get(dispatch.request_id)
        with telemetry.tracer().start_as_current_span(
            "orchestrator.dispatch",
            context=pending.trace_ctx if pending is not None else None,
            kind=SpanKind.CLIENT,
            attributes={
                "haif.service": "orchestrator",
                "haif.request_id": dispatch.request_id,
                "haif.attempt": dispatch.attempt,
                "haif.worker_id": dispatch.worker_id,
                "haif.region": dispatch.region,
                "haif.resume_tokens": dispatch.resume_tokens,
            },
        ) as span:
            log.debug(
                "dispatch %s/%d to %s", dispatch.request_id, dispatch.attempt, dispatch.worker_id
            )
            try:
                result = await self._run(dispatch, pending, span)
            finally:
                self._tasks.pop((dispatch.request_id, dispatch.attempt), None)
            span.set_attribute("haif.output_tokens", result.output_tokens)
            if not result.ok:
                span.set_status(StatusCode.ERROR, result.error or "failed")
                span.add_event("attempt_failed", {"error": result.error or ""})
        self._feed(result)

    async def _run(self, dispatch: Dispatch, pending: Pending | None, span: Span) -> AttemptResult:
        assert self.session is not None
        rid, attempt = dispatch.request_id, dispatch.attempt
        started = self._now()
        first_token: float | None = None
        url = self._workers.get(dispatch.worker_id)
        try:
            if pending is None:
                raise RpcError("internal", f"no pending request {rid}")
            pending.attempt = attempt
            if url is None:
                raise RpcUnavailable(f"unknown worker {dispatch.worker_id}", "connect")
            client = RpcClient(
                self.session,
                url,
                self.rpc_timeout_s,
                signer=self._signer,
                audience=dispatch.worker_id,
                tls=self._tls,
            )
            # Workers see the caller's request id (the orchestrator's "Request ids").
            request = pending.request
            if pending.client_id != request.request_id:
                request = replace(request, request_id=pending.client_id)
            call = InferCall(request, dispatch.resume_tokens, attempt)
            end: InferEnd | None = None
            frames = client.stream("infer_stream", call, idle_timeout_s=self.idle_timeout_s)
            async with contextlib.aclosing(frames):
                async for frame in frames:
                    if isinstance(frame, TokenChunk):
                        if first_token is None:
                            first_token = self._now()
                            span.add_event("first_token")
                        pending.relay(attempt, frame)
                    elif isinstance(frame, InferEnd):
                        end = frame
                    else:
                        raise RpcError("bad_reply", f"unexpected frame {type(frame).__name__}")
            if end is None:
                raise RpcUnavailable("worker stream ended without a result", "disconnected")
            now = self._now()
            if (
                pending.delivered < pending.request.max_tokens
                and end.output_tokens > pending.delivered
            ):
                raise RpcError("bad_reply", "worker ended before its last token")
            pending.finish_reason = end.finish_reason
            output = max(end.output_tokens, pending.delivered)
            prompt: int | None = None
            if end.usage is not None:  # the engine's own count (an upstream's usage) is billed
                prompt, output = end.usage
            return AttemptResult(
                request_id=rid,
                attempt=attempt,
                worker_id=dispatch.worker_id,
                ok=True,
                started_s=started,
                finish_s=now,
                first_token_s=first_token if first_token is not None else now,
                output_tokens=output,
                cold_start=end.cold_start,
                cost=end.cost,
                prompt_tokens=prompt,
            )
        except (RpcUnavailable, RpcError) as exc:
            log.warning("attempt %s/%d on %s: %s", rid, attempt, dispatch.worker_id, exc)
            error = exc.error_kind if isinstance(exc, RpcUnavailable) else exc.code
            return self._failure(dispatch, started, error, pending, first_token)

    def _failure(
        self,
        dispatch: Dispatch,
        started: float,
        error: str,
        pending: Pending | None,
        first_token: float | None,
    ) -> AttemptResult:
        return AttemptResult(
            request_id=dispatch.request_id,
            attempt=dispatch.attempt,
            worker_id=dispatch.worker_id,
            ok=False,
            started_s=started,
            finish_s=self._now(),
            # Tokens the client already has: the core resumes from here.
            first_token_s=first_token,
            output_tokens=pending.delivered if pending is not None else 0,
            error=error,
        )
