"""``haif query``: SQL (DuckDB) over the Parquet files of many runs.

Each run folder's Parquet files are registered as views of an in-memory
DuckDB database (nothing is copied; the files are read when a query runs):

``records`` / ``timeseries`` / ``utilization``
    the ``UNION ALL BY NAME`` of that file over every run that has it, with a
    leading ``run`` column holding the run folder's name. Runs whose time
    series have different ``served_<region>`` columns line up by name (NULL
    where a run has no such column).
``<run>_records`` / ``<run>_timeseries`` / ``<run>_utilization``
    one run's file as written, ``<run>`` being the folder name sanitised to
    an SQL identifier (:func:`view_name`: lower case, anything but letters,
    digits and ``_`` becomes ``_``, ``r_`` in front of a leading digit).
``runs``
    one row per run: ``run``, ``view`` (the sanitised prefix), ``path``,
    ``summary`` (the run's ``summary.json`` as text, NULL if none) and
    ``sweep`` (the sweep a cell belongs to, NULL for other runs).
``sweep_cells``
    one row per sweep cell among the runs: ``run``, ``sweep``, ``cell_id``,
    ``scenario`` (its label), ``seed``, ``overrides`` (``; ``-separated, in
    the order applied) and one column per grid key (e.g.
    ``"policy.placement"``) holding the cell's value as override text.
    Join it with ``records`` on ``run``.
``sweep_aggregate``
    the ``aggregate.parquet`` of every sweep among the runs (one row per
    scenario and grid point: ``<metric>_mean`` / ``_std`` / ``_n`` /
    ``_ci95``), with a leading ``sweep`` column.

Runs are given as folders (:func:`resolve_runs`): a run folder (holding
``records.parquet``), a ``haif sweep`` output folder (holding ``sweep.json``:
each finished cell under ``cells/`` is a run, named ``<sweep folder>/<cell
id>``), or a folder of those (e.g. ``reports/baseline``, ``reports``). The
default is every subfolder of ``reports/`` holding a ``records.parquet``,
and the cells of every sweep folder in it.

Output (:func:`write_result`): a rich table (``--format table``, the
default; at most ``--max-rows`` rows shown), CSV with a header row, or a
JSON array of objects (non-finite floats as ``null``). SQL errors are
raised as :class:`~haif.configfile.ConfigError` with DuckDB's message, so
the CLI prints them without a traceback and exits 2.

Example::

    haif query "SELECT run, count(*) AS n, avg(finish_s - arrival_s) AS mean_e2e
                FROM records WHERE status = 'ok' GROUP BY run ORDER BY run"
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

import duckdb
from rich.console import Console
from rich.table import Table

from haif.analysis import sweep as sweep_files
from haif.analysis.compare import RECORDS, SUMMARY, TIMESERIES, UTILIZATION
from haif.configfile import ConfigError

Format = Literal["table", "csv", "json"]
FORMATS: tuple[Format, ...] = ("table", "csv", "json")
DEFAULT_ROOT = Path("reports")
TABLES: dict[str, str] = {
    "records": RECORDS,
    "timeseries": TIMESERIES,
    "utilization": UTILIZATION,
}
"""Union view name -> the Parquet file it covers in each run folder."""

_NOT_IDENT = re.compile(r"[^0-9a-z_]")

# What `haif sweep` writes.
SWEEP_MANIFEST = sweep_files.MANIFEST
SWEEP_CELLS = sweep_files.CELLS
SWEEP_CELL_FILE = sweep_files.CELL_FILE
SWEEP_AGGREGATE = sweep_files.AGGREGATE
_SWEEP_CELL_COLUMNS: dict[str, str] = {
    "run": "VARCHAR",
    "sweep": "VARCHAR",
    "cell_id": "VARCHAR",
    "scenario": "VARCHAR",
    "seed": "BIGINT",
    "overrides": "VARCHAR",
}


def view_name(run: str) -> str:
    """A run folder name as an SQL identifier prefix: ``run-A.1`` -> ``run_a_1``."""
    name = _NOT_IDENT.sub("_", run.lower()) or "_"
    return f"r_{name}" if name[0].isdigit() else name


def is_sweep(folder: Path) -> bool:
    """Whether ``folder`` is what ``haif sweep`` writes (``sweep.json`` and ``cells/``)."""
    return (folder / SWEEP_MANIFEST).is_file() and (folder / SWEEP_CELLS).is_dir()


def sweep_of(run: Path) -> Path | None:
    """The sweep folder a run folder is a cell of (``<sweep>/cells/<id>``), else None."""
    cells = run.resolve().parent
    if cells.name == SWEEP_CELLS and is_sweep(cells.parent):
        return cells.parent
    return None


def run_name(run: Path) -> str:
    """The ``run`` column of a run folder: its name; ``<sweep>/<cell id>`` for a sweep cell."""
    sweep = sweep_of(run)
    name = run.resolve().name
    return f"{sweep.name}/{name}" if sweep is not None else name


def sweep_cells(folder: Path) -> list[Path]:
    """The finished cells (holding ``records.parquet``) of a sweep folder, by id."""
    cells = folder / SWEEP_CELLS
    return sorted(p for p in cells.iterdir() if p.is_dir() and (p / RECORDS).is_file())


def discover_runs(root: str | Path = DEFAULT_ROOT) -> list[Path]:
    """Subfolders of ``root`` holding a ``records.parquet``, and the cells of the sweep
    folders among them, sorted by name."""
    base = Path(root)
    if not base.is_dir():
        return []
    runs: list[Path] = []
    for p in sorted(base.iterdir()):
        if not p.is_dir():
            continue
        if (p / RECORDS).is_file():
            runs.append(p)
        elif is_sweep(p):
            runs.extend(sweep_cells(p))
    return runs


def resolve_runs(folders: Sequence[str | Path]) -> list[Path]:
    """Run folders from the given folders: a run folder, or a folder of run folders."""
    runs: list[Path] = []
    for item in folders:
        path = Path(item)
        if not path.is_dir():
            raise ConfigError(f"{path}: no such run folder")
        if (path / RECORDS).is_file():
            runs.append(path)
            continue
        if is_sweep(path):
            inner = sweep_cells(path)
            if not inner:
                raise ConfigError(f"{path}: a sweep folder without a finished cell")
        else:
            inner = discover_runs(path)
        if not inner:
            raise ConfigError(
                f"{path}: not a HAIF run folder ({RECORDS} is missing), not a sweep "
                f"folder ({SWEEP_MANIFEST} is missing) and none of its subfolders is one"
            )
        runs.extend(inner)
    return runs


@dataclass(frozen=True)
class RegisteredRun:
    name: str
    view: str
    path: Path
    sweep: Path | None = None  # the sweep folder of a sweep cell


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def connect(runs: Sequence[Path]) -> tuple[duckdb.DuckDBPyConnection, list[RegisteredRun]]:
    """An in-memory DuckDB with the views described in the module docstring."""
    registered: list[RegisteredRun] = []
    by_name: dict[str, Path] = {}
    by_view: dict[str, str] = {}
    for path in runs:
        name = run_name(path)
        if name in by_name:
            if by_name[name].resolve() == path.resolve():
                continue
            raise ConfigError(
                f"two runs are named {name!r} ({by_name[name]}, {path}); "
                "the run column needs distinct folder names"
            )
        view = view_name(name)
        if view in by_view:
            raise ConfigError(
                f"runs {by_view[view]!r} and {name!r} both map to the view prefix {view!r}; "
                "rename one of the folders"
            )
        by_name[name] = path
        by_view[view] = name
        registered.append(RegisteredRun(name, view, path, sweep_of(path)))

    con = duckdb.connect(":memory:")
    try:
        for union, filename in TABLES.items():
            parts: list[str] = []
            for run in registered:
                file = run.path.resolve() / filename
                if not file.is_file():
                    continue
                source = f"read_parquet({_literal(str(file))})"
                con.execute(
                    f"CREATE VIEW {_ident(run.view + '_' + union)} AS SELECT * FROM {source}"
                )
                parts.append(f"SELECT {_literal(run.name)} AS run, * FROM {source}")
            if parts:
                con.execute(f"CREATE VIEW {union} AS " + " UNION ALL BY NAME ".join(parts))
        con.execute(
            "CREATE TABLE runs (run VARCHAR, view VARCHAR, path VARCHAR, summary VARCHAR, "
            "sweep VARCHAR)"
        )
        for run in registered:
            summary = run.path / SUMMARY
            text = summary.read_text(encoding="utf-8") if summary.is_file() else None
            sweep = run.sweep.name if run.sweep is not None else None
            con.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?)",
                [run.name, run.view, str(run.path), text, sweep],
            )
        _register_sweeps(con, registered)
    except duckdb.Error as exc:
        con.close()
        raise ConfigError(f"cannot open the runs' Parquet files: {exc}") from None
    return con, registered


def _cell_manifest(run: RegisteredRun) -> dict[str, Any]:
    """A sweep cell's ``cell.json`` ``cell`` entry (``{}`` if it cannot be read)."""
    try:
        marker = json.loads((run.path / SWEEP_CELL_FILE).read_text(encoding="utf-8"))
        cell = marker["cell"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return cell if isinstance(cell, dict) else {}


def _register_sweeps(con: duckdb.DuckDBPyConnection, registered: Sequence[RegisteredRun]) -> None:
    """The ``sweep_cells`` table and the ``sweep_aggregate`` view (module docstring)."""
    cells = [(run, _cell_manifest(run)) for run in registered if run.sweep is not None]
    if not cells:
        return
    grid_keys: list[str] = []
    for _run, cell in cells:
        grid = cell.get("grid")
        for key in grid if isinstance(grid, dict) else {}:
            if key not in grid_keys and key not in _SWEEP_CELL_COLUMNS:
                grid_keys.append(key)
    columns = [f"{_ident(c)} {t}" for c, t in _SWEEP_CELL_COLUMNS.items()]
    columns += [f"{_ident(k)} VARCHAR" for k in grid_keys]
    con.execute(f"CREATE TABLE sweep_cells ({', '.join(columns)})")
    for run, cell in cells:
        assert run.sweep is not None
        raw_grid = cell.get("grid")
        point: dict[str, Any] = raw_grid if isinstance(raw_grid, dict) else {}
        overrides = cell.get("overrides")
        seed = cell.get("seed")
        row = [
            run.name,
            run.sweep.name,
            run.path.resolve().name,
            cell.get("scenario"),
            seed if isinstance(seed, int) else None,
            "; ".join(str(o) for o in overrides) if isinstance(overrides, list) else None,
            *(None if point.get(k) is None else str(point[k]) for k in grid_keys),
        ]
        con.execute(f"INSERT INTO sweep_cells VALUES ({', '.join('?' * len(row))})", row)
    parts: list[str] = []
    seen: set[Path] = set()
    for run, _cell in cells:
        assert run.sweep is not None
        folder = run.sweep.resolve()
        if folder in seen or not (folder / SWEEP_AGGREGATE).is_file():
            continue
        seen.add(folder)
        source = f"read_parquet({_literal(str(folder / SWEEP_AGGREGATE))})"
        parts.append(f"SELECT {_literal(folder.name)} AS sweep, * FROM {source}")
    if parts:
        con.execute("CREATE VIEW sweep_aggregate AS " + " UNION ALL BY NAME ".join(parts))


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]


def run_query(sql: str, runs: Sequence[Path]) -> QueryResult:
    """Run ``sql`` over ``runs``; a DuckDB error becomes a ConfigError with its message."""
    if not sql.strip():
        raise ConfigError("query: the SQL text is empty")
    con, _ = connect(runs)
    try:
        cursor = con.execute(sql)
        if cursor.description is None:
            return QueryResult([], [])
        columns = [str(d[0]) for d in cursor.description]
        return QueryResult(columns, [tuple(row) for row in cursor.fetchall()])
    except duckdb.Error as exc:
        message = str(exc).strip()
        raise ConfigError(f"query failed: {message}\n(tables: {_table_names(con)})") from None
    finally:
        con.close()


def _table_names(con: duckdb.DuckDBPyConnection, limit: int = 16) -> str:
    """The views and tables a query can use, for an error message."""
    try:
        rows = con.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'main' ORDER BY table_name"
        ).fetchall()
    except duckdb.Error:
        return "unknown"
    names = [str(r[0]) for r in rows]
    fixed = [
        n
        for n in ("records", "timeseries", "utilization", "runs", "sweep_cells", "sweep_aggregate")
        if n in names
    ]
    rest = [n for n in names if n not in fixed]
    shown = fixed + rest[: max(0, limit - len(fixed))]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _plain(value: Any) -> Any:
    """A JSON-friendly version of a DuckDB value."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, dt.date | dt.datetime | dt.time | dt.timedelta):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def render_csv(result: QueryResult) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(result.columns)
    for row in result.rows:
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def render_json(result: QueryResult) -> str:
    objects = [
        {col: _plain(v) for col, v in zip(result.columns, row, strict=True)} for row in result.rows
    ]
    return json.dumps(objects, indent=2, default=str, allow_nan=False) + "\n"


def write_result(result: QueryResult, fmt: Format, out: TextIO, *, max_rows: int = 200) -> None:
    """Print ``result`` as a table, CSV or JSON."""
    if fmt == "csv":
        out.write(render_csv(result))
        return
    if fmt == "json":
        out.write(render_json(result))
        return
    if not result.columns:
        Console(file=out).print("(no result set)")
        return
    shown = result.rows if max_rows < 0 else result.rows[:max_rows]
    cells = [[_cell(v) for v in row] for row in shown]
    widths = [
        max([len(col), *(len(row[i]) for row in cells)]) for i, col in enumerate(result.columns)
    ]
    natural = sum(w + 3 for w in widths) + 1
    # A terminal wraps wide tables; a file or pipe gets the whole width.
    console = Console(file=out, width=None if out.isatty() else max(80, natural))
    table = Table(show_lines=False)
    for col in result.columns:
        table.add_column(col, overflow="fold")
    for row in cells:
        table.add_row(*row)
    console.print(table)
    more = len(result.rows) - len(shown)
    tail = f" (showing {len(shown)}; --max-rows or --format csv for all)" if more > 0 else ""
    console.print(f"{len(result.rows)} row(s){tail}", highlight=False)
