"""``haif replay``: drive a live cluster with a trace or a scenario's workload.

An open-loop load generator: every request is sent at its arrival time
(divided by ``--speed``) whether or not earlier ones have been answered, as
real clients do, through the gateway's OpenAI ``/v1/completions`` with
``stream: true``, and timed at the client: the first streamed token and the
end of the stream. The result is a request-record file in the simulator's
schema (:mod:`haif.records`), so ``haif compare`` / ``haif query`` read a
live run and a simulated one the same way.

The prompt of a request of ``n`` prompt tokens is ``n`` words (the synthetic
model's tokenizer counts words) that keep the trace's prefix structure
(:func:`prompt_text`): a request with prefix blocks (Mooncake's
``hash_ids``) repeats one word per block named by the block's hash, so two
requests share exactly the leading words of the blocks they share, and the
gateway's prefix hashes of those words are shared exactly as far (live
prefix caches and ``prefix_affinity`` then see the trace's reuse); a request
without blocks begins with its own id, so it shares no prefix, as in the
simulator. Its ``max_tokens`` is the trace's output length, with
``ignore_eos`` (vLLM's extension: every engine then produces exactly that
many, as the simulator does). The request id is sent as
``x-request-id``, so each record joins the cluster's own record of it (which
worker served it, how many attempts), which ``haif up`` exports to
``<data-dir>/records.parquet`` when it stops (:func:`join_server_records`;
``haif parity`` does this join).

With ``--faults`` the scenario's fault schedule runs at the same time,
against the cluster ``--cluster`` names (:mod:`haif.runtime.faults`).

Times in the records are seconds since the replay started (the first
request is due at its trace time); with ``--speed`` other than 1 the
arrivals are compressed but latencies are real seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp

from haif.configfile import ConfigError
from haif.contracts import Request, RequestRecord
from haif.fleet.scenario import Scenario, WorkerGroup, Workload, load_scenario

#: Trace formats ``haif replay`` takes directly (else a scenario YAML).
TRACE_KINDS = {".csv": "azure", ".jsonl": "mooncake"}


def load_workload(
    source: str | Path, *, duration_s: float | None = None, limit: int | None = None
) -> tuple[list[Request], Scenario]:
    """The requests of a scenario YAML or of a trace file (Azure CSV, Mooncake JSONL)."""
    from haif.fleet.workload import build_requests

    path = Path(source)
    if not path.exists():
        raise ConfigError(f"{path}: no such file")
    kind = TRACE_KINDS.get(path.suffix.lower())
    if kind is None:
        scenario = load_scenario(path)
        if duration_s is not None:
            scenario = scenario.model_copy(update={"duration_s": duration_s})
    else:
        scenario = Scenario(
            name=path.stem,
            regions=("local",),
            workers=(WorkerGroup(region="local"),),
            duration_s=duration_s or 3600.0,
            workload=Workload(kind=kind, path=str(path.resolve())),  # type: ignore[arg-type]
        )
    try:
        requests = build_requests(scenario)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if limit is not None:
        requests = requests[:limit]
    return requests, scenario


#: The word prompts are made of: " the" is one token in byte-level BPE vocabularies
#: (GPT-2's, Llama 3's, the tiny models'), so a real model's tokenizer counts about
#: the trace's prompt length too (the synthetic engines count words).
FILLER = "the"


def prompt_text(
    tokens: int, blocks: Sequence[int] = (), block_tokens: int = 0, salt: str = ""
) -> str:
    """A prompt the gateway counts as ``tokens`` tokens (one word each).

    ``blocks`` (a trace's prefix hashes of ``block_tokens`` tokens each): block
    ``i`` is ``block_tokens`` words ``b<blocks[i]>`` (the words past the last
    block: :data:`FILLER`), so prompts share words exactly where they share
    blocks. Without blocks, ``salt`` (the request's id) is the first word, so
    the prompt shares no prefix with another; without either, filler words.
    """
    if blocks and block_tokens > 0:
        words: list[str] = []
        for h in blocks:
            if len(words) >= tokens:
                break
            words += [f"b{h}"] * min(block_tokens, tokens - len(words))
        words += [FILLER] * (tokens - len(words))
        return " ".join(words)
    first = "".join(salt.split())  # one word
    if first and tokens > 0:
        return " ".join([first, *[FILLER] * (tokens - 1)])
    return " ".join([FILLER] * tokens)


@dataclass(slots=True)
class _Outcome:
    status: str = "failed"
    reason: str | None = None
    first_token_s: float | None = None
    finish_s: float = math.nan
    output_tokens: int = 0


async def _consume_sse(
    resp: aiohttp.ClientResponse, out: _Outcome, clock: Callable[[], float]
) -> None:
    """Read the stream; note the first token, the usage, and an error event."""
    async for raw in resp.content:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            if out.reason is None:
                out.status = "ok"
            return
        try:
            event = json.loads(data)
        except ValueError:
            out.reason = "bad_event"
            continue
        if "error" in event:
            error = event["error"] or {}
            out.status = "failed"
            out.reason = str(error.get("code") or error.get("type") or "stream_error")
            continue
        choices = event.get("choices") or []
        if out.first_token_s is None and any(c.get("text") for c in choices):
            out.first_token_s = clock()
        usage = event.get("usage")
        if usage:
            out.output_tokens = int(usage.get("completion_tokens", 0))


def _refusal_status(http_status: int) -> str:
    return "rejected" if http_status in (400, 404, 409, 413, 429, 503, 529) else "failed"


async def send_one(
    session: aiohttp.ClientSession,
    gateway: str,
    request: Request,
    *,
    clock: Callable[[], float],
    headers: dict[str, str],
    timeout_s: float | None,
) -> RequestRecord:
    """Send ``request`` now; its record with client-side times from ``clock``."""
    sent = clock()
    body = {
        "model": request.model,
        "prompt": prompt_text(
            request.prompt_tokens,
            request.prefix_hashes,
            request.prefix_block_tokens,
            salt=request.request_id,
        ),
        "max_tokens": request.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "priority": request.priority,
        # Exactly the trace's output length, past end-of-sequence (vLLM's extension).
        "ignore_eos": True,
    }
    out = _Outcome()
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(
                f"{gateway}/v1/completions",
                json=body,
                headers={**headers, "x-request-id": request.request_id},
            ) as resp:
                if resp.status != 200:
                    out.status = _refusal_status(resp.status)
                    with contextlib.suppress(Exception):
                        error = (await resp.json(content_type=None)).get("error") or {}
                        out.reason = str(error.get("code") or error.get("type") or resp.status)
                    out.reason = out.reason or f"http_{resp.status}"
                else:
                    await _consume_sse(resp, out, clock)
                    if out.status != "ok" and out.reason is None:
                        out.reason = "stream_ended_early"
    except TimeoutError:
        out.status, out.reason = "timeout", "client_timeout"
    except (aiohttp.ClientError, OSError) as exc:
        out.status, out.reason = "failed", f"unreachable: {type(exc).__name__}"
    out.finish_s = clock()
    # The client's view: sent at ``sent``; where it ran is the cluster's to say.
    record = RequestRecord.never_served(
        replace(request, arrival_s=sent), out.finish_s, out.status, out.reason or ""
    )
    if out.status != "ok":
        return record
    return replace(
        record, first_token_s=out.first_token_s, output_tokens=out.output_tokens, reason=None
    )


@dataclass(frozen=True, slots=True)
class RecordedRun:
    records: list[RequestRecord]
    wall_s: float


async def run_open_loop(
    requests: Sequence[Request],
    gateway: str,
    *,
    speed: float = 1.0,
    headers: dict[str, str] | None = None,
    timeout_s: float | None = None,
    on_done: Callable[[RequestRecord], None] | None = None,
    on_start: Callable[[float], Any] | None = None,
) -> RecordedRun:
    """Send every request at ``arrival_s / speed`` after the start; wait for all.

    ``on_start(t0)`` is called with the loop time of trace time 0 before the
    first request is due (``haif replay --faults`` starts the fault schedule
    there); ``on_done`` gets each record as it completes (progress).
    """
    if not speed > 0:
        raise ValueError(f"--speed must be > 0, got {speed}")
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.5

    def clock() -> float:
        return (loop.time() - t0) * speed

    gateway = gateway.rstrip("/")
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0)
    pending: set[asyncio.Task[RequestRecord]] = set()
    records: list[RequestRecord] = []
    background: asyncio.Task[Any] | None = None
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if on_start is not None:
            result = on_start(t0)
            if asyncio.iscoroutine(result):
                background = asyncio.ensure_future(result)

        def done(task: asyncio.Task[RequestRecord]) -> None:
            pending.discard(task)
            if not task.cancelled() and task.exception() is None:
                record = task.result()
                records.append(record)
                if on_done is not None:
                    on_done(record)

        try:
            for request in requests:
                due = t0 + request.arrival_s / speed
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                task = asyncio.create_task(
                    send_one(
                        session,
                        gateway,
                        request,
                        clock=clock,
                        headers=headers or {},
                        timeout_s=timeout_s,
                    )
                )
                pending.add(task)
                task.add_done_callback(done)
            while pending:
                await asyncio.wait(set(pending))
            if background is not None:
                await background
        finally:
            for task in pending:
                task.cancel()
            if background is not None and not background.done():
                background.cancel()
                with contextlib.suppress(BaseException):
                    await background
    return RecordedRun(records, clock())


def join_server_records(
    client: Sequence[RequestRecord], server: Sequence[RequestRecord]
) -> list[RequestRecord]:
    """Client-side times joined with the cluster's record of each request.

    The cluster knows where a request ran, how many attempts it took and how it
    ended (status and reason as the core defines them, the same as the
    simulator's: a request the core dead-lettered is ``dead_lettered`` here
    too, not the client's ``failed``); the client knows when it got its
    tokens. The client's status stands only where the cluster served a request
    the client did not get (it gave up, or the connection broke). Requests the
    cluster never saw (refused by the gateway, or unreachable) keep the
    client's view.
    """
    by_id = {r.request_id: r for r in server}
    out = []
    for r in client:
        s = by_id.get(r.request_id)
        if s is None:
            out.append(r)
            continue
        clients_view = s.status == "ok" and r.status != "ok"
        out.append(
            replace(
                r,
                served_region=s.served_region,
                worker_id=s.worker_id,
                gpu_class=s.gpu_class,
                attempts=s.attempts,
                cold_start=s.cold_start,
                cost=s.cost,
                status=r.status if clients_view else s.status,
                reason=r.reason if clients_view else s.reason,
            )
        )
    return out


async def replay_with_faults(
    requests: Sequence[Request],
    gateway: str,
    *,
    scenario: Scenario | None = None,
    cluster_dir: str | Path | None = None,
    speed: float = 1.0,
    headers: dict[str, str] | None = None,
    timeout_s: float | None = None,
    on_done: Callable[[RequestRecord], None] | None = None,
    log_event: Callable[[str], None] | None = None,
) -> RecordedRun:
    """:func:`run_open_loop`, with ``scenario``'s faults run on the cluster in ``cluster_dir``."""
    if scenario is None or not scenario.faults:
        return await run_open_loop(
            requests, gateway, speed=speed, headers=headers, timeout_s=timeout_s, on_done=on_done
        )
    from haif.runtime.faults import ClusterControl, live_plan, run_faults
    from haif.runtime.supervisor import read_state

    if cluster_dir is None:
        raise ConfigError("--faults needs --cluster DATA_DIR (the --data-dir of `haif up`)")
    state = read_state(cluster_dir)
    async with aiohttp.ClientSession() as session:
        control = ClusterControl(session, state["control_url"], state["control_token"])
        plan = live_plan(scenario, await control.services())

        def start(t0: float) -> Any:
            return run_faults(plan, control, t0=t0, speed=speed, log_event=log_event)

        return await run_open_loop(
            requests,
            gateway,
            speed=speed,
            headers=headers,
            timeout_s=timeout_s,
            on_done=on_done,
            on_start=start,
        )


def add_replay_command(sub: Any) -> None:
    p = sub.add_parser(
        "replay",
        help="drive a live cluster with a trace or a scenario's workload (open loop)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="scenario YAML, Azure trace CSV or Mooncake JSONL")
    p.add_argument("--gateway", help="gateway URL (default: the --cluster's gateway)")
    p.add_argument("--cluster", help="data directory of the `haif up` cluster (default .haif)")
    p.add_argument("--faults", action="store_true", help="also run the scenario's faults")
    p.add_argument("--speed", type=float, default=1.0, help="arrival speed-up (default 1)")
    p.add_argument("--duration", type=float, help="only arrivals before this many seconds")
    p.add_argument("--limit", type=int, help="only the first N requests")
    p.add_argument("--timeout-s", type=float, help="client timeout per request")
    p.add_argument("--api-key", help="API key sent as a bearer token (else anonymous)")
    p.add_argument("--out", default="reports/replay", help="output folder (default reports/replay)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")
    p.set_defaults(func=_cmd_replay)


def _cmd_replay(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from haif.records import summarize, write_parquet

    console = Console(stderr=True)
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be >= 1")
    requests, scenario = load_workload(args.source, duration_s=args.duration, limit=args.limit)
    if not requests:
        raise ConfigError(f"{args.source}: no requests to send")
    gateway = args.gateway
    cluster_dir = args.cluster or (".haif" if args.faults or not gateway else None)
    if gateway is None:
        from haif.runtime.supervisor import read_state

        assert cluster_dir is not None
        gateway = read_state(cluster_dir)["gateway_url"]
    if args.faults and not scenario.faults:
        console.print(f"[yellow]{args.source} has no faults to run[/]")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with Progress(
        TextColumn("replay"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} not ok"),
        console=console,
        transient=True,
        disable=args.quiet,
    ) as progress:
        task = progress.add_task("replay", total=len(requests), failed=0)
        failed = 0

        def on_done(record: RequestRecord) -> None:
            nonlocal failed
            failed += record.status != "ok"
            progress.update(task, advance=1, failed=failed)

        run = asyncio.run(
            replay_with_faults(
                requests,
                gateway,
                scenario=scenario if args.faults else None,
                cluster_dir=cluster_dir,
                speed=args.speed,
                headers=headers,
                timeout_s=args.timeout_s,
                on_done=on_done,
                log_event=lambda text: progress.console.print(text),
            )
        )
    out = Path(args.out)
    records = run.records
    write_parquet(records, out / "records.parquet")
    summary = summarize(records)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not args.quiet:
        _print_summary(console, summary, run.wall_s, out)
    return 0


def _print_summary(console: Any, summary: dict[str, Any], wall_s: float, out: Path) -> None:
    from rich.table import Table

    table = Table(title="replay")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("requests", str(summary["requests"]))
    for status, n in summary["by_status"].items():
        table.add_row(f"  {status}", str(n))
    for key in ("ttft_p50_s", "ttft_p99_s", "latency_p50_s", "latency_p99_s"):
        value = summary[key]
        table.add_row(key.removesuffix("_s"), "n/a" if value is None else f"{value:.3f} s")
    table.add_row("wall time", f"{wall_s:.1f} s")
    console.print(table)
    console.print(f"records: {out / 'records.parquet'}")
