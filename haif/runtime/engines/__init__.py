"""Inference engines a worker can host: one adapter per module, one registry.

An engine is anything with ``stream(request, start) -> AsyncIterator[TokenChunk]``
(:class:`Engine`): it yields the response's tokens from index ``start`` on,
in order, as text deltas (``TokenChunk.texts[i]`` is the text of token
``chunk.start + i`` exactly as it appears in the response, so the
concatenation of every chunk is the response). An engine that has to load
something first also has ``async load()`` and ``async close()``
(:class:`ManagedEngine`); the worker awaits ``load()`` before it announces
itself, so a model whose artifact does not verify is never announced.

Engines (``make_engine(name, **options)``; each takes typed constructor
arguments only, the worker's command line is mapped onto them by
:mod:`haif.runtime.engines_cli`):

- ``synthetic`` — :class:`SyntheticEngine` (:mod:`.synthetic`): deterministic
  text; nothing to load; timed ``fixed`` (``ttft_s``, ``mean_s``) or by the
  simulator's iteration-level (``profile``) or request-level
  (``profile-request``) engine and the GPU x model profiles.
- ``transformers`` — :class:`TransformersEngine` (:mod:`.transformers_engine`):
  a causal LM from a signed artifact (:mod:`haif.runtime.artifacts`), run
  with PyTorch on CUDA when available, else CPU; every sampling parameter.
- ``vllm`` — :class:`VllmEngine` (:mod:`.vllm_engine`): the same artifact in
  an in-process ``vllm.AsyncLLMEngine`` (every sampling parameter); needs
  ``haif[vllm]``.
- ``openai`` — :class:`OpenAIUpstreamEngine` (:mod:`.upstream`): relays an
  upstream OpenAI-compatible server: a chat to its ``/v1/chat/completions``,
  a completion to its ``/v1/completions``, streamed only when the client
  streams, the sampling parameters forwarded and the upstream's usage billed.

Sampling and stopping: each engine declares the parameters of
:data:`~haif.contracts.SAMPLING_PARAMETERS` it honours (``SUPPORTED_SAMPLING``,
read with :func:`supported_sampling`); the worker refuses a request that sets
another one (never ignores it). The synthetic engine honours ``temperature``,
``seed``, ``stop`` and ``ignore_eos`` (deterministically, see
:mod:`.synthetic`), the others all of them. Each engine sets the
``finish_reason`` (``stop``: end of sequence or a stop string, whose text is
not returned; ``length``: ``max_tokens``) on its last ``TokenChunk``.

Chat (``Request.messages``): ``transformers`` and ``vllm`` render the
messages with the model's chat template (:func:`.text.encode_chat`; a model
without one refuses chat with ``bad_request``, as vLLM), ``synthetic`` joins
their contents with newlines, ``openai`` forwards them as chat.

Shared by the adapters: :mod:`.base` (the protocols, errors,
``MAX_CHUNK_TOKENS``), :mod:`.text` (detokenization, prompt ids) and
:mod:`.loading` (verified artifact fetch) for the local-model engines.

torch, transformers and vllm are optional: they are imported only when an
engine that needs them is built or loaded, so this package imports without them.

Resuming (``start > 0``): the orchestrator does not send the tokens already
delivered, only how many there were. The local engines regenerate them: the
same prompt prefill followed by the same one-token decode steps, with the
regenerated ids appended to the context one by one, then go on from
``start``. The computation is the one an uninterrupted request performs, so on
the same device type and dtype the continuation is bit-for-bit the same (across
device types, greedy decoding can differ where two logits nearly tie); sampled
tokens are drawn from a generator seeded by the request's ``seed``, else by its
id, so they are drawn again the same way. The text
of token ``i`` is a pure function of the prompt and the ids ``0..i``
(:class:`IncrementalDetokenizer`), so every worker cuts the text the same way.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from haif.runtime.engines.base import (
    ALL_SAMPLING,
    MAX_CHUNK_TOKENS,
    Engine,
    EngineError,
    EngineUnavailable,
    ManagedEngine,
    sampling_of,
    supported_sampling,
    unsupported_parameter,
)
from haif.runtime.engines.synthetic import (
    TIMINGS,
    SyntheticEngine,
    profiles_for,
    synthetic_piece,
    synthetic_token,
)
from haif.runtime.engines.text import IncrementalDetokenizer
from haif.runtime.engines.transformers_engine import LoadedModel, TransformersEngine
from haif.runtime.engines.upstream import OpenAIUpstreamEngine
from haif.runtime.engines.vllm_engine import VllmEngine

__all__ = [
    "ALL_SAMPLING",
    "ENGINES",
    "MAX_CHUNK_TOKENS",
    "TIMINGS",
    "Engine",
    "EngineError",
    "EngineUnavailable",
    "IncrementalDetokenizer",
    "LoadedModel",
    "ManagedEngine",
    "OpenAIUpstreamEngine",
    "SyntheticEngine",
    "TransformersEngine",
    "VllmEngine",
    "make_engine",
    "profiles_for",
    "sampling_of",
    "supported_sampling",
    "synthetic_piece",
    "synthetic_token",
    "unsupported_parameter",
]

ENGINES: dict[str, Callable[..., Any]] = {
    "synthetic": SyntheticEngine,
    "transformers": TransformersEngine,
    "vllm": VllmEngine,
    "openai": OpenAIUpstreamEngine,
}


def make_engine(name: str, **options: Any) -> Engine:
    """Build the engine called ``name`` with ``options`` (its constructor's keyword arguments).

    Raises :class:`EngineError` for an unknown name or options the engine does
    not take, :class:`EngineUnavailable` when its software is not installed.
    """
    factory = ENGINES.get(name)
    if factory is None:
        raise EngineError(f"unknown engine {name!r}; known engines: {', '.join(sorted(ENGINES))}")
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as exc:
        raise EngineError(f"engine {name!r}: {exc}") from None
    engine: Engine = factory(**options)
    return engine
