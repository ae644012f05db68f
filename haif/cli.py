"""The ``haif`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from haif.analysis.cli import add_analysis_commands
from haif.analysis.parity import add_parity_command
from haif.configfile import ConfigError
from haif.runtime.artifacts_cli import add_artifact_commands
from haif.runtime.cluster_keys import add_cluster_auth_args
from haif.runtime.dlq_cli import add_dlq_commands
from haif.runtime.replay import add_replay_command
from haif.runtime.worker import add_worker_args

err_console = Console(stderr=True, soft_wrap=True)


def _cmd_sim(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from haif.fleet.scenario import load_scenario
    from haif.sim.driver import run_scenario
    from haif.sim.report import write_report

    overrides = list(args.set or [])
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    scenario = load_scenario(args.scenario, overrides)
    out = Path(args.out) if args.out else Path("reports") / scenario.name
    console = Console()
    with Progress(
        TextColumn(f"[bold]simulating {scenario.name}"),
        BarColumn(),
        TextColumn("{task.fields[t]:>7.0f} / {task.total:.0f} s simulated"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=args.quiet,
    ) as progress:
        end = scenario.duration_s + scenario.drain_s
        task = progress.add_task("sim", total=end, t=0.0)
        result = run_scenario(
            scenario,
            progress=lambda t, _end: progress.update(task, completed=t, t=t),
        )
    summary = write_report(result, out)
    if not args.quiet:
        table = Table(title=f"{scenario.name} (seed {scenario.seed})")
        table.add_column("metric")
        table.add_column("value", justify="right")
        rate = summary["success_rate"]
        table.add_row("requests", str(summary["requests"]))
        table.add_row("success rate", "n/a" if rate is None else f"{rate:.2%}")
        for key in ("latency_p50_s", "latency_p99_s", "ttft_p50_s"):
            value = summary[key]
            table.add_row(key.removesuffix("_s"), "n/a" if value is None else f"{value:.3f} s")
        table.add_row("retried", str(summary["retried"]))
        table.add_row("dead-lettered", str(summary["dead_letters"]))
        table.add_row(
            "wall time",
            f"{result.wall_s:.1f} s ({summary['requests'] / max(result.wall_s, 1e-9):,.0f} req/s)",
        )
        console.print(table)
        console.print(f"report: {out / 'report.md'}")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from haif.runtime.cluster import run_cluster

    return run_cluster(args.config, data_dir=Path(args.data_dir), port=args.port)


def _cmd_service(args: argparse.Namespace) -> int:
    from haif.runtime.services import run_service

    return run_service(args.command, args)


def _cmd_keys(args: argparse.Namespace) -> int:
    from haif.runtime.services import add_key, revoke_key

    if args.keys_command == "add":
        key = add_key(args.store, args.tenant, args.name)
        print(key, flush=True)
        err_console.print(
            f"API key for tenant {args.tenant!r} stored (as a hash) in {args.store}; "
            "this is the only time it is shown.",
            highlight=False,
        )
        return 0
    if revoke_key(args.store, args.key):
        err_console.print("key revoked", highlight=False)
        return 0
    err_console.print("[bold red]error:[/] no such active key", highlight=False)
    return 1


def _add_gateway_serving_args(parser: argparse.ArgumentParser) -> None:
    """How a gateway serves clients (``haif gateway``, ``haif orchestrator --gateway-port``)."""
    parser.add_argument(
        "--shutdown-timeout-s",
        type=float,
        default=10.0,
        help="on SIGTERM, how long in-flight streams may run on (default 10)",
    )
    parser.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="serve HTTPS with this certificate chain (with --tls-key); default plain HTTP",
    )
    parser.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haif", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("sim", help="simulate a scenario and write a report")
    sim.add_argument("scenario", help="scenario YAML file, e.g. scenarios/failover.yaml")
    sim.add_argument("--seed", type=int, help="override the scenario's seed")
    sim.add_argument("--out", help="report directory (default reports/<scenario name>)")
    sim.add_argument(
        "--set",
        action="append",
        metavar="PATH=VALUE",
        help="override a scenario field, e.g. --set workload.rate=30",
    )
    sim.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")
    sim.set_defaults(func=_cmd_sim)

    up = sub.add_parser("up", help="start a local cluster (gateway, orchestrator, workers)")
    up.add_argument("config", nargs="?", help="cluster YAML (default: built-in 2 workers)")
    up.add_argument("--port", type=int, default=None, help="gateway port (default 8080)")
    up.add_argument("--data-dir", default=".haif", help="store and logs (default .haif)")
    up.set_defaults(func=_cmd_up)

    orch = sub.add_parser("orchestrator", help="run one orchestrator")
    orch.add_argument("--host", default="127.0.0.1")
    orch.add_argument("--port", type=int, required=True)
    orch.add_argument(
        "--store", required=True, help="metadata store: a DuckDB file or a postgresql:// URL"
    )
    orch.add_argument("--config", help="cluster YAML holding the policy")
    orch.add_argument("--seed", type=int, default=0)
    orch.add_argument(
        "--idle-timeout-s",
        type=float,
        default=10.0,
        help="fail an attempt when its worker sends nothing for this long (default 10)",
    )
    orch.add_argument(
        "--gateway-port",
        type=int,
        help="also serve the client API (the gateway) on this port, in this process: "
        "it calls the orchestrator directly, without an RPC hop",
    )
    _add_gateway_serving_args(orch)  # with --gateway-port
    add_cluster_auth_args(orch)
    orch.set_defaults(func=_cmd_service)

    worker = sub.add_parser("worker", help="run one worker")
    add_worker_args(worker)
    worker.set_defaults(func=_cmd_service)

    gw = sub.add_parser("gateway", help="run one gateway")
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, required=True)
    gw.add_argument("--orchestrator", required=True, help="orchestrator base URL")
    gw.add_argument("--region", default="local")
    gw.add_argument("--config", help="cluster YAML holding the auth settings")
    gw.add_argument(
        "--idle-timeout-s",
        type=float,
        default=15.0,
        help="give up on the orchestrator when it sends nothing for this long (default 15)",
    )
    _add_gateway_serving_args(gw)
    add_cluster_auth_args(gw)
    gw.set_defaults(func=_cmd_service)

    keys = sub.add_parser("keys", help="manage API keys in the store")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    add = keys_sub.add_parser("add", help="create an API key; prints it once")
    add.add_argument("--tenant", required=True, help="the tenant the key acts for")
    add.add_argument("--name", default="", help="a label for the key")
    add.add_argument(
        "--store",
        default=".haif/store.duckdb",
        help="DuckDB file or postgresql:// URL (default .haif/store.duckdb)",
    )
    add.set_defaults(func=_cmd_keys)
    revoke = keys_sub.add_parser("revoke", help="revoke an API key")
    revoke.add_argument("key", help="the key, or its SHA-256 hex digest")
    revoke.add_argument("--store", default=".haif/store.duckdb")
    revoke.set_defaults(func=_cmd_keys)

    add_analysis_commands(sub)
    add_replay_command(sub)
    add_parity_command(sub)
    add_dlq_commands(sub)
    add_artifact_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
