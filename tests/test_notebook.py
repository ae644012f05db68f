"""``notebooks/compare_placement.ipynb``: committed without outputs, and it runs.

The notebook is executed in a real Jupyter kernel running *this* interpreter
(the project's virtualenv), headless (``MPLBACKEND=Agg``), from the
``notebooks`` folder as a user would run it. It runs 28 shortened
simulations, so this test takes about half a minute; it is part of the normal
suite on purpose (CI runs it): a notebook that nobody executes rots.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.kernelspec import find_kernel_specs
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "compare_placement.ipynb"
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
KERNEL = "python3"

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
    tagged = [c for c in raw["cells"] if SUMMARY_TAG in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"exactly one cell should be tagged {SUMMARY_TAG!r}"
    last = raw["cells"][-1]
    assert last["cell_type"] == "markdown" and "Conclusion" in "".join(last["source"])


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


@pytest.mark.slow
def test_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _use_this_interpreter_as_kernel(tmp_path, monkeypatch)
    # The kernel inherits this environment: headless matplotlib, and IPython's
    # history database in a scratch folder rather than the home directory.
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
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

    summary = [cell for cell in code if SUMMARY_TAG in cell.metadata.get("tags", [])]
    assert len(summary) == 1 and summary[0] is code[-1], "the summary is the last code cell"
    results = [out for out in summary[0].outputs if out.get("output_type") == "execute_result"]
    assert results, "the summary cell should end with the summary DataFrame"
    shown = "\n".join(_text(out) for out in results)
    missing = [policy for policy in POLICIES if policy not in shown]
    assert not missing, f"the summary DataFrame does not mention {missing}:\n{shown}"
    figures = [out for cell in code for out in cell.outputs if "image/png" in out.get("data", {})]
    assert len(figures) >= 3, f"expected the three figures, got {len(figures)}"
