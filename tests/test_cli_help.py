"""The ``haif`` command line as a user meets it: ``--version``, help texts written for
people, commands grouped, and configuration errors that point at what to fix."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

from haif.cli import COMMAND_GROUPS, build_parser, check_help, main, walk_parsers
from haif.configfile import ConfigError, known_keys
from haif.fleet.scenario import Scenario, load_scenario

ROOT = Path(__file__).resolve().parent.parent
FAILOVER = ROOT / "scenarios" / "failover.yaml"
SERVICES = ("gateway", "orchestrator", "worker")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"haif {importlib.metadata.version('haif')} (Python ")


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_parses_its_command_without_the_analysis_stack(service: str) -> None:
    """A service (re)started by ``haif up`` imports no pandas or matplotlib: they cost
    about 2 s of CPU at every start, on a machine busy with the cluster's failover."""
    probe = (
        "import contextlib, io, sys\n"
        "from haif.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        f"    main([{service!r}, '--help'])\n"
        "print(sorted(m for m in ('pandas', 'matplotlib') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_every_help_text_is_for_users() -> None:
    """No docstring markup, no "%%", and every command, flag and argument has help."""
    assert check_help(build_parser()) == []


def test_check_help_finds_what_is_wrong() -> None:
    parser = build_parser()
    _, sim = next((n, p) for n, p in walk_parsers(parser) if n == "sim")
    sim.description = "See :mod:`haif.sim` (95%% CI)."
    sim.add_argument("--bare")
    problems = check_help(parser)
    assert "haif sim: docstring markup in the description" in problems
    assert "haif sim --bare: no help" in problems


def test_every_subcommand_help_renders(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for name, sub in walk_parsers(parser):
        text = sub.format_help()
        assert "%%" not in text and "``" not in text and ":mod:" not in text, name
        assert not re.search(r":(func|class|meth):`", text), name
    capsys.readouterr()


def test_top_level_help_groups_user_and_service_commands(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: haif [-h] [--version] COMMAND ...")
    headings = [heading for heading, _ in COMMAND_GROUPS]
    positions = [text.index(f"\n{heading}:\n") for heading in headings]
    assert positions == sorted(positions)
    services = text[positions[-1] :]
    users = text[: positions[-1]]
    for command in SERVICES:
        assert re.search(rf"^  {command} ", services, re.MULTILINE), command
        assert not re.search(rf"^  {command} ", users, re.MULTILINE), command
    for command in ("sim", "sweep", "query", "up", "replay"):
        assert re.search(rf"^  {command} ", users, re.MULTILINE), command
    # argparse's own flat list of the commands is not shown as well.
    assert "positional arguments" not in text
    # Every command is in exactly one group.
    grouped = [c for _, names in COMMAND_GROUPS for c in names]
    commands = [n for n, _ in walk_parsers(build_parser()) if n and " " not in n]
    assert sorted(grouped) == sorted(commands)


# ------------------------------------------------------------------ configuration errors


@pytest.mark.parametrize(
    ("override", "field", "suggestion"),
    [
        ("workload.rate_scal=2", "workload.rate_scal", "did you mean workload.rate_scale?"),
        ("polcy.placement=jsq", "polcy", "did you mean policy?"),
        (
            "policy.retry.max_attemps=3",
            "policy.retry.max_attemps",
            "did you mean policy.retry.max_attempts?",
        ),
        ("faults.0.strt_s=3", "faults.0.strt_s", "did you mean faults.0.start_s?"),
        ("workers.0.prefx_cache=true", "workers.0.prefx_cache", "workers.0.prefix_cache?"),
    ],
)
def test_set_typo_names_the_flag_and_the_nearest_key(
    override: str, field: str, suggestion: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        load_scenario(FAILOVER, [override])
    text = str(info.value)
    assert f"  --set {override}: {field}: " in text, text
    assert suggestion in text, text
    assert f"{FAILOVER}:" not in text.split("\n", 1)[1], "blamed on the file"
    # The CLI prints it and exits 2.
    assert main(["sim", str(FAILOVER), "--set", override, "-q", "--out", "/nonexistent"]) == 2
    assert f"--set {override}" in capsys.readouterr().err


def test_set_bad_value_names_the_flag() -> None:
    with pytest.raises(ConfigError) as info:
        load_scenario(FAILOVER, ["workload.rate_scale=abc"])
    assert "--set workload.rate_scale=abc: workload.rate_scale: " in str(info.value)


def test_unknown_key_without_a_near_one_lists_the_keys() -> None:
    with pytest.raises(ConfigError) as info:
        load_scenario(FAILOVER, ["zzzz=1"])
    assert "(allowed here: name, description, seed" in str(info.value)


def test_errors_in_the_file_still_name_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("name: t\nregions: [a]\nworkers: [{region: a}]\nworklaod: {}\n")
    with pytest.raises(ConfigError) as info:
        load_scenario(path, ["seed=3"])  # an override elsewhere is not blamed
    text = str(info.value)
    assert f"{path}:4: worklaod: " in text and "did you mean workload?" in text, text
    assert "--set" not in text


def test_union_tags_are_not_part_of_the_path(tmp_path: Path) -> None:
    path = tmp_path / "fault.yaml"
    path.write_text(
        "name: f\nregions: [a]\nworkers: [{region: a}]\nfaults:\n"
        "  - {kind: region_outage, region: a, start_s: 1, end_s: 2, ed_s: 3}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    assert f"{path}:5: faults.0.ed_s: " in str(info.value)
    assert "did you mean faults.0.end_s?" in str(info.value)


def test_known_keys() -> None:
    keys = known_keys(Scenario, ["workload"])
    assert keys is not None and "rate_scale" in keys
    assert "max_attempts" in (known_keys(Scenario, ["policy", "retry"]) or [])
    assert "start_s" in (known_keys(Scenario, ["faults", 0, "region_outage"]) or [])
    assert known_keys(Scenario, ["nope"]) is None


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("name: x\nregions: [a\n  b: 3\n", 3, 4),
        ("name: x\n  bad: indentation\n", 2, 6),
        ("name: x\nname: [unclosed\n", 3, 1),
    ],
)
def test_yaml_syntax_error_names_file_and_line(
    tmp_path: Path, text: str, line: int, column: int, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}:{column}: not valid YAML: "), message
    assert "<unicode string>" not in message
    assert main(["sim", str(path), "-q", "--out", str(tmp_path / "out")]) == 2
    assert f"{path}:{line}:{column}: not valid YAML" in capsys.readouterr().err
