"""The ``compare``, ``query``, ``regress``, ``sweep``, ``validate`` and ``calibrate`` subcommands.

:func:`add_analysis_commands` registers them on the main parser's
subparsers object; each sets ``func`` to a function taking the parsed
arguments and returning an exit code, and raises
:class:`~haif.configfile.ConfigError` for user errors (the main CLI prints
those and exits 2). The heavy modules (DuckDB, matplotlib, the simulator)
are imported when a command runs, so ``haif --help`` stays fast.

::

    haif compare RUN [RUN ...] [--out DIR] [--labels a,b]
    haif query "SQL" [--runs DIR ...] [--format table|csv|json] [--max-rows N]
    haif regress --current DIR [--baseline DIR] [--thresholds YAML] [--report PATH] [--exact]
    haif regress --run-canonical --out DIR [--no-compare] [--baseline DIR] ...
    haif regress --refresh-baseline [--baseline DIR] [--canonical YAML]
    haif sweep SWEEP.yaml [--out DIR] [--executor local|ray] [--address ADDR]
               [--workers N] [--resume/--no-resume]
    haif validate [--out DIR] [--quick] [--no-queueing]
    haif calibrate RECORDS [--out YAML] [--gpu G] [--model M] [--as-gpu NAME]
                   [--as-model NAME] [--base GPU] [--catalog YAML] [--overhead S]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from haif.configfile import ConfigError

if TYPE_CHECKING:
    from haif.analysis.regress import CanonicalRun


def _console() -> Console:
    """stdout; wide when it is not a terminal, so tables written to files do not wrap."""
    return Console(width=None if sys.stdout.isatty() else 160)


def _cmd_compare(args: argparse.Namespace) -> int:
    from haif.analysis.compare import (
        compare_runs,
        parse_labels,
        print_comparison,
        write_comparison,
    )

    labels = parse_labels(args.labels, len(args.runs))
    comparison = compare_runs(args.runs, labels)
    console = _console()
    print_comparison(comparison, console)
    paths = write_comparison(comparison, args.out)
    console.print(f"comparison: {paths[0]}", highlight=False)
    return 0


def _cmd_query(args: argparse.Namespace) -> int:
    from haif.analysis.query import (
        DEFAULT_ROOT,
        discover_runs,
        resolve_runs,
        run_query,
        write_result,
    )

    if args.runs:
        runs = resolve_runs(args.runs)
    else:
        runs = discover_runs(DEFAULT_ROOT)
        if not runs:
            raise ConfigError(
                f"query: no run folders under {DEFAULT_ROOT}/ (none holds records.parquet); "
                "give them with --runs DIR"
            )
    result = run_query(args.sql, runs)
    write_result(result, args.format, sys.stdout, max_rows=args.max_rows)
    return 0


def _cmd_regress(args: argparse.Namespace) -> int:
    from haif.analysis import regress

    modes = [
        name
        for name, on in (
            ("--current", args.current is not None),
            ("--run-canonical", args.run_canonical),
            ("--refresh-baseline", args.refresh_baseline),
        )
        if on
    ]
    if len(modes) != 1:
        raise ConfigError(
            "regress: give exactly one of --current DIR, --run-canonical --out DIR "
            f"or --refresh-baseline (got {', '.join(modes) or 'none'})"
        )
    if args.run_canonical and args.out is None:
        raise ConfigError("regress --run-canonical: give --out DIR for the runs")
    if args.out is not None and not args.run_canonical:
        raise ConfigError("regress: --out only goes with --run-canonical")
    if args.no_compare and not args.run_canonical:
        raise ConfigError("regress: --no-compare only goes with --run-canonical")

    console = _console()
    baseline = Path(args.baseline)

    def progress(entry: CanonicalRun, index: int, total: int, seconds: float) -> None:
        if not args.quiet:
            console.print(
                f"[{index + 1}/{total}] {entry.name}: {entry.scenario} "
                f"(seed {entry.seed}) in {seconds:.1f} s",
                highlight=False,
            )

    if args.refresh_baseline:
        summaries = regress.refresh_baseline(args.canonical, baseline, progress=progress)
        console.print(f"baseline refreshed: {baseline} ({len(summaries)} scenario(s))")
        return 0

    if args.run_canonical:
        current = Path(args.out)
        regress.run_canonical(args.canonical, current, progress=progress)
        if args.no_compare:
            console.print(f"canonical runs written to {current}", highlight=False)
            return 0
        if not baseline.is_dir():
            raise ConfigError(
                f"{baseline}: no baseline to compare with; create it with "
                "`haif regress --refresh-baseline` (or pass --no-compare)"
            )
    else:
        current = Path(args.current)

    thresholds_path = Path(args.thresholds)
    thresholds = regress.load_thresholds(thresholds_path)
    report = regress.compare_sets(
        baseline, current, thresholds, thresholds_path=thresholds_path, exact=args.exact
    )
    regress.print_report(report, console, verbose=not args.quiet)
    path = regress.write_markdown(report, args.report or current / "regress.md")
    console.print(f"report: {path}", highlight=False)
    return 1 if report.failed else 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from haif.analysis.sweep import print_sweep, run_sweep

    console = _console()
    result = run_sweep(
        args.sweep,
        args.out,
        executor=args.executor,
        workers=args.workers,
        address=args.address,
        resume=args.resume,
        console=console,
    )
    print_sweep(result, console)
    return 1 if result.failed else 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from rich.table import Table

    from haif.analysis.validation import (
        all_checks,
        format_error,
        verdict,
        write_validation,
    )

    console = _console()
    with console.status("validating") as status:
        checks = all_checks(
            queueing=args.queueing,
            quick=args.quick,
            progress=lambda text: status.update(f"validating: {text}"),
        )
    table = Table(title="How far to trust the simulator")
    for column, right in (
        ("check", False),
        ("compared", True),
        ("worst error", True),
        ("mean abs.", True),
        ("sample", False),
        ("within bound", False),
    ):
        table.add_column(column, justify="right" if right else "left", overflow="fold")
    for c in checks:
        worst, mean = format_error(c)
        table.add_row(
            f"{c.group}: {c.name}",
            str(c.figures),
            worst,
            mean,
            "in sample" if c.in_sample else "out of sample",
            verdict(c),
        )
    console.print(table)
    md, js = write_validation(checks, args.out)
    console.print(f"written: {md}, {js}", highlight=False)
    failed = [c for c in checks if not c.passed]
    for c in failed:
        console.print(f"[red]FAILED[/red] {c.group}: {c.name}", highlight=False)
    return 1 if failed else 0


def add_analysis_commands(subparsers: Any) -> None:
    """Register ``compare``, ``query``, ``regress`` and ``sweep`` on an argparse subparsers
    object."""
    from haif.analysis.query import FORMATS
    from haif.analysis.regress import DEFAULT_BASELINE, DEFAULT_CANONICAL, DEFAULT_THRESHOLDS

    cmp = subparsers.add_parser(
        "compare",
        help="compare run folders side by side",
        description="Compare run folders (haif sim reports or live records.parquet) "
        "side by side, with deltas against the first.",
    )
    cmp.add_argument("runs", nargs="+", metavar="RUN", help="run folder (holds records.parquet)")
    cmp.add_argument(
        "--out",
        default=str(Path("reports") / "compare"),
        help="where compare.md and the figures go (default reports/compare)",
    )
    cmp.add_argument("--labels", help="comma-separated run labels (default: folder names)")
    cmp.set_defaults(func=_cmd_compare)

    qry = subparsers.add_parser(
        "query",
        help="SQL (DuckDB) over the Parquet files of runs",
        description="Run SQL (DuckDB) over runs: views records / timeseries / utilization "
        "(all runs, with a run column), <run>_records etc. (one run), a runs table, and for "
        "haif sweep cells a sweep_cells table (scenario, seed and grid values per run) and a "
        "sweep_aggregate view.",
    )
    qry.add_argument("sql", help="the SQL query")
    qry.add_argument(
        "--runs",
        nargs="+",
        metavar="DIR",
        help="run folders, haif sweep output folders, or folders of those (default: every "
        "subfolder of reports/ holding records.parquet, and the cells of every sweep there)",
    )
    qry.add_argument("--format", choices=FORMATS, default="table", help="output (default table)")
    qry.add_argument(
        "--max-rows",
        type=int,
        default=200,
        help="rows shown by --format table (default 200; -1 for all)",
    )
    qry.set_defaults(func=_cmd_query)

    reg = subparsers.add_parser(
        "regress",
        help="check runs against the committed regression baseline",
        description="Compare runs with a baseline under per-metric thresholds (exit 1 on a "
        "regression), run the canonical scenario set, or refresh the baseline.",
    )
    reg.add_argument(
        "--baseline",
        default=str(DEFAULT_BASELINE),
        help=f"baseline folder (default {DEFAULT_BASELINE})",
    )
    reg.add_argument("--current", help="run folder, or folder of runs, to check")
    reg.add_argument(
        "--thresholds",
        default=str(DEFAULT_THRESHOLDS),
        help=f"thresholds YAML (default {DEFAULT_THRESHOLDS})",
    )
    reg.add_argument("--report", help="Markdown report path (default <current>/regress.md)")
    reg.add_argument(
        "--run-canonical",
        action="store_true",
        help="run the canonical set into --out, then check it against --baseline",
    )
    reg.add_argument("--out", help="folder for --run-canonical's runs")
    reg.add_argument(
        "--no-compare", action="store_true", help="with --run-canonical: only run the set"
    )
    reg.add_argument(
        "--refresh-baseline",
        action="store_true",
        help="rerun the canonical set into --baseline, replacing it (deliberately!)",
    )
    reg.add_argument(
        "--canonical",
        default=str(DEFAULT_CANONICAL),
        help=f"canonical scenario set (default {DEFAULT_CANONICAL})",
    )
    reg.add_argument(
        "--exact",
        action="store_true",
        help="also require every summary.json to equal the baseline's",
    )
    reg.add_argument("-q", "--quiet", action="store_true", help="print only failures")
    reg.set_defaults(func=_cmd_regress)

    swp = subparsers.add_parser(
        "sweep",
        help="run scenarios over a grid of overrides and seeds, and aggregate",
        description="Run every cell (scenario x grid point x seed) of a sweep file, in "
        "parallel processes or Ray tasks, resuming finished cells; aggregate each metric "
        "over the seeds (mean, std, 95 % confidence interval) into results.parquet, "
        "aggregate.parquet and sweep.md. A grid point is named the winner of a metric only "
        "when its mean is the best and its interval overlaps no other point's; otherwise "
        "the sweep says there is no clear winner. haif query --runs OUT reads the cells. "
        "Exit 1 if any cell failed.",
    )
    swp.add_argument("sweep", metavar="SWEEP.yaml", help="sweep file, e.g. sweeps/placement.yaml")
    swp.add_argument("--out", help="output folder (default reports/sweep-<name>)")
    swp.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: a process pool; ray: Ray tasks (default local)",
    )
    swp.add_argument(
        "--address",
        help="with --executor ray: the Ray cluster to connect to (default: start a local one)",
    )
    swp.add_argument(
        "--workers",
        type=int,
        default=None,
        help="parallel cells: processes, or the local Ray instance's CPUs "
        "(default: the number of CPUs)",
    )
    swp.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip cells whose summary.json exists with the same settings (default: on)",
    )
    swp.set_defaults(func=_cmd_sweep)

    val = subparsers.add_parser(
        "validate",
        help="every check of the simulator against published figures and queueing theory",
        description="Compare the simulator with numbers no one here chose: LambdaLabs' vLLM "
        "benchmarks replayed through the batching engine, Splitwise's Llama-2-70B step times "
        "(the packaged fit, and a fit on half the cells against the other half), the prefix "
        "cache against an exact LRU replay of the Mooncake trace, and M/M/c and M/D/1 queues "
        "against their closed forms. Prints one table (worst and mean error, in or out of "
        "sample, and why a row is outside its bound) and writes validation.md and "
        "validation.json to --out. Exit 1 if a row is outside its bound with no explanation "
        "or a queueing interval is wider than it was sized for.",
    )
    val.add_argument("--out", default="reports/validation", help="output folder")
    val.add_argument(
        "--quick",
        action="store_true",
        help="the queueing checks on their quick subset (about a minute instead of several)",
    )
    val.add_argument(
        "--queueing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the queueing-theory simulations (default: on)",
    )
    val.set_defaults(func=_cmd_validate)

    from haif.analysis.calibrate import add_calibrate_command

    add_calibrate_command(subparsers)
