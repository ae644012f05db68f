"""Workload sources for the simulator: public LLM-inference traces and arrival processes.

Sources (shipped byte-exact, or as a documented slice, under ``traces/``; see
``traces/README.md`` for provenance, licences, checksums and attribution):

* **Azure LLM inference 2023** (Splitwise, ISCA 2024): ``azure_llm_2023_{conv,code}.csv``,
  columns ``TIMESTAMP,ContextTokens,GeneratedTokens``. Timestamps look like
  ``2023-11-16 18:15:46.6805900`` (7 fractional digits, no timezone); CRLF line
  endings. :func:`load_azure` parses them exactly (integer nanoseconds) and returns
  arrivals relative to the earliest row (which is the first row in both files), so
  the first request arrives at 0.0.
* **Mooncake FAST 2025** conversation trace: ``mooncake_fast25_conversation.jsonl``, one
  JSON object a line with ``timestamp`` (ms, relative), ``input_length``,
  ``output_length`` and ``hash_ids`` (prefix-block hashes, 512-token blocks; equal
  leading ids mean a shared prefix). Its timestamps are quantized to about 3 s, so
  :func:`load_mooncake` spreads each bucket uniformly (see there).
* **Length distributions** (Vidur / Sarathi-Serve / Etalon): ``lengths_*_llama2tok.csv``,
  columns ``num_prefill_tokens,num_decode_tokens,...``; no timestamps.
  :func:`load_lengths` + :class:`LengthSampler` draw (prefill, decode) pairs.
* **ServeGen** (Alibaba Bailian, arXiv 2505.09999): per-client, per-10-minute-window
  arrival parameters (``rate`` in req/s, ``cv``, a fitted Gamma or Weibull IAT
  distribution). :func:`load_servegen` reads them, :func:`servegen_arrivals` turns
  them into request arrival times.

Conventions:

* Times are float seconds. Every function returns arrivals sorted ascending
  (ties keep their input order: all sorts are stable).
* There is no clock and no global randomness: every random function takes an
  injected ``random.Random`` (or an ``int`` seed, turned into ``random.Random(seed)``),
  so a seed fully determines the output.
* Synthetic arrival processes return times in ``[0, duration_s)``.
* Renewal processes (:func:`gamma_arrivals`, :func:`servegen_arrivals`) start in
  their *stationary* state: the first arrival is drawn from the forward-recurrence
  (equilibrium) distribution, so the expected count over ``T`` seconds is exactly
  ``rate * T`` even for very bursty processes (CV >> 1), whose ordinary renewal
  count would be biased by about ``(CV**2 - 1) / 2`` per window.

ServeGen units (checked on the shipped 7-day file, 128,222 client windows): the
``rate`` column is ``count / 600`` (req/s). For **Gamma** windows the fit is a moment
fit with the scale in seconds: ``shape == 1 / cv**2`` exactly and the mean IAT
``shape * scale`` equals ``1 / rate`` (median ratio 0.9994; p10 0.85, p1 0.05 where
the window has few requests). For **Weibull** windows the fitted scale is also in
seconds but the fit is not moment-matched: the mean IAT ``scale * Gamma(1 + 1/shape)``
is ``1.24 / rate`` at the median (p1-p99: 0.20-3.97) and the distribution's CV is
0.76 x the ``cv`` column at the median. :func:`servegen_arrivals` therefore keeps
the fitted *shape* of each window (so the IAT CV is the fitted distribution's CV)
and sets the scale so that the mean IAT is exactly ``1 / (rate * rate_scale)``.

Prefix reuse (:func:`prefix_reuse`): requests are processed in arrival order; a
request's blocks are looked up in order and the lookup stops at the first miss
(prefix-cache semantics, as in vLLM automatic prefix caching / Mooncake); after
the lookup all the request's blocks are in the cache (most recently used). The
reuse is hits / total blocks. With an unlimited cache this gives 36.64% of blocks
(37.36% of tokens) on the Mooncake conversation trace, the published 36.6% (37.4%);
with an LRU of 3M tokens (5,859 blocks) it gives 13.55% (published 13.6%). On this
trace the "any block present" definition gives the same figures (its ``hash_ids``
are prefix-closed: no request has a hit after a miss), so the published number
does not distinguish them; prefix-stop is implemented because it is what a prefix
cache can actually reuse.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = [
    "BLOCK_TOKENS",
    "SERVEGEN_WINDOW_S",
    "TRACES_DIR",
    "ClientWindow",
    "LengthSampler",
    "TraceRequest",
    "diurnal_arrivals",
    "gamma_arrivals",
    "load_azure",
    "load_lengths",
    "load_mooncake",
    "load_servegen",
    "poisson_arrivals",
    "prefix_reuse",
    "prefix_reuse_tokens",
    "repeat",
    "scale_rate",
    "servegen_arrivals",
    "shift",
    "time_window",
    "trace_stats",
]

TRACES_DIR: Path = Path(__file__).resolve().parents[2] / "traces"
"""The project's ``traces/`` directory (data files shipped with the repository)."""

BLOCK_TOKENS = 512
"""Tokens per Mooncake prefix block (``hash_ids`` entry)."""

SERVEGEN_WINDOW_S = 600.0
"""Length of a ServeGen client window (10 minutes)."""

RngLike = random.Random | int
PathLike = str | Path


def _rng(rng: RngLike) -> random.Random:
    if isinstance(rng, random.Random):
        return rng
    return random.Random(rng)


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace: arrival time (s), token counts, prefix blocks, client."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()
    client: str = ""


# --------------------------------------------------------------------------- Azure


def _timestamp_ns(text: str) -> int:
    """``YYYY-MM-DD HH:MM:SS[.fffffff]`` (no timezone) -> integer ns since 0001-01-01."""
    day, _, clock = text.strip().partition(" ")
    if not clock:
        day, _, clock = text.strip().partition("T")
    whole, _, frac = clock.partition(".")
    hh, mm, ss = whole.split(":")
    seconds = date.fromisoformat(day).toordinal() * 86_400 + int(hh) * 3600 + int(mm) * 60
    seconds += int(ss)
    frac_ns = int((frac + "000000000")[:9]) if frac else 0
    return seconds * 1_000_000_000 + frac_ns


def load_azure(path: PathLike) -> list[TraceRequest]:
    """Load an Azure LLM inference 2023 CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``).

    Arrivals are seconds since the earliest timestamp (the first row in the shipped
    files, so the first request is at 0.0), sorted stably. Timestamps are parsed
    exactly to the nanosecond (no float rounding before the subtraction).
    """
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader)]
        i_ts = header.index("TIMESTAMP")
        i_in = header.index("ContextTokens")
        i_out = header.index("GeneratedTokens")
        rows = [(_timestamp_ns(r[i_ts]), int(r[i_in]), int(r[i_out])) for r in reader if r]
    if not rows:
        return []
    t0 = min(r[0] for r in rows)
    reqs = [TraceRequest((ns - t0) / 1e9, p, o) for ns, p, o in rows]
    reqs.sort(key=lambda r: r.arrival_s)
    return reqs


# ------------------------------------------------------------------------ Mooncake


def load_mooncake(path: PathLike, rng: RngLike, quantum_s: float = 3.0) -> list[TraceRequest]:
    """Load a Mooncake JSONL trace, spreading quantized timestamps.

    The conversation trace's timestamps (ms) are quantized to about 3 s (1,180
    distinct values for 12,031 requests; distinct values are 2.997-3.003 s apart).
    The requests sharing a timestamp ``t`` get arrival times drawn uniformly from
    ``[t, t + gap)`` with ``gap = min(quantum_s, next distinct timestamp - t)``
    (``quantum_s`` for the last bucket); the draws are sorted and assigned in file
    order, so the result is sorted and file order is kept within a bucket. One
    ``rng.random()`` per request, buckets in time order. ``quantum_s = 0`` keeps
    the raw timestamps and draws nothing.
    """
    gen = _rng(rng)
    raw: list[tuple[float, int, int, tuple[int, ...]]] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            obj = json.loads(line)
            raw.append(
                (
                    float(obj["timestamp"]) / 1000.0,
                    int(obj["input_length"]),
                    int(obj["output_length"]),
                    tuple(int(h) for h in obj.get("hash_ids", ())),
                )
            )
    raw.sort(key=lambda r: r[0])
    out: list[TraceRequest] = []
    i = 0
    n = len(raw)
    while i < n:
        t = raw[i][0]
        j = i
        while j < n and raw[j][0] == t:
            j += 1
        if quantum_s > 0:
            gap = quantum_s if j == n else min(quantum_s, raw[j][0] - t)
            upper = t + gap
            times = sorted(
                min(t + gen.random() * gap, math.nextafter(upper, t)) for _ in range(j - i)
            )
        else:
            times = [t] * (j - i)
        for (_, p, o, h), a in zip(raw[i:j], times, strict=True):
            out.append(TraceRequest(a, p, o, h))
        i = j
    return out


# ------------------------------------------------------------------------- lengths


def load_lengths(path: PathLike) -> list[tuple[int, int]]:
    """(prefill, decode) token pairs from an Etalon/Vidur length CSV, in file order."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return [(int(row["num_prefill_tokens"]), int(row["num_decode_tokens"])) for row in reader]


class LengthSampler:
    """Empirical (prefill, decode) sampler: uniform over the pairs, with replacement."""

    __slots__ = ("_pairs", "_rng")

    def __init__(self, pairs: Sequence[tuple[int, int]], rng: RngLike) -> None:
        if not pairs:
            raise ValueError("LengthSampler needs at least one pair")
        self._pairs: tuple[tuple[int, int], ...] = tuple(pairs)
        self._rng = _rng(rng)

    def __len__(self) -> int:
        return len(self._pairs)

    def sample(self) -> tuple[int, int]:
        """One (prefill, decode) pair; one ``rng.randrange`` draw."""
        return self._pairs[self._rng.randrange(len(self._pairs))]


# ------------------------------------------------------------------------ ServeGen

Pattern = Literal["Gamma", "Weibull"]


@dataclass(frozen=True, slots=True)
class ClientWindow:
    """One ServeGen client window: ``[start_s, start_s + 600)`` with its fitted IAT law.

    ``arg1`` is the shape, ``arg2`` the scale (s) of ``scipy.stats.gamma(a, scale)``
    or ``scipy.stats.weibull_min(c, scale)``; ``rate`` (req/s) = requests / 600.
    """

    category: str
    model: str
    client_id: str
    start_s: float
    rate: float
    cv: float
    pattern: Pattern
    arg1: float
    arg2: float

    @property
    def end_s(self) -> float:
        return self.start_s + SERVEGEN_WINDOW_S

    def fitted_mean_iat(self) -> float:
        """Mean IAT of the fitted distribution as published (s)."""
        return self.arg2 * _unit_mean(self.pattern, self.arg1)

    def fitted_cv(self) -> float:
        """CV of the fitted distribution (kept by :func:`servegen_arrivals`)."""
        return _pattern_cv(self.pattern, self.arg1)


def _unit_mean(pattern: Pattern, shape: float) -> float:
    """Mean of the pattern with scale 1."""
    if pattern == "Gamma":
        return shape
    return math.exp(math.lgamma(1.0 + 1.0 / shape))


def _pattern_cv(pattern: Pattern, shape: float) -> float:
    if pattern == "Gamma":
        return 1.0 / math.sqrt(shape)
    g1 = math.lgamma(1.0 + 1.0 / shape)
    g2 = math.lgamma(1.0 + 2.0 / shape)
    return math.sqrt(max(math.exp(g2 - 2.0 * g1) - 1.0, 0.0))


def load_servegen(
    path: PathLike, model: str | None = None, clients: Sequence[str] | None = None
) -> list[ClientWindow]:
    """Load ServeGen client windows (header ``category,model,client_id,timestamp,rate,
    cv,pat_name,pat_arg1,pat_arg2``), optionally only one model and some clients.

    File order is kept (model, client, window start). Rows without a fitted pattern
    or with a non-positive rate are skipped. Line endings may be mixed (the data
    rows keep the original CRLF); fields are stripped.
    """
    wanted = None if clients is None else {str(c) for c in clients}
    out: list[ClientWindow] = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            rec = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            if model is not None and rec["model"] != model:
                continue
            if wanted is not None and rec["client_id"] not in wanted:
                continue
            pat = rec["pat_name"]
            if pat not in ("Gamma", "Weibull"):
                continue
            rate = float(rec["rate"])
            if rate <= 0:
                continue
            pattern: Pattern = "Gamma" if pat == "Gamma" else "Weibull"
            out.append(
                ClientWindow(
                    category=rec["category"],
                    model=rec["model"],
                    client_id=rec["client_id"],
                    start_s=float(rec["timestamp"]),
                    rate=rate,
                    cv=float(rec["cv"]),
                    pattern=pattern,
                    arg1=float(rec["pat_arg1"]),
                    arg2=float(rec["pat_arg2"]),
                )
            )
    return out


def _draw_iat(rng: random.Random, pattern: Pattern, shape: float, scale: float) -> float:
    if pattern == "Gamma":
        return rng.gammavariate(shape, scale)
    # Python's argument order: weibullvariate(alpha=scale, beta=shape).
    return rng.weibullvariate(scale, shape)


def _draw_forward_recurrence(
    rng: random.Random, pattern: Pattern, shape: float, scale: float
) -> float:
    """Time to the first arrival of a stationary renewal process.

    The forward-recurrence time is ``U * L`` with ``U ~ U(0, 1)`` and ``L`` the
    length-biased IAT (density ``x f(x) / mean``): Gamma(k, s) -> Gamma(k + 1, s);
    Weibull(c, s) -> ``s * Y**(1/c)`` with ``Y ~ Gamma(1 + 1/c, 1)``.
    """
    if pattern == "Gamma":
        length = rng.gammavariate(shape + 1.0, scale)
    else:
        length = scale * rng.gammavariate(1.0 + 1.0 / shape, 1.0) ** (1.0 / shape)
    return rng.random() * length


def _renewal(
    rng: random.Random,
    pattern: Pattern,
    shape: float,
    rate: float,
    lo: float,
    hi: float,
    out: list[float],
) -> None:
    """Append a stationary renewal process of mean rate ``rate`` on ``[lo, hi)``."""
    if rate <= 0 or hi <= lo:
        return
    scale = 1.0 / (rate * _unit_mean(pattern, shape))
    t = lo + _draw_forward_recurrence(rng, pattern, shape, scale)
    while t < hi:
        out.append(t)
        t += _draw_iat(rng, pattern, shape, scale)


def servegen_arrivals(
    windows: Iterable[ClientWindow],
    rng: RngLike,
    start_s: float = 0.0,
    duration_s: float | None = None,
    rate_scale: float = 1.0,
) -> list[tuple[float, str]]:
    """Arrival times generated from ServeGen client windows, merged and sorted.

    For each window (in the given order) and the part of it inside
    ``[start_s, start_s + duration_s)`` (``duration_s=None``: to the end of the last
    window), a stationary renewal process is drawn whose IATs follow the window's
    fitted law with the fitted *shape* and the scale reset so that the mean rate is
    ``rate * rate_scale`` (see the module docstring for why the published scale is
    not used as is). Windows are independent. Returns ``(t - start_s, client_id)``
    sorted by time (ties: generation order). Client ids are not unique across
    models; filter by model in :func:`load_servegen` when mixing.
    """
    gen = _rng(rng)
    wins = list(windows)
    if not wins:
        return []
    end = max(w.end_s for w in wins) if duration_s is None else start_s + duration_s
    out: list[tuple[float, str]] = []
    buf: list[float] = []
    for w in wins:
        lo = max(w.start_s, start_s)
        hi = min(w.end_s, end)
        if hi <= lo:
            continue
        buf.clear()
        _renewal(gen, w.pattern, w.arg1, w.rate * rate_scale, lo, hi, buf)
        out.extend((t - start_s, w.client_id) for t in buf)
    out.sort(key=lambda a: a[0])
    return out


# ---------------------------------------------------------------- synthetic arrivals


def poisson_arrivals(rate: float, duration_s: float, rng: RngLike) -> list[float]:
    """Homogeneous Poisson process of ``rate`` req/s on ``[0, duration_s)``."""
    gen = _rng(rng)
    out: list[float] = []
    if rate <= 0:
        return out
    t = gen.expovariate(rate)
    while t < duration_s:
        out.append(t)
        t += gen.expovariate(rate)
    return out


def gamma_arrivals(rate: float, cv: float, duration_s: float, rng: RngLike) -> list[float]:
    """Stationary Gamma renewal process: IATs Gamma(shape=1/cv**2, mean=1/rate).

    ``cv = 1`` is a Poisson process (in distribution; the draws differ from
    :func:`poisson_arrivals`). ``cv = 0`` is a periodic process with a uniform phase.
    """
    if cv < 0:
        raise ValueError("cv must be >= 0")
    gen = _rng(rng)
    out: list[float] = []
    if rate <= 0:
        return out
    if cv == 0:
        t = gen.random() / rate
        while t < duration_s:
            out.append(t)
            t += 1.0 / rate
        return out
    _renewal(gen, "Gamma", 1.0 / (cv * cv), rate, 0.0, duration_s, out)
    return out


def diurnal_arrivals(
    mean_rate: float,
    amplitude: float,
    period_s: float,
    duration_s: float,
    rng: RngLike,
    phase_s: float = 0.0,
) -> list[float]:
    """Non-homogeneous Poisson process by Lewis-Shedler thinning on ``[0, duration_s)``.

    ``rate(t) = mean_rate * (1 + amplitude * sin(2 pi (t + phase_s) / period_s))``,
    ``0 <= amplitude <= 1``; with ``phase_s = 0`` the peak is at ``period_s / 4``.
    Candidates come from a Poisson process of ``mean_rate * (1 + amplitude)`` and
    each is kept with probability ``rate(t) / max rate`` (two draws per candidate).
    """
    if not 0.0 <= amplitude <= 1.0:
        raise ValueError("amplitude must be in [0, 1]")
    if period_s <= 0:
        raise ValueError("period_s must be > 0")
    gen = _rng(rng)
    out: list[float] = []
    if mean_rate <= 0:
        return out
    peak = mean_rate * (1.0 + amplitude)
    omega = 2.0 * math.pi / period_s
    t = gen.expovariate(peak)
    while t < duration_s:
        rate_t = mean_rate * (1.0 + amplitude * math.sin(omega * (t + phase_s)))
        if gen.random() * peak < rate_t:
            out.append(t)
        t += gen.expovariate(peak)
    return out


# ----------------------------------------------------------------------- transforms


def scale_rate(reqs: Sequence[TraceRequest], factor: float) -> list[TraceRequest]:
    """Compress time by ``factor`` (arrival / factor): ``factor = 2`` doubles the rate."""
    if factor <= 0:
        raise ValueError("factor must be > 0")
    return [
        TraceRequest(r.arrival_s / factor, r.prompt_tokens, r.output_tokens, r.hash_ids, r.client)
        for r in reqs
    ]


def repeat(
    reqs: Sequence[TraceRequest], times: int, until_s: float = math.inf
) -> list[TraceRequest]:
    """The trace ``times`` times back to back (``times = 1``: unchanged).

    Copy ``k`` (from 0) arrives ``k * period`` later than the trace, where the
    period is the last arrival plus the mean gap between arrivals (so the seam
    looks like any other gap); requests are otherwise unchanged and stay sorted.
    Copies that would begin after ``until_s`` are left out (a caller that keeps
    only the arrivals before some time need not build the others).
    """
    if times < 1:
        raise ValueError("times must be >= 1")
    if times == 1 or not reqs:
        return list(reqs)
    first, last = reqs[0].arrival_s, reqs[-1].arrival_s
    gap = (last - first) / (len(reqs) - 1) if len(reqs) > 1 else 1.0
    period = last + (gap if gap > 0 else 1.0)
    out = list(reqs)
    for k in range(1, times):
        offset = k * period
        if first + offset > until_s:
            break
        out.extend(
            TraceRequest(
                r.arrival_s + offset, r.prompt_tokens, r.output_tokens, r.hash_ids, r.client
            )
            for r in reqs
        )
    return out


def time_window(
    reqs: Sequence[TraceRequest], start_s: float, duration_s: float
) -> list[TraceRequest]:
    """Requests with ``start_s <= arrival < start_s + duration_s``, re-based to 0."""
    end = start_s + duration_s
    return [
        replace(r, arrival_s=r.arrival_s - start_s) for r in reqs if start_s <= r.arrival_s < end
    ]


def shift(
    reqs: Sequence[TraceRequest], offset_s: float, period_s: float | None = None
) -> list[TraceRequest]:
    """Shift arrivals by ``offset_s`` (e.g. a region's time-zone offset).

    With ``period_s``, times wrap modulo the period (into ``[0, period_s)``) and the
    result is re-sorted (stably); without, the order is unchanged.
    """
    if period_s is None:
        return [replace(r, arrival_s=r.arrival_s + offset_s) for r in reqs]
    if period_s <= 0:
        raise ValueError("period_s must be > 0")
    out = [replace(r, arrival_s=(r.arrival_s + offset_s) % period_s) for r in reqs]
    out.sort(key=lambda r: r.arrival_s)
    return out


# -------------------------------------------------------------------- prefix reuse


def _prefix_hits(reqs: Iterable[TraceRequest], cache_blocks: int | None) -> list[tuple[int, int]]:
    """Per request (in arrival order): (hit blocks, total blocks), prefix-stop lookup."""
    ordered = sorted(reqs, key=lambda r: r.arrival_s)
    result: list[tuple[int, int]] = []
    if cache_blocks is None:
        seen: set[int] = set()
        for r in ordered:
            k = 0
            for h in r.hash_ids:
                if h not in seen:
                    break
                k += 1
            seen.update(r.hash_ids)
            result.append((k, len(r.hash_ids)))
        return result
    if cache_blocks < 0:
        raise ValueError("cache_blocks must be >= 0 or None")
    lru: OrderedDict[int, None] = OrderedDict()
    for r in ordered:
        k = 0
        hitting = True
        for h in r.hash_ids:
            if h in lru:
                lru.move_to_end(h)
                if hitting:
                    k += 1
            else:
                hitting = False
                lru[h] = None
                if len(lru) > cache_blocks:
                    lru.popitem(last=False)
        result.append((k, len(r.hash_ids)))
    return result


def prefix_reuse(reqs: Iterable[TraceRequest], cache_blocks: int | None = None) -> float:
    """Fraction of prefix blocks found in the cache (prefix-stop lookup, arrival order).

    ``cache_blocks=None``: unlimited cache; otherwise an LRU over blocks holding at
    most ``cache_blocks`` blocks (a looked-up hit and every block of a processed
    request become most recently used). See the module docstring.
    """
    pairs = _prefix_hits(reqs, cache_blocks)
    total = sum(n for _, n in pairs)
    return sum(k for k, _ in pairs) / total if total else 0.0


def prefix_reuse_tokens(
    reqs: Iterable[TraceRequest],
    cache_blocks: int | None = None,
    block_tokens: int = BLOCK_TOKENS,
) -> float:
    """Like :func:`prefix_reuse` but weighted by tokens: reused tokens of a request
    are ``min(hit_blocks * block_tokens, prompt_tokens)``, over all prompt tokens."""
    ordered = sorted(reqs, key=lambda r: r.arrival_s)
    pairs = _prefix_hits(ordered, cache_blocks)
    total = sum(r.prompt_tokens for r in ordered)
    hit = sum(
        min(k * block_tokens, r.prompt_tokens) for r, (k, _) in zip(ordered, pairs, strict=True)
    )
    return hit / total if total else 0.0


# --------------------------------------------------------------------------- stats


def trace_stats(reqs: Sequence[TraceRequest]) -> dict[str, float]:
    """Summary statistics (numpy): count, span, rate, IAT CV, token mean/p50/p99.

    ``rate`` is ``1 / mean IAT = (n - 1) / span``; ``iat_cv`` is ``std / mean`` of the
    inter-arrival times (population std); percentiles use numpy's linear default.
    """
    n = len(reqs)
    stats: dict[str, float] = {"n": float(n)}
    if n == 0:
        return stats
    arr = np.sort(np.fromiter((r.arrival_s for r in reqs), dtype=float, count=n))
    iat = np.diff(arr)
    span = float(arr[-1] - arr[0])
    stats["span_s"] = span
    mean_iat = float(iat.mean()) if iat.size else 0.0
    stats["rate"] = 1.0 / mean_iat if mean_iat > 0 else math.inf
    stats["iat_cv"] = float(iat.std() / mean_iat) if mean_iat > 0 else 0.0
    for name, values in (
        ("input", np.fromiter((r.prompt_tokens for r in reqs), dtype=float, count=n)),
        ("output", np.fromiter((r.output_tokens for r in reqs), dtype=float, count=n)),
    ):
        stats[f"{name}_mean"] = float(values.mean())
        stats[f"{name}_p50"] = float(np.percentile(values, 50))
        stats[f"{name}_p99"] = float(np.percentile(values, 99))
    return stats
