"""Synthetic request streams (Poisson arrivals with tenant / model / origin mixes).

All draws come from the workload's own generator, so changing a policy never
changes the requests a scenario produces.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping

from haif.contracts import Request
from haif.sim.scenario import Distribution, Workload


def _pick(rng: random.Random, weights: Mapping[str, float]) -> str:
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def draw_tokens(dist: Distribution, rng: random.Random) -> int:
    if dist.kind == "fixed":
        return dist.value
    if dist.kind == "uniform":
        return rng.randint(dist.low, dist.high)
    sigma2 = math.log1p(dist.cv**2)
    mu = math.log(dist.mean) - sigma2 / 2
    return max(1, round(rng.lognormvariate(mu, math.sqrt(sigma2))))


def poisson_requests(
    workload: Workload, regions: tuple[str, ...], duration_s: float, rng: random.Random
) -> Iterator[Request]:
    """Requests arriving as a Poisson process of ``workload.rate`` per second."""
    origins = workload.origins or dict.fromkeys(regions, 1.0)
    t = 0.0
    n = 0
    while True:
        t += rng.expovariate(workload.rate)
        if t >= duration_s:
            return
        n += 1
        yield Request(
            request_id=f"r{n:07d}",
            tenant=_pick(rng, workload.tenants),
            model=_pick(rng, workload.models),
            prompt_tokens=draw_tokens(workload.prompt_tokens, rng),
            max_tokens=max(1, draw_tokens(workload.output_tokens, rng)),
            arrival_s=t,
            origin_region=_pick(rng, origins),
            deadline_s=t + workload.timeout_s if workload.timeout_s else None,
        )
