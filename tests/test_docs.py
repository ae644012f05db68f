"""The README and ``docs/``: every command they show is run or checked, every relative link
resolves, and the scenario reference's key tables are the scenario model's.

A command is a line of a ``bash`` code block (or a ``haif ...`` line of any block), or a
code span in the prose that starts with ``haif``, ``make`` or ``python bench/``. Each one is

- run here for real (``RUN``: the cheap ones; a simulation shortened with ``--set``), or
- accepted by its parser (``haif``: :func:`haif.cli.build_parser`; a bench script: its
  ``--help`` lists every flag the command uses; ``make``: a target of the Makefile) and run
  by the test or CI line that ``COVERED``, ``MAKE``, ``BENCH`` or ``OTHER`` names for it,
  which must exist.

A command added to the docs that none of these covers fails ``test_every_command_is_covered``.
A synopsis may use ``[optional]`` groups, ``a|b`` alternatives and UPPERCASE placeholders:
each alternative is parsed, a placeholder stands for a value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any, get_type_hints

import pytest
from pydantic import BaseModel

from haif.cli import build_parser, main, walk_parsers
from haif.control.config import CoreConfig
from haif.fleet import scenario as sc
from haif.policy.admission import ShedConfig, ThrottleConfig
from haif.policy.breaker import BreakerConfig
from haif.policy.ratelimit import QuotaConfig
from haif.policy.retry import BACKOFF_KINDS, Backoff, RetryConfig
from haif.runtime.cluster_schema import type_name

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# ------------------------------------------------------------------ what covers each command

#: Run by ``test_commands_run_for_real``, in this order, in a scratch directory that links
#: the checkout's data folders. A ``haif sim`` gets ``SHORT_SIM`` appended.
RUN: tuple[str, ...] = (
    "haif --help",
    "haif sim --help",
    "haif up --schema",
    "haif sim scenarios/failover.yaml",
    "haif sim scenarios/failover.yaml --seed 7 --set policy.placement=jsq --out reports/jsq",
    "haif sim scenarios/failover.yaml --out reports/p2c",
    "haif sim scenarios/failover.yaml --set policy.placement=locality --out reports/locality",
    "haif compare reports/p2c reports/locality",
    'haif query "select run, gpu_class, count(*), avg(finish_s - arrival_s) '
    'from records group by all"',
)
SHORT_SIM = ["--set", "duration_s=30", "-q"]

#: ``haif`` commands that are only parsed here, by command: where they run. An entry is
#: ``tests/FILE.py::TEST`` (the test must exist) or ``FILE: LINE`` (the line must be in FILE).
COVERED: dict[str, tuple[str, ...]] = {
    "sim": ("tests/test_sim.py::test_cli_writes_report",),
    "sweep": ("tests/test_sweep.py::test_failed_cell_is_reported_and_the_others_succeed",),
    "compare": ("tests/test_analysis.py::test_compare_deltas_table_and_files",),
    "query": ("tests/test_analysis.py::test_query_default_runs_are_reports_subfolders",),
    "regress": (
        ".ci/run: .venv/bin/haif regress --run-canonical --out reports/regress-current",
        "tests/test_analysis.py::test_refresh_baseline_and_sets",
    ),
    "calibrate": ("tests/test_calibrate.py::test_cli_prints_the_fit_and_writes_the_catalog",),
    "validate": (
        ".ci/run: .venv/bin/haif validate --out reports/validation",
        "tests/test_validate.py::test_cli_prints_and_writes_the_table",
        "tests/test_validate.py::test_the_readme_table_is_the_quick_validation",
    ),
    "up": (
        "tests/test_example_clusters.py::test_example_cluster_serves_a_completion",
        "tests/test_example_clusters.py::test_tiny_model_example",
        "tests/test_runtime_up.py::test_completion_round_trip",
    ),
    "deploy": (
        "tests/test_deploy.py::test_three_hosts_deploy_serve_recover_upgrade_and_stop",
        "tests/test_deploy.py::test_a_changed_or_unknown_host_key_stops_the_deploy",
    ),
    "supervise": ("tests/test_deploy.py::test_three_hosts_deploy_serve_recover_upgrade_and_stop",),
    "replay": (
        "tests/test_replay.py::test_replay_cli_with_faults_kills_and_restarts_a_worker",
        "tests/test_replay.py::test_replay_cli_errors_are_clear",
    ),
    "parity": (
        ".ci/run: .venv/bin/haif parity scenarios/parity_heldout.yaml --repeat 3 "
        "--out reports/parity-heldout",
        "tests/test_replay.py::test_parity_cluster_mirrors_the_scenario_fleet",
    ),
    "keys add": ("tests/test_api_keys.py::test_keys_commands_on_a_stopped_clusters_store",),
    "keys list": ("tests/test_api_keys.py::test_keys_commands_on_a_stopped_clusters_store",),
    "keys revoke": ("tests/test_api_keys.py::test_keys_commands_on_a_stopped_clusters_store",),
    "dlq": ("tests/test_api_keys.py::test_dlq_and_keys_reach_a_running_duckdb_cluster",),
    "dlq list": ("tests/test_runtime_reliability.py::test_dead_letters_listed_then_replayed",),
    "dlq show": ("tests/test_runtime_reliability.py::test_dead_letters_listed_then_replayed",),
    "dlq replay": ("tests/test_runtime_reliability.py::test_dead_letters_listed_then_replayed",),
    "certs list": (
        "tests/test_cluster_tls.py::test_certs_cli_lists_rotates_and_issues_a_server_certificate",
    ),
    "certs rotate": (
        "tests/test_cluster_tls.py::test_certs_cli_lists_rotates_and_issues_a_server_certificate",
    ),
    "certs server": (
        "tests/test_cluster_tls.py::test_certs_cli_lists_rotates_and_issues_a_server_certificate",
    ),
    "artifacts make-tiny": (
        "tests/test_example_clusters.py::test_tiny_model_example",
        "tests/vllm_lane/test_vllm_serving.py::test_the_vllm_engine_streams_a_chat_with_a_stop_sequence",
    ),
    "artifacts verify": ("tests/test_artifacts.py::test_cli_list_and_verify",),
    "artifacts fetch": (
        "tests/test_tiny_llama.py::test_the_tiny_llamas_tokenizer_and_template",
        "tests/vllm_lane/test_vllm_serving.py::test_the_openai_engine_relays_a_vllm_server",
    ),
    "artifacts list": ("tests/test_artifacts.py::test_cli_list_and_verify",),
    # haif up starts the services with their flags (--journal; --gateway-port colocated).
    "gateway": ("tests/test_gateway_tls.py::test_the_gateway_serves_https",),
    "orchestrator": (
        "tests/test_example_clusters.py::test_example_cluster_serves_a_completion",
        "tests/test_gateway_tls.py::test_tls_flags_on_an_orchestrator_need_its_gateway_port",
    ),
    "worker": (
        "tests/test_example_clusters.py::test_example_cluster_serves_a_completion",
        "tests/test_batching.py::test_a_worker_streams_with_profile_timing",
    ),
}

#: ``make`` targets: where they run. ``test-fast`` is ``make test``'s suite less three
#: markers; ``test_make_targets_exist`` checks the markers are declared.
MAKE: dict[str, tuple[str, ...]] = {
    "sim": ("Makefile: $(BIN)/haif sim scenarios/failover.yaml",),  # and in RUN
    "test": (".ci/run: make test",),
    "test-fast": (".ci/run: make test",),
    "lint": (".ci/run: make lint",),
    "chaos": (".ci/run: make chaos",),
    "test-vllm": (".ci/run: make test-vllm",),
}

#: Bench scripts: the test that runs them on a small input, or why none does. Every
#: command's flags are checked against the script's --help.
BENCH: dict[str, tuple[str, ...] | str] = {
    "bench/sim_speed.py": (
        "tests/test_bench_smoke.py::test_main_reports_speed_results_and_disagreement",
    ),
    "bench/store_writes.py": (
        "tests/test_bench_smoke.py::test_store_writes_reports_cpu_and_batches",
    ),
    "bench/core_decisions.py": ("tests/test_docs.py::test_commands_run_for_real",),
    "bench/sim_scale.py": (
        "tests/test_sim_scale.py::test_sim_scale_bench_reports_time_speed_and_memory",
    ),
    "bench/prompt_tokens.py": (
        "tests/test_prompt_tokens.py::test_the_bench_prints_the_cost_per_request",
    ),
    "bench/prefix_placement.py": (
        "tests/test_live_prefix.py::"
        "test_prefix_affinity_finds_more_cached_prefixes_than_least_outstanding",
    ),
    "bench/runtime_overhead.py": "by hand: a live cluster under load for minutes",
    "bench/orchestrator_fleet.py": "by hand: an orchestrator watching 1,000 workers for minutes",
    "bench/hop_latency.py": "by hand: a live cluster, 200 requests one at a time",
    "bench/worker_boot.py": "by hand: restarts a live cluster's workers",
    "bench/parity_matrix.py": (
        "tests/test_parity_matrix.py::test_summarize_reads_both_windows_errors_and_lag",
        "tests/test_parity_matrix.py::test_the_kept_matrix_is_the_documented_one",
    ),
}
#: Appended to a bench command that ``test_commands_run_for_real`` runs.
SHORT_BENCH = {
    "bench/core_decisions.py": [
        *("--sizes", "12", "--placements", "random", "--requests", "20"),
        *("--warmup", "2", "--repeat", "1"),
    ],
}

VLLM_EXAMPLE = (
    "tests/vllm_lane/test_vllm_serving.py::test_the_vllm_engine_streams_a_chat_with_a_stop_sequence",
)

VLLM_PARITY = (
    "tests/vllm_lane/test_vllm_parity.py::test_calibrate_then_parity_against_real_vllm_end_to_end",
)

#: Commands of other programs, as shown (comment and trailing ``&`` left out): the test that
#: runs or checks them, or why none does. Repository paths in them must exist.
OTHER: dict[str, tuple[str, ...] | str] = {
    # The gateway of clusters/single-region.yaml answers a completion.
    "curl -s localhost:8080/v1/completions "
    """-d '{"model": "llama-3-8b", "prompt": "hello", "max_tokens": 8}'""": (
        "tests/test_example_clusters.py::test_example_cluster_serves_a_completion",
        "tests/test_runtime_up.py::test_completion_round_trip",
    ),
    # The OpenAI SDK streaming from `haif up` without auth.
    ".venv/bin/python - <<'PY'": (
        "tests/test_runtime_up.py::test_openai_sdk_without_auth_streams",
    ),
    # Ctrl-C of `haif up`, which then exports its records (UpCli.stop sends SIGINT).
    "kill -INT %1": (
        "tests/test_runtime_up.py::test_records_after_shutdown_share_the_simulator_schema",
    ),
    # Prometheus is not started by a test; the configuration it loads is checked.
    "prometheus --config.file=monitoring/prometheus/prometheus.yml": (
        "tests/test_monitoring.py::test_promtool_check_config",
    ),
    # Grafana is not started by a test; the files it mounts are checked.
    "docker run --network host "
    "-v $PWD/monitoring/grafana/provisioning:/etc/grafana/provisioning "
    "-v $PWD/monitoring/grafana/dashboards:/var/lib/grafana/dashboards/haif grafana/grafana": (
        "tests/test_monitoring.py::test_dashboard_is_provisioning_ready",
    ),
    "createdb -h 127.0.0.1 -U postgres haif_bench": "by hand: the database of a by-hand bench",
    # The README's vLLM session, from clusters/ (the example's paths are relative to its
    # file): the vLLM lane starts the same file beside a store built the same way and
    # streams the same chat with the openai SDK, with and without a stop sequence.
    "cd clusters": VLLM_EXAMPLE,
    "../.ci/vllm-env python -m haif artifacts make-tiny --arch llama --store tiny-llama/art "
    "--key tiny-llama/keys/cluster.key": VLLM_EXAMPLE,
    "../.ci/vllm-env python -m haif up tiny-llama-vllm.yaml": VLLM_EXAMPLE,
    "../.ci/vllm-env python - <<'PY'": VLLM_EXAMPLE,
    # The README's sim-to-real against real vLLM: the vLLM lane runs the same commands
    # (the test's own data directory and output folders).
    ".ci/vllm-env python -m haif up clusters/tiny-llama-vllm.yaml --data-dir .haif-vllm": (
        VLLM_PARITY
    ),
    ".ci/vllm-env python -m haif replay scenarios/calibrate_vllm.yaml --cluster .haif-vllm": (
        VLLM_PARITY
    ),
    "kill %1": VLLM_PARITY,
    ".ci/vllm-env python -m haif calibrate .haif-vllm/records.parquet --as-gpu CPU-vllm --base CPU "
    "--shared-steps --out scenarios/profiles/cpu-vllm.yaml": VLLM_PARITY,
    ".ci/vllm-env python -m haif parity scenarios/parity_vllm.yaml "
    "--engines clusters/tiny-llama-vllm.yaml": VLLM_PARITY,
}

# ------------------------------------------------------------------ reading the pages

SHELL = {"bash", "console", "sh", "shell"}
FENCE = re.compile(r"^```(\S*)\s*$")
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_-]*")
PLACEHOLDER_VALUES = {"URL": "http://127.0.0.1:8081"}
REDIRECTS = {">", ">>", "<", "|", "2>&1"}
#: Top-level folders whose paths in a command must exist (reports/ and data dirs are outputs).
REPO_DIRS = ("scenarios", "clusters", "sweeps", "traces", "monitoring", "bench", "regress")


@dataclasses.dataclass(frozen=True)
class Command:
    page: str
    line: int
    text: str  # as shown, without its comment and a trailing "&"
    inline: bool  # a code span in the prose: a fragment, required arguments may be left out

    @property
    def words(self) -> list[str]:
        words = shlex.split(self.text)
        cut = next((i for i, w in enumerate(words) if w in REDIRECTS), len(words))
        return words[:cut]

    @property
    def kind(self) -> str:
        w = self.words
        if w[0] in ("haif", ".venv/bin/haif") or w[:3] in (
            ["python", "-m", "haif"],
            [".venv/bin/python", "-m", "haif"],
        ):
            return "haif"
        if w[0] in ("python", ".venv/bin/python") and len(w) > 1 and w[1].startswith("bench/"):
            return "bench"
        return "make" if w[0] == "make" else "other"

    @property
    def argv(self) -> list[str]:
        """The arguments after the program (``haif``, ``make``, ``python``: a bench command's
        first argument is its script)."""
        w = self.words
        skip = {"haif": 3 if w[0].endswith("python") else 1, "bench": 1, "make": 1}
        return w[skip.get(self.kind, 1) :]

    @property
    def haif(self) -> str:
        """The command as RUN keys it: ``haif ARGS`` as shown."""
        return re.sub(r"^(\.venv/bin/)?(python -m )?haif ", "haif ", self.text + " ").strip()

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def _clean(text: str) -> str:
    text = re.split(r"\s+#\s", " " + text.strip())[0]
    text = re.sub(r"\s*&$", "", text.strip())
    return " ".join(text.split())


def _is_command(text: str) -> bool:
    return bool(re.match(r"(\.venv/bin/)?haif |(\.venv/bin/)?python -m haif ", text))


def _split(text: str) -> tuple[list[tuple[int, str, list[tuple[int, str]]]], str]:
    """Code blocks (first line, language, numbered lines) and the prose, code blanked out."""
    blocks: list[tuple[int, str, list[tuple[int, str]]]] = []
    prose: list[str] = []
    current: tuple[int, str, list[tuple[int, str]]] | None = None
    for no, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if current is None and fence:
            current = (no, fence.group(1), [])
            prose.append("")
        elif current is not None and line.strip() == "```":
            blocks.append(current)
            current = None
            prose.append("")
        elif current is not None:
            current[2].append((no, line))
            prose.append("")
        else:
            prose.append(line)
    assert current is None, f"unclosed code block at line {current[0]}"
    return blocks, "\n".join(prose)


def _block_commands(lang: str, lines: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    heredoc: str | None = None
    pending, start = "", 0
    for no, raw in lines:
        if heredoc is not None:
            heredoc = None if raw.strip() == heredoc else heredoc
            continue
        if not pending:
            start, raw = no, raw.removeprefix("$ ")
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        text, pending = (pending + raw).strip(), ""
        if found := re.search(r"<<-?'?(\w+)'?", text):
            heredoc = found.group(1)
        if not text or text.startswith("#"):
            continue
        if lang in SHELL or _is_command(text):
            yield start, text


@cache
def commands() -> tuple[Command, ...]:
    found: list[Command] = []
    for page in PAGES:
        name = str(page.relative_to(ROOT))
        blocks, prose = _split(page.read_text(encoding="utf-8"))
        for _, lang, lines in blocks:
            for no, text in _block_commands(lang, lines):
                found.append(Command(name, no, _clean(text), inline=False))
        for span in re.finditer(r"`([^`]+)`", prose):
            text = " ".join(span.group(1).split())
            if _is_command(text) or re.match(r"make \S|(\.venv/bin/)?python bench/", text):
                no = prose.count("\n", 0, span.start()) + 1
                found.append(Command(name, no, _clean(text), inline=True))
    return tuple(found)


def of_kind(kind: str) -> list[Command]:
    return [c for c in commands() if c.kind == kind]


def expand(argv: list[str]) -> list[list[str]]:
    """A synopsis's argument lists: brackets dropped, one list per alternative, placeholders
    replaced by values."""
    out: list[list[str]] = [[]]
    depth = 0
    for word in argv:
        if word.startswith("[") and len(word) > 1:
            depth, word = depth + 1, word[1:]
        if depth and word.endswith("]"):
            depth, word = depth - 1, word[:-1]
        if not word:
            continue
        alternatives = word.split("|") if "|" in word and " " not in word else [word]
        values = [
            PLACEHOLDER_VALUES.get(a, "1") if PLACEHOLDER.fullmatch(a) else a for a in alternatives
        ]
        out = [[*o, v] for o in out for v in values]
    return out


def parse_error(argv: list[str]) -> str | None:
    """What ``haif``'s parser says against ``argv`` (None: accepted)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return err.getvalue().strip().splitlines()[-1]
    return None


def command_path(argv: list[str]) -> str:
    paths = {name for name, _ in walk_parsers(build_parser())}
    words: list[str] = []
    for word in argv:
        if " ".join([*words, word]) not in paths:
            break
        words.append(word)
    return " ".join(words)


def reference_exists(ref: str) -> bool:
    if "::" in ref:
        path, test = ref.split("::")
        file = ROOT / path
        pattern = rf"^(async )?def {re.escape(test)}\("
        return file.is_file() and re.search(pattern, file.read_text(), re.M) is not None
    path, line = ref.split(": ", 1)
    file = ROOT / path
    return file.is_file() and line in [x.strip() for x in file.read_text().splitlines()]


# ------------------------------------------------------------------ commands


def test_the_pages_show_commands_of_every_kind() -> None:
    """The extraction finds what the pages show (a guard against it finding nothing)."""
    kinds = {c.kind for c in commands()}
    assert kinds == {"haif", "bench", "make", "other"}
    assert any(c.text == "make test" for c in commands() if c.page == "README.md")
    assert len(of_kind("haif")) > 40


def test_every_code_block_names_its_language() -> None:
    """An untagged block could hide commands from this test's view of what is shell."""
    untagged = [
        f"{page.relative_to(ROOT)}:{first}"
        for page in PAGES
        for first, lang, _ in _split(page.read_text(encoding="utf-8"))[0]
        if not lang
    ]
    assert not untagged, untagged


def test_every_haif_command_is_accepted_by_the_parser() -> None:
    bad = []
    for cmd in of_kind("haif"):
        for argv in expand(cmd.argv):
            error = parse_error(argv)
            fragment = (
                error is not None
                and cmd.inline
                and (
                    "the following arguments are required" in error
                    or error.endswith("expected one argument")
                )
            )
            if error is not None and not fragment:
                bad.append(f"{cmd}\n    {error}")
    assert not bad, "\n".join(bad)


def test_every_command_is_covered() -> None:
    """Run here (RUN, SHORT_BENCH) or named in a coverage table whose references exist."""
    uncovered = []
    for cmd in commands():
        if cmd.kind == "haif":
            if cmd.haif not in RUN and command_path(cmd.argv) not in COVERED:
                uncovered.append(f"{cmd}  (haif {command_path(cmd.argv) or '...'})")
        elif cmd.kind == "make":
            if cmd.argv[0] not in MAKE:
                uncovered.append(str(cmd))
        elif cmd.kind == "bench":
            if cmd.argv[0] not in BENCH:
                uncovered.append(str(cmd))
        elif cmd.text not in OTHER:
            uncovered.append(str(cmd))
    assert not uncovered, "commands no test or CI line covers:\n" + "\n".join(uncovered)


def test_the_coverage_tables_name_what_exists_and_is_shown() -> None:
    refs = [
        ref
        for table in (COVERED, MAKE, BENCH, OTHER)
        for entry in table.values()
        if isinstance(entry, tuple)
        for ref in entry
    ]
    missing = [ref for ref in refs if not reference_exists(ref)]
    assert not missing, f"references to tests or lines that do not exist: {missing}"
    shown = {c.haif for c in of_kind("haif")}
    assert set(RUN) <= shown, f"RUN holds commands no page shows: {set(RUN) - shown}"
    paths = {command_path(c.argv) for c in of_kind("haif")}
    assert set(COVERED) <= paths, f"COVERED names commands no page shows: {set(COVERED) - paths}"
    texts = {c.text for c in of_kind("other")}
    assert set(OTHER) <= texts, f"OTHER holds commands no page shows: {set(OTHER) - texts}"
    by_hand = {k: v for table in (BENCH, OTHER) for k, v in table.items() if isinstance(v, str)}
    assert all(v.startswith("by hand: ") for v in by_hand.values()), by_hand


def test_make_targets_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    for cmd in of_kind("make"):
        assert cmd.argv and cmd.argv[0] in targets, str(cmd)
    # test-fast deselects markers that must exist, else pytest --strict-markers refuses.
    fast = re.search(r"^test-fast:.*\n\t.*-m \"([^\"]+)\"", makefile, re.M)
    assert fast is not None
    declared = (ROOT / "pyproject.toml").read_text()
    for marker in re.findall(r"not (\w+)", fast.group(1)):
        assert f'"{marker}: ' in declared, marker


def test_repository_paths_in_commands_exist() -> None:
    missing = []
    for cmd in commands():
        for word in cmd.text.replace(":", " ").replace("=", " ").split():
            path = word.removeprefix("$PWD/")
            if path.startswith(tuple(f"{d}/" for d in REPO_DIRS)) and not (ROOT / path).exists():
                missing.append(f"{cmd}: {path}")
    assert not missing, "\n".join(missing)


@pytest.fixture(scope="module")
def bench_help() -> dict[str, str]:
    """Each bench script's --help."""
    helps = {}
    for script in sorted({c.argv[0] for c in of_kind("bench")}):
        done = subprocess.run(
            [sys.executable, script, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"{script} --help: {done.stderr}"
        helps[script] = done.stdout
    return helps


def test_every_bench_command_uses_flags_its_script_has(bench_help: dict[str, str]) -> None:
    unknown = []
    for cmd in of_kind("bench"):
        for argv in expand(cmd.argv[1:]):
            for flag in (w.split("=")[0] for w in argv if w.startswith("--")):
                if not re.search(rf"(^|[\s\[,]){re.escape(flag)}\b", bench_help[cmd.argv[0]]):
                    unknown.append(f"{cmd}: {flag}")
    assert not unknown, "\n".join(unknown)


@pytest.mark.slow
def test_commands_run_for_real(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """RUN in order, in a scratch checkout (outputs land under its reports/)."""
    for folder in REPO_DIRS:
        (tmp_path / folder).symlink_to(ROOT / folder)
    monkeypatch.chdir(tmp_path)
    outputs = {}
    for command in RUN:
        argv = shlex.split(command)[1:]
        if argv[0] == "sim" and "--help" not in argv:
            argv += SHORT_SIM
        code: object
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        outputs[command] = capsys.readouterr().out
        assert code in (0, None), f"{command}: exit {code}\n{outputs[command]}"
    assert outputs["haif --help"].startswith("usage: haif")
    assert "--set PATH=VALUE" in outputs["haif sim --help"]
    assert outputs["haif up --schema"].startswith("# Cluster YAML reference")
    reports = tmp_path / "reports"
    for run in ("failover", "jsq", "p2c", "locality"):
        summary = json.loads((reports / run / "summary.json").read_text())
        assert summary["requests"] > 0, run
    assert (reports / "compare" / "compare.md").is_file()
    assert all(run in outputs[RUN[-1]] for run in ("jsq", "p2c", "locality"))

    shown = [c for c in of_kind("bench") if c.argv[0] in SHORT_BENCH]
    assert {c.argv[0] for c in shown} == set(SHORT_BENCH)
    for cmd in shown:
        argv = [*cmd.argv, *SHORT_BENCH[cmd.argv[0]], "--json", str(tmp_path / "bench.json")]
        done = subprocess.run(
            [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"{cmd}\n{done.stdout}\n{done.stderr}"
        assert json.loads((tmp_path / "bench.json").read_text())


# ------------------------------------------------------------------ links


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    _, prose = _split(page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose, re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in PAGES:
        _, prose = _split(page.read_text(encoding="utf-8"))
        prose = re.sub(r"`[^`]*`", "", prose)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_slugs_follow_github() -> None:
    assert slug("The CI gate (`.ci/run`)") == "the-ci-gate-cirun"
    assert slug("`faults[]`: `region_outage`") == "faults-region_outage"
    assert slug("Calibrating a profile from a run's records") == (
        "calibrating-a-profile-from-a-runs-records"
    )


# ------------------------------------------------------------------ the scenario reference

_CORE = CoreConfig()
#: The key tables of docs/scenarios.md: heading -> (model, the instance whose values are the
#: defaults, or None for the class's own).
SECTIONS: dict[str, tuple[type, Any]] = {
    "Top level": (sc.Scenario, None),
    "`workers[]`": (sc.WorkerGroup, None),
    "`workers[].service`": (sc.ServiceModel, None),
    "`workload`": (sc.Workload, None),
    "`workload.prompt_tokens`, `workload.output_tokens`": (sc.Distribution, None),
    "`workload.phases[]`": (sc.Phase, None),
    "`heartbeat`": (sc.Heartbeats, None),
    "`network`": (sc.Network, None),
    "`store`": (sc.Store, None),
    "`faults[]`: `region_outage`": (sc.RegionOutage, None),
    "`faults[]`: `worker_crash`": (sc.WorkerCrash, None),
    "`faults[]`: `partition`": (sc.Partition, None),
    "`faults[]`: `gray_failure`": (sc.GrayFailure, None),
    "`faults[]`: `store_outage`": (sc.StoreOutage, None),
    "`faults[]`: `gateway_down`": (sc.GatewayDown, None),
    "`random_failures`": (sc.RandomFailures, None),
    "`policy`": (CoreConfig, _CORE),
    "`policy.retry`": (RetryConfig, _CORE.retry),
    "`policy.retry.backoff`": (Backoff, _CORE.retry.backoff),
    "`policy.worker_breaker`": (BreakerConfig, _CORE.worker_breaker),
    "`policy.route_breaker`": (BreakerConfig, _CORE.route_breaker),
    "`policy.default_quota`, `policy.global_quota`, `policy.tenant_quotas.<tenant>`": (
        QuotaConfig,
        None,
    ),
    "`policy.throttle`": (ThrottleConfig, _CORE.throttle),
    "`policy.shedding`": (ShedConfig, _CORE.shedding),
}
#: Types the field annotations do not show: a validator's choices, the union of fault kinds.
TYPES = {
    ("Top level", "faults"): "list of mapping (below)",
    ("`policy.retry.backoff`", "kind"): "one of " + ", ".join(BACKOFF_KINDS),
    ("`policy.worker_breaker`", "window"): "one of count, time",
    ("`policy.route_breaker`", "window"): "one of count, time",
}


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, BaseModel) or dataclasses.is_dataclass(value):
        return "(below)"
    if isinstance(value, str):
        return value or '""'
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def expected_rows(title: str) -> dict[str, tuple[str, str]]:
    """key -> (type, default) of one table, from the model."""
    cls, instance = SECTIONS[title]
    hints = get_type_hints(cls, include_extras=True)
    rows = {}
    if issubclass(cls, BaseModel):
        for name, info in cls.model_fields.items():
            default = info.get_default(call_default_factory=True)
            rows[name] = (type_name(hints[name]), "*required*" if info.is_required() else default)
    else:
        base = instance if instance is not None else cls()
        assert dataclasses.is_dataclass(base), title
        rows = {
            f.name: (type_name(hints[f.name]), getattr(base, f.name))
            for f in dataclasses.fields(base)
        }
    return {
        name: (TYPES.get((title, name), kind), d if d == "*required*" else _shown(d))
        for name, (kind, d) in rows.items()
    }


def documented_tables() -> dict[str, list[list[str]]]:
    """The tables under "## Every key" in docs/scenarios.md: heading -> rows of cells."""
    text = (ROOT / "docs" / "scenarios.md").read_text(encoding="utf-8")
    part = text.split("\n## Every key\n", 1)[1].split("\n## ", 1)[0]
    tables: dict[str, list[list[str]]] = {}
    for section in part.split("\n### ")[1:]:
        title, _, body = section.partition("\n")
        rows = [
            [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            for line in body.splitlines()
            if line.startswith("| ")
        ]
        assert rows and rows[0] == ["key", "type", "default", "meaning"], title
        tables[title.strip()] = rows[1:]
    return tables


def test_the_scenario_reference_has_every_section() -> None:
    assert list(documented_tables()) == list(SECTIONS)


@pytest.mark.parametrize("title", list(SECTIONS))
def test_the_scenario_reference_matches_the_model(title: str) -> None:
    """Every key of the model, its type and default as the model has them, and a meaning."""
    rows = documented_tables()[title]
    documented = {row[0].strip("`"): (row[1], row[2]) for row in rows}
    assert documented == expected_rows(title)
    assert len(documented) == len(rows), "a key is listed twice"
    assert all(row[3] for row in rows), "a key without a meaning"


def test_the_scenario_fields_are_all_in_a_section() -> None:
    """A new nested model under Scenario needs its own table."""
    covered = {cls for cls, _ in SECTIONS.values()}
    nested = set()
    for cls in covered:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            continue
        for hint in get_type_hints(cls).values():
            for arg in itertools.chain([hint], getattr(hint, "__args__", ())):
                for inner in itertools.chain([arg], getattr(arg, "__args__", ())):
                    if isinstance(inner, type) and issubclass(inner, BaseModel):
                        nested.add(inner)
    assert nested <= covered, nested - covered


# ------------------------------------------------------------------ figures from kept runs

VLLM_RUNS = ROOT / "docs" / "runs" / "vllm-parity-2026-12-07"


def _vllm_run(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A kept run's fit coefficients and its parity metrics by name ("ttft p50", ...)."""
    fit = json.loads((VLLM_RUNS / name / "calibrate.json").read_text())["pairs"][0]
    parity = json.loads((VLLM_RUNS / name / "parity.json").read_text())
    return fit["coefficients"], {m["metric"]: m for m in parity["metrics"]} | {
        f"{d['metric']} ks": d for d in parity["distances"]
    }


def _signed(x: float) -> str:
    return f"{x * 100:+.1f}"


def test_the_readme_vllm_table_is_the_kept_run() -> None:
    """README, "Sim-to-real against real vLLM": every figure of the table and the KS
    distances are the shipped profile's run (docs/runs/vllm-parity-2026-12-07)."""
    _, m = _vllm_run("shared-steps")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    qs = ("p50", "p90", "p99")

    def row(label: str, cells: list[str]) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    def error(k: str) -> str:
        lo, hi = m[k]["interval"]
        return f"{_signed(m[k]['error'])} % ({_signed(lo)} .. {_signed(hi)})"

    ttft = [
        f"{m[f'ttft {q}']['sim'] * 1e3:.1f} / {m[f'ttft {q}']['live'] * 1e3:.1f} ms" for q in qs
    ]
    e2e = [f"{m[f'e2e {q}']['sim'] * 1e3:,.0f} / {m[f'e2e {q}']['live'] * 1e3:,.0f} ms" for q in qs]
    assert row("TTFT, simulated / live", ttft) in readme
    assert row("TTFT error (95 % interval)", [error(f"ttft {q}") for q in qs]) in readme
    assert row("end-to-end, simulated / live", e2e) in readme
    assert row("end-to-end error (95 % interval)", [error(f"e2e {q}") for q in qs]) in readme
    ks = f"(TTFT {m['ttft ks']['ks']:.3f}, end-to-end {m['e2e ks']['ks']:.3f}, critical "
    assert ks + f"{m['ttft ks']['ks_critical_95']:.3f})" in " ".join(readme.split())


@pytest.mark.parametrize(
    ("name", "fitted"),
    [
        ("busier", "7.7 ms, 0.44 µs, 0.78 ms"),
        ("separate-steps", "7.6 ms, 0.20 µs, 0.70 ms"),
        ("shared-steps", "6.2 ms, 0.80 µs, 0.98 ms"),
    ],
)
def test_the_validation_vllm_rows_are_the_kept_runs(name: str, fitted: str) -> None:
    """docs/validation.md, "Against real vLLM": each row's fit and errors are its run's."""
    coef, m = _vllm_run(name)
    assert fitted == (
        f"{coef['floor_s'] * 1e3:.1f} ms, {coef['c_s'] * 1e6:.2f} µs, {coef['d_s'] * 1e3:.2f} ms"
    )
    errors = [
        " / ".join(_signed(m[f"{k} {q}"]["error"]) for q in ("p50", "p90", "p99")) + " %"
        for k in ("ttft", "e2e")
    ]
    text = (ROOT / "docs" / "validation.md").read_text(encoding="utf-8")
    assert any(
        line.startswith("| ") and f"| {fitted} | {errors[0]} | {errors[1]} |" in line
        for line in text.splitlines()
    ), (fitted, errors)
