"""How far to trust the simulator: every validation against numbers no one here chose.

``haif validate`` runs these and prints one table (written to the report
folder as ``validation.md`` and ``validation.json``; the README's accuracy
table is that file's table). Each row says what was compared, the worst and
mean error, whether a coefficient was fitted to those very figures (in
sample) or not (out of sample), the source, and, where the error is outside
the bound, why: the explanation is computed from the data, not typed in.

* **LambdaLabs vLLM** (``haif/fleet/data/published.yaml``): the published
  benchmark (10 prompts at once) replayed through the simulator's batching
  engine with the packaged profile; mean TTFT and mean decode step.
* **Splitwise Llama-2-70B TP8**: the packaged coefficients against all 19
  cells (in sample: they were fitted to them), and a fit on one half of the
  cells (:func:`~haif.fleet.profiles.splitwise_halves`) against the other.
* **Prefix cache**: the engine over the Mooncake trace against an exact LRU
  replay of the same blocks.
* **Queueing theory** (:mod:`haif.analysis.queueing`): the simulator as M/M/c
  and M/D/1 queues against their closed forms, in 95 % intervals under 2 %.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from haif.analysis.queueing import QueueingCheck, queueing_checks
from haif.contracts import Request
from haif.fleet.engine import BatchingEngine, Seq
from haif.fleet.profiles import (
    PerfProfile,
    ProfileCatalog,
    SplitwiseCell,
    StepCoefficients,
    fit_cells,
    load_catalog,
    splitwise_cells,
    splitwise_errors,
    splitwise_halves,
)
from haif.fleet.traces import TRACES_DIR

BOUND = 0.10  # the bar: every published check within 10 %
SPLITWISE_CSV = TRACES_DIR / "splitwise_sim_perf_model.csv"
SPLITWISE_SOURCE = "Mutinifni/splitwise-sim@8f99e7d data/perf_model.csv (traces/)"
SPLITWISE_GPUS = {"A100-80G": "a100-80gb", "H100-80G": "h100-80gb"}


@dataclass(frozen=True, slots=True)
class Check:
    """One validation: ``error`` is the worst signed error, ``mean_abs`` the mean
    of the absolute errors over ``figures`` compared figures (relative errors,
    bound ``bound``)."""

    group: str
    name: str
    figures: int
    error: float
    mean_abs: float
    in_sample: bool
    source: str
    note: str = ""
    bound: float = BOUND
    unit: str = "relative"  # or "points": error and bound are differences of two shares
    sound: bool = True  # False: the check itself is in doubt (a queueing interval too wide)
    bound_label: str = ""  # how the table names the bound ("" : from bound and unit)

    @property
    def within(self) -> bool:
        return abs(self.error) <= self.bound

    @property
    def passed(self) -> bool:
        """What ``haif validate`` gates on: within the bound, or explained, and sound."""
        return (self.within or bool(self.note)) and self.sound


@dataclass(frozen=True, slots=True)
class PublishedRun:
    """One LambdaLabs benchmark run (see ``published.yaml`` for the setup)."""

    gpu: str
    model: str
    checkpoint: str
    file: str
    commit: str
    input_lens: tuple[int, ...]
    output_lens: tuple[int, ...]
    ttft_s: float
    step_s: float
    fitted: str

    @property
    def source(self) -> str:
        return f"LambdaLabsML/vllm-benchmark@{self.commit[:7]} {self.file}"


def published_runs() -> list[PublishedRun]:
    """The packaged LambdaLabs runs (``haif/fleet/data/published.yaml``)."""
    text = resources.files("haif.fleet.data").joinpath("published.yaml").read_text("utf-8")
    doc = yaml.safe_load(text)
    return [
        PublishedRun(
            gpu=str(r["gpu"]),
            model=str(r["model"]),
            checkpoint=str(r["checkpoint"]),
            file=str(r["file"]),
            commit=str(r["commit"]),
            input_lens=tuple(int(n) for n in r["input_lens"]),
            output_lens=tuple(int(n) for n in r["output_lens"]),
            ttft_s=float(r["ttft_ms"]) / 1e3,
            step_s=float(r["itl_ms"]) / 10 / 1e3,  # one streamed chunk per 10 steps
            fitted=str(r.get("fitted", "")),
        )
        for r in doc["lambdalabs"]["runs"]
    ]


def _run_to_idle(engine: BatchingEngine) -> None:
    """Drive ``engine`` at each of its deadlines until it has nothing left to time."""
    deadline = engine.next_deadline()
    while deadline is not None:
        engine.on_timer(deadline)
        deadline = engine.next_deadline()


def replay(
    profile: PerfProfile, prompts: Sequence[int], outputs: Sequence[int]
) -> tuple[float, float]:
    """(mean TTFT, mean decode step) of the prompts sent together at t=0 through
    the simulator's batching engine: TTFT over requests that return a token,
    the step pooled over every decode token (as a streamed benchmark pools its
    inter-token gaps)."""
    engine = BatchingEngine({profile.model.name: profile}, profile.model.name)
    seqs = [
        Seq(Request(f"r{i}", "t", profile.model.name, p, max(o, 1), 0.0))
        for i, (p, o) in enumerate(zip(prompts, outputs, strict=True))
    ]
    for s in seqs:
        engine.add(s, 0.0)
    _run_to_idle(engine)
    answered = [s for s, o in zip(seqs, outputs, strict=True) if o > 0]
    ttft = statistics.fmean(s.first_token_s or 0.0 for s in answered)
    decoding = [(s, o) for s, o in zip(seqs, outputs, strict=True) if o > 1]
    span = sum((s.finish_s or 0.0) - (s.first_token_s or 0.0) for s, _ in decoding)
    return ttft, span / sum(o - 1 for _, o in decoding)


def lambdalabs_checks(catalog: ProfileCatalog) -> list[Check]:
    out = []
    for run in published_runs():
        ttft, step = replay(catalog.get(run.gpu, run.model), run.input_lens, run.output_lens)
        label = f"{run.model} on {run.gpu}, 10 prompts ({sum(run.input_lens):,} tokens)"
        for what, model, measured in (
            ("TTFT", ttft, run.ttft_s),
            ("decode step", step, run.step_s),
        ):
            error = model / measured - 1
            out.append(
                Check(
                    group="LambdaLabs vLLM",
                    name=f"{label}: {what} {model * 1e3:.1f} vs {measured * 1e3:.1f} ms",
                    figures=1,
                    error=error,
                    mean_abs=abs(error),
                    in_sample=run.fitted == ("ttft" if what == "TTFT" else "step"),
                    source=run.source,
                )
            )
    return out


def splitwise_rows(hardware: str, path: str | Path = SPLITWISE_CSV) -> list[dict[str, str]]:
    """Splitwise's Llama-2-70B TP8 rows for one hardware name (e.g. ``h100-80gb``)."""
    with Path(path).open(newline="") as f:
        return [
            row
            for row in csv.DictReader(f)
            if row["model"] == "llama2-70b"
            and row["hardware"] == hardware
            and row["tensor_parallel"] == "8"
        ]


def _splitwise_check(
    name: str, coeffs: StepCoefficients, cells: Sequence[SplitwiseCell], in_sample: bool
) -> Check:
    rows = splitwise_errors(coeffs, cells)
    errors = [e for _, p, t in rows for e in (p, t)]
    worst = max(errors, key=abs)
    note = ""
    if abs(worst) > BOUND:
        cell, pe, te = max(rows, key=lambda r: max(abs(r[1]), abs(r[2])))
        prompt, token = cell.predicted(coeffs)
        kind, model, measured = (
            ("prompt", prompt, cell.prompt_time_s)
            if abs(pe) >= abs(te)
            else ("token", token, cell.token_time_s)
        )
        note = (
            f"worst: the {kind} time of {cell.batch_size} x {cell.prompt_size} tokens, "
            f"model {model * 1e3:.1f} vs measured {measured * 1e3:.1f} ms. "
            + _why(cells, abs(worst))
        )
    return Check(
        group="Splitwise Llama-2-70B TP8",
        name=name,
        figures=len(errors),
        error=worst,
        mean_abs=statistics.fmean(abs(e) for e in errors),
        in_sample=in_sample,
        source=SPLITWISE_SOURCE,
        note=note,
    )


def _why(cells: Sequence[SplitwiseCell], worst: float) -> str:
    """Why the error is that large: two measured prompt times that contradict any
    step time growing with the prefill tokens, when they force most of it; else
    the shape of the measured curve."""
    pairs = [
        (a.prompt_time_s / b.prompt_time_s, a, b)
        for a in cells
        for b in cells
        if a.prefill_tokens <= b.prefill_tokens and a.prompt_time_s > b.prompt_time_s
    ]
    if pairs:
        ratio, a, b = max(pairs, key=lambda p: p[0])
        forced = (ratio - 1) / (ratio + 1)
        if forced >= 0.8 * worst:
            return (
                f"Measured, {a.batch_size} x {a.prompt_size} tokens take "
                f"{a.prompt_time_s * 1e3:.1f} ms and {b.batch_size} x {b.prompt_size} take "
                f"{b.prompt_time_s * 1e3:.1f} ms ({ratio - 1:.0%} longer for no more tokens): "
                f"a step time that grows with the prefill tokens is off by at least "
                f"{forced:.1%} on one of them."
            )
    return (
        "Splitwise's prompt times are flat up to 512 tokens and then bend twice; the "
        "step model has one knee, fitted where the fitted cells put it."
    )


def splitwise_checks(catalog: ProfileCatalog, path: str | Path = SPLITWISE_CSV) -> list[Check]:
    out = []
    for gpu, hardware in sorted(SPLITWISE_GPUS.items()):
        rows = splitwise_rows(hardware, path)
        cells = splitwise_cells(rows)
        packaged = catalog.get(gpu, "llama-2-70b").coeffs
        out.append(
            _splitwise_check(f"{gpu}: packaged fit, all {len(cells)} cells", packaged, cells, True)
        )
        fit, held_out = splitwise_halves(cells)
        half = fit_cells(fit, f"llama2-70b, {hardware}, TP8, half")
        out.append(
            _splitwise_check(
                f"{gpu}: fit on {len(fit)} cells, the {len(held_out)} held out",
                half,
                held_out,
                False,
            )
        )
    return out


PREFIX_BOUND = 0.005  # the bar: within 0.5 points of an exact LRU replay
MOONCAKE_SOURCE = (
    "kvcache-ai/Mooncake@3b5a594 FAST25-release/traces/conversation_trace.jsonl (traces/)"
)
MOONCAKE_LRU_BLOCKS = 5_859  # 3M tokens of 512-token blocks: the published LRU size


def prefix_cache_checks() -> list[Check]:
    """The engine's prefix cache over the Mooncake conversation trace, one request at
    a time (none overlap), against an exact offline LRU replay of the same blocks:
    a KV pool that holds every block, and one of 3M tokens that must evict."""
    import random

    from haif.fleet.profiles import GpuSpec, ModelSpec
    from haif.fleet.traces import load_mooncake, prefix_reuse

    requests = load_mooncake(TRACES_DIR / "mooncake_fast25_conversation.jsonl", random.Random(7))
    # Timing does not matter here, only the pool: a plain 10 ms step.
    gpu = GpuSpec("pool", 80.0, 0.0, 1.0, 1.0, source="validation")
    spec = ModelSpec("m", 1.0, 1.0, 1, 1, 1, source="validation")
    coeffs = StepCoefficients(0.01, 0.0, 0.0, 0.0, 0.0, source="validation")
    out = []
    for label, pool_tokens, blocks in (
        ("a KV pool that holds every block", 10**8, None),
        ("a 3M-token KV pool that evicts", MOONCAKE_LRU_BLOCKS * 512, MOONCAKE_LRU_BLOCKS),
    ):
        profile = PerfProfile(gpu, spec, coeffs, 64, pool_tokens, 0.0, 0.0)
        engine = BatchingEngine({"m": profile}, "m", prefix_cache=True)
        for i, r in enumerate(requests):
            engine.add(
                Seq(
                    Request(
                        f"r{i}",
                        "t",
                        "m",
                        r.prompt_tokens,
                        r.output_tokens,
                        0.0,
                        prefix_hashes=r.hash_ids,
                    )
                ),
                engine.clock,
            )
            _run_to_idle(engine)  # to the end of this request: none overlap
        assert engine.prefix is not None
        hit = engine.prefix.hits / engine.prefix.lookups
        exact = prefix_reuse(requests, blocks)
        out.append(
            Check(
                group="Prefix cache",
                name=f"Mooncake conversation trace ({len(requests):,} requests), {label}: "
                f"engine {hit:.2%} vs exact LRU replay {exact:.2%} of blocks reused",
                figures=1,
                error=hit - exact,
                mean_abs=abs(hit - exact),
                in_sample=False,
                source=MOONCAKE_SOURCE,
                bound=PREFIX_BOUND,
                unit="points",
            )
        )
    return out


def profile_checks(catalog: ProfileCatalog | None = None) -> list[Check]:
    """The GPU-profile validations (fast: no simulation beyond ten requests)."""
    cat = catalog or load_catalog()
    return lambdalabs_checks(cat) + splitwise_checks(cat)


# ---------------------------------------------------------------- output


def format_error(c: Check) -> tuple[str, str]:
    """(worst, mean) as the table prints them: relative in %, shares in points."""
    if c.unit == "points":
        return f"{c.error * 100:+.2f} pts", f"{c.mean_abs * 100:.2f} pts"
    return f"{c.error:+.1%}", f"{c.mean_abs:.1%}"


def format_bound(c: Check) -> str:
    if c.bound_label:
        return c.bound_label
    return f"{c.bound * 100:g} pts" if c.unit == "points" else f"{c.bound:.0%}"


def verdict(c: Check) -> str:
    """``yes (bound)``, or ``no (bound)`` and why."""
    if c.within:
        return f"yes ({format_bound(c)})"
    return f"no ({format_bound(c)})" + (f": {c.note}" if c.note else "")


def markdown_table(checks: Iterable[Check]) -> str:
    """The accuracy table (README and ``validation.md``)."""
    lines = [
        "| check | compared | worst error | mean abs. error | sample | within bound? |",
        "|---|---:|---:|---:|---|---|",
    ]
    for c in checks:
        sample = "in sample" if c.in_sample else "out of sample"
        worst, mean = format_error(c)
        lines.append(
            f"| {c.group}: {c.name} | {c.figures} | {worst} | {mean} | {sample} | {verdict(c)} |"
        )
    return "\n".join(lines) + "\n"


def write_validation(checks: Sequence[Check], out: str | Path) -> tuple[Path, Path]:
    """``validation.md`` (the table and each row's source) and ``validation.json``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    md = folder / "validation.md"
    sources = sorted({c.source for c in checks})
    md.write_text(
        "# Validation\n\n"
        + markdown_table(checks)
        + "\nSources:\n\n"
        + "".join(f"- {s}\n" for s in sources),
        encoding="utf-8",
    )
    js = folder / "validation.json"
    rows: list[dict[str, Any]] = [asdict(c) | {"within": c.within} for c in checks]
    js.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return md, js


def queueing_rows(rows: Iterable[QueueingCheck]) -> list[Check]:
    """:mod:`haif.analysis.queueing`'s rows as table rows: the error is the simulated
    estimate against the closed form, the bound the 95 % interval's half-width (so
    a row is within exactly when the formula lies in the interval). A row sized
    for 2 % whose interval is wider, or whose inputs stray from their known means
    (|z| >= 4), is not sound."""
    out = []
    for q in rows:
        sized = f"+-{q.rel_half_width:.2%}" + ("" if q.sized else ", not sized for 2 %")
        out.append(
            Check(
                group="Queueing theory",
                name=f"{q.name}, {q.metric}: simulated {q.estimate:.4g} ({sized}) vs "
                f"formula {q.formula:.4g}, {q.customers:,} customers in "
                f"{q.replications} replications",
                figures=1,
                error=q.estimate / q.formula - 1,
                mean_abs=abs(q.estimate / q.formula - 1),
                in_sample=False,
                source="Erlang C (M/M/c), Pollaczek-Khinchine (M/D/1)",
                bound=q.rel_half_width * q.estimate / q.formula,
                sound=(q.powered or not q.sized) and all(abs(z) < 4 for z in q.control_z),
                bound_label="formula in the 95 % interval",
            )
        )
    return out


def all_checks(
    *,
    queueing: bool = True,
    quick: bool = False,
    progress: Callable[[str], None] | None = None,
    queueing_done: Sequence[QueueingCheck] | None = None,
) -> list[Check]:
    """Every validation ``haif validate`` reports, in table order (``queueing_done``:
    queueing rows already run, e.g. by a test fixture)."""
    say = progress or (lambda _text: None)
    say("GPU profiles")
    checks = profile_checks()
    say("prefix cache (Mooncake trace)")
    checks += prefix_cache_checks()
    if queueing_done is not None:
        checks += queueing_rows(queueing_done)
    elif queueing:
        done = queueing_checks(
            quick=quick,
            progress=lambda name, r, n: say(f"queueing: {name}, replication {r} of {n}"),
        )
        checks += queueing_rows(done)
    return checks
