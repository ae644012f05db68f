"""``notebooks/compare_placement.ipynb``: committed without outputs, it runs, and it
cannot lie.

The notebook is executed in a real Jupyter kernel running *this* interpreter
(the project's virtualenv), headless (``MPLBACKEND=Agg``), from the
``notebooks`` folder as a user would run it, once with the scenario files'
seeds and once with other seeds (``HAIF_NOTEBOOK_SEED``, which its
parameters cell reads). It runs 42 shortened simulations, so each execution
takes about twenty seconds; it is part of the normal suite on purpose (CI
runs it): a notebook that nobody executes rots.

Its prose is rendered from its results. The tests check that against the
numbers: the committed markdown holds no typed-in figures; every figure in
the conclusion is the results table's cell for that policy and metric; the
table's cells are the unrounded results (a JSON copy of them travels in the
same output); and the winner named per metric (or "no clear winner") is the
one the notebook's stated rule gives, applied here by an independent
implementation.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.kernelspec import find_kernel_specs
from nbclient import NotebookClient

from haif.fleet.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "compare_placement.ipynb"
FAILOVER = ROOT / "scenarios" / "failover.yaml"
POLICIES = (
    "p2c",
    "jsq",
    "least_outstanding",
    "round_robin",
    "locality",
    "weighted_score",
    "random",
)
SUMMARY_TAG = "summary"  # the tag of the cell that shows the final summary DataFrame
RESULTS_TAG = "results"  # the results tables (text/markdown) and their numbers (JSON)
CONCLUSION_TAG = "conclusion"  # the rendered conclusion (text/markdown); the last cell
TAGS = ("parameters", "configuration", RESULTS_TAG, SUMMARY_TAG, CONCLUSION_TAG)
RESULTS_MIME = "application/vnd.haif.results+json"
SEED_ENV = "HAIF_NOTEBOOK_SEED"
OTHER_SEED = 1000
KERNEL = "python3"
# A figure: digits not glued to a word (A100, p99 and slo_e2e_s are names). The
# committed markdown may state one: the confidence level of its rule.
FIGURE = re.compile(r"(?<![A-Za-z_\d])\d")
ALLOWED_FIGURES = re.compile(r"\b95 %")

# nbformat.read has no annotations; call it through a typed name (mypy --strict).
_read_notebook: Callable[..., Any] = nbformat.read


def _load_notebook() -> Any:
    """The notebook as nbformat's NotebookNode (version 4)."""
    return _read_notebook(NOTEBOOK, as_version=4)


def _raw_notebook() -> dict[str, Any]:
    """The notebook file's JSON exactly as committed (no normalisation by nbformat)."""
    data = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_notebook_is_committed_without_outputs() -> None:
    nbformat.validate(_load_notebook())
    raw = _raw_notebook()
    assert "widgets" not in raw.get("metadata", {}), "strip the widget state before committing"
    dirty = []
    for index, cell in enumerate(raw["cells"]):
        if cell["cell_type"] != "code":
            continue
        if cell.get("outputs"):
            dirty.append(f"cell {index} has outputs")
        if cell.get("execution_count") is not None:
            dirty.append(f"cell {index} has execution_count {cell['execution_count']}")
    assert not dirty, "commit the notebook with outputs cleared: " + "; ".join(dirty)
    for tag in TAGS:
        tagged = [c for c in raw["cells"] if tag in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"exactly one cell should be tagged {tag!r}"
    last = raw["cells"][-1]
    assert last["cell_type"] == "code" and CONCLUSION_TAG in last["metadata"]["tags"]
    heading = raw["cells"][-2]
    assert heading["cell_type"] == "markdown" and "## Conclusion" in "".join(heading["source"])


def test_committed_prose_has_no_typed_in_figures() -> None:
    """Every figure a reader sees comes from a cell's output, not from the markdown."""
    typed = []
    for index, cell in enumerate(_raw_notebook()["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        text = ALLOWED_FIGURES.sub("", "".join(cell["source"]))
        typed += [
            f"cell {index}: {line.strip()!r}" for line in text.splitlines() if FIGURE.search(line)
        ]
    assert not typed, "render these from the results instead: " + "; ".join(typed)


def _spec_runs_this_interpreter(spec_dir: str) -> bool:
    """Whether a kernelspec starts this interpreter (jupyter_client maps a bare
    ``python`` / ``python3`` / ``python3.X`` to ``sys.executable``)."""
    try:
        spec = json.loads((Path(spec_dir) / "kernel.json").read_text(encoding="utf-8"))
        program = str(spec["argv"][0])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return False
    major, minor = sys.version_info[:2]
    if program in {"python", f"python{major}", f"python{major}.{minor}"}:
        return True
    return os.path.abspath(program) == os.path.abspath(sys.executable)


def _use_this_interpreter_as_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the ``python3`` kernel run ``sys.executable``.

    ipykernel installs a ``python3`` kernelspec into the virtualenv; if none is
    registered (or the registered one starts another interpreter), write a
    temporary one and put it first on ``JUPYTER_PATH``.
    """
    specs = find_kernel_specs()
    if KERNEL in specs and _spec_runs_this_interpreter(specs[KERNEL]):
        return
    data_dir = tmp_path / "jupyter"
    kernel_dir = data_dir / "kernels" / KERNEL
    kernel_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (HAIF tests)",
        "language": "python",
    }
    (kernel_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    previous = os.environ.get("JUPYTER_PATH")
    paths = [str(data_dir), *([previous] if previous else [])]
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(paths))
    assert _spec_runs_this_interpreter(find_kernel_specs()[KERNEL])


def _text(output: dict[str, Any]) -> str:
    """Everything a person would read in one output: stream text or rich data."""
    if output.get("output_type") == "stream":
        return str(output.get("text", ""))
    data = output.get("data", {})
    return "\n".join(str(data[kind]) for kind in ("text/plain", "text/html") if kind in data)


# ------------------------------------------------------------------ the prose against the tables


def _markdown_outputs(cell: Any) -> str:
    return "\n".join(
        str(out["data"]["text/markdown"])
        for out in cell.outputs
        if "text/markdown" in out.get("data", {})
    )


def _tables(markdown: str) -> dict[str, dict[tuple[str, str], tuple[str, bool]]]:
    """Scenario -> (policy, metric label) -> (cell text, bold) of the results tables."""
    tables: dict[str, dict[tuple[str, str], tuple[str, bool]]] = {}
    scenario = None
    header: list[str] = []
    for line in markdown.splitlines():
        if line.startswith("### "):
            scenario = line[4:].strip()
            tables[scenario] = {}
            header = []
            continue
        if not line.startswith("|") or scenario is None:
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not header:
            header = cells
        elif not set(line) <= set("|-: "):
            policy = cells[0].strip("`")
            for label, text in zip(header[1:], cells[1:], strict=True):
                bold = text.startswith("**") and text.endswith("**")
                tables[scenario][(policy, label)] = (text.strip("*"), bold)
    return tables


_UNIT = re.compile(
    r"^(?P<dollar>\$)?(?P<number>-?[\d,]+(?:\.(?P<decimals>\d+))?)\s*(?P<unit>%|pp|ms|s)?$"
)


def _number(text: str) -> tuple[float, float]:
    """A formatted value (``99.59%``, ``0.25 pp``, ``82.4 ms``, ``2.230 s``, ``$1.3655``,
    ``13.7``) in base units, and half of its last digit (the rounding error)."""
    match = _UNIT.match(text.strip())
    assert match, f"not a formatted value: {text!r}"
    scale = {"%": 0.01, "pp": 0.01, "ms": 0.001, "s": 1.0, None: 1.0}[match["unit"]]
    digits = len(match["decimals"] or "")
    value = float(match["number"].replace(",", "")) * scale
    return value, 0.5 * 10.0**-digits * scale


def _interval(stat: dict[str, Any]) -> tuple[float, float]:
    half = stat["ci95"] or 0.0
    return stat["mean"] - half, stat["mean"] + half


def _expected(stats: dict[str, dict[str, Any]], better: str) -> tuple[str | None, set[str]]:
    """The notebook's rule, written again: (clear winner or None, the policies whose
    interval overlaps the best mean's)."""
    known = {p: s for p, s in stats.items() if s["mean"] is not None}
    sign = 1.0 if better == "higher" else -1.0
    best = max(known, key=lambda p: sign * known[p]["mean"])  # the first on a tie
    lo, hi = _interval(known[best])
    overlapping = set()
    for policy, stat in known.items():
        other_lo, other_hi = _interval(stat)
        apart = lo > other_hi if better == "higher" else hi < other_lo
        if policy != best and not apart:
            overlapping.add(policy)
    if overlapping or any(s["n"] < 2 for s in known.values()):
        return None, overlapping
    return best, overlapping


def check_prose_agrees_with_tables(nb: Any) -> None:
    """The checks of the module docstring, on an executed notebook."""
    (results,) = [c for c in nb.cells if RESULTS_TAG in c.metadata.get("tags", [])]
    (conclusion,) = [c for c in nb.cells if CONCLUSION_TAG in c.metadata.get("tags", [])]
    (data,) = [
        out["data"][RESULTS_MIME] for out in results.outputs if RESULTS_MIME in out.get("data", {})
    ]
    tables = _tables(_markdown_outputs(results))
    labels = {m["label"]: key for key, m in data["metrics"].items()}
    assert set(tables) == set(data["scenarios"]) and tables

    for scenario, table in tables.items():
        numbers = data["scenarios"][scenario]
        for (policy, label), (text, bold) in table.items():
            stat = numbers[labels[label]][policy]
            mean_text, _, half_text = text.partition(" ± ")
            mean, mean_err = _number(mean_text)
            half, half_err = _number(half_text)
            assert math.isclose(mean, stat["mean"], abs_tol=mean_err * 1.001 + 1e-12), (text, stat)
            assert math.isclose(half, stat["ci95"], abs_tol=half_err * 1.001 + 1e-12), (text, stat)
            better = data["metrics"][labels[label]]["better"]
            winner = _expected(numbers[labels[label]], better)[0] if better else None
            assert bold == (winner == policy), f"{scenario} {label}: bold {policy}, winner {winner}"

    prose = _markdown_outputs(conclusion)
    sections = re.split(r"^### (\S+)$", prose, flags=re.MULTILINE)
    by_scenario = dict(zip(sections[1::2], sections[2::2], strict=True))
    for scenario, table in tables.items():
        lines = [ln for ln in by_scenario[scenario].splitlines() if ln.startswith("- **")]
        by_label = {ln[4:].partition("**")[0]: ln for ln in lines}
        ranked = [k for k, m in data["metrics"].items() if m["better"]]
        assert len(by_label) == len(lines) == len(ranked), lines
        winners = set()
        for key in ranked:
            label = data["metrics"][key]["label"]
            line = by_label[label]
            winner, overlapping = _expected(
                data["scenarios"][scenario][key], data["metrics"][key]["better"]
            )
            mentions = re.findall(r"`([a-z0-9_]+)` \(([^()]*)\)", line)
            assert mentions, line
            for policy, text in mentions:  # every figure is the table's
                assert (policy, label) in table, (line, policy)
                assert text == table[(policy, label)][0], (line, table[(policy, label)])
            if winner is not None:
                winners.add(winner)
                assert (
                    line.startswith(f"- **{label}**: `{winner}` (")
                    and "is the clear winner" in line
                ), line
            else:
                assert "no clear winner" in line and "is the clear winner" not in line, line
                if "overlaps" in line:
                    named = {p for p, _ in mentions[1:]}
                    assert named == overlapping, (line, overlapping)
        (summary,) = [
            ln for ln in by_scenario[scenario].splitlines() if ln.startswith(f"On {scenario},")
        ]
        named = set(re.findall(r"`([a-z0-9_]+)`", summary.partition("No clear winner")[0]))
        assert named == winners, (summary, winners)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [None, OTHER_SEED], ids=["file-seeds", f"seed-{OTHER_SEED}"])
def test_notebook_executes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int | None
) -> None:
    _use_this_interpreter_as_kernel(tmp_path, monkeypatch)
    # The kernel inherits this environment: headless matplotlib, IPython's history
    # database in a scratch folder rather than the home directory, and the seed.
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    if seed is None:
        monkeypatch.delenv(SEED_ENV, raising=False)
    else:
        monkeypatch.setenv(SEED_ENV, str(seed))
    monkeypatch.chdir(ROOT)

    nb = _load_notebook()
    client = NotebookClient(
        nb, timeout=600, kernel_name=KERNEL, resources={"metadata": {"path": "notebooks"}}
    )
    client.execute()  # raises CellExecutionError, with the traceback, if a cell fails

    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    errors = [
        f"cell {i}: {out.get('ename')}: {out.get('evalue')}"
        for i, cell in enumerate(code)
        for out in cell.outputs
        if out.get("output_type") == "error"
    ]
    assert not errors, errors
    assert all(cell.execution_count is not None for cell in code)

    (configuration,) = [c for c in code if "configuration" in c.metadata.get("tags", [])]
    shown = _markdown_outputs(configuration)
    first = load_scenario(FAILOVER).seed if seed is None else seed  # the parameter took effect
    assert f"| {first}, {first + 1}, {first + 2} |" in shown, shown

    summary = [cell for cell in code if SUMMARY_TAG in cell.metadata.get("tags", [])]
    results = [out for out in summary[0].outputs if out.get("output_type") == "execute_result"]
    assert results, "the summary cell should end with the summary DataFrame"
    shown = "\n".join(_text(out) for out in results)
    missing = [policy for policy in POLICIES if policy not in shown]
    assert not missing, f"the summary DataFrame does not mention {missing}:\n{shown}"
    figures = [out for cell in code for out in cell.outputs if "image/png" in out.get("data", {})]
    assert len(figures) >= 3, f"expected the three figures, got {len(figures)}"
    assert CONCLUSION_TAG in code[-1].metadata.get("tags", [])
    check_prose_agrees_with_tables(nb)
    _check_the_check(nb)


def _check_the_check(nb: Any) -> None:
    """The check has teeth: a figure or a winner changed in the prose fails it."""
    conclusion = next(c for c in nb.cells if CONCLUSION_TAG in c.metadata.get("tags", []))
    output = next(o for o in conclusion.outputs if "text/markdown" in o.get("data", {}))
    prose = str(output["data"]["text/markdown"])
    figure = re.search(r"`[a-z0-9_]+` \((\S+)", prose)
    assert figure is not None
    tampered = [
        prose.replace(figure.group(0), figure.group(0) + "0", 1),  # a figure not in the table
        re.sub(r"(- \*\*[^*]+\*\*: )no clear winner", r"\1is the clear winner", prose, count=1),
        re.sub(r": `([a-z0-9_]+)` \(", r": `\1x` (", prose, count=1),
    ]
    try:
        for text in tampered:
            output["data"]["text/markdown"] = text
            with pytest.raises(AssertionError):
                check_prose_agrees_with_tables(nb)
    finally:
        output["data"]["text/markdown"] = prose
