"""What every engine is: the :class:`Engine` protocol, its managed form and its errors.

Every adapter module of :mod:`haif.runtime.engines` imports from here (and
nothing from its siblings but the shared helpers), so adding an engine is one
new module plus one line in the registry (:data:`haif.runtime.engines.ENGINES`).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from haif.configfile import ConfigError
from haif.contracts import SAMPLING_PARAMETERS, Request, SamplingParams
from haif.runtime.messages import TokenChunk

__all__ = [
    "ALL_SAMPLING",
    "GREEDY",
    "MAX_CHUNK_TOKENS",
    "Engine",
    "EngineError",
    "EngineUnavailable",
    "ManagedEngine",
    "request_seed",
    "sampling_of",
    "supported_sampling",
    "unsupported_parameter",
]

#: Most tokens one frame carries (tokens due at the same instant are batched).
MAX_CHUNK_TOKENS = 256

#: Every sampling parameter (what an engine that honours them all declares).
ALL_SAMPLING: frozenset[str] = frozenset(SAMPLING_PARAMETERS)

#: What a request without sampling parameters means (the simulator's
#: semantics, :class:`~haif.contracts.Request`): greedy, exactly ``max_tokens``.
GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)


def sampling_of(request: Request) -> SamplingParams:
    """The request's sampling parameters; :data:`GREEDY` when it has none."""
    return request.sampling if request.sampling is not None else GREEDY


def request_seed(request: Request) -> int:
    """The seed of the request's sampling: its ``seed``, else a digest of its id."""
    sampling = request.sampling
    if sampling is not None and sampling.seed is not None:
        return sampling.seed
    return int.from_bytes(hashlib.sha256(request.request_id.encode()).digest()[:8], "big")


def supported_sampling(engine: Any) -> frozenset[str]:
    """The sampling parameters ``engine`` honours: its ``SUPPORTED_SAMPLING``.

    An engine that does not declare them is assumed to honour only
    ``ignore_eos`` (it produces ``max_tokens`` tokens, as every engine did):
    a parameter is refused rather than silently ignored.
    """
    declared = getattr(engine, "SUPPORTED_SAMPLING", None)
    return frozenset(declared) if declared is not None else frozenset({"ignore_eos"})


def unsupported_parameter(request: Request, supported: frozenset[str]) -> str | None:
    """The first sampling parameter ``request`` sets that is not in ``supported``."""
    if request.sampling is None:
        return None
    return next((p for p in request.sampling.requested() if p not in supported), None)


class EngineError(ConfigError):
    """An engine cannot be built as asked (unknown name, bad or missing options)."""


class EngineUnavailable(EngineError):
    """The engine's software is not installed here."""


class Engine(Protocol):
    """What a worker hosts: a token stream for a request, from a token index on."""

    def stream(self, request: Request, start: int = 0) -> AsyncIterator[TokenChunk]: ...


@runtime_checkable
class ManagedEngine(Protocol):
    """An engine with a model to load before serving and resources to free after."""

    async def load(self) -> None: ...

    async def close(self) -> None: ...
