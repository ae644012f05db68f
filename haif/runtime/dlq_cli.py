"""``haif dlq``: inspect and replay the dead-letter queue.

A request the control core gave up on (``DeadLetter``: its retries were
exhausted) is parked in the metadata store with the request as the caller
sent it and the reason. Commands::

    haif dlq list [--data-dir .haif | --store PATH_OR_URL | --orchestrator URL] [--json]
    haif dlq show ID [--data-dir .haif | --store PATH_OR_URL | --orchestrator URL] [--json]
    haif dlq replay ID [--data-dir .haif | --orchestrator URL] [--timeout-s 300]

By default they ask the orchestrator of the ``haif up --data-dir .haif``
that is running (its address is in ``.haif/cluster.json``; calls are sealed
with the cluster's ``admin`` key, ``.haif/keys/admin.key``), and ``list`` /
``show`` read ``.haif/store.duckdb`` when no cluster runs
(:mod:`haif.runtime.cluster_access`). ``--orchestrator URL`` asks another
orchestrator (sealed with ``--cluster-key`` / ``--cluster-keyring``), and
``--store`` (a DuckDB file or a ``postgresql://`` URL) reads a store
directly: DuckDB allows one process per file, so not one a cluster runs
on; a PostgreSQL store can be read at any time.

``replay`` asks the orchestrator (RPC ``dlq_replay``) to resubmit the stored
request through the normal path — same tenant and body, every decision the
core's — and to remove it from the queue once the replay succeeds. A replay
that fails again leaves the entry (with the new reason) in the queue. The
exit status is 0 on success, 1 for an unknown id or a failed replay, 2 when
the store or the orchestrator cannot be reached.

Not in ``haif/cli.py`` yet? ``python -m haif.runtime.dlq_cli dlq ...`` runs
the same commands.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from haif.configfile import ConfigError
from haif.contracts import Request
from haif.runtime.cluster_access import Target, add_target_args, call, resolve
from haif.runtime.messages import SubmitReply

DEFAULT_STORE = ".haif/store.duckdb"
_LOCK_HINT = (
    "DuckDB allows one process per file: while a cluster runs on it, ask its "
    "orchestrator instead (the default while `haif up --data-dir` runs, or --orchestrator URL)"
)


class DlqNotFound(Exception):
    """No dead letter with that id."""


def add_dlq_commands(subparsers: Any) -> None:
    """Register ``haif dlq list|show|replay`` on the CLI's subparsers."""
    dlq = subparsers.add_parser("dlq", help="inspect and replay dead-lettered requests")
    sub = dlq.add_subparsers(dest="dlq_command", required=True)

    def source(p: argparse.ArgumentParser, *, store: bool = True) -> None:
        add_target_args(p, store=store)

    lst = sub.add_parser("list", help="list the dead letters, oldest first")
    source(lst)
    lst.add_argument("--json", action="store_true", help="one JSON array")
    lst.set_defaults(func=run_dlq)

    show = sub.add_parser("show", help="print a dead letter's request and reason")
    show.add_argument("request_id")
    source(show)
    show.add_argument("--json", action="store_true", help="one JSON object")
    show.set_defaults(func=run_dlq)

    replay = sub.add_parser("replay", help="resubmit a dead letter; remove it if it succeeds")
    replay.add_argument("request_id")
    source(replay, store=False)
    replay.add_argument(
        "--timeout-s", type=float, default=300.0, help="give up waiting after (default 300)"
    )
    replay.set_defaults(func=run_dlq)


def run_dlq(args: argparse.Namespace) -> int:
    command = args.dlq_command
    try:
        if command == "list":
            rows = asyncio.run(_list(args))
            _print_list(rows, as_json=args.json)
            return 0
        if command == "show":
            row = asyncio.run(_show(args))
            _print_show(row, as_json=args.json)
            return 0
        if command == "replay":
            return _print_replay(asyncio.run(_replay(args)))
    except DlqNotFound as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    raise ValueError(f"unknown dlq command {command!r}")


# ------------------------------------------------------------------ sources


async def _from_store(url: str, request_id: str | None) -> Any:
    from haif.runtime.dead_letters import view
    from haif.runtime.services import store_error
    from haif.runtime.store import open_store, store_backend

    backend, target = store_backend(url) if "://" in url else ("duckdb", url)
    if backend == "duckdb" and target != ":memory:" and not Path(target).exists():
        raise ConfigError(f"no store at {target} (--store: a DuckDB file or postgresql:// URL)")
    try:
        store = await open_store(url)
    except Exception as exc:
        raise ConfigError(store_error(url, exc, _LOCK_HINT)) from None
    try:
        if request_id is None:
            return [view(row) for row in await store.list_dead_letters()]
        found = await store.get_dead_letter(request_id)
        if found is None:
            raise DlqNotFound(f"no dead letter {request_id!r} in {_redact(url)}")
        return view(found)
    finally:
        await store.close()


async def _call(target: Target, method: str, body: Any, timeout_s: float = 30.0) -> Any:
    from haif.runtime.rpc import RpcError, RpcUnavailable

    url = target.orchestrator
    if url is None:
        raise ConfigError(
            f"{method.replace('_', ' ')} needs a running orchestrator: start the cluster "
            "(haif up) or give --orchestrator URL"
        )
    try:
        return await call(target, method, body, timeout_s)
    except RpcUnavailable as exc:
        raise ConfigError(f"orchestrator {url} unavailable: {exc}") from None
    except RpcError as exc:
        if exc.code == "not_found":
            raise DlqNotFound(exc.message) from None
        if exc.code == "unknown_method":
            raise ConfigError(
                f"{url} does not serve the dead-letter queue (not an orchestrator?)"
            ) from None
        raise ConfigError(f"orchestrator {url}: {exc}") from None


async def _list(args: argparse.Namespace) -> list[dict[str, Any]]:
    target = resolve(args)
    if target.orchestrator:
        rows = await _call(target, "dlq_list", None)
        if not isinstance(rows, list):
            raise ConfigError(f"orchestrator {target.orchestrator}: bad dlq_list reply")
        return [r for r in rows if isinstance(r, dict)]
    assert target.store is not None
    rows = await _from_store(target.store, None)
    assert isinstance(rows, list)
    return rows


async def _show(args: argparse.Namespace) -> dict[str, Any]:
    target = resolve(args)
    if target.orchestrator:
        row = await _call(target, "dlq_show", args.request_id)
    else:
        assert target.store is not None
        row = await _from_store(target.store, args.request_id)
    if not isinstance(row, dict):
        raise ConfigError("bad dlq_show reply")
    return row


async def _replay(args: argparse.Namespace) -> dict[str, Any]:
    target = resolve(args)
    answer = await _call(target, "dlq_replay", args.request_id, args.timeout_s)
    if not isinstance(answer, dict) or not isinstance(answer.get("reply"), SubmitReply):
        raise ConfigError(f"orchestrator {target.orchestrator}: bad dlq_replay reply")
    return answer


def _redact(url: str) -> str:
    from haif.runtime.cluster import redact

    return redact(url)


# ------------------------------------------------------------------ output


def _when(created_s: Any) -> str:
    try:
        return datetime.fromtimestamp(float(created_s), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (TypeError, ValueError, OverflowError, OSError):
        return str(created_s)


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    request = out.get("request")
    if isinstance(request, Request):
        out["request"] = dataclasses.asdict(request)
    return out


def _print_list(rows: list[dict[str, Any]], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps([_plain(r) for r in rows], indent=2), flush=True)
        return
    if not rows:
        print("no dead letters", flush=True)
        return
    table = [("REQUEST ID", "TENANT", "MODEL", "ATTEMPTS", "DEAD-LETTERED (UTC)", "REASON")]
    for r in rows:
        req = r.get("request")
        tenant = req.tenant if isinstance(req, Request) else "?"
        model = req.model if isinstance(req, Request) else "?"
        table.append(
            (
                str(r["request_id"]),
                tenant,
                model,
                str(r["attempts"]),
                _when(r["created_s"]),
                str(r["reason"]),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]), flush=True)
    print(f"{len(rows)} dead letter(s)", flush=True)


def _print_show(row: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_plain(row), indent=2), flush=True)
        return
    print(f"request id:    {row['request_id']}")
    print(f"reason:        {row['reason']}")
    print(f"attempts:      {row['attempts']}")
    print(f"dead-lettered: {_when(row['created_s'])}")
    print("request:")
    request = _plain(row).get("request")
    if isinstance(request, dict):
        for key, value in request.items():
            print(f"  {key}: {json.dumps(value)}")
    sys.stdout.flush()


def _print_replay(answer: dict[str, Any]) -> int:
    reply: SubmitReply = answer["reply"]
    rec = reply.record
    rid = answer.get("request_id")
    if answer.get("ok"):
        removed = (
            "removed from the dead-letter queue"
            if answer.get("removed")
            else "already gone from the dead-letter queue"
        )
        print(
            f"replayed {rid} as {rec.request_id}: ok, {rec.output_tokens} tokens on "
            f"{rec.worker_id}; {removed}",
            flush=True,
        )
        return 0
    why = f"refused ({reply.reject.status} {reply.reject.reason})" if reply.reject else rec.status
    reason = f": {rec.reason}" if rec.reason and not reply.reject else ""
    print(
        f"error: replay of {rid} (as {rec.request_id}) {why}{reason}; "
        "it stays in the dead-letter queue",
        file=sys.stderr,
        flush=True,
    )
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m haif.runtime.dlq_cli dlq ...`` (the same as ``haif dlq ...``)."""
    parser = argparse.ArgumentParser(prog="haif")
    sub = parser.add_subparsers(dest="command", required=True)
    add_dlq_commands(sub)
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
