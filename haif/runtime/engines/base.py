"""What every engine is: the :class:`Engine` protocol, its managed form and its errors.

Every adapter module of :mod:`haif.runtime.engines` imports from here (and
nothing from its siblings but the shared helpers), so adding an engine is one
new module plus one line in the registry (:data:`haif.runtime.engines.ENGINES`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from haif.configfile import ConfigError
from haif.contracts import Request
from haif.runtime.messages import TokenChunk

__all__ = ["MAX_CHUNK_TOKENS", "Engine", "EngineError", "EngineUnavailable", "ManagedEngine"]

#: Most tokens one frame carries (tokens due at the same instant are batched).
MAX_CHUNK_TOKENS = 256


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
