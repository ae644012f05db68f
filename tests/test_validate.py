"""`haif validate`: the table of every validation, its notes and its files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from haif.analysis.queueing import QueueingCheck
from haif.analysis.validation import (
    BOUND,
    Check,
    all_checks,
    markdown_table,
    profile_checks,
    write_validation,
)
from haif.cli import main


@pytest.fixture(scope="module")
def checks() -> list[Check]:
    return profile_checks()


def test_every_lambdalabs_row_is_within_the_bound_and_labelled(checks: list[Check]) -> None:
    lambdalabs = [c for c in checks if c.group == "LambdaLabs vLLM"]
    assert len(lambdalabs) == 8  # 4 runs x (TTFT, decode step)
    assert all(c.within for c in lambdalabs), markdown_table(lambdalabs)
    in_sample = {c.name.split(":")[0] for c in lambdalabs if c.in_sample}
    assert in_sample == {
        "llama-3-8b on H100-80G, 10 prompts (1,369 tokens)",
        "llama-3-8b on A100-80G, 10 prompts (1,369 tokens)",
    }
    assert all("mistral" not in c.name for c in lambdalabs if c.in_sample)


def test_splitwise_rows_say_in_or_out_of_sample_and_why_they_miss(checks: list[Check]) -> None:
    splitwise = [c for c in checks if c.group.startswith("Splitwise")]
    assert [c.in_sample for c in splitwise] == [True, False, True, False]
    assert [c.figures for c in splitwise] == [38, 18, 38, 18]
    for c in splitwise:
        assert c.within == (abs(c.error) <= BOUND)
        assert bool(c.note) == (not c.within), c  # every miss is explained, no hit is
    # The A100 fit's worst figure is forced by two contradicting measurements.
    a100 = splitwise[0]
    assert "16 x 512 tokens take 2084.4 ms and 1 x 8192 take 1549.8 ms" in a100.note
    assert f"at least {abs(a100.error):.1%}" in a100.note


def test_markdown_table_marks_misses() -> None:
    rows = [
        Check("g", "hit", 1, 0.05, 0.05, False, "s"),
        Check("g", "miss", 2, -0.2, 0.1, True, "s", note="because"),
    ]
    table = markdown_table(rows)
    assert "| g: hit | 1 | +5.0% | 5.0% | out of sample | yes (10%) |" in table
    assert "| g: miss | 2 | -20.0% | 10.0% | in sample | no (10%): because |" in table


def test_cli_prints_and_writes_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", "--no-queueing", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "How far to trust the simulator" in out and "mistral-7b on A100-80G" in out
    rows = json.loads((tmp_path / "validation.json").read_text())
    assert {r["group"] for r in rows} >= {"LambdaLabs vLLM", "Splitwise Llama-2-70B TP8"}
    md = (tmp_path / "validation.md").read_text()
    assert markdown_table(profile_checks()) in md
    assert "LambdaLabsML/vllm-benchmark@a4f9f43" in md


def test_write_validation_creates_the_folder(tmp_path: Path) -> None:
    md, js = write_validation([Check("g", "n", 1, 0.0, 0.0, False, "src")], tmp_path / "a" / "b")
    assert md.is_file() and js.is_file()
    assert json.loads(js.read_text())[0]["within"] is True


def test_prefix_cache_rows_compare_the_engine_with_an_exact_lru_replay() -> None:
    from haif.analysis.validation import prefix_cache_checks

    rows = prefix_cache_checks()
    assert [r.unit for r in rows] == ["points", "points"] and all(r.within for r in rows)
    assert "engine 36.64% vs exact LRU replay 36.64%" in rows[0].name  # published: 36.6 %
    assert rows[0].error == 0.0 and rows[1].error != 0.0  # eviction order differs slightly
    points = Check("g", "n", 1, 0.0006, 0.0006, False, "s", bound=0.005, unit="points")
    assert "| +0.06 pts | 0.06 pts | out of sample | yes (0.5 pts) |" in markdown_table([points])


def test_the_figures_in_docs_validation_are_the_computed_ones(checks: list[Check]) -> None:
    import re

    from haif.analysis.validation import prefix_cache_checks

    page = (Path(__file__).resolve().parents[1] / "docs" / "validation.md").read_text()
    a100 = next(c for c in checks if c.name.startswith("A100-80G: packaged fit"))
    longer = re.search(r"\((\d+)% longer", a100.note)
    assert longer is not None
    assert f"by up to\n  {abs(a100.error) * 100:.1f} % (its 16 prompts of 512 tokens take " in page
    assert f"take {longer.group(1)} % longer than one prompt of" in page
    reused = re.search(r"engine (\d+\.\d+)%", prefix_cache_checks()[0].name)
    assert reused is not None
    assert f"({reused.group(1)} % reused" in page


@pytest.mark.slow
def test_the_readme_table_is_the_quick_validation(quick_queueing: list[QueueingCheck]) -> None:
    """The README's accuracy table is `haif validate --quick`'s, row for row."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    begin, end = "<!-- haif validate: begin -->\n", "<!-- haif validate: end -->"
    block = readme.split(begin, 1)[1].split(end, 1)[0]
    expected = markdown_table(all_checks(queueing_done=quick_queueing))
    assert block == expected, "README.md's accuracy table is stale; it should be:\n" + expected
