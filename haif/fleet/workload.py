"""Turn a scenario's ``workload`` into the list of requests clients will send.

Arrival times and token counts come from a trace (Azure 2023, Mooncake,
ServeGen client windows) or a synthetic process (Poisson, Gamma with a CV,
diurnal, Poisson phases with their own rates and lengths); tenant, model,
origin region and priority are drawn from the scenario's mixes. All draws
use the workload's own generators, so changing a policy, the fleet or the
faults never changes the requests.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from pathlib import Path

from haif.configfile import ConfigError
from haif.contracts import Request
from haif.fleet import traces
from haif.fleet.scenario import Distribution, Scenario, Workload
from haif.seeding import derive_rng


def _picker(
    weights: Mapping[str, float] | Mapping[int, float], rng: random.Random
) -> Callable[[], object]:
    keys = list(weights)
    cum: list[float] = []
    total = 0.0
    for k in keys:
        total += float(weights[k])  # type: ignore[index]
        cum.append(total)
    if len(keys) == 1:
        return lambda: keys[0]
    return lambda: rng.choices(keys, cum_weights=cum)[0]


def draw_tokens(dist: Distribution, rng: random.Random) -> int:
    if dist.kind == "fixed":
        return dist.value
    if dist.kind == "uniform":
        return rng.randint(dist.low, dist.high)
    sigma2 = math.log1p(dist.cv**2)
    mu = math.log(dist.mean) - sigma2 / 2
    return max(1, round(rng.lognormvariate(mu, math.sqrt(sigma2))))


def resolve_path(raw: str, base_dir: Path, field: str) -> Path:
    """A data path as written in a scenario: relative to the scenario file, then to CWD."""
    candidates = [base_dir / raw, Path(raw)]
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise ConfigError(f"{field}: no such file {raw!r} (looked at {tried})")


def _arrivals(
    w: Workload, duration_s: float, base_dir: Path, seed: int
) -> list[traces.TraceRequest]:
    """Arrivals with token counts, in [0, duration_s), before mixes are applied."""
    rng = derive_rng(seed, "workload:arrivals")
    if w.kind in ("azure", "mooncake"):
        assert w.path is not None
        path = resolve_path(w.path, base_dir, "workload.path")
        rows = traces.load_azure(path) if w.kind == "azure" else traces.load_mooncake(path, rng)
        rows = traces.time_window(rows, w.start_s, math.inf)
        # Copies starting after the window are not built (with a margin for rounding).
        rows = traces.repeat(rows, w.repeat, until_s=duration_s * w.rate_scale * (1 + 1e-9) + 1.0)
        rows = traces.scale_rate(rows, w.rate_scale)
        return [r for r in rows if r.arrival_s < duration_s]
    if w.kind == "servegen":
        assert w.path is not None
        path = resolve_path(w.path, base_dir, "workload.path")
        windows = traces.load_servegen(path, model=w.servegen_model)
        if not windows:
            raise ConfigError(f"workload.servegen_model: no windows for {w.servegen_model!r}")
        times = [
            t
            for t, _ in traces.servegen_arrivals(
                windows, rng, start_s=w.start_s, duration_s=duration_s, rate_scale=w.rate_scale
            )
        ]
    elif w.kind == "phases":
        return _phase_arrivals(w, duration_s, rng, derive_rng(seed, "workload:lengths"))
    elif w.kind == "poisson":
        times = traces.poisson_arrivals(w.rate * w.rate_scale, duration_s, rng)
    elif w.kind == "gamma":
        times = traces.gamma_arrivals(w.rate * w.rate_scale, w.cv, duration_s, rng)
    else:
        times = traces.diurnal_arrivals(
            w.rate * w.rate_scale, w.amplitude, w.period_s, duration_s, rng, phase_s=w.start_s
        )
    lengths_rng = derive_rng(seed, "workload:lengths")
    if w.lengths:
        sampler = traces.LengthSampler(
            traces.load_lengths(resolve_path(w.lengths, base_dir, "workload.lengths")), lengths_rng
        )
        return [traces.TraceRequest(t, *sampler.sample()) for t in times]
    return [
        traces.TraceRequest(
            t, draw_tokens(w.prompt_tokens, lengths_rng), draw_tokens(w.output_tokens, lengths_rng)
        )
        for t in times
    ]


def _phase_arrivals(
    w: Workload, duration_s: float, rng: random.Random, lengths_rng: random.Random
) -> list[traces.TraceRequest]:
    """The phases in order, over and over, until ``duration_s``."""
    out: list[traces.TraceRequest] = []
    start = 0.0
    while start < duration_s:
        for phase in w.phases:
            span = min(phase.duration_s, duration_s - start)
            prompts = phase.prompt_tokens or w.prompt_tokens
            outputs = phase.output_tokens or w.output_tokens
            out.extend(
                traces.TraceRequest(
                    start + t, draw_tokens(prompts, lengths_rng), draw_tokens(outputs, lengths_rng)
                )
                for t in traces.poisson_arrivals(phase.rate * w.rate_scale, span, rng)
            )
            start += phase.duration_s
            if start >= duration_s:
                break
    return out


def build_requests(scenario: Scenario) -> list[Request]:
    """Every request of the run, sorted by arrival time."""
    w = scenario.workload
    seed = scenario.seed
    rows = _arrivals(w, scenario.duration_s, Path(scenario.base_dir), seed)
    mix = derive_rng(seed, "workload:mix")
    tenant = _picker(w.tenants, mix)
    model = _picker(w.models, mix)
    origin = _picker(w.origins or dict.fromkeys(scenario.regions, 1.0), mix)
    priority = _picker(w.priorities, mix)
    out: list[Request] = []
    for n, row in enumerate(rows, start=1):
        region = str(origin())
        t = row.arrival_s
        if w.region_shift_s:
            t = (t + w.region_shift_s.get(region, 0.0)) % scenario.duration_s
        out.append(
            Request(
                request_id=f"r{n:07d}",
                tenant=str(tenant()),
                model=str(model()),
                prompt_tokens=max(
                    1, min(round(row.prompt_tokens * w.prompt_scale), w.max_prompt_tokens)
                ),
                max_tokens=max(1, min(row.output_tokens, w.max_output_tokens or row.output_tokens)),
                arrival_s=t,
                origin_region=region,
                priority=int(priority()),  # type: ignore[call-overload]
                deadline_s=t + w.timeout_s if w.timeout_s else None,
                prefix_hashes=row.hash_ids,
                prefix_block_tokens=traces.BLOCK_TOKENS,
            )
        )
    out.sort(key=lambda r: r.arrival_s)
    return out
