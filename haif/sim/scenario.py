"""The scenario file: fleet, workload, faults and policy of one what-if run.

Validated once by pydantic (unknown keys are errors, so a typo never
silently falls back to a default); the control core's part is the
:class:`~haif.control.config.CoreConfig` under ``policy``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from haif.configfile import load_model
from haif.control.config import CoreConfig

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServiceModel(_Strict):
    """Time a request occupies a worker slot (the skeleton's service model).

    ``fixed``: exactly ``mean_s``; ``exponential``: exponential with that mean.
    The first token arrives ``ttft_s`` after the request starts (bounded by
    the service time).
    """

    kind: Literal["fixed", "exponential"] = "exponential"
    mean_s: PositiveFloat = 1.0
    ttft_s: NonNegFloat = 0.1


class WorkerGroup(_Strict):
    region: str
    count: Annotated[int, Field(ge=1)] = 1
    gpu_class: str = "A100-80G"
    vram_gb: NonNegFloat = 80.0
    capacity: Annotated[int, Field(ge=1)] = 8
    models: tuple[str, ...] = ("llama-3-8b",)
    price_per_hour: NonNegFloat = 2.21
    service: ServiceModel = ServiceModel()


class Distribution(_Strict):
    """A token-count distribution: fixed, uniform[low, high] or lognormal(mean, cv)."""

    kind: Literal["fixed", "uniform", "lognormal"] = "fixed"
    value: Annotated[int, Field(ge=0)] = 0
    low: Annotated[int, Field(ge=0)] = 0
    high: Annotated[int, Field(ge=0)] = 0
    mean: NonNegFloat = 0.0
    cv: NonNegFloat = 1.0

    @model_validator(mode="after")
    def _check(self) -> Distribution:
        if self.kind == "uniform" and self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        if self.kind == "lognormal" and self.mean <= 0:
            raise ValueError("lognormal needs mean > 0")
        return self


class Workload(_Strict):
    kind: Literal["poisson"] = "poisson"
    rate: PositiveFloat = 10.0
    tenants: dict[str, PositiveFloat] = Field(default_factory=lambda: {"default": 1.0})
    models: dict[str, PositiveFloat] = Field(default_factory=lambda: {"llama-3-8b": 1.0})
    origins: dict[str, PositiveFloat] = Field(default_factory=dict)
    prompt_tokens: Distribution = Distribution(kind="fixed", value=512)
    output_tokens: Distribution = Distribution(kind="fixed", value=128)
    timeout_s: PositiveFloat | None = None


class Heartbeats(_Strict):
    interval_s: PositiveFloat = 1.0
    loss: Annotated[float, Field(ge=0, lt=1)] = 0.0


class RegionOutage(_Strict):
    """Every worker of ``region`` is down (unreachable) from start_s to end_s."""

    kind: Literal["region_outage"]
    region: str
    start_s: NonNegFloat
    end_s: PositiveFloat

    @model_validator(mode="after")
    def _check(self) -> RegionOutage:
        if self.end_s <= self.start_s:
            raise ValueError(f"end_s ({self.end_s}) must be after start_s ({self.start_s})")
        return self


Fault = Annotated[RegionOutage, Field(discriminator="kind")]


class Network(_Strict):
    # A request to an unreachable worker fails after this long.
    connect_timeout_s: PositiveFloat = 1.0


class Scenario(_Strict):
    name: str
    description: str = ""
    seed: int = 0
    duration_s: PositiveFloat = 600.0
    # Extra time after the last arrival to let requests finish.
    drain_s: NonNegFloat = 120.0
    control_region: str
    regions: tuple[str, ...]
    workers: tuple[WorkerGroup, ...]
    workload: Workload = Workload()
    heartbeat: Heartbeats = Heartbeats()
    network: Network = Network()
    faults: tuple[Fault, ...] = ()
    policy: CoreConfig = CoreConfig()

    @model_validator(mode="after")
    def _check_regions(self) -> Scenario:
        known = set(self.regions)
        allowed = ", ".join(self.regions)

        def check(where: str, region: str) -> None:
            if region not in known:
                raise ValueError(f"{where}: unknown region {region!r} (allowed: {allowed})")

        check("control_region", self.control_region)
        for i, group in enumerate(self.workers):
            check(f"workers.{i}.region", group.region)
        for region in self.workload.origins:
            check(f"workload.origins.{region}", region)
        for i, fault in enumerate(self.faults):
            check(f"faults.{i}.region", fault.region)
        return self


def load_scenario(path: str | Path, overrides: Iterable[str] = ()) -> Scenario:
    """Load and validate a scenario file (raises ConfigError with file:line: field)."""
    return load_model(Scenario, path, overrides)
