"""``haif calibrate``: fit a GPU x model step-time profile to the records of a run.

The simulator times a continuous-batching step as
``max(floor, a + b*N + e*S) + c*C + d*B`` (:mod:`haif.fleet.profiles`). A
request record (:mod:`haif.records`) does not show the steps, but it shows
the two phases of every request, so each ok request with at least two output
tokens gives two observations:

* **prefill**: ``TTFT = first_token_s - admitted_s`` (``arrival_s`` when the
  record has no admission time), minus the per-request overhead the simulator
  adds on top of the prefill step (``--overhead``, default the catalog's
  ``api_overhead_s``), taken as one step prefilling ``N = prompt_tokens``
  (``S = N**2``, ``B = 1``, nothing decoding);
* **decode**: the mean inter-token time ``(finish_s - first_token_s) /
  (output_tokens - 1)``, taken as one decode step of the batch the request
  shared its worker with: ``B`` = the time-averaged number of requests of the
  same ``worker_id`` decoding at once during that interval, ``C`` = the
  time-averaged total context of those requests (each one's context grows
  linearly from ``prompt + 1`` to ``prompt + output - 1`` while it decodes).

Requests that were retried (their first token may come from another worker)
are left out; cold starts are left out of the prefill fit (their TTFT holds
the weight load). ``floor, c, d`` are fitted to the decode observations,
then ``a, b, e`` to the prefills above the floor (as
:func:`~haif.fleet.profiles.fit_coefficients` does for Splitwise), each by
least squares on the relative error with every coefficient >= 0. No knee is
fitted. A coefficient the records cannot identify (every decode at the same
batch size, every prompt of the same length, ...) is kept at 0, or at the
``--base`` GPU's value for that model, and the reason is reported.

The fitted pairs are written as a catalog (the packaged one, or ``--catalog``,
plus the fitted pairs) that a scenario uses with ``profiles: PATH``; the
error of the fit on its own records (TTFT and time per output token,
median and p90 of the absolute relative error) is printed and written to
``calibrate.json`` next to the catalog.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from haif.configfile import ConfigError
from haif.contracts import RequestRecord
from haif.fleet.profiles import (
    ProfileCatalog,
    StepCoefficients,
    _weighted_nonneg_lstsq,
    load_catalog,
)
from haif.records import SCHEMA

__all__ = [
    "CalibrationError",
    "PairFit",
    "PairObservations",
    "add_calibrate_command",
    "catalog_document",
    "collect",
    "fit_pair",
    "read_records",
    "records_file",
    "write_catalog",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

MIN_FLOOR_S = 1e-6  # StepCoefficients need floor > 0
IDENTIFIABLE = 0.02  # a term whose part not explained by the earlier ones is < 2% of it is not
UNKNOWN = "unknown"  # gpu_class / worker_id of a record that has none
MIN_IDLE = 10  # fit the TTFTs of requests that found their worker idle when this many did
FLOOR_MARGIN = 0.02  # prefills within 2% of the floor are taken as floor-bound, not fitted
STALL_ITERATIONS = 4  # decode / prefill fits alternated while taking prefill stalls out
COEFFICIENTS = ("floor_s", "a_s", "b_s", "c_s", "d_s", "e_s")


class CalibrationError(ConfigError):
    """The records cannot be calibrated (the message says why)."""


# ------------------------------------------------------------------ observations


@dataclass(frozen=True, slots=True)
class PairObservations:
    """One (gpu_class, model): a row per usable request, with masks of what it can show."""

    gpu: str
    model: str
    skipped: Mapping[str, int]  # reason -> requests of this pair left out entirely
    prompt: FloatArray  # N
    ttft_s: FloatArray  # first_token - admitted
    prefill_ok: BoolArray  # TTFT usable (not a cold start, > 0, prompt > 0)
    idle: BoolArray  # no other request was active on the worker between admission and first token
    decode_steps: FloatArray  # output_tokens - 1
    decode_s: FloatArray  # finish - first_token
    batch: FloatArray  # time-averaged sequences decoding on the worker (B)
    context: FloatArray  # time-averaged context tokens decoding on the worker (C)
    stalls: tuple[FloatArray, ...]  # prompts of others prefilled on the worker meanwhile

    @property
    def decode_ok(self) -> BoolArray:
        return self.decode_s > 0

    @property
    def tpot_s(self) -> FloatArray:
        return self.decode_s / self.decode_steps


@dataclass(frozen=True, slots=True)
class _Load:
    batch: float
    context: float
    idle: bool
    stalls: FloatArray


def _worker_load(rows: Sequence[RequestRecord]) -> dict[str, _Load]:
    """What each request of one worker shared it with.

    A request decodes from its first token to its finish; its context rises
    linearly from ``prompt + 1`` to ``prompt + output - 1`` meanwhile, so the
    integral over an overlap is its length times the value at its middle.
    B and C are time averages over the request's own decode interval; it was
    *idle* when no other request (of any status) was active on the worker
    between its admission and its first token; its *stalls* are the prompts
    of the requests whose first token came while it decoded.
    """
    rows = sorted(rows, key=lambda r: r.admitted_s if r.admitted_s is not None else r.arrival_s)
    start = np.array([r.admitted_s if r.admitted_s is not None else r.arrival_s for r in rows])
    finish = np.array([r.finish_s for r in rows], dtype=float)
    decoding = np.array([r.status == "ok" and r.first_token_s is not None for r in rows])
    first = np.array([r.first_token_s if r.first_token_s is not None else np.nan for r in rows])
    prompt = np.array([r.prompt_tokens for r in rows], dtype=float)
    output = np.array([r.output_tokens for r in rows], dtype=float)
    f, e = np.where(decoding, first, 0.0), np.where(decoding, finish, 0.0)  # empty if not
    span = e - f
    longest = float((finish - start).max()) if len(rows) else 0.0
    out: dict[str, _Load] = {}
    for j, r in enumerate(rows):
        if not decoding[j]:
            continue
        # Only requests active at some point of [start_j, finish_j] matter.
        a = int(np.searchsorted(start, start[j] - longest, side="left"))
        b = max(int(np.searchsorted(start, finish[j], side="left")), j + 1)
        w = slice(a, b)
        others = np.arange(a, b) != j
        busy = others & (start[w] < first[j]) & (finish[w] > start[j])
        if span[j] > 0:
            fw, ew, sw, dw = f[w], e[w], span[w], decoding[w]
            lo, hi = np.maximum(fw, f[j]), np.minimum(ew, e[j])
            overlap = np.where(dw, np.clip(hi - lo, 0.0, None), 0.0)
            frac = np.where(sw > 0, ((lo + hi) / 2 - fw) / np.where(sw > 0, sw, 1.0), 0.5)
            ctx = prompt[w] + 1 + np.maximum(output[w] - 2, 0) * frac
            batch = float(overlap.sum() / span[j])
            context = float((overlap * ctx).sum() / span[j])
            stalls = prompt[w][others & dw & (fw > f[j]) & (fw < e[j])]
        else:
            batch, context, stalls = 1.0, float(prompt[j]), np.zeros(0)
        out[r.request_id] = _Load(batch, context, not busy.any(), stalls)
    return out


def collect(records: Sequence[RequestRecord]) -> dict[tuple[str, str], PairObservations]:
    """Group usable requests by (gpu_class, model) with their prefill and decode observations.

    Every request of a worker counts toward what its others shared it with
    (:func:`_worker_load`); a request is observed when it is ok with a first
    token, has >= 2 output tokens and ran in one attempt.
    """
    by_worker: dict[str, list[RequestRecord]] = {}
    for r in records:
        if r.worker_id is not None:
            by_worker.setdefault(r.worker_id, []).append(r)
    load: dict[str, _Load] = {}
    for rows in by_worker.values():
        load.update(_worker_load(rows))

    groups: dict[tuple[str, str], list[RequestRecord]] = {}
    skipped: dict[tuple[str, str], dict[str, int]] = {}
    for r in records:
        if r.status != "ok" or r.first_token_s is None:
            continue
        key = (r.gpu_class or UNKNOWN, r.model)
        reason = (
            "fewer than 2 output tokens"
            if r.output_tokens < 2
            else "retried (attempts > 1)"
            if r.attempts > 1
            else "no worker_id"
            if r.request_id not in load
            else None
        )
        if reason is not None:
            counts = skipped.setdefault(key, {})
            counts[reason] = counts.get(reason, 0) + 1
            continue
        groups.setdefault(key, []).append(r)

    out: dict[tuple[str, str], PairObservations] = {}
    for key, rows in sorted(groups.items()):
        first = np.array([r.first_token_s for r in rows], dtype=float)
        start = np.array(
            [r.admitted_s if r.admitted_s is not None else r.arrival_s for r in rows], dtype=float
        )
        prompt = np.array([r.prompt_tokens for r in rows], dtype=float)
        ttft = first - start
        cold = np.array([r.cold_start for r in rows], dtype=bool)
        loads = [load[r.request_id] for r in rows]
        out[key] = PairObservations(
            gpu=key[0],
            model=key[1],
            skipped=dict(skipped.get(key, {})),
            prompt=prompt,
            ttft_s=ttft,
            prefill_ok=(~cold) & (ttft > 0) & (prompt > 0),
            idle=np.array([x.idle for x in loads], dtype=bool),
            decode_steps=np.array([r.output_tokens - 1 for r in rows], dtype=float),
            decode_s=np.array([r.finish_s for r in rows], dtype=float) - first,
            batch=np.array([x.batch for x in loads]),
            context=np.array([x.context for x in loads]),
            stalls=tuple(x.stalls for x in loads),
        )
    return out


# ------------------------------------------------------------------ fitting


@dataclass(frozen=True, slots=True)
class _Term:
    name: str
    column: FloatArray
    why_not: Callable[[], str]  # the reason when it cannot be identified


class _Fitter:
    """Collects fitted values, the coefficients that could not be identified, and notes."""

    def __init__(self, base: Mapping[str, float] | None) -> None:
        self.base = base
        self.values: dict[str, float] = {}
        self.unidentified: set[str] = set()
        self.notes: list[str] = []

    def keep(self, names: Sequence[str], reason: str) -> None:
        """``names`` cannot be identified: keep them at the base value (or 0)."""
        for name in names:
            self.values[name] = self.base[name] if self.base is not None else 0.0
            self.unidentified.add(name)
        kept = "the --base GPU's value" if self.base is not None else "0"
        self.notes.append(f"{', '.join(names)} cannot be identified: {reason}; kept at {kept}")

    def fit(self, y: FloatArray, terms: Sequence[_Term]) -> None:
        """Non-negative least squares on the relative error of ``y ~ sum(coef * column)``.

        Terms are tried in order; one whose column (weighted by 1/y) is, to within
        :data:`IDENTIFIABLE`, a combination of the terms before it cannot be told
        apart from them and is kept (:meth:`keep`).
        """
        scale = 1.0 / y
        included: list[_Term] = []
        for term in terms:
            w = term.column * scale
            reason: str | None = None
            if len(included) >= len(y):
                reason = f"too few observations ({len(y)})"
            elif not np.any(w):
                reason = term.why_not()
            elif included:
                x = np.column_stack([t.column * scale for t in included])
                sol, *_ = np.linalg.lstsq(x, w, rcond=None)
                if np.linalg.norm(w - x @ sol) < IDENTIFIABLE * np.linalg.norm(w):
                    reason = term.why_not()
            if reason is None:
                included.append(term)
            else:
                self.keep([term.name], reason)
        if not included:
            return
        rest = y.copy()
        for t in terms:
            if t.name in self.values:
                rest -= self.values[t.name] * t.column
        rows = rest > 0  # rows the kept terms already explain tell nothing about the others
        if not rows.any():
            self.keep([t.name for t in included], "the kept terms explain every observation")
            return
        x = np.column_stack([t.column for t in included])[rows]
        # _weighted_nonneg_lstsq divides by its target; these weights make that 1/y.
        weights = (rest[rows] / y[rows]) ** 2
        coef = _weighted_nonneg_lstsq(x, rest[rows], weights, tuple(range(len(included))))
        for t, value in zip(included, coef, strict=True):
            self.values[t.name] = float(value)


def _span(values: FloatArray) -> str:
    return f"{values.min():.4g}-{values.max():.4g}" if len(values) else "none"


def _prefill_seconds(prompts: FloatArray, v: Mapping[str, float]) -> FloatArray:
    """The step model's prefill of each prompt alone (B = 1, nothing decoding)."""
    compute = v["a_s"] + v["b_s"] * prompts + v["e_s"] * prompts * prompts
    return np.asarray(np.maximum(v["floor_s"], compute) + v["d_s"], dtype=np.float64)


def _stall_seconds(
    obs: PairObservations, v: Mapping[str, float] | None, shared: bool = False
) -> FloatArray:
    """Per request: the time the others' prefills on its worker added to its decode, as the
    model times them: a step of their own each, or (``shared``: the prompt joins a step of
    the running decodes, which still emits their tokens) what the prefill adds beyond the
    floor of that step."""
    if v is None:
        return np.zeros(len(obs.prompt))
    floor = v["floor_s"] if shared else 0.0
    return np.array([float((_prefill_seconds(n, v) - floor).sum()) for n in obs.stalls])


def _fit_decode(obs: PairObservations, stall_s: FloatArray, f: _Fitter) -> None:
    m = obs.decode_ok
    y = (obs.decode_s[m] - stall_s[m]) / obs.decode_steps[m]
    b, c = obs.batch[m][y > 0], obs.context[m][y > 0]
    if int((y <= 0).sum()):
        f.notes.append(
            f"{int((y <= 0).sum())} decode intervals are no longer than the prefills of the "
            "requests that joined meanwhile, and are left out of the decode fit"
        )
    y = y[y > 0]
    if not len(y):
        f.keep(["floor_s", "d_s", "c_s"], "no decode observations")
    else:
        per_seq = c / np.where(b > 0, b, 1.0)
        f.fit(
            y,
            [
                _Term("floor_s", np.ones(len(y)), lambda: "no decode observations"),
                _Term(
                    "d_s",
                    b,
                    lambda: f"every decode ran at about the same batch size (B {_span(b)})",
                ),
                _Term(
                    "c_s",
                    c,
                    lambda: (
                        "the decode context does not vary apart from the batch size "
                        f"(context per sequence {_span(per_seq)} tokens)"
                    ),
                ),
            ],
        )
    if f.values["floor_s"] < MIN_FLOOR_S:
        f.notes.append(
            f"floor_s came out {f.values['floor_s']:.3g} s; set to {MIN_FLOOR_S:g} s "
            "(the step model needs a positive floor)"
        )
        f.values["floor_s"] = MIN_FLOOR_S


def _prefill_rows(obs: PairObservations) -> tuple[BoolArray, str | None]:
    """The TTFTs to fit: those of requests that found their worker idle, if enough did."""
    idle = obs.prefill_ok & obs.idle
    if int(idle.sum()) >= MIN_IDLE:
        return idle, None
    return obs.prefill_ok, (
        f"only {int(idle.sum())} requests found their worker idle; the prefill fit uses all "
        f"{int(obs.prefill_ok.sum())} TTFTs, which include waiting behind other requests"
    )


def _fit_prefill(obs: PairObservations, overhead_s: float, f: _Fitter) -> None:
    m, why = _prefill_rows(obs)
    if why:
        f.notes.append(why)
    y_all = obs.ttft_s[m] - overhead_s
    short = int((y_all <= 0).sum())
    if short:
        f.notes.append(
            f"{short} of {len(y_all)} TTFTs are not longer than the overhead "
            f"({overhead_s * 1000:.4g} ms) and are left out of the prefill fit (see --overhead)"
        )
    n_all = obs.prompt[m][y_all > 0]
    z = y_all[y_all > 0] - f.values["d_s"]  # the prefill step of one sequence: B = 1
    above = z > f.values["floor_s"] * (1 + FLOOR_MARGIN)
    n, y = n_all[above], z[above]
    if not len(y):
        why = (
            "no prefill observations"
            if not len(z)
            else f"the prefill never took longer than the decode floor "
            f"({f.values['floor_s'] * 1000:.4g} ms)"
        )
        f.keep(["a_s", "b_s", "e_s"], why)
        return
    lengths = np.unique(n)
    f.fit(
        y,
        [
            _Term("a_s", np.ones(len(y)), lambda: "no prefill observations"),
            _Term(
                "b_s",
                n,
                lambda: (
                    f"every prompt had {int(lengths[0])} tokens"
                    if len(lengths) == 1
                    else "the prompt length does not vary enough"
                ),
            ),
            _Term(
                "e_s",
                n * n,
                lambda: (
                    f"every prompt had {int(lengths[0])} tokens"
                    if len(lengths) == 1
                    else f"only {len(lengths)} prompt lengths (3 or more tell N^2 from N)"
                    if len(lengths) < 3
                    else "the prompt lengths do not vary enough to tell N^2 from N"
                ),
            ),
        ],
    )


def _abs_error(values: FloatArray) -> dict[str, float | None]:
    a = np.abs(values)
    if not len(a):
        return {"median": None, "p90": None, "max": None, "mean_signed": None}
    return {
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "max": float(a.max()),
        "mean_signed": float(values.mean()),
    }


def _range(values: FloatArray) -> list[float] | None:
    return [float(values.min()), float(values.max())] if len(values) else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


@dataclass(frozen=True, slots=True)
class PairFit:
    """The fitted coefficients of one (gpu_class, model) and their error on its records."""

    obs: PairObservations
    coeffs: StepCoefficients
    sources: Mapping[str, str]  # coefficient -> where its value comes from
    overhead_s: float
    prefill_stalls: bool
    notes: tuple[str, ...]
    fitted: tuple[str, ...]  # the coefficients fitted; the others were kept

    @property
    def gpu(self) -> str:
        return self.obs.gpu

    @property
    def model(self) -> str:
        return self.obs.model

    def _values(self) -> dict[str, float]:
        return {n: float(getattr(self.coeffs, n)) for n in COEFFICIENTS}

    def ttft_error(self, idle_only: bool = False) -> FloatArray:
        """Signed relative error of overhead + prefill step vs first_token - admitted."""
        m = self.obs.prefill_ok & (self.obs.idle if idle_only else True)
        predicted = self.overhead_s + _prefill_seconds(self.obs.prompt[m], self._values())
        measured = self.obs.ttft_s[m]
        return np.asarray((predicted - measured) / measured, dtype=np.float64)

    def tpot_error(self) -> FloatArray:
        """Signed relative error of the time per output token: a decode step at the
        observed (B, C), plus the others' prefills meanwhile spread over its tokens."""
        o, k = self.obs, self.coeffs
        m = o.decode_ok
        stall = _stall_seconds(o, self._values() if self.prefill_stalls else None)[m]
        predicted = k.floor_s + k.c_s * o.context[m] + k.d_s * o.batch[m]
        predicted = predicted + stall / o.decode_steps[m]
        measured = o.tpot_s[m]
        return np.asarray((predicted - measured) / measured, dtype=np.float64)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: coefficients, observation counts and ranges, errors, notes."""
        o = self.obs
        dm = o.decode_ok
        return {
            "gpu": self.gpu,
            "model": self.model,
            "coefficients": self._values(),
            "fitted": list(self.fitted),
            "overhead_s": self.overhead_s,
            "prefill_stalls": self.prefill_stalls,
            "requests": len(o.prompt),
            "skipped": dict(o.skipped),
            "prefill_observations": int(o.prefill_ok.sum()),
            "idle_prefill_observations": int((o.prefill_ok & o.idle).sum()),
            "decode_observations": int(dm.sum()),
            "prompt_tokens_range": _range(o.prompt[o.prefill_ok]),
            "batch_range": _range(o.batch[dm]),
            "context_range": _range(o.context[dm]),
            "ttft_abs_rel_error": _abs_error(self.ttft_error()),
            "ttft_idle_abs_rel_error": _abs_error(self.ttft_error(idle_only=True)),
            "tpot_abs_rel_error": _abs_error(self.tpot_error()),
            "notes": list(self.notes),
            "sources": dict(self.sources),
        }


def _coefficients(values: Mapping[str, float], source: str) -> StepCoefficients:
    return StepCoefficients(
        floor_s=values["floor_s"],
        a_s=values["a_s"],
        b_s=values["b_s"],
        c_s=values["c_s"],
        d_s=values["d_s"],
        e_s=values["e_s"],
        source=source,
    )


def fit_pair(
    obs: PairObservations,
    *,
    overhead_s: float,
    origin: str,
    base: StepCoefficients | None = None,
    base_label: str = "",
    prefill_stalls: bool = True,
    shared_steps: bool = False,
) -> PairFit:
    """Fit the step coefficients of one pair.

    ``origin`` names the records (and the date) in the sources; ``base``
    (described by ``base_label``) supplies what the records cannot identify.
    With ``prefill_stalls`` the prefills of requests that joined a worker
    are taken out of the decode intervals of those decoding there (they pause
    decoding: vLLM without chunked prefill, the transformers engine, the
    simulator's iteration level); the decode and prefill fits then alternate
    until the stalls settle. ``shared_steps``: a joining prompt is prefilled in
    a step that also decodes the running sequences (vLLM v1; a scenario's
    ``chunked_prefill_tokens``), so it stalls them by its prefill beyond the floor.
    """
    base_values = {n: float(getattr(base, n)) for n in COEFFICIENTS} if base else None
    f = _Fitter(base_values)
    previous: dict[str, float] | None = None
    for _ in range(STALL_ITERATIONS if prefill_stalls else 1):
        f = _Fitter(base_values)
        _fit_decode(obs, _stall_seconds(obs, previous, shared_steps), f)
        _fit_prefill(obs, overhead_s, f)
        previous = dict(f.values)
    fitted = tuple(n for n in COEFFICIENTS if n not in f.unidentified)
    values = {
        n: max(float(f"{f.values[n]:.4g}") if n in fitted else f.values[n], 0.0)
        for n in COEFFICIENTS
    }
    values["floor_s"] = max(values["floor_s"], MIN_FLOOR_S)
    draft = PairFit(obs, _coefficients(values, "draft"), {}, overhead_s, prefill_stalls, (), fitted)
    n_idle = int((obs.prefill_ok & obs.idle).sum())
    fitted_ttfts = f"{n_idle} on an idle worker fitted" if n_idle >= MIN_IDLE else "all fitted"
    label = (
        f"fitted by haif calibrate to {origin}: {obs.gpu}, {obs.model}, "
        f"{int(obs.prefill_ok.sum())} TTFTs ({fitted_ttfts}), {int(obs.decode_ok.sum())} "
        f"decode intervals, overhead {overhead_s * 1000:.4g} ms"
        f"{', prefill stalls taken out' if prefill_stalls else ''}"
        f"{' (prefills share steps with decodes)' if prefill_stalls and shared_steps else ''}"
        "; median |relative error|: "
        f"TTFT {_pct(_abs_error(draft.ttft_error(idle_only=True))['median'])} on an idle "
        f"worker, {_pct(_abs_error(draft.ttft_error())['median'])} in all, "
        f"time per output token {_pct(_abs_error(draft.tpot_error())['median'])}"
    )
    kept = f"kept at {base_label}'s value" if base is not None else "kept at 0"
    sources = {
        n: label if n in fitted else f"not identifiable from {origin}; {kept}" for n in COEFFICIENTS
    }
    coeffs = _coefficients(values, "; ".join(f"{k}: {v}" for k, v in sources.items()))
    return PairFit(obs, coeffs, sources, overhead_s, prefill_stalls, tuple(f.notes), fitted)


# ------------------------------------------------------------------ catalog


def _packaged_text() -> str:
    return resources.files("haif.fleet.data").joinpath("profiles.yaml").read_text(encoding="utf-8")


def catalog_document(
    doc: Mapping[str, Any],
    fits: Sequence[PairFit],
    *,
    names: Mapping[tuple[str, str], tuple[str, str]],
    hardware_from: str,
) -> tuple[dict[str, Any], list[str]]:
    """A catalog document: ``doc`` plus the fitted pairs, and notes on what changed.

    ``names`` maps each fit's (gpu, model) to the (gpu, model) it is written as;
    a GPU not in ``doc`` is added with the hardware figures of ``hardware_from``
    (marked as assumptions: records measure times, not hardware).
    """
    out: dict[str, Any] = json.loads(json.dumps(doc))  # a deep copy of plain YAML data
    gpus: dict[str, Any] = out.setdefault("gpus", {})
    models: dict[str, Any] = out.setdefault("models", {})
    coefficients: list[dict[str, Any]] = list(out.get("coefficients") or [])
    notes: list[str] = []
    for fit in fits:
        gpu, model_name = names[(fit.gpu, fit.model)]
        if model_name not in models:
            raise CalibrationError(
                f"model {model_name!r} is not in the catalog "
                f"(models: {', '.join(sorted(models))}); pass --as-model NAME, "
                "or add the model to a catalog and pass --catalog"
            )
        if gpu not in gpus:
            if hardware_from not in gpus:
                raise CalibrationError(
                    f"GPU {hardware_from!r} (hardware figures for {gpu!r}) is not in the catalog "
                    f"(GPUs: {', '.join(sorted(gpus))})"
                )
            src = gpus[hardware_from]
            entry = {k: v for k, v in src.items() if k != "sources"}
            entry["sources"] = {
                k: f"assumption: copied from catalog GPU {hardware_from} by haif calibrate "
                f"(records measure step times, not hardware): {v}"
                for k, v in (src.get("sources") or {}).items()
            }
            gpus[gpu] = entry
            notes.append(f"new GPU {gpu!r}: hardware figures copied from {hardware_from!r}")
        model = models[model_name]
        allowed = list(model.get("allowed_gpus") or [])
        if allowed and gpu not in allowed:
            model["allowed_gpus"] = [*allowed, gpu]
            model["sources"]["allowed_gpus"] = (
                f"{model['sources'].get('allowed_gpus', '')}; {gpu}: measured there "
                "(haif calibrate)"
            )
        before = len(coefficients)
        coefficients = [
            c for c in coefficients if (str(c.get("gpu")), str(c.get("model"))) != (gpu, model_name)
        ]
        if len(coefficients) < before:
            notes.append(f"replaced the catalog's coefficients of {model_name} on {gpu}")
        entry = {"gpu": gpu, "model": model_name}
        entry.update({n: getattr(fit.coeffs, n) for n in COEFFICIENTS})
        entry.update({"knee_tokens": 0, "b2_s": 0.0})
        entry["sources"] = {
            **fit.sources,
            "knee_tokens": "not fitted by haif calibrate (no knee)",
            "b2_s": "not fitted by haif calibrate (no knee)",
        }
        coefficients.append(entry)
    out["coefficients"] = coefficients
    return out, notes


def write_catalog(
    fits: Sequence[PairFit],
    out: Path,
    *,
    base_catalog: Path | None,
    names: Mapping[tuple[str, str], tuple[str, str]],
    hardware_from: str,
    header: str,
) -> list[str]:
    """Write the catalog YAML (checked by loading it) and return notes on what changed."""
    if base_catalog is None:
        text, origin = _packaged_text(), "haif/fleet/data/profiles.yaml"
    else:
        try:
            text, origin = base_catalog.read_text(encoding="utf-8"), str(base_catalog)
        except OSError as exc:
            raise CalibrationError(f"--catalog {base_catalog}: cannot read: {exc}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CalibrationError(f"--catalog {origin}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise CalibrationError(f"--catalog {origin}: not a profile catalog")
    new, notes = catalog_document(doc, fits, names=names, hardware_from=hardware_from)
    body = yaml.safe_dump(new, sort_keys=False, allow_unicode=True, width=100)
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".calibrate-", suffix=".yaml", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(f"{comment}# Based on {origin}.\n\n{body}")
        try:
            catalog = load_catalog(tmp)
            for fit in fits:
                catalog.get(*names[(fit.gpu, fit.model)])
        except (ValueError, KeyError) as exc:
            raise CalibrationError(f"the fitted catalog does not load: {exc}") from None
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return notes


# ------------------------------------------------------------------ reading


def records_file(path: Path) -> Path:
    """``path``, or the records.parquet of the run folder ``path``."""
    return path / "records.parquet" if path.is_dir() else path


def read_records(path: Path) -> list[RequestRecord]:
    """Request records from a Parquet file or a run folder holding records.parquet."""
    path = records_file(path)
    if not path.exists():
        raise CalibrationError(f"{path}: no such file")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise CalibrationError(f"{path}: cannot read request records as Parquet: {exc}") from None
    missing = [c for c in SCHEMA.names if c not in table.schema.names]
    if missing:
        raise CalibrationError(
            f"{path}: not a HAIF request-record file: missing column(s) {', '.join(missing)}"
        )
    try:
        table = table.select(SCHEMA.names).cast(SCHEMA)
    except (pa.ArrowException, ValueError) as exc:
        raise CalibrationError(f"{path}: request-record columns of the wrong type: {exc}") from None
    return [RequestRecord(**row) for row in table.to_pylist()]


# ------------------------------------------------------------------ command


@dataclass(frozen=True, slots=True)
class Calibration:
    """What one ``haif calibrate`` run fitted and wrote."""

    fits: tuple[PairFit, ...]
    names: Mapping[tuple[str, str], tuple[str, str]]  # (gpu, model) -> as written
    notes: tuple[str, ...]
    catalog_path: Path | None
    json_path: Path | None


def _base_catalog(path: Path | None) -> ProfileCatalog:
    if path is None:
        return load_catalog()
    if not path.is_file():
        raise CalibrationError(f"--catalog {path}: no such file")
    try:
        return load_catalog(path)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise CalibrationError(f"--catalog {path}: not a profile catalog: {exc}") from None


def _select(
    pairs: Mapping[tuple[str, str], PairObservations], gpu: str | None, model: str | None
) -> list[PairObservations]:
    chosen = [
        o
        for (g, m), o in pairs.items()
        if (gpu is None or g == gpu) and (model is None or m == model)
    ]
    if not chosen:
        found = ", ".join(f"{g}/{m}" for g, m in pairs) or "none"
        wanted = " ".join(f"--{k} {v}" for k, v in (("gpu", gpu), ("model", model)) if v)
        raise CalibrationError(
            f"{wanted}: no such (gpu_class, model) in the records (found {found})"
        )
    return chosen


def calibrate(
    records_path: Path,
    *,
    today: dt.date,
    out: Path | None = None,
    gpu: str | None = None,
    model: str | None = None,
    as_gpu: str | None = None,
    as_model: str | None = None,
    base_gpu: str | None = None,
    catalog_path: Path | None = None,
    overhead_s: float | None = None,
    prefill_stalls: bool = True,
    shared_steps: bool = False,
) -> Calibration:
    """Read, fit every selected pair, and (with ``out``) write the catalog and calibrate.json."""
    records = read_records(records_path)
    records_path = records_file(records_path)
    ok = [r for r in records if r.status == "ok"]
    if not ok:
        statuses = sorted({r.status for r in records})
        raise CalibrationError(
            f"{records_path}: no ok requests to calibrate from ({len(records)} records"
            + (f", statuses: {', '.join(statuses)})" if statuses else ")")
        )
    pairs = collect(records)
    if not pairs:
        raise CalibrationError(
            f"{records_path}: no usable requests: calibration needs ok requests with a first "
            f"token, at least 2 output tokens and a single attempt ({len(ok)} ok requests)"
        )
    chosen = _select(pairs, gpu, model)
    if as_gpu is not None and len({o.gpu for o in chosen}) > 1:
        raise CalibrationError(
            f"--as-gpu {as_gpu}: the records hold several GPU classes "
            f"({', '.join(sorted({o.gpu for o in chosen}))}); pick one with --gpu"
        )
    if as_model is not None and len({o.model for o in chosen}) > 1:
        raise CalibrationError(
            f"--as-model {as_model}: the records hold several models "
            f"({', '.join(sorted({o.model for o in chosen}))}); pick one with --model"
        )
    names = {(o.gpu, o.model): (as_gpu or o.gpu, as_model or o.model) for o in chosen}
    catalog = _base_catalog(catalog_path)
    if overhead_s is None:
        overhead_s = catalog.settings.api_overhead_s
    elif overhead_s < 0:
        raise CalibrationError(f"--overhead must be >= 0, got {overhead_s:g}")
    if base_gpu is not None and base_gpu not in catalog.gpus:
        raise CalibrationError(
            f"--base {base_gpu}: not a GPU of the catalog (GPUs: {', '.join(sorted(catalog.gpus))})"
        )
    origin = f"{records_path} ({len(records)} records, {today.isoformat()})"
    fits = []
    for obs in chosen:
        base = None
        if base_gpu is not None:
            target_model = names[(obs.gpu, obs.model)][1]
            try:
                base = catalog.get(base_gpu, target_model).coeffs
            except ValueError as exc:  # UnknownProfileError, ModelDoesNotFitError
                raise CalibrationError(f"--base {base_gpu}: {exc}") from None
        fits.append(
            fit_pair(
                obs,
                overhead_s=overhead_s,
                origin=origin,
                base=base,
                base_label=f"{base_gpu} (catalog)",
                prefill_stalls=prefill_stalls,
                shared_steps=shared_steps,
            )
        )
    notes: list[str] = []
    if not math.isclose(overhead_s, catalog.settings.api_overhead_s):
        notes.append(
            f"fitted with --overhead {overhead_s:g} s, but the catalog's api_overhead_s is "
            f"{catalog.settings.api_overhead_s:g} s and the simulator adds that to every TTFT: "
            f"TTFTs simulated with these profiles come out "
            f"{(catalog.settings.api_overhead_s - overhead_s) * 1000:+.1f} ms off the fit"
        )
    json_path = None
    if out is not None:
        hardware_from = base_gpu or ("CPU" if "CPU" in catalog.gpus else sorted(catalog.gpus)[0])
        header = (
            f"GPU x model profiles written by `haif calibrate` on {today.isoformat()} from\n"
            f"{records_path}: the base catalog plus the fitted pair(s)\n"
            + "".join(f"  {g}, {m}\n" for g, m in names.values())
            + "Use it in a scenario with `profiles: <path relative to the scenario>`."
        )
        notes += write_catalog(
            fits,
            out,
            base_catalog=catalog_path,
            names=names,
            hardware_from=hardware_from,
            header=header,
        )
        json_path = out.parent / "calibrate.json"
        doc = {
            "records": str(records_path),
            "date": today.isoformat(),
            "catalog": str(out),
            "base_catalog": str(catalog_path) if catalog_path else "haif/fleet/data/profiles.yaml",
            "notes": notes,
            "pairs": [{**f.summary(), "written_as": list(names[(f.gpu, f.model)])} for f in fits],
        }
        json_path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return Calibration(tuple(fits), names, tuple(notes), out, json_path)


def _fmt_seconds(value: float) -> str:
    if value == 0:
        return "0"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if abs(value) >= scale:
            return f"{value / scale:.4g} {unit}"
    return f"{value:.3g} s"


_UNITS = {
    "floor_s": "per step",
    "a_s": "per prefill step",
    "b_s": "per prefill token",
    "c_s": "per context token",
    "d_s": "per sequence",
    "e_s": "per prefill token^2",
}


def print_calibration(result: Calibration, console: Any) -> None:
    """A rich table per pair: coefficients, observations and the fit's error."""
    from rich.table import Table

    for fit in result.fits:
        s = fit.summary()
        gpu, model = result.names[(fit.gpu, fit.model)]
        title = f"{fit.gpu}, {fit.model}"
        if (gpu, model) != (fit.gpu, fit.model):
            title += f" (written as {gpu}, {model})"
        table = Table(title=title)
        table.add_column("")
        table.add_column("value", justify="right")
        table.add_column("")
        for name in COEFFICIENTS:
            how = "fitted" if name in fit.fitted else "kept (not identifiable)"
            table.add_row(name, _fmt_seconds(s["coefficients"][name]), f"{_UNITS[name]}, {how}")
        table.add_row("requests", str(s["requests"]), "")
        table.add_row(
            "TTFTs (idle) / decodes",
            f"{s['prefill_observations']} ({s['idle_prefill_observations']}) / "
            f"{s['decode_observations']}",
            "observations",
        )

        def rng(key: str, s: dict[str, Any] = s) -> str:
            r = s[key]
            return "n/a" if r is None else f"{r[0]:.4g} - {r[1]:.4g}"

        table.add_row("prompt tokens", rng("prompt_tokens_range"), "observed")
        table.add_row("batch B", rng("batch_range"), "observed (time-averaged)")
        table.add_row("context C", rng("context_range"), "observed (time-averaged)")
        for key, label in (
            ("ttft_idle_abs_rel_error", "TTFT, idle worker"),
            ("ttft_abs_rel_error", "TTFT, all"),
            ("tpot_abs_rel_error", "TPOT"),
        ):
            e = s[key]
            table.add_row(
                f"{label} |rel. error|",
                f"{_pct(e['median'])} / {_pct(e['p90'])}",
                "median / p90",
            )
        console.print(table)
        for note in fit.notes:
            console.print(f"  [yellow]note:[/] {note}", highlight=False)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    if result.catalog_path is not None:
        console.print(f"catalog: {result.catalog_path}", highlight=False)
        console.print(f"errors: {result.json_path}", highlight=False)
    else:
        console.print("(pass --out PATH to write a catalog the simulator reads)", highlight=False)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from rich.console import Console

    result = calibrate(
        Path(args.records),
        today=dt.date.today(),
        out=Path(args.out) if args.out else None,
        gpu=args.gpu,
        model=args.model,
        as_gpu=args.as_gpu,
        as_model=args.as_model,
        base_gpu=args.base,
        catalog_path=Path(args.catalog) if args.catalog else None,
        overhead_s=args.overhead,
        prefill_stalls=args.prefill_stalls,
        shared_steps=args.shared_steps,
    )
    print_calibration(result, Console(width=None if sys.stdout.isatty() else 120))
    return 0


DESCRIPTION = """\
Fit the step-time coefficients of GPU x model profiles to the request records
of a run (a live cluster's records.parquet, or a haif sim report folder),
print each fit with its error, and with --out write a profile catalog that a
scenario uses with `profiles: PATH`.

The simulator times a batching step as
max(floor, a + b*N + e*N^2) + c*C + d*B (N prompt tokens prefilled, C tokens
of context decoding, B sequences). Each ok request with two or more output
tokens gives two observations: a prefill (its time to first token less
--overhead, one step of its prompt) and a decode step (its mean time per
output token, at the batch and context its worker had meanwhile). Retried
requests are left out, cold starts out of the prefill fit. A coefficient the
records cannot identify (one batch size, one prompt length) stays 0, or
takes the --base GPU's value, and the table says why.
"""
"""``haif calibrate --help``: what the command does, for its users."""


def add_calibrate_command(sub: Any) -> None:
    """Register ``haif calibrate`` on the main parser's subparsers."""
    p = sub.add_parser(
        "calibrate",
        help="fit a GPU x model step-time profile to the request records of a run",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "records",
        metavar="RECORDS",
        help="records.parquet (haif up: <data-dir>/records.parquet; haif sim: in the report "
        "folder), or the folder holding it",
    )
    p.add_argument("--out", metavar="YAML", help="write the catalog here (and calibrate.json)")
    p.add_argument("--gpu", help="fit only this gpu_class of the records")
    p.add_argument("--model", help="fit only this model of the records")
    p.add_argument("--as-gpu", metavar="NAME", help="GPU name in the catalog (e.g. CPU-local)")
    p.add_argument("--as-model", metavar="NAME", help="model name in the catalog")
    p.add_argument(
        "--base",
        metavar="GPU",
        help="catalog GPU whose profile of the model supplies what the records cannot "
        "identify (default: 0), and the hardware figures of a new GPU (default: CPU)",
    )
    p.add_argument("--catalog", metavar="YAML", help="base catalog (default: the packaged one)")
    p.add_argument(
        "--overhead",
        type=float,
        metavar="SECONDS",
        help="per-request time the simulator adds to the prefill step, subtracted from each "
        "TTFT (default: the catalog's api_overhead_s; add the scenario's store write "
        "latency for records of haif sim)",
    )
    p.add_argument(
        "--prefill-stalls",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="take the prefills of requests joining a worker out of the decode times of "
        "those decoding there (default: on; off for engines that prefill without pausing "
        "decodes, and for records of haif sim at fidelity: request)",
    )
    p.add_argument(
        "--shared-steps",
        action="store_true",
        help="a joining prompt is prefilled in a step that also decodes the running sequences "
        "(vLLM v1, a scenario's chunked_prefill_tokens): it stalls them by its prefill beyond "
        "the step's floor, not by a step of its own",
    )
    p.set_defaults(func=_cmd_calibrate)
