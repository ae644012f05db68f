"""The ``haif`` command line.

The top-level help lists the commands in three groups (:data:`COMMAND_GROUPS`):
what users run to simulate and analyse, what they run against a cluster,
and the services ``haif up`` starts (run by hand to place one elsewhere).
Every description and flag is written for users: :func:`check_help` finds
docstring markup or a flag without help, and the tests run it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import re
import signal
import sys
import textwrap
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from haif.configfile import ConfigError
from haif.runtime.cluster_keys import add_cluster_auth_args
from haif.runtime.cluster_tls import add_cluster_tls_args
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
    from haif.runtime.cluster import UpFlags, run_cluster

    if args.schema:
        from haif.runtime.cluster_schema import reference

        print(reference(), end="", flush=True)
        return 0
    flags = UpFlags(
        host=args.host,
        gateway_port=args.port,
        orchestrator_port=args.orchestrator_port,
        standby_port=args.standby_port,
        control_port=args.control_port,
        worker_port=args.worker_port,
        store=args.store,
    )
    return run_cluster(args.config, data_dir=Path(args.data_dir), flags=flags)


def _cmd_service(args: argparse.Namespace) -> int:
    from haif.runtime.services import run_service

    return run_service(args.command, args)


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0-65535 (0: a free one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, not {value}")
    return value


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
    parser.add_argument(
        "--listen-fd",
        type=int,
        metavar="FD",
        help="serve on this inherited listening socket instead of binding --host/--port "
        "(haif supervise holds the gateway's socket, so a new gateway takes over the port "
        "without refusing or dropping a connection)",
    )
    from haif.runtime.gateway import add_edge_args

    add_edge_args(parser)  # deadlines and the connection cap


DESCRIPTION = (
    "HAIF: simulate a multi-region LLM inference fleet against real traces and failures, "
    "compare control policies, and run the same control code as a live cluster."
)

COMMAND_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "simulate and analyse",
        ("sim", "sweep", "compare", "query", "regress", "calibrate", "validate"),
    ),
    (
        "run a cluster",
        ("up", "deploy", "replay", "parity", "keys", "dlq", "certs", "artifacts"),
    ),
    (
        "services (haif up starts them; run one by hand to place it on another machine)",
        ("gateway", "orchestrator", "worker", "supervise"),
    ),
)
"""Top-level help: (heading, commands) in order; every command is in exactly one group."""

_REPLAY_DESCRIPTION = """\
Send the requests of a trace (Azure CSV, Mooncake JSONL) or of a scenario's
workload to a live cluster at their arrival times, open loop (--speed
compresses time), streaming through the gateway's /v1/completions, and time
each one at the client. The records have the simulator's schema
(reports/replay/records.parquet by default), so haif compare and haif query
read a live run like a simulated one. With --faults the scenario's fault
schedule runs too, against the processes of the cluster --cluster names.
"""

# Flags that modules outside the CLI register without help, and what to show.
_MISSING_HELP: dict[tuple[str, str], str] = {
    ("worker", "host"): "address to listen on (default 127.0.0.1)",
    ("worker", "port"): "port to listen on",
    ("worker", "worker_id"): "this worker's id, unique in the cluster",
    ("worker", "region"): "the region this worker announces",
    ("worker", "gpu_class"): "the GPU class it announces and, with profile timings, is "
    "timed by (default A100-80G)",
    ("worker", "capacity"): "requests it runs at once (default 8)",
    ("worker", "ttft_s"): "synthetic, fixed timing: time to first token (default 0.01)",
    ("worker", "heartbeat_s"): "seconds between heartbeats to the orchestrator (default 0.5)",
    ("dlq show", "request_id"): "the dead-lettered request's id (haif dlq list shows them)",
    ("dlq replay", "request_id"): "the dead-lettered request's id (haif dlq list shows them)",
    ("artifacts make-tiny", "name"): "artifact name (default: the tiny model's)",
    ("artifacts make-tiny", "version"): "artifact version (default: the tiny model's)",
    ("artifacts publish", "store"): "artifact store directory",
    ("artifacts publish", "name"): "artifact name",
    ("artifacts publish", "version"): "artifact version",
    ("artifacts publish", "engine"): "engine that loads it (default transformers)",
    ("artifacts verify", "store"): "artifact store directory",
    ("artifacts verify", "name"): "artifact name",
    ("artifacts verify", "version"): "artifact version",
    ("artifacts list", "store"): "artifact store directory",
}

_MARKUP = re.compile(r":(?:mod|func|class|meth|data|attr|exc):`|``|%%")


def version() -> str:
    """``haif 0.1.0 (Python 3.11.9)``: the installed package's version."""
    try:
        number = importlib.metadata.version("haif")
    except importlib.metadata.PackageNotFoundError:
        number = "unknown (not installed)"
    return f"haif {number} (Python {platform.python_version()})"


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[Any] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def walk_parsers(
    parser: argparse.ArgumentParser, name: str = ""
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(command path, parser) of ``parser`` and every sub-command below it."""
    yield name, parser
    sub = _subparsers(parser)
    if sub is not None:
        for child, subparser in sub.choices.items():
            yield from walk_parsers(subparser, f"{name} {child}".strip())


def check_help(parser: argparse.ArgumentParser) -> list[str]:
    """What is wrong with the help texts: docstring markup, a "%%" shown as such, a
    command, flag or argument without help. Empty when all is well."""
    problems: list[str] = []
    for name, p in walk_parsers(parser):
        where = f"haif {name}".strip()
        if p.description and _MARKUP.search(p.description):
            problems.append(f"{where}: docstring markup in the description")
        for action in p._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                continue
            label = "/".join(action.option_strings) or action.dest
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    if not choice.help:
                        problems.append(f"{where} {choice.dest}: no help")
                continue
            if action.help is None or not action.help.strip():
                problems.append(f"{where} {label}: no help")
            elif action.help is not argparse.SUPPRESS and _MARKUP.search(action.help % {}):
                problems.append(f"{where} {label}: markup in the help")
    return problems


def _fill_missing_help(parser: argparse.ArgumentParser) -> None:
    for name, p in walk_parsers(parser):
        for action in p._actions:
            text = _MISSING_HELP.get((name, action.dest))
            if action.help is None and text is not None:
                action.help = text


def _top_level_help(sub: argparse._SubParsersAction[Any]) -> str:
    """The description of ``haif``: what it is, then the commands in their groups."""
    helps = {c.dest: c.help or "" for c in sub._choices_actions}
    grouped = [c for _, names in COMMAND_GROUPS for c in names]
    missing = sorted(set(helps) - set(grouped))
    extra = sorted(set(grouped) - set(helps))
    if missing or extra or len(grouped) != len(set(grouped)):
        raise AssertionError(f"COMMAND_GROUPS: ungrouped {missing}, unknown {extra}")
    width = max(len(c) for c in helps) + 2
    lines = [textwrap.fill(DESCRIPTION, width=79)]
    for heading, names in COMMAND_GROUPS:
        lines += ["", f"{heading}:"]
        lines += [
            textwrap.fill(
                helps[c],
                width=79,
                initial_indent=f"  {c:<{width}}",
                subsequent_indent=" " * (width + 2),
            )
            for c in names
        ]
    lines += ["", "Run 'haif COMMAND --help' for a command's options."]
    return "\n".join(lines)


#: The services ``haif up`` starts: their processes parse only their own command
#: (:func:`main`), without importing the analysis stack (pandas, matplotlib:
#: about 2 s of CPU at every start, paid again by each restarted service).
SERVICE_COMMANDS = frozenset({"orchestrator", "worker", "gateway"})


def build_parser(*, services_only: bool = False) -> argparse.ArgumentParser:
    """The whole command line; with ``services_only``, the service commands alone."""
    parser = argparse.ArgumentParser(
        prog="haif", formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--version", action="version", version=version(), help="show the version and exit"
    )
    # The commands are listed, grouped, in the description (argparse has one flat list).
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS
    )
    parser.usage = "haif [-h] [--version] COMMAND ..."  # after the subparsers took "haif"

    sim = sub.add_parser(
        "sim",
        help="simulate a scenario and write a report",
        description="Simulate a scenario file and write its report folder: report.md with "
        "tables and figures, records.parquet (one row per request), timeseries.parquet, "
        "utilization.parquet and summary.json.",
    )
    sim.add_argument("scenario", help="scenario YAML file, e.g. scenarios/failover.yaml")
    sim.add_argument("--seed", type=int, help="override the scenario's seed")
    sim.add_argument("--out", help="report directory (default reports/<scenario name>)")
    sim.add_argument(
        "--set",
        action="append",
        metavar="PATH=VALUE",
        help="override a scenario field, e.g. --set workload.rate_scale=2 or --set "
        "workers.0.count=4 (repeatable; the value is YAML)",
    )
    sim.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")
    sim.set_defaults(func=_cmd_sim)

    up = sub.add_parser(
        "up",
        help="start a local cluster (gateway, orchestrator, workers)",
        description="Start a cluster on this machine: the orchestrator, the workers and the "
        "gateway, each its own process, until Ctrl-C; then stop them (gateway first) and "
        "export the request records to DATA_DIR/records.parquet. While it runs, "
        "DATA_DIR/cluster.json says where everything is (haif dlq and haif keys use it) and "
        "DATA_DIR/prometheus-targets.json lists every /metrics for Prometheus. The flags "
        "override the cluster YAML; clusters/ holds examples, --schema its reference.",
    )
    up.add_argument(
        "config", nargs="?", help="cluster YAML (default: two synthetic workers, no file)"
    )
    up.add_argument(
        "--host",
        default=None,
        help="address the gateway, orchestrator and workers listen on (default 127.0.0.1; "
        "0.0.0.0 for every interface)",
    )
    up.add_argument(
        "--port",
        "--gateway-port",
        dest="port",
        type=_port,
        default=None,
        help="the gateway's port (default: the YAML's gateway_port, 8080)",
    )
    up.add_argument(
        "--orchestrator-port",
        type=_port,
        default=None,
        help="the orchestrator's RPC and /metrics port (default: the YAML's, else a free one)",
    )
    up.add_argument(
        "--standby-port",
        type=_port,
        default=None,
        help="with orchestrators: 2, the standby's port (default: the YAML's, else a free one)",
    )
    up.add_argument(
        "--control-port",
        type=_port,
        default=None,
        help="the control endpoint's port, on 127.0.0.1 (default: the YAML's, else a free one)",
    )
    up.add_argument(
        "--worker-port",
        type=_port,
        default=None,
        help="the first worker's port; the others take the ports after it (default: each "
        "worker's port in the YAML, else a free one)",
    )
    up.add_argument(
        "--store",
        default=None,
        help="the metadata store, instead of the YAML's: a DuckDB file or a postgresql:// URL "
        "(default DATA_DIR/store.duckdb)",
    )
    up.add_argument(
        "--data-dir", default=".haif", help="store, keys, logs and records (default .haif)"
    )
    up.add_argument(
        "--schema",
        action="store_true",
        help="print the cluster YAML reference (every key, its type, default and meaning) and exit",
    )
    up.set_defaults(func=_cmd_up)

    orch = sub.add_parser(
        "orchestrator",
        help="run one orchestrator (places requests, retries, keeps the store)",
        description="Run one orchestrator: the control core behind the gateways. It "
        "learns of workers from their signed heartbeats, places, retries and finalizes "
        "requests, and keeps jobs, usage and dead letters in the metadata store.",
    )
    orch.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    orch.add_argument("--port", type=int, required=True, help="port to listen on")
    orch.add_argument(
        "--store", required=True, help="metadata store: a DuckDB file or a postgresql:// URL"
    )
    orch.add_argument("--config", help="cluster YAML holding the policy")
    orch.add_argument(
        "--journal",
        help="directory of the usage journal: each request's usage is fsynced there "
        "before its answer ends, and written to the store again at the next start if "
        "the store did not take it (default: none; answers then wait for the store)",
    )
    orch.add_argument(
        "--journal-no-fsync",
        action="store_true",
        help="write the journal without fsync: it then survives the orchestrator's crash "
        "but not the machine's, and no answer waits for the disk",
    )
    orch.add_argument(
        "--seed", type=int, default=0, help="seed of the placement and retry draws (default 0)"
    )
    orch.add_argument(
        "--idle-timeout-s",
        type=float,
        default=10.0,
        help="fail an attempt when its worker sends nothing for this long (default 10)",
    )
    orch.add_argument(
        "--leader-lease-s",
        type=float,
        metavar="S",
        help="one of a standby pair sharing a PostgreSQL store: take requests only while "
        "holding the store's leader lease of S seconds (default: the only orchestrator)",
    )
    orch.add_argument(
        "--gateway-port",
        type=int,
        help="also serve the client API (the gateway) on this port, in this process: "
        "it calls the orchestrator directly, without an RPC hop",
    )
    _add_gateway_serving_args(orch)  # with --gateway-port
    add_cluster_auth_args(orch)
    add_cluster_tls_args(orch)
    orch.set_defaults(func=_cmd_service)

    worker = sub.add_parser(
        "worker",
        help="run one worker (an engine that generates tokens)",
        description="Run one worker: an inference engine (synthetic, transformers, vLLM or "
        "an OpenAI-compatible upstream) that announces itself to the orchestrator and "
        "serves the attempts it is sent.",
    )
    add_worker_args(worker)
    worker.set_defaults(func=_cmd_service)

    gw = sub.add_parser(
        "gateway",
        help="run one gateway (the client API)",
        description="Run one gateway: the OpenAI-compatible client API (authentication, "
        "rate limits and quotas), forwarding each request to the orchestrator.",
    )
    gw.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    gw.add_argument("--port", type=int, required=True, help="port to listen on")
    gw.add_argument("--orchestrator", required=True, help="orchestrator base URL")
    gw.add_argument(
        "--standby",
        metavar="URL",
        help="the standby orchestrator's base URL: requests turn to it when the other "
        "is down or no longer leads",
    )
    gw.add_argument(
        "--region", default="local", help="the region this gateway serves (default local)"
    )
    gw.add_argument("--config", help="cluster YAML holding the auth settings")
    gw.add_argument(
        "--idle-timeout-s",
        type=float,
        default=15.0,
        help="give up on the orchestrator when it sends nothing for this long (default 15)",
    )
    _add_gateway_serving_args(gw)
    add_cluster_auth_args(gw)
    add_cluster_tls_args(gw)
    gw.set_defaults(func=_cmd_service)

    if services_only:
        return parser

    from haif.analysis.cli import add_analysis_commands
    from haif.analysis.parity import add_parity_command
    from haif.deploy.cli import add_deploy_command
    from haif.deploy.supervise import add_supervise_command
    from haif.runtime.api_keys import add_keys_commands
    from haif.runtime.artifacts_cli import add_artifact_commands
    from haif.runtime.certs_cli import add_certs_commands
    from haif.runtime.dlq_cli import add_dlq_commands
    from haif.runtime.replay import add_replay_command

    add_keys_commands(sub)
    add_analysis_commands(sub)
    add_replay_command(sub)
    add_parity_command(sub)
    add_dlq_commands(sub)
    add_certs_commands(sub)
    add_artifact_commands(sub)
    add_deploy_command(sub)
    add_supervise_command(sub)
    sub.choices["replay"].description = _REPLAY_DESCRIPTION
    _fill_missing_help(parser)
    parser.description = _top_level_help(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so that its cleanup runs as for Ctrl-C
    (``haif parity`` stops the cluster it started); servers install their own handler."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    services_only = bool(argv) and argv[0] in SERVICE_COMMANDS
    args = build_parser(services_only=services_only).parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    except Terminated:
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return code


if __name__ == "__main__":
    sys.exit(main())
