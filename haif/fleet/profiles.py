"""GPU x model performance profiles: step-time model, KV capacity, cold start.

The simulator times one continuous-batching iteration ("step") of an LLM
engine with a cheap closed form. Per step let

* ``N`` = prefill tokens in the step (sum over the sequences being prefilled),
* ``S`` = sum over those sequences of the squared chunk length (attention's
  quadratic term),
* ``C`` = total context tokens of the decoding sequences,
* ``B`` = number of sequences in the step (prefilling and decoding).

Then, all in seconds::

    prefill = a + b*N + e*S + b2*max(0, N - knee)     (only when N > 0)
    t_step  = overhead + max(floor, prefill) + c*C + d*B

``floor`` is the memory-bound cost of a pass over the weights (a decode step
at small batch), ``a + b*N`` the compute-bound prefill roofline (REFERENCE.md
"GPU / model performance" form ``max(floor, a + b*N) + c*C + d*B``), ``e*S``
the attention FLOPs growing with the square of each prompt chunk, ``c*C``
reading the KV cache, ``d*B`` the per-sequence cost (sampling, bookkeeping,
one more token of GEMM work per decoding sequence), ``overhead`` what every
step costs besides the GPU work (scheduling, sampling, kernel launches: BLIS's
126 us + 32 us per layer, REFERENCE.md; 0 where a fit to end-to-end step times
absorbs it into ``floor`` and ``a``).

Two refinements of the REFERENCE form, both needed to reproduce the Splitwise
Llama-2-70B measurements within 15% and both inert for the default profiles:

1. the prefill intercept ``a`` only applies when the step prefills (``N > 0``),
   so a prefill-only fixed cost above ``floor`` does not inflate decode steps
   (Splitwise: prompt of 128 tokens 58 ms on H100 but a decode step 30 ms);
2. a knee: beyond ``knee`` prefill tokens per step the per-token cost rises by
   ``b2`` (Splitwise: per-token prefill cost roughly doubles past ~2k tokens).
   ``knee = b2 = 0`` for every profile not fitted to Splitwise.

Both keep ``t_step`` positive and non-decreasing in each argument (all
coefficients are non-negative; the ``N > 0`` gate sits inside ``max(floor, .)``).
With no prefill the step time is linear in ``C``, which the engine relies on.

Where the numbers come from (each number in ``haif/fleet/data/profiles.yaml``
carries its own ``sources`` entry):

* **Llama-3-8B on H100-80G / A100-80G**: REFERENCE.md (Vidur operator profiles:
  floor, a, c; BLIS per-step overhead), except ``b``, which
  :func:`fit_prefill_b` fits to LambdaLabs' measured TTFT of 10 prompts on the
  same GPU (``haif/fleet/data/published.yaml``; that TTFT is therefore
  in-sample, the decode step and every Mistral-7B figure are not).
  ``d``: BLIS fitted per-decode-token coefficient for
  llama-3.1-8b TP1 (6.0 us H100, 18.2 us A100; inference-sim coefficients.yaml).
* **Llama-2-7B on H100-80G / A100-80G**: REFERENCE "as above, 4x c" (MHA, 512 KiB
  of KV per token instead of 128 KiB).
* **Llama-2-70B TP8 on A100-80G / H100-80G**: fitted by :func:`fit_coefficients`
  to ``traces/splitwise_sim_perf_model.csv`` (median of the 5 repeats per cell).
* **Every other pair that fits**: :func:`roofline_scale` from the measured
  Llama-3-8B profile on the same GPU, or on A100-80G for GPUs without one
  (L40S, RTX4090-24G, CPU): weight-streaming terms (floor, a) scale with
  weight bytes per GPU / memory bandwidth, KV terms (c) with KV bytes per token /
  bandwidth, compute terms (b, d) with parameters / (peak FLOP/s * prefill MFU),
  using BLIS MFUs from REFERENCE (H100 0.45, A100 0.38, L40S 0.32).
* ``e`` where not fitted: attention costs ``2 * n_layers * hidden`` FLOPs per
  token^2 (causal: half of QK^T plus AV) against ``2 * params`` per token for the
  dense layers, at the same efficiency: ``e = b * n_layers * hidden / params``.

Time to first token, as the simulator's engines compute it, is
``api_overhead_s + prefill_time(...)`` (plus queueing): ``api_overhead_s`` is
the per-request API-server overhead, 15.6 ms (BLIS, REFERENCE.md).

KV capacity (vLLM's accounting, GiB throughout; ``vram_gb`` is the nominal
size, read as GiB, and ``weights_gb`` is params * 2 bytes / 2**30 for bf16)::

    kv_capacity_tokens = floor((vram_gb * tensor_parallel * 0.9 - weights_gb)
                               * 2**30 / kv_bytes_per_token)

0.9 is vLLM's default ``gpu_memory_utilization``. For Llama-3-8B on one
80 GiB GPU this gives 467,271 tokens; BLIS reports 29,205 blocks of 16 tokens
(467,280) for vLLM 0.8.4 with llama-3.1-8b on H100 and A100-80 TP1.

Cold start: ``load_time_s = weights_gb / load_bw_gib_s`` with 2 GiB/s (local
NVMe), e.g. 7.5 s for Llama-3-8B. This is the weight read only; REFERENCE.md
notes full re-initialisation can take minutes.

This module is pure computation: the only I/O is reading the packaged YAML
(or a YAML file the caller names).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml

GIB = 2**30
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default gpu_memory_utilization
DEFAULT_KV_BLOCK_TOKENS = 16  # vLLM's DEFAULT_BLOCK_SIZE (vllm/config/cache.py)

__all__ = [
    "DEFAULT_GPU_MEMORY_UTILIZATION",
    "DEFAULT_KV_BLOCK_TOKENS",
    "GIB",
    "CatalogSettings",
    "GpuSpec",
    "ModelDoesNotFitError",
    "ModelSpec",
    "PerfProfile",
    "ProfileCatalog",
    "SplitwiseCell",
    "StepCoefficients",
    "UnknownProfileError",
    "attention_e",
    "fit_cells",
    "fit_coefficients",
    "fit_prefill_b",
    "kv_capacity_tokens",
    "load_catalog",
    "roofline_scale",
    "splitwise_cells",
    "splitwise_errors",
    "splitwise_halves",
]


class UnknownProfileError(KeyError, ValueError):
    """An unknown GPU or model name; the message lists the available ones."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ModelDoesNotFitError(ValueError):
    """The model cannot run on that GPU (memory, or not an allowed placement)."""


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One accelerator (or a CPU-only host). ``vram_gb`` is GiB per device."""

    name: str
    vram_gb: float
    price_per_hour: float
    mem_bw_tb_s: float
    tflops: float  # dense bf16 peak per device (CPU: the host)
    source: str
    mfu_prefill: float = 0.4  # achieved fraction of ``tflops`` in prefill (BLIS)
    max_batch: int = 256  # max sequences per step (vLLM max_num_seqs default)

    def __post_init__(self) -> None:
        for name in ("vram_gb", "mem_bw_tb_s", "tflops", "mfu_prefill"):
            _require_positive(f"gpu {self.name!r}: {name}", getattr(self, name))
        _require_non_negative(f"gpu {self.name!r}: price_per_hour", self.price_per_hour)
        if self.mfu_prefill > 1.0:
            raise ValueError(f"gpu {self.name!r}: mfu_prefill must be <= 1")
        if self.max_batch < 1:
            raise ValueError(f"gpu {self.name!r}: max_batch must be >= 1")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model as served: bf16 weights (GiB) split over ``tensor_parallel`` devices."""

    name: str
    params_b: float
    weights_gb: float
    kv_bytes_per_token: int
    n_layers: int
    tensor_parallel: int
    source: str
    hidden_size: int = 0  # 0: unknown (no attention-quadratic term derived)
    allowed_gpus: tuple[str, ...] = ()  # empty: any GPU it fits on
    kv_block_tokens: int = 0  # tokens per KV-cache block; 0: the catalog's setting

    def __post_init__(self) -> None:
        for name in ("params_b", "weights_gb"):
            _require_positive(f"model {self.name!r}: {name}", getattr(self, name))
        for name in ("kv_bytes_per_token", "n_layers", "tensor_parallel"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model {self.name!r}: {name} must be >= 1")
        if self.hidden_size < 0:
            raise ValueError(f"model {self.name!r}: hidden_size must be >= 0")
        if self.kv_block_tokens < 0:
            raise ValueError(f"model {self.name!r}: kv_block_tokens must be >= 1")


@dataclass(frozen=True, slots=True)
class StepCoefficients:
    """Coefficients of the step-time model (seconds, per token / token^2 / sequence)."""

    floor_s: float
    a_s: float
    b_s: float
    c_s: float
    d_s: float
    e_s: float = 0.0
    _: KW_ONLY
    source: str
    knee_tokens: int = 0
    b2_s: float = 0.0
    overhead_s: float = 0.0  # every step: the engine's CPU work and kernel launches

    def __post_init__(self) -> None:
        _require_positive("floor_s", self.floor_s)
        for name in ("a_s", "b_s", "c_s", "d_s", "e_s", "b2_s", "overhead_s"):
            _require_non_negative(name, getattr(self, name))
        if self.knee_tokens < 0:
            raise ValueError("knee_tokens must be >= 0")
        if not self.source.strip():
            raise ValueError("StepCoefficients need a non-empty source")

    def step_time(
        self, prefill_tokens: int, context_tokens: int, batch: int, prefill_sq: float = 0.0
    ) -> float:
        """Seconds for one step; see the module docstring for the form."""
        if prefill_tokens < 0 or context_tokens < 0 or batch < 0 or prefill_sq < 0:
            raise ValueError(
                "step_time arguments must be >= 0, got "
                f"N={prefill_tokens} C={context_tokens} B={batch} S={prefill_sq}"
            )
        t = self.floor_s
        if prefill_tokens > 0:
            compute = self.a_s + self.b_s * prefill_tokens + self.e_s * prefill_sq
            if self.b2_s and prefill_tokens > self.knee_tokens:
                compute += self.b2_s * (prefill_tokens - self.knee_tokens)
            t = max(t, compute)
        return self.overhead_s + t + self.c_s * context_tokens + self.d_s * batch


def _require_positive(what: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")


def _require_non_negative(what: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")


# ------------------------------------------------------------------ capacity


def kv_capacity_tokens(
    gpu: GpuSpec, model: ModelSpec, gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
) -> int:
    """KV-cache tokens the model's ``tensor_parallel`` devices hold after the weights.

    ``floor((vram_gb * tp * util - weights_gb) * 2**30 / kv_bytes_per_token)``, all
    sizes in GiB. Raises :class:`ModelDoesNotFitError` (a ``ValueError``) naming
    the GPU and model when the weights leave no room for a single token.
    """
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    usable = gpu.vram_gb * model.tensor_parallel * gpu_memory_utilization
    free_gib = usable - model.weights_gb
    tokens = math.floor(free_gib * GIB / model.kv_bytes_per_token) if free_gib > 0 else 0
    if tokens < 1:
        raise ModelDoesNotFitError(
            f"model {model.name!r} does not fit on GPU {gpu.name!r}: {model.weights_gb:g} GiB "
            f"of weights vs {usable:g} GiB usable ({model.tensor_parallel} x {gpu.vram_gb:g} GiB "
            f"x {gpu_memory_utilization:g}), no room for the KV cache"
        )
    return tokens


# ------------------------------------------------------------------- profile


@dataclass(frozen=True, slots=True)
class PerfProfile:
    """Everything the simulator needs to time one model served on one GPU (group)."""

    gpu: GpuSpec
    model: ModelSpec
    coeffs: StepCoefficients
    max_batch: int
    kv_capacity_tokens: int
    load_time_s: float
    api_overhead_s: float
    kv_block_tokens: int = DEFAULT_KV_BLOCK_TOKENS  # tokens per KV-cache (prefix) block

    @property
    def name(self) -> str:
        return f"{self.model.name}@{self.gpu.name}"

    def step_time(
        self, prefill_tokens: int, context_tokens: int, batch: int, prefill_sq: float = 0.0
    ) -> float:
        """One continuous-batching step (see the module docstring)."""
        return self.coeffs.step_time(prefill_tokens, context_tokens, batch, prefill_sq)

    def prefill_time(self, prompt_tokens: int, batch: int = 1) -> float:
        """One step prefilling ``batch`` prompts of ``prompt_tokens`` each, nothing decoding."""
        if prompt_tokens < 0 or batch < 1:
            raise ValueError(
                f"prefill_time needs prompt_tokens >= 0 and batch >= 1, got "
                f"{prompt_tokens}, {batch}"
            )
        return self.step_time(
            prompt_tokens * batch, 0, batch, float(batch) * prompt_tokens * prompt_tokens
        )

    def decode_step_time(self, batch: int, context_per_seq: int) -> float:
        """One decode-only step of ``batch`` sequences holding ``context_per_seq`` tokens each."""
        if batch < 0 or context_per_seq < 0:
            raise ValueError(
                f"decode_step_time needs non-negative arguments, got {batch}, {context_per_seq}"
            )
        return self.step_time(0, batch * context_per_seq, batch)


# ---------------------------------------------------------------- derivation


def attention_e(b_s: float, model: ModelSpec) -> float:
    """Attention-quadratic coefficient at the efficiency of the dense layers.

    Causal attention over a chunk of L tokens costs ``2 * n_layers * hidden * L**2``
    FLOPs (QK^T and AV, half of each) against ``2 * params`` FLOPs per token for
    the dense layers, so ``e = b * n_layers * hidden / params``.
    """
    if model.hidden_size <= 0:
        return 0.0
    return b_s * model.n_layers * model.hidden_size / (model.params_b * 1e9)


def roofline_scale(
    ref: StepCoefficients,
    ref_gpu: GpuSpec,
    ref_model: ModelSpec,
    gpu: GpuSpec,
    model: ModelSpec,
    *,
    step_overhead_s: float,
    per_layer_overhead_s: float,
    min_per_seq_s: float,
) -> StepCoefficients:
    """Coefficients for ``model`` on ``gpu`` scaled from a measured reference pair.

    * floor, a (weight streaming): x (weights/tp) / (ref weights/ref tp) x ref BW / BW;
    * overhead: ``step_overhead_s + per_layer_overhead_s * n_layers`` (BLIS), per step;
    * c (KV reads): x (KV bytes/token/tp) / (ref ...) x ref BW / BW;
    * b, d (compute): x (params/tp) / (ref ...) x (ref peak * ref MFU) / (peak * MFU),
      with d at least ``min_per_seq_s``;
    * e: :func:`attention_e` of the scaled b; no knee.
    """
    bw = ref_gpu.mem_bw_tb_s / gpu.mem_bw_tb_s
    k_mem = (
        (model.weights_gb / model.tensor_parallel)
        / (ref_model.weights_gb / ref_model.tensor_parallel)
        * bw
    )
    k_kv = (
        (model.kv_bytes_per_token / model.tensor_parallel)
        / (ref_model.kv_bytes_per_token / ref_model.tensor_parallel)
        * bw
    )
    k_cmp = (
        (model.params_b / model.tensor_parallel)
        / (ref_model.params_b / ref_model.tensor_parallel)
        * (ref_gpu.tflops * ref_gpu.mfu_prefill)
        / (gpu.tflops * gpu.mfu_prefill)
    )
    overhead = step_overhead_s + per_layer_overhead_s * model.n_layers
    b = ref.b_s * k_cmp
    source = (
        f"derived by roofline_scale() from {ref_model.name} on {ref_gpu.name}: "
        f"floor,a x{k_mem:.4g} (weight bytes per device / memory bandwidth); "
        f"overhead {overhead * 1e3:.4g} ms per step (BLIS: step + per-layer overhead); "
        f"c x{k_kv:.4g} (KV bytes per token / bandwidth); b,d x{k_cmp:.4g} "
        f"(params / (peak TFLOP/s x prefill MFU)); e = b*n_layers*hidden/params "
        f"(attention FLOPs); reference: [{ref.source}]"
    )
    return StepCoefficients(
        floor_s=ref.floor_s * k_mem,
        a_s=ref.a_s * k_mem,
        b_s=b,
        c_s=ref.c_s * k_kv,
        d_s=max(ref.d_s * k_cmp, min_per_seq_s),
        e_s=attention_e(b, model),
        source=source,
        overhead_s=overhead,
    )


def fit_prefill_b(
    coeffs: StepCoefficients,
    model: ModelSpec,
    prompts: Sequence[int],
    ttft_s: float,
    api_overhead_s: float,
) -> float:
    """The per-token prefill cost ``b`` that makes one step prefilling ``prompts``
    together, after the API overhead, last ``ttft_s`` (``e`` follows ``b`` as in
    :func:`attention_e`, ``coeffs.b_s`` and ``coeffs.e_s`` are ignored; no knee).

    Raises ``ValueError`` when the measured time leaves nothing for the prefill or
    the fitted prefill would sit below the step's floor (``b`` then means nothing).
    """
    n = sum(prompts)
    square = float(sum(p * p for p in prompts))
    fixed = api_overhead_s + coeffs.overhead_s + coeffs.a_s + coeffs.d_s * len(prompts)
    if n <= 0 or ttft_s <= fixed:
        raise ValueError(
            f"cannot fit b: TTFT {ttft_s * 1e3:.2f} ms leaves no prefill time after "
            f"{fixed * 1e3:.2f} ms of fixed costs, or the prompts are empty"
        )
    b = (ttft_s - fixed) / (n + square * attention_e(1.0, model))
    if coeffs.a_s + b * n <= coeffs.floor_s:
        raise ValueError("cannot fit b: the prefill would be below the step's floor")
    return b


# -------------------------------------------------------------- Splitwise fit


@dataclass(frozen=True, slots=True)
class SplitwiseCell:
    """Median over the repeats of one (prompt_size, batch_size, token_size) cell."""

    prompt_size: int
    batch_size: int
    token_size: int
    prompt_time_s: float  # TTFT of a batch of prompts
    token_time_s: float  # time per output token (one decode step)

    @property
    def prefill_tokens(self) -> int:
        return self.prompt_size * self.batch_size

    @property
    def prefill_sq(self) -> float:
        return float(self.batch_size) * self.prompt_size * self.prompt_size

    @property
    def decode_context_per_seq(self) -> int:
        """Average context over the generation: the prompt plus half the output."""
        return self.prompt_size + self.token_size // 2

    def predicted(self, coeffs: StepCoefficients) -> tuple[float, float]:
        """(prompt_time, token_time) the step model gives for this cell."""
        prompt = coeffs.step_time(self.prefill_tokens, 0, self.batch_size, self.prefill_sq)
        token = coeffs.step_time(0, self.batch_size * self.decode_context_per_seq, self.batch_size)
        return prompt, token


def splitwise_cells(rows: Iterable[Mapping[str, Any]]) -> list[SplitwiseCell]:
    """Group rows of Splitwise's perf_model.csv (one model/hardware/TP) into medians.

    Times in the CSV are milliseconds; cells come back in seconds, sorted.
    Raises ``ValueError`` if the rows mix models, hardware or tensor-parallel sizes.
    """
    groups: dict[tuple[int, int, int], tuple[list[float], list[float]]] = {}
    kinds: set[tuple[str, str, str]] = set()
    for row in rows:
        kinds.add((str(row["model"]), str(row["hardware"]), str(row["tensor_parallel"])))
        key = (int(row["prompt_size"]), int(row["batch_size"]), int(row["token_size"]))
        prompts, tokens = groups.setdefault(key, ([], []))
        prompts.append(float(row["prompt_time"]) / 1000.0)
        tokens.append(float(row["token_time"]) / 1000.0)
    if len(kinds) != 1:
        raise ValueError(
            f"rows must be one (model, hardware, tensor_parallel), got {sorted(kinds)}"
        )
    return [
        SplitwiseCell(p, b, t, statistics.median(pt), statistics.median(tt))
        for (p, b, t), (pt, tt) in sorted(groups.items())
    ]


def splitwise_halves(
    cells: Sequence[SplitwiseCell],
) -> tuple[list[SplitwiseCell], list[SplitwiseCell]]:
    """(fit half, held-out half) of Splitwise's three sweeps, by a rule fixed
    before any error was looked at: the cells cross at one centre cell (the most
    common prompt, batch and token size); along each sweep (prompt sizes, batch
    sizes, token sizes, each sorted) the values alternate fit, held out, fit, ...
    from the smallest, and the centre cell is fitted. Raises ``ValueError`` when
    the cells are not three sweeps through one centre."""

    def mode(values: list[int]) -> int:
        return max(set(values), key=values.count)

    centre = (
        mode([c.prompt_size for c in cells]),
        mode([c.batch_size for c in cells]),
        mode([c.token_size for c in cells]),
    )
    fit: list[SplitwiseCell] = []
    held_out: list[SplitwiseCell] = []
    for cell in cells:
        key = (cell.prompt_size, cell.batch_size, cell.token_size)
        off = [i for i in range(3) if key[i] != centre[i]]
        if len(off) > 1:
            raise ValueError(f"cell {key} is on no sweep through the centre {centre}")
        if not off:
            fit.append(cell)
            continue
        axis = off[0]
        sweep = sorted(
            {
                (c.prompt_size, c.batch_size, c.token_size)[axis]
                for c in cells
                if all(
                    (c.prompt_size, c.batch_size, c.token_size)[j] == centre[j]
                    for j in range(3)
                    if j != axis
                )
            }
        )
        (fit if sweep.index(key[axis]) % 2 == 0 else held_out).append(cell)
    return fit, held_out


def splitwise_errors(
    coeffs: StepCoefficients, cells: Sequence[SplitwiseCell]
) -> list[tuple[SplitwiseCell, float, float]]:
    """Per cell: (cell, relative error of prompt_time, relative error of token_time)."""
    out = []
    for cell in cells:
        prompt, token = cell.predicted(coeffs)
        out.append(
            (
                cell,
                (prompt - cell.prompt_time_s) / cell.prompt_time_s,
                (token - cell.token_time_s) / cell.token_time_s,
            )
        )
    return out


_FloatArray = npt.NDArray[np.float64]


def _weighted_nonneg_lstsq(
    x: _FloatArray, y: _FloatArray, weights: _FloatArray, nonneg: Sequence[int]
) -> _FloatArray:
    """Least squares on relative error (rows / y, times sqrt(weight)), coefficients in
    ``nonneg`` held >= 0 by dropping the most negative one and solving again."""
    cols = list(range(x.shape[1]))
    scale = np.sqrt(weights) / y
    while True:
        sol, *_ = np.linalg.lstsq(x[:, cols] * scale[:, None], y * scale, rcond=None)
        coef = np.zeros(x.shape[1])
        coef[cols] = sol
        negative = [c for c in cols if c in nonneg and coef[c] < 0]
        if not negative:
            return coef
        cols.remove(min(negative, key=lambda c: float(coef[c])))


def _minimax_relative_fit(
    x: _FloatArray, y: _FloatArray, nonneg: Sequence[int], iterations: int = 200
) -> _FloatArray:
    """Relative-error least squares, then Lawson's iteratively reweighted least squares
    toward the minimax (smallest worst-case) relative error; returns the best iterate."""
    weights = np.ones(len(y))
    best: tuple[float, _FloatArray] | None = None
    for _ in range(iterations):
        coef = _weighted_nonneg_lstsq(x, y, weights, nonneg)
        resid = np.abs(x @ coef - y) / y
        worst = float(resid.max())
        if best is None or worst < best[0] - 1e-12:
            best = (worst, coef)
        weights = np.maximum(weights * resid, 1e-12)
        weights = weights / weights.mean()
    assert best is not None
    return best[1]


def _round_sig(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def fit_coefficients(rows: Iterable[Mapping[str, Any]], knee_step: int = 256) -> StepCoefficients:
    """Fit :class:`StepCoefficients` to Splitwise perf_model.csv rows of one
    (model, hardware, tensor_parallel), e.g. ``csv.DictReader`` rows.

    Cells are medians over the repeats (:func:`splitwise_cells`). The model:
    ``token_time`` = a decode step of ``batch_size`` sequences with context
    ``prompt_size + token_size/2`` each; ``prompt_time`` = one step prefilling
    ``batch_size`` prompts of ``prompt_size`` tokens (N = batch*prompt,
    S = batch*prompt^2).

    1. floor, c, d from the token times (linear in them);
    2. for each knee in 0, knee_step, 2*knee_step, ... up to the largest N: a, b,
       e, b2 from the prompt times above ``floor`` (minus ``d*B``), then keep the
       knee with the smallest worst-case relative error over all cells.

    Each linear fit minimises relative error by least squares, then runs
    Lawson's reweighting toward the minimax error; all coefficients >= 0.
    Results are rounded to 4 significant digits; the source string reports
    the max and mean relative error of the rounded coefficients.
    """
    row_list = list(rows)
    if not row_list:
        raise ValueError("no rows to fit")
    first = row_list[0]
    label = f"{first['model']}, {first['hardware']}, TP{first['tensor_parallel']}"
    return fit_cells(splitwise_cells(row_list), label, knee_step)


def fit_cells(cells: Sequence[SplitwiseCell], label: str, knee_step: int = 256) -> StepCoefficients:
    """:func:`fit_coefficients` on cells already grouped (e.g. one half of them)."""
    if len(cells) < 6:
        raise ValueError(f"need at least 6 cells to fit, got {len(cells)}")
    n = np.array([c.prefill_tokens for c in cells], dtype=float)
    s = np.array([c.prefill_sq for c in cells], dtype=float)
    b = np.array([c.batch_size for c in cells], dtype=float)
    ctx = np.array([c.batch_size * c.decode_context_per_seq for c in cells], dtype=float)
    y_prompt = np.array([c.prompt_time_s for c in cells])
    y_token = np.array([c.token_time_s for c in cells])
    ones = np.ones(len(cells))

    floor, c_s, d_s = _minimax_relative_fit(np.column_stack([ones, ctx, b]), y_token, (0, 1, 2))
    z = y_prompt - d_s * b
    above = z > floor
    if int(above.sum()) < 4:
        raise ValueError("too few prompt cells above the decode floor to fit the prefill terms")

    best: tuple[tuple[float, float], StepCoefficients] | None = None
    for knee in range(0, int(n.max()), knee_step):
        cols = [ones, n, s] + ([np.maximum(0.0, n - knee)] if knee else [])
        x = np.column_stack(cols)
        coef = _minimax_relative_fit(x[above], z[above], tuple(range(len(cols))))
        b2 = float(coef[3]) if knee else 0.0
        candidate = StepCoefficients(
            floor_s=_round_sig(float(floor)),
            a_s=_round_sig(float(coef[0])),
            b_s=_round_sig(float(coef[1])),
            c_s=_round_sig(float(c_s)),
            d_s=_round_sig(float(d_s)),
            e_s=_round_sig(float(coef[2])),
            knee_tokens=knee if b2 > 0 else 0,
            b2_s=_round_sig(b2),
            source="candidate",
        )
        errors = [abs(e) for _, pe, te in splitwise_errors(candidate, cells) for e in (pe, te)]
        key = (max(errors), sum(errors) / len(errors))
        if best is None or key < best[0]:
            best = (key, candidate)
    assert best is not None
    (worst, mean), chosen = best
    source = (
        f"fitted to splitwise perf_model.csv (Mutinifni/splitwise-sim@8f99e7d data/perf_model.csv: "
        f"{label}, median of repeats, {len(cells)} cells) by haif.fleet.profiles.fit_coefficients, "
        f"max error {worst:.1%}, mean {mean:.1%} over prompt_time and token_time"
    )
    return StepCoefficients(
        floor_s=chosen.floor_s,
        a_s=chosen.a_s,
        b_s=chosen.b_s,
        c_s=chosen.c_s,
        d_s=chosen.d_s,
        e_s=chosen.e_s,
        knee_tokens=chosen.knee_tokens,
        b2_s=chosen.b2_s,
        source=source,
    )


# ------------------------------------------------------------------- catalog


@dataclass(frozen=True, slots=True)
class CatalogSettings:
    """Catalog-wide numbers (see profiles.yaml ``settings`` for their sources)."""

    gpu_memory_utilization: float
    load_bw_gib_s: float
    api_overhead_s: float
    step_overhead_s: float
    per_layer_overhead_s: float
    min_per_seq_s: float
    source: str
    kv_block_tokens: int = DEFAULT_KV_BLOCK_TOKENS


@dataclass(frozen=True, slots=True)
class ProfileCatalog:
    """GPUs, models and step coefficients for every (gpu, model) pair that can run."""

    gpus: Mapping[str, GpuSpec]
    models: Mapping[str, ModelSpec]
    coefficients: Mapping[tuple[str, str], StepCoefficients]
    settings: CatalogSettings
    origin: str = field(default="", compare=False)

    def names(self) -> tuple[tuple[str, str], ...]:
        """Every valid ``(gpu, model)`` pair, sorted."""
        return tuple(sorted(self.coefficients))

    def profiles(self) -> tuple[PerfProfile, ...]:
        return tuple(self.get(g, m) for g, m in self.names())

    def block_tokens(self, model: str) -> int:
        """Tokens per KV-cache block of ``model``: its own ``kv_block_tokens``, else the
        catalog's (``settings.kv_block_tokens``; any model, also one without a profile)."""
        spec = self.models.get(model)
        if spec is not None and spec.kv_block_tokens:
            return spec.kv_block_tokens
        return self.settings.kv_block_tokens

    def _available(self) -> str:
        return (
            f"available GPUs: {', '.join(sorted(self.gpus))}; "
            f"available models: {', '.join(sorted(self.models))}"
        )

    def get(self, gpu: str, model: str) -> PerfProfile:
        """The profile of ``model`` on ``gpu``.

        Raises :class:`UnknownProfileError` (a ``KeyError`` and ``ValueError``) for an
        unknown name and :class:`ModelDoesNotFitError` (a ``ValueError``) when the
        model cannot run there; both messages name what is available / why.
        """
        unknown = [
            f"{kind} {name!r}"
            for kind, name, known in (("GPU", gpu, self.gpus), ("model", model, self.models))
            if name not in known
        ]
        if unknown:
            raise UnknownProfileError(f"unknown {' and '.join(unknown)}; {self._available()}")
        g, m = self.gpus[gpu], self.models[model]
        _check_allowed(g, m)
        kv = kv_capacity_tokens(g, m, self.settings.gpu_memory_utilization)
        coeffs = self.coefficients.get((gpu, model))
        if coeffs is None:  # cannot happen for a catalog built by load_catalog
            raise ModelDoesNotFitError(f"no coefficients for model {model!r} on GPU {gpu!r}")
        return PerfProfile(
            gpu=g,
            model=m,
            coeffs=coeffs,
            max_batch=g.max_batch,
            kv_capacity_tokens=kv,
            load_time_s=m.weights_gb / self.settings.load_bw_gib_s,
            api_overhead_s=self.settings.api_overhead_s,
            kv_block_tokens=self.block_tokens(model),
        )


def _check_allowed(gpu: GpuSpec, model: ModelSpec) -> None:
    if model.allowed_gpus and gpu.name not in model.allowed_gpus:
        raise ModelDoesNotFitError(
            f"model {model.name!r} (tensor_parallel {model.tensor_parallel}) is only served on "
            f"{', '.join(model.allowed_gpus)}, not on GPU {gpu.name!r}"
        )


def load_catalog(path: str | Path | None = None) -> ProfileCatalog:
    """Load a catalog from ``path``, or the packaged ``haif/fleet/data/profiles.yaml``
    (cached) when ``path`` is None. Raises ``ValueError`` on a malformed file."""
    if path is None:
        return _default_catalog()
    p = Path(path)
    return _build_catalog(yaml.safe_load(p.read_text(encoding="utf-8")), str(p))


@functools.lru_cache(maxsize=1)
def _default_catalog() -> ProfileCatalog:
    text = resources.files("haif.fleet.data").joinpath("profiles.yaml").read_text(encoding="utf-8")
    return _build_catalog(yaml.safe_load(text), "haif/fleet/data/profiles.yaml")


# ---------------------------------------------------------------- YAML parse

_GPU_FIELDS = ("vram_gb", "price_per_hour", "mem_bw_tb_s", "tflops", "mfu_prefill", "max_batch")
_MODEL_FIELDS = (
    "params_b",
    "weights_gb",
    "kv_bytes_per_token",
    "n_layers",
    "hidden_size",
    "tensor_parallel",
)
_SETTINGS_FIELDS = (
    "gpu_memory_utilization",
    "load_bw_gib_s",
    "api_overhead_s",
    "step_overhead_s",
    "per_layer_overhead_s",
    "min_per_seq_s",
)
_COEFF_REQUIRED = ("floor_s", "a_s", "b_s", "c_s", "d_s")
_COEFF_OPTIONAL = ("e_s", "knee_tokens", "b2_s", "overhead_s")


def _mapping(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _sourced_numbers(
    entry: Mapping[str, Any],
    where: str,
    required: Sequence[str],
    optional: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> tuple[dict[str, float], dict[str, str]]:
    """Numbers of an entry and the source of each (``sources: {field: text}``)."""
    allowed = {*required, *optional, *extra, "sources"}
    unexpected = sorted(set(entry) - allowed)
    if unexpected:
        raise ValueError(f"{where}: unexpected keys {unexpected}")
    sources = _mapping(entry.get("sources"), f"{where}.sources")
    values: dict[str, float] = {}
    texts: dict[str, str] = {}
    for key in (*required, *optional):
        if key not in entry:
            if key in required:
                raise ValueError(f"{where}: missing {key}")
            continue
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}.{key}: expected a number, got {value!r}")
        text = sources.get(key)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}.{key}: every number needs a non-empty sources.{key}")
        values[key] = float(value)
        texts[key] = text.strip()
    return values, texts


def _join_sources(texts: Mapping[str, str]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in texts.items())


def _build_catalog(doc: object, origin: str) -> ProfileCatalog:
    root = _mapping(doc, origin)
    sv, st = _sourced_numbers(
        _mapping(root.get("settings"), "settings"),
        "settings",
        _SETTINGS_FIELDS,
        ("kv_block_tokens",),
    )
    block = sv.pop("kv_block_tokens", DEFAULT_KV_BLOCK_TOKENS)
    if block != int(block) or block < 1:
        raise ValueError(f"settings.kv_block_tokens: expected a whole number >= 1, got {block!r}")
    settings = CatalogSettings(**sv, source=_join_sources(st), kv_block_tokens=int(block))
    if not 0 < settings.gpu_memory_utilization <= 1 or settings.load_bw_gib_s <= 0:
        raise ValueError("settings: need 0 < gpu_memory_utilization <= 1 and load_bw_gib_s > 0")

    gpus: dict[str, GpuSpec] = {}
    for name, raw in _mapping(root.get("gpus"), "gpus").items():
        v, t = _sourced_numbers(_mapping(raw, f"gpus.{name}"), f"gpus.{name}", _GPU_FIELDS)
        gpus[str(name)] = GpuSpec(
            name=str(name),
            vram_gb=v["vram_gb"],
            price_per_hour=v["price_per_hour"],
            mem_bw_tb_s=v["mem_bw_tb_s"],
            tflops=v["tflops"],
            source=_join_sources(t),
            mfu_prefill=v["mfu_prefill"],
            max_batch=int(v["max_batch"]),
        )

    models: dict[str, ModelSpec] = {}
    for name, raw in _mapping(root.get("models"), "models").items():
        entry = _mapping(raw, f"models.{name}")
        v, t = _sourced_numbers(
            entry, f"models.{name}", _MODEL_FIELDS, ("kv_block_tokens",), extra=("allowed_gpus",)
        )
        model_block = v.get("kv_block_tokens", 0.0)
        if "kv_block_tokens" in v and (model_block != int(model_block) or model_block < 1):
            raise ValueError(
                f"models.{name}.kv_block_tokens: expected a whole number >= 1, got {model_block!r}"
            )
        allowed = tuple(str(g) for g in entry.get("allowed_gpus", ()) or ())
        for allowed_gpu in allowed:
            if allowed_gpu not in gpus:
                raise ValueError(f"models.{name}.allowed_gpus: unknown GPU {allowed_gpu!r}")
        if allowed:
            t["allowed_gpus"] = str(_mapping(entry["sources"], "").get("allowed_gpus", "")).strip()
            if not t["allowed_gpus"]:
                raise ValueError(f"models.{name}: allowed_gpus needs sources.allowed_gpus")
        models[str(name)] = ModelSpec(
            name=str(name),
            params_b=v["params_b"],
            weights_gb=v["weights_gb"],
            kv_bytes_per_token=int(v["kv_bytes_per_token"]),
            n_layers=int(v["n_layers"]),
            tensor_parallel=int(v["tensor_parallel"]),
            source=_join_sources(t),
            hidden_size=int(v["hidden_size"]),
            allowed_gpus=allowed,
            kv_block_tokens=int(model_block),
        )

    explicit: dict[tuple[str, str], StepCoefficients] = {}
    for i, raw in enumerate(root.get("coefficients") or ()):
        entry = _mapping(raw, f"coefficients[{i}]")
        gpu, model = str(entry.get("gpu")), str(entry.get("model"))
        where = f"coefficients[{i}] ({model} on {gpu})"
        if gpu not in gpus or model not in models:
            raise ValueError(f"{where}: unknown GPU or model")
        if (gpu, model) in explicit:
            raise ValueError(f"{where}: duplicate entry")
        _check_allowed(gpus[gpu], models[model])
        kv_capacity_tokens(gpus[gpu], models[model], settings.gpu_memory_utilization)
        v, t = _sourced_numbers(entry, where, _COEFF_REQUIRED, _COEFF_OPTIONAL, ("gpu", "model"))
        if "e_s" not in v:
            v["e_s"] = attention_e(v["b_s"], models[model])
            t["e_s"] = "attention_e(): b*n_layers*hidden/params (attention FLOPs, same efficiency)"
        explicit[(gpu, model)] = StepCoefficients(
            floor_s=v["floor_s"],
            a_s=v["a_s"],
            b_s=v["b_s"],
            c_s=v["c_s"],
            d_s=v["d_s"],
            e_s=v["e_s"],
            knee_tokens=int(v.get("knee_tokens", 0)),
            b2_s=v.get("b2_s", 0.0),
            overhead_s=v.get("overhead_s", 0.0),
            source=_join_sources(t),
        )

    derivation = _mapping(root.get("derivation"), "derivation")
    ref_model = str(derivation.get("reference_model"))
    fallback_gpu = str(derivation.get("fallback_gpu"))
    if (fallback_gpu, ref_model) not in explicit:
        raise ValueError(f"derivation: no explicit coefficients for {ref_model} on {fallback_gpu}")

    coefficients: dict[tuple[str, str], StepCoefficients] = {}
    for gname, g in gpus.items():
        for mname, m in models.items():
            try:
                _check_allowed(g, m)
                kv_capacity_tokens(g, m, settings.gpu_memory_utilization)
            except ModelDoesNotFitError:
                continue
            if (gname, mname) in explicit:
                coefficients[(gname, mname)] = explicit[(gname, mname)]
                continue
            ref_gpu = gname if (gname, ref_model) in explicit else fallback_gpu
            coefficients[(gname, mname)] = roofline_scale(
                explicit[(ref_gpu, ref_model)],
                gpus[ref_gpu],
                models[ref_model],
                g,
                m,
                step_overhead_s=settings.step_overhead_s,
                per_layer_overhead_s=settings.per_layer_overhead_s,
                min_per_seq_s=settings.min_per_seq_s,
            )
    return ProfileCatalog(
        gpus=MappingProxyType(gpus),
        models=MappingProxyType(models),
        coefficients=MappingProxyType(coefficients),
        settings=settings,
        origin=origin,
    )
