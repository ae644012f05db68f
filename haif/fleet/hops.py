"""Measured hop delays: the runtime's cost of one service hop as a distribution.

A scenario gives the one-way cost of a hop between services (HTTP, msgpack,
Python; on top of the RTT between regions) either as a constant,
``network.hop_ms``, or as a file of measured delays, ``network.hops: PATH``:

.. code-block:: yaml

    source: bench/hop_latency.py --requests 200 on 2026-12-07 (...)
    hop_ms: [1.91, 1.97, 2.02, ...]   # one-way delays of one hop, in ms

``bench/hop_latency.py --out PATH`` writes such a file from a live cluster
(each sample is a quarter of one request's measured overhead on its time to
first token: the four hops the simulator models), and ``source`` says which
run that was, so a scenario can be checked against runs its hop cost was
not measured on. The simulator draws each hop of a request's path (client
-> gateway, orchestrator -> worker, worker -> orchestrator, gateway ->
client) from the file's empirical distribution, interpolated linearly between
its sorted samples (numpy's default quantile), with a generator derived from
the scenario's seed; heartbeats and the other control messages take the
median, so the most frequent message costs no draw. Draws come in the
simulation's event order, so a seed gives the same run every time.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from haif.configfile import load_model

__all__ = ["HopSampler", "HopSamples", "hops_document", "load_hops", "quantile"]

HopMs = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class HopSamples(BaseModel):
    """The file ``network.hops`` names: measured one-way delays of one hop."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # What measured them (command, date, machine): a scenario's hop cost must be
    # traceable to a run other than the one it is checked against.
    source: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
    # One-way delays of one hop in milliseconds, in any order.
    hop_ms: Annotated[tuple[HopMs, ...], Field(min_length=1)]


def load_hops(path: str | Path) -> HopSamples:
    """Read and validate a hops file (raises ConfigError naming the file, line and field)."""
    return load_model(HopSamples, path)


def quantile(sorted_values: Sequence[float], u: float) -> float:
    """The ``u`` quantile (0 <= u <= 1) of sorted samples, interpolated linearly between
    neighbours as numpy's default does, so a draw is not limited to the measured values."""
    if not sorted_values:
        raise ValueError("quantile of no samples")
    if not 0.0 <= u <= 1.0:
        raise ValueError(f"u: must be in [0, 1], got {u}")
    pos = u * (len(sorted_values) - 1)
    i = int(pos)
    if i + 1 >= len(sorted_values):
        return float(sorted_values[-1])
    lo, hi = sorted_values[i], sorted_values[i + 1]
    return float(lo + (hi - lo) * (pos - i))


class HopSampler:
    """Draws hop delays (seconds) from measured samples with an injected generator."""

    def __init__(self, samples_ms: Sequence[float], rng: random.Random) -> None:
        if not samples_ms:
            raise ValueError("samples_ms: give at least one sample")
        self._sorted_s = tuple(sorted(ms / 1000.0 for ms in samples_ms))
        self._rng = rng

    @property
    def median_s(self) -> float:
        """The delay of messages off a request's path (heartbeats): no draw."""
        return quantile(self._sorted_s, 0.5)

    def draw_s(self) -> float:
        """One hop's delay: the quantile at a uniform draw (inverse transform sampling)."""
        return quantile(self._sorted_s, self._rng.random())


def hops_document(samples_ms: Sequence[float], source: str, comment: Sequence[str] = ()) -> str:
    """The text of a hops file (comment lines first), which :func:`load_hops` reads back."""
    head = "".join(f"# {line}\n" if line else "#\n" for line in comment)
    values = ", ".join(f"{ms:.3f}" for ms in samples_ms)
    # A JSON string is a valid YAML scalar, so any source text round-trips.
    return f"{head}source: {json.dumps(source)}\nhop_ms: [{values}]\n"
