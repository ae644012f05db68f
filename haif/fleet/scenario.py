"""The scenario file: regions, fleet, workload, faults and policy of one what-if run.

Validated once by pydantic (unknown keys are errors, so a typo never
silently falls back to a default); errors name the file, line and field
(:mod:`haif.configfile`). The control core's part is the
:class:`~haif.control.config.CoreConfig` under ``policy``.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from haif.configfile import ConfigError, load_model
from haif.control.config import CoreConfig
from haif.control.presence import PresenceConfig
from haif.fleet.hops import HopSamples, load_hops

if TYPE_CHECKING:
    from haif.fleet.profiles import ProfileCatalog

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Count = Annotated[int, Field(ge=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ------------------------------------------------------------------ fleet


class ServiceModel(_Strict):
    """The abstract service model (no GPU profile): a request holds a slot.

    ``fixed``: exactly ``mean_s``; ``exponential``: exponential with that mean
    (with ``capacity`` slots this is an M/M/c server). The first token arrives
    ``ttft_s`` after the request starts (bounded by the service time).
    """

    kind: Literal["fixed", "exponential"] = "exponential"
    mean_s: PositiveFloat = 1.0
    ttft_s: NonNegFloat = 0.1


class WorkerGroup(_Strict):
    """``count`` identical workers in one region.

    With ``gpu`` set, the worker is modelled from the GPU x model profile
    (continuous batching; see :mod:`haif.sim.engine`); without it, from the
    abstract ``service`` model with ``capacity`` slots.
    """

    region: str
    count: Count = 1
    gpu: str | None = None
    gpu_class: str | None = None  # label for the abstract model (default: gpu or "generic")
    models: tuple[str, ...] = ("llama-3-8b",)
    warm_models: tuple[str, ...] | None = None  # default: the first model
    max_batch: Count | None = None  # default: the profile's
    chunked_prefill_tokens: Count | None = None  # None: prefill-only steps (vLLM v0)
    prefix_cache: bool = False
    # Cap on the prefix cache's evictable blocks, in tokens (None: the KV pool decides).
    prefix_cache_max_tokens: Annotated[int, Field(ge=0)] | None = None
    capacity: Count = 8  # abstract model only
    service: ServiceModel = ServiceModel()  # abstract model only
    price_per_hour: NonNegFloat | None = None  # default: the GPU's list price

    @model_validator(mode="after")
    def _check(self) -> WorkerGroup:
        if self.prefix_cache_max_tokens is not None and not self.prefix_cache:
            raise ValueError("prefix_cache_max_tokens: needs prefix_cache: true")
        return self

    @property
    def label(self) -> str:
        return self.gpu_class or self.gpu or "generic"


# ------------------------------------------------------------------ workload


class Distribution(_Strict):
    """Token counts: fixed, uniform[low, high], lognormal(mean, cv), or
    ``empirical`` pairs (prompt, output) drawn from a length CSV (``path``)."""

    kind: Literal["fixed", "uniform", "lognormal"] = "fixed"
    value: Annotated[int, Field(ge=0)] = 0
    low: Annotated[int, Field(ge=0)] = 0
    high: Annotated[int, Field(ge=0)] = 0
    mean: NonNegFloat = 0.0
    cv: NonNegFloat = 1.0

    @model_validator(mode="after")
    def _check(self) -> Distribution:
        if self.kind == "uniform" and self.high < self.low:
            raise ValueError(f"high: must be >= low ({self.low}), got {self.high}")
        if self.kind == "lognormal" and self.mean <= 0:
            raise ValueError("mean: lognormal needs mean > 0")
        return self


class Phase(_Strict):
    """A stretch of a ``phases`` workload: Poisson arrivals at ``rate`` for
    ``duration_s``, token counts from its own distributions or the workload's."""

    duration_s: PositiveFloat
    rate: NonNegFloat
    prompt_tokens: Distribution | None = None
    output_tokens: Distribution | None = None


class Workload(_Strict):
    """Where requests come from.

    Synthetic arrivals: ``poisson`` (``rate``), ``gamma`` (``rate``, ``cv``),
    ``diurnal`` (``rate`` as the mean, ``amplitude``, ``period_s``) with token
    counts from ``prompt_tokens`` / ``output_tokens`` or, when ``lengths`` names
    a length CSV, drawn from it; ``phases``: Poisson stretches in order, each
    with its own rate and, where it gives them, its own token distributions,
    repeated until the run's end (``rate`` does not apply; :class:`Phase`).
    A calibration uses phases to vary the context per sequence independently
    of the batch size. Trace replay: ``azure`` and ``mooncake``
    (arrivals and lengths from ``path``), ``servegen`` (per-client windows from
    ``path``, lengths as for synthetic). ``rate_scale`` compresses time
    (2 = twice the rate); ``start_s`` skips into the trace; ``region_shift_s``
    shifts each origin region's clients in time (wrapping around). ``repeat``
    replays a trace (``azure``, ``mooncake``) that many times back to back,
    before ``rate_scale``: each copy starts one period after the previous one,
    the period being the trace's span (from ``start_s``) plus its mean gap
    between arrivals, so a trace of one hour becomes ``repeat`` hours of the
    same arrivals and lengths. ``prompt_scale`` multiplies every prompt length
    (rounded, at least 1) before ``max_prompt_tokens`` cuts it: a trace's shape on a
    model with a short context. ``max_output_tokens`` cuts output lengths.
    """

    kind: Literal["poisson", "gamma", "diurnal", "phases", "azure", "mooncake", "servegen"] = (
        "poisson"
    )
    rate: PositiveFloat = 10.0
    phases: list[Phase] = Field(default_factory=list)
    cv: PositiveFloat = 1.0
    amplitude: Fraction = 0.5
    period_s: PositiveFloat = 86400.0
    path: str | None = None
    lengths: str | None = None
    servegen_model: str | None = None
    rate_scale: PositiveFloat = 1.0
    repeat: Count = 1
    start_s: NonNegFloat = 0.0
    tenants: dict[str, PositiveFloat] = Field(default_factory=lambda: {"default": 1.0})
    models: dict[str, PositiveFloat] = Field(default_factory=lambda: {"llama-3-8b": 1.0})
    origins: dict[str, PositiveFloat] = Field(default_factory=dict)
    priorities: dict[int, PositiveFloat] = Field(default_factory=lambda: {1: 1.0})
    region_shift_s: dict[str, float] = Field(default_factory=dict)
    prompt_tokens: Distribution = Distribution(kind="fixed", value=512)
    output_tokens: Distribution = Distribution(kind="fixed", value=128)
    prompt_scale: PositiveFloat = 1.0
    max_prompt_tokens: Count = 32768
    max_output_tokens: Count | None = None
    timeout_s: PositiveFloat | None = None

    @model_validator(mode="after")
    def _check(self) -> Workload:
        if self.kind in ("azure", "mooncake", "servegen") and not self.path:
            raise ValueError(f"path: workload kind {self.kind!r} replays a trace file; give it")
        if self.prompt_scale != 1.0 and self.kind == "mooncake":
            raise ValueError(
                "prompt_scale: a mooncake trace's prompts are its prefix blocks (hash_ids); "
                "scaling their lengths would break the blocks, so it is not allowed"
            )
        if (self.kind == "phases") != bool(self.phases):
            raise ValueError(
                "phases: kind phases needs a list of phases"
                if self.kind == "phases"
                else f"phases: only kind phases has phases, not {self.kind!r}"
            )
        if self.phases and self.lengths:
            raise ValueError(
                "lengths: phases draw token counts from their distributions, not a CSV"
            )
        if self.repeat > 1 and self.kind not in ("azure", "mooncake"):
            raise ValueError(
                f"repeat: only a trace of arrivals (azure, mooncake) is repeated, not {self.kind!r}"
            )
        for p in self.priorities:
            if p < 0:
                raise ValueError(f"priorities.{p}: priority must be >= 0 (0 = most important)")
        return self


# ------------------------------------------------------------------ control plane


class Heartbeats(_Strict):
    """Worker heartbeats, and how orchestrators judge their silence.

    The judging is the runtime's (:mod:`haif.control.presence`): a worker's
    interval is estimated from the gaps between its heartbeats (assumed to be
    ``interval_s`` until its second one), and a worker silent for more than
    ``evict_after_missed`` intervals is evicted until it beats again.
    """

    interval_s: PositiveFloat = 1.0
    loss: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # Intervals of silence before an orchestrator evicts a worker (the
    # runtime's `evict_after_missed` in the cluster YAML, default 3).
    evict_after_missed: Count = 3
    # A restarted worker answers and announces itself this long after its
    # restart (process start-up); its weights load from the restart on, so the
    # load overlaps it. `python bench/worker_boot.py` measures the runtime's.
    boot_s: NonNegFloat = 0.0

    def presence(self) -> PresenceConfig:
        """How an orchestrator judges these heartbeats (both shells build it here)."""
        return PresenceConfig(
            evict_after_missed=self.evict_after_missed, default_interval_s=self.interval_s
        )


class Network(_Strict):
    # A request to an unreachable peer fails after this long.
    connect_timeout_s: PositiveFloat = 1.0
    # Clients notice their gateway is down after this long and fail over.
    failover_delay_s: NonNegFloat = 5.0
    # One-way latency of each hop between services (client -> gateway ->
    # orchestrator -> worker and back), on top of the RTT between regions: the
    # runtime's HTTP + msgpack + Python cost per hop (`haif parity` measures it).
    hop_ms: NonNegFloat = 0.0
    # Instead of hop_ms: a file of measured hop delays (haif.fleet.hops; written by
    # `bench/hop_latency.py --out`), relative to the scenario file. Each hop of a
    # request's path draws its delay from them; heartbeats take their median.
    hops: str | None = None
    # How a call to a crashed (or still booting) worker fails: "timeout", its
    # host is gone, after connect_timeout_s; "refused", only its process is
    # (what `haif replay --faults` does to a local cluster): the host refuses
    # the connection at once, so the call fails after one hop there and back.
    crashed_worker: Literal["timeout", "refused"] = "timeout"

    @model_validator(mode="after")
    def _one_hop_cost(self) -> Network:
        if self.hops is not None and "hop_ms" in self.model_fields_set:
            raise ValueError(
                "hops: give the hop cost as hop_ms or as a hops file, not both "
                f"(hop_ms {self.hop_ms:g}, hops {self.hops!r})"
            )
        return self


class Store(_Strict):
    """Metadata store: a reservation is written before every dispatch.

    ``write_latency_ms`` is how long a dispatch waits for it. The runtime
    makes a request wait for its job row only when it carries an
    Idempotency-Key (the key must be looked up); one without runs at once,
    so a scenario that models such requests on the runtime sets 0
    (``scenarios/parity.yaml`` does).
    """

    write_latency_ms: NonNegFloat = 2.0


# ------------------------------------------------------------------ faults


class _Window(_Strict):
    start_s: NonNegFloat
    end_s: PositiveFloat

    @model_validator(mode="after")
    def _window(self) -> _Window:
        if self.end_s <= self.start_s:
            raise ValueError(f"end_s: must be after start_s ({self.start_s}), got {self.end_s}")
        return self


class RegionOutage(_Window):
    """Every worker of ``region`` is unreachable (crashed) in the window."""

    kind: Literal["region_outage"]
    region: str


class WorkerCrash(_Strict):
    """Workers crash at ``at_s`` and restart after ``restart_s`` (then reload weights).

    Choose them by ``ids``, or ``count`` / ``fraction`` of a ``region`` (or of
    the fleet), picked with the fault's own seeded generator.
    """

    kind: Literal["worker_crash"]
    at_s: NonNegFloat
    restart_s: PositiveFloat = 120.0
    ids: tuple[str, ...] = ()
    region: str | None = None
    count: Count | None = None
    fraction: Annotated[float, Field(gt=0, le=1)] | None = None


class Partition(_Window):
    """Regions ``a`` and ``b`` cannot reach each other in the window."""

    kind: Literal["partition"]
    a: str
    b: str


class GrayFailure(_Window):
    """Workers run ``factor`` times slower in the window (still healthy-looking)."""

    kind: Literal["gray_failure"]
    factor: Annotated[float, Field(gt=1)] = 3.0
    ids: tuple[str, ...] = ()
    region: str | None = None
    count: Count | None = None


class StoreOutage(_Window):
    """Reservations cannot be written (optionally in one region only)."""

    kind: Literal["store_outage"]
    region: str | None = None


class GatewayDown(_Window):
    """A region's gateway is down; its clients fail over to the nearest other one."""

    kind: Literal["gateway_down"]
    region: str


Fault = Annotated[
    RegionOutage | WorkerCrash | Partition | GrayFailure | StoreOutage | GatewayDown,
    Field(discriminator="kind"),
]


class RandomFailures(_Strict):
    """Independent worker failures at a rate per GPU-hour (Llama 3 405B
    training: 419 interruptions / (16,384 GPUs x 54 days) = 2e-5; REFERENCE.md)."""

    per_gpu_hour: NonNegFloat = 2e-5
    restart_s: PositiveFloat = 300.0


# ------------------------------------------------------------------ scenario


class Scenario(_Strict):
    name: str
    description: str = ""
    seed: int = 0
    duration_s: PositiveFloat = 600.0
    # Extra time after the last arrival to let requests finish.
    drain_s: NonNegFloat = 120.0
    # "iteration": continuous batching step by step (accurate);
    # "request": one service time per request (fast approximation).
    fidelity: Literal["iteration", "request"] = "iteration"
    regions: tuple[str, ...]
    # Regions running a gateway + orchestrator (default: every region).
    control_regions: tuple[str, ...] | None = None
    # Targets reported in the SLO columns of the report.
    slo_ttft_s: PositiveFloat | None = None
    slo_e2e_s: PositiveFloat | None = None
    workers: tuple[WorkerGroup, ...]
    workload: Workload = Workload()
    heartbeat: Heartbeats = Heartbeats()
    network: Network = Network()
    store: Store = Store()
    faults: tuple[Fault, ...] = ()
    random_failures: RandomFailures | None = None
    policy: CoreConfig = CoreConfig()
    # GPU x model profile catalog (YAML, e.g. from `haif calibrate --out`),
    # relative to the scenario file; default: the packaged catalog.
    profiles: str | None = None
    # Data paths (traces, length files) are relative to this directory;
    # load_scenario sets it to the scenario file's directory.
    base_dir: str = "."

    def profiles_path(self) -> Path | None:
        """The ``profiles`` catalog file: relative to the scenario file, then to the CWD
        (as the other data paths)."""
        return None if self.profiles is None else self._data_file(self.profiles)

    def hops_path(self) -> Path | None:
        """The ``network.hops`` file, found as :meth:`profiles_path` finds the catalog."""
        return None if self.network.hops is None else self._data_file(self.network.hops)

    def hop_samples(self) -> HopSamples | None:
        """The measured hop delays the simulator draws from (None: ``hop_ms`` holds)."""
        path = self.hops_path()
        return None if path is None else load_hops(path)

    def _data_file(self, name: str) -> Path:
        """A file the scenario names: relative to the scenario file, then to the CWD."""
        path = Path(name).expanduser()
        if path.is_absolute():
            return path
        loading = _LOADING_DIR.get()
        if "base_dir" not in self.model_fields_set and loading is not None:
            base = loading  # validating inside load_scenario: base_dir is not set yet
        else:
            base = Path(self.base_dir)
        return base / path if (base / path).is_file() or not path.is_file() else path

    def catalog(self) -> ProfileCatalog:
        """The profile catalog this scenario's GPU workers are timed by."""
        from haif.fleet.profiles import load_catalog

        return load_catalog(self.profiles_path())

    @property
    def control(self) -> tuple[str, ...]:
        return self.control_regions or self.regions

    @model_validator(mode="after")
    def _check_regions(self) -> Scenario:
        known = set(self.regions)
        allowed = ", ".join(self.regions)

        def check(where: str, region: str | None) -> None:
            if region is not None and region not in known:
                raise ValueError(f"{where}: unknown region {region!r} (allowed: {allowed})")

        if not self.regions:
            raise ValueError("regions: give at least one region")
        for i, region in enumerate(self.control):
            check(f"control_regions.{i}", region)
        for i, group in enumerate(self.workers):
            check(f"workers.{i}.region", group.region)
        for region in self.workload.origins:
            check(f"workload.origins.{region}", region)
        for region in self.workload.region_shift_s:
            check(f"workload.region_shift_s.{region}", region)
        for i, fault in enumerate(self.faults):
            for attr in ("region", "a", "b"):
                check(f"faults.{i}.{attr}", getattr(fault, attr, None))
        self._check_fleet()
        self._check_hops()
        return self

    def _check_hops(self) -> None:
        """A hops file is read once here, so a bad one is refused before anything runs."""
        try:
            self.hop_samples()
        except ConfigError as exc:
            raise ValueError(f"network.hops: {exc}") from None

    def _check_fleet(self) -> None:
        """Every profiled worker exists in the catalog, and every model has a server."""
        from haif.fleet.profiles import ModelDoesNotFitError, UnknownProfileError

        catalog = self._load_catalog() if any(g.gpu for g in self.workers) else None
        for i, group in enumerate(self.workers):
            if group.gpu is None:
                continue
            assert catalog is not None
            for model in group.models:
                try:
                    catalog.get(group.gpu, model)
                except UnknownProfileError as exc:
                    field = "gpu" if group.gpu not in catalog.gpus else "models"
                    raise ValueError(f"workers.{i}.{field}: {exc}") from None
                except ModelDoesNotFitError as exc:
                    raise ValueError(f"workers.{i}.models: {exc}") from None
        served = {m for g in self.workers for m in g.models}
        for model in self.workload.models:
            if model not in served:
                raise ValueError(
                    f"workload.models.{model}: no worker serves {model!r} "
                    f"(the workers serve: {', '.join(sorted(served))})"
                )

    def _load_catalog(self) -> ProfileCatalog:
        try:
            return self.catalog()
        except FileNotFoundError:
            raise ValueError(f"profiles: no such file {self.profiles_path()}") from None
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise ValueError(
                f"profiles: {self.profiles_path()}: not a profile catalog: {exc}"
            ) from None


# The scenario file's directory while load_scenario validates it (profiles are relative to it).
_LOADING_DIR: ContextVar[Path | None] = ContextVar("haif_scenario_dir", default=None)


def load_scenario(path: str | Path, overrides: Iterable[str] = ()) -> Scenario:
    """Load and validate a scenario file (raises ConfigError with file:line: field)."""
    token = _LOADING_DIR.set(Path(path).resolve().parent)
    try:
        scenario = load_model(Scenario, path, overrides)
    finally:
        _LOADING_DIR.reset(token)
    if "base_dir" not in scenario.model_fields_set:
        scenario = scenario.model_copy(update={"base_dir": str(Path(path).resolve().parent)})
    return scenario
