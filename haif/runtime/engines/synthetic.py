"""The ``synthetic`` engine: deterministic text, timed by a fixed service model or profiles.

Timings (``timing=``, the worker's ``--timing``):

- ``fixed`` (default): the first token ``ttft_s`` after the call, the rest
  evenly so that a response takes ``mean_s`` (the simulator's abstract
  ``service`` model, one request per slot);
- ``profile``: the simulator's iteration-level engine
  (:class:`~haif.sim.engine.BatchingWorker`) on the asyncio clock, timed by
  the GPU x model profile of ``gpu`` and the request's model
  (:mod:`haif.runtime.batching`): continuous batching over all of the
  worker's streams, API overhead, prefill-only or chunked prefill
  (``chunked_prefill_tokens``), KV-cache admission and preemption, prefix
  cache in the KV pool (``prefix_cache``, capped by
  ``prefix_cache_max_tokens``), ``max_batch``, model swaps (the first of
  ``models`` is loaded at start);
- ``profile-request``: the simulator's request-level engine
  (:class:`~haif.sim.engine.RequestLevelWorker`) with the same profiles.

Under both profile timings a request's first token and last token come out
when the simulator would emit them for the same arrivals; the engine queues
requests itself, as the simulated worker does.

Text, sampling and stopping (deterministic; the same on every worker, so a
resumed response continues exactly):

- The synthetic model's next-token distribution is uniform over its
  vocabulary, which is why ``temperature`` is honoured trivially: ``0``
  (greedy) picks the text of the request id, whatever the ``seed``; any other
  temperature leaves a uniform distribution uniform, so the ``seed`` picks the
  text: with a seed the text is a function of the seed and the prompt (the
  same seed and prompt give the same text, another seed another text),
  without one a function of the request id (the text requests have always
  had). ``top_p``, ``top_k``, ``presence_penalty`` and
  ``frequency_penalty`` would change a distribution this model does not
  have: it declares them unsupported, so a request setting them is refused
  with a 400 naming the parameter rather than silently ignored.
- End of sequence: unless ``ignore_eos``, the model's answer ends after
  ``L`` tokens, ``L`` in ``[EOS_MIN, EOS_MIN + EOS_SPAN)`` (512-2048) derived
  from the text's seed; a request allowed fewer tokens ends at
  ``max_tokens`` (``finish_reason`` ``length``), one allowed more ends after
  ``L`` (``stop``). A request without sampling parameters (the simulator's
  semantics, e.g. a trace) always runs to ``max_tokens``.
- ``stop``: the response ends with the token that completes the first stop
  string in the text (the earliest to complete; ``finish_reason`` ``stop``);
  the text is cut before it, so the pieces of the tokens from there on are
  empty or shortened.
- Chat: accepted without a template (the synthetic model has none); the
  prompt is the messages' contents joined with newlines
  (:attr:`~haif.contracts.Request.text`), which is what a seed's text
  depends on, and the gateway counts ``prompt_tokens`` as the words of that
  text, as for a completion's prompt.
- Tokenizer: the synthetic model is word-level: a prompt's tokens are its
  whitespace-separated words, each answer token one word
  (:func:`haif.fleet.prefix.word_token_ids`, which the gateway uses to count
  a prompt and hash its prefix blocks for ``prefix_hashes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import time
from collections.abc import AsyncGenerator, Mapping, Sequence

from haif.contracts import Request
from haif.fleet.engine import PrefixCache
from haif.fleet.profiles import ModelDoesNotFitError, PerfProfile, UnknownProfileError, load_catalog
from haif.runtime.batching import BatchingOptions, IterationTimer, Occupancy, RequestTimer, Timer
from haif.runtime.engines.base import MAX_CHUNK_TOKENS, EngineError, sampling_of
from haif.runtime.messages import TokenChunk
from haif.runtime.supervisor import SPAWNED_AT_ENV

__all__ = [
    "EOS_MIN",
    "EOS_SPAN",
    "TIMINGS",
    "SyntheticEngine",
    "plan",
    "profiles_for",
    "synthetic_piece",
    "synthetic_token",
]

#: The synthetic engine's timing models (``--timing``).
TIMINGS = ("fixed", "profile", "profile-request")


def _seed(request_id: str) -> bytes:
    return hashlib.sha256(request_id.encode()).digest()


def synthetic_token(seed: bytes, index: int) -> str:
    return f"tok{seed[index % len(seed)] + index}"


def synthetic_piece(seed: bytes, index: int) -> str:
    """Token ``index`` as it appears in the text (space-separated tokens)."""
    token = synthetic_token(seed, index)
    return token if index == 0 else " " + token


#: End of sequence: the synthetic answer is ``EOS_MIN + h % EOS_SPAN`` tokens long.
EOS_MIN, EOS_SPAN = 512, 1537


def _text_seed(request: Request) -> bytes:
    """What the text is a function of: the seed and prompt if sampled with a seed, else
    the request id."""
    sampling = request.sampling
    if sampling is not None and sampling.seed is not None and sampling.temperature != 0:
        return hashlib.sha256(f"seed:{sampling.seed}\n{request.text}".encode()).digest()
    return _seed(request.request_id)


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    """One request's response: its seed, length, why it ends and where its text is cut."""

    seed: bytes
    count: int
    finish: str
    cut: int | None = None  # the text ends at this character (a stop string starts there)
    offsets: tuple[int, ...] = ()  # start of each token's piece in the text (when cut)

    def piece(self, index: int) -> str:
        text = synthetic_piece(self.seed, index)
        if self.cut is None:
            return text
        start = self.offsets[index]
        return text[: max(0, self.cut - start)]


def plan(request: Request) -> _Plan:
    """The response to ``request``: see the module's "Text, sampling and stopping"."""
    sampling = sampling_of(request)
    seed = _text_seed(request)
    n = request.max_tokens
    count, finish = n, "length"
    if not sampling.ignore_eos:
        eos = EOS_MIN + int.from_bytes(seed[-4:], "big") % EOS_SPAN
        if eos < n:
            count, finish = eos, "stop"
    if not sampling.stop:
        return _Plan(seed, count, finish)
    offsets: list[int] = []
    pieces: list[str] = []
    at = 0
    for i in range(count):
        offsets.append(at)
        pieces.append(synthetic_piece(seed, i))
        at += len(pieces[-1])
    text = "".join(pieces)
    best: tuple[int, int] | None = None  # (end, start) of the first stop string to complete
    for stop in sampling.stop:
        found = text.find(stop)
        if found >= 0 and (best is None or (found + len(stop), found) < best):
            best = (found + len(stop), found)
    if best is None:
        return _Plan(seed, count, finish)
    end, start = best
    last = max(i for i, off in enumerate(offsets) if off < end)  # completes the stop string
    return _Plan(seed, last + 1, "stop", start, tuple(offsets[: last + 1]))


class SyntheticEngine:
    """Deterministic text, timed by a fixed service model or by GPU x model profiles.

    ``timing="fixed"``: the first token comes ``ttft_s`` after the call (the
    prefill of the prompt, plus the already-produced tokens when resuming), the
    rest spread evenly so that a full response takes ``mean_s``.
    ``timing="profile"`` / ``"profile-request"``: tokens come out when the
    simulator's iteration-level / request-level engine would emit them
    (:mod:`haif.runtime.batching`), timed by ``profiles`` (model -> profile),
    by default the catalog's profiles of ``gpu`` x each of ``models``; the
    first model is the one loaded at start. Token ``i`` of a request depends
    only on the request id and ``i`` — the same on every worker — so a
    response resumed on another worker continues exactly where the first one
    stopped.
    Sampling and stopping: see the module's docstring.
    """

    name = "synthetic"
    #: What the synthetic model honours (see the module's docstring).
    SUPPORTED_SAMPLING = frozenset({"temperature", "seed", "stop", "ignore_eos"})

    def __init__(
        self,
        mean_s: float = 0.05,
        ttft_s: float = 0.01,
        *,
        timing: str = "fixed",
        gpu: str | None = None,
        models: Sequence[str] = (),
        profiles: Mapping[str, PerfProfile] | None = None,
        max_batch: int | None = None,
        chunked_prefill_tokens: int | None = None,
        prefix_cache: bool = False,
        prefix_cache_max_tokens: int | None = None,
        cold_start: bool = False,
    ) -> None:
        self.mean_s = mean_s
        self.cold_start = cold_start
        self.ttft_s = min(ttft_s, mean_s)
        if timing not in TIMINGS:
            raise EngineError(f"unknown timing {timing!r}; known timings: {', '.join(TIMINGS)}")
        self.timing = timing
        self.timer: Timer | None = None
        profiled_options = (
            max_batch is not None
            or chunked_prefill_tokens
            or prefix_cache
            or prefix_cache_max_tokens is not None
        )
        if timing == "fixed":
            if profiles is not None or profiled_options:
                raise EngineError(
                    "profiles, max_batch, chunked_prefill_tokens, prefix_cache and "
                    "prefix_cache_max_tokens apply to the profile timings only, not to "
                    "timing 'fixed'"
                )
            return
        if profiles is None:
            profiles = profiles_for(timing, gpu, models)
        if not profiles:
            raise EngineError(f"timing {timing!r} needs at least one model")
        try:
            options = BatchingOptions(
                max_batch, chunked_prefill_tokens, prefix_cache, prefix_cache_max_tokens
            )
        except ValueError as exc:
            raise EngineError(f"timing {timing!r}: {exc}") from None
        warm = next(iter(profiles))
        kind = IterationTimer if timing == "profile" else RequestTimer
        self.timer = kind(profiles, warm, options)

    async def load(self) -> None:
        """With ``cold_start`` (a restarted worker), the profile timings load the warm
        model's weights first (``load_time_s``), as the simulator does on restart;
        the worker is announced meanwhile, not warm. Nothing to load otherwise."""
        if self.cold_start and self.timer is not None:
            # The restart began when `haif up` spawned this process (its start-up
            # is part of the reload, as the simulator's restart is one instant).
            now = asyncio.get_running_loop().time()
            spawned = os.environ.get(SPAWNED_AT_ENV)
            try:
                since = max(0.0, time.time() - float(spawned)) if spawned else 0.0
            except ValueError:
                since = 0.0
            self.timer.cold_start(now - min(since, 60.0))

    async def close(self) -> None:
        pass

    @property
    def queues_internally(self) -> bool:
        """True when the engine queues and batches requests itself (profile timings)."""
        return self.timer is not None

    def occupancy(self) -> Occupancy | None:
        """Queue, batch, free KV and warm models of the profile timings (None: fixed)."""
        return self.timer.occupancy() if self.timer is not None else None

    def prefix_cache_stats(self) -> tuple[int, int] | None:
        """``(query_tokens, hit_tokens)`` of the profile timing's prefix cache so far (None
        without one): the prompt tokens looked up and those found, not prefilled."""
        prefix = getattr(self.timer.engine, "prefix", None) if self.timer is not None else None
        if not isinstance(prefix, PrefixCache):
            return None
        return prefix.query_tokens, prefix.hit_tokens

    @staticmethod
    def tokens(request: Request) -> list[str]:
        """The response's tokens (before a stop string cuts the text)."""
        p = plan(request)
        return [synthetic_token(p.seed, i) for i in range(p.count)]

    @staticmethod
    def text(request: Request) -> str:
        """The whole response text (what the concatenated stream must equal)."""
        p = plan(request)
        return "".join(p.piece(i) for i in range(p.count))

    @staticmethod
    def finish_reason(request: Request) -> str:
        """Why the response to ``request`` ends: ``stop`` or ``length``."""
        return plan(request).finish

    async def stream(self, request: Request, start: int = 0) -> AsyncGenerator[TokenChunk, None]:
        """Tokens ``start..`` of the response when the timing emits them (fixed: the first
        after ``ttft_s``, then evenly paced); tokens already due make one chunk. The
        last chunk carries the ``finish_reason``."""
        p = plan(request)
        n = p.count
        if start >= n:
            return
        if self.timer is not None:
            # Timed as a request of the response's length (the simulator's max_tokens).
            timed = (
                request if n == request.max_tokens else dataclasses.replace(request, max_tokens=n)
            )
            emissions = self.timer.emissions(timed, start, MAX_CHUNK_TOKENS)
            async with contextlib.aclosing(emissions):
                async for span, cold in emissions:
                    yield TokenChunk(
                        span.start,
                        tuple(p.piece(k) for k in span),
                        p.finish if span.stop >= n else None,
                        cold_start=cold,
                    )
            return
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        step = (self.mean_s - self.ttft_s) / max(1, n - 1)
        i = start
        while i < n:
            due = t0 + self.ttft_s + (i - start) * step
            now = loop.time()
            if now < due:
                await asyncio.sleep(due - now)
                now = loop.time()
            late = int((now - due) / step) if step > 0 else n
            j = min(n, i + 1 + late, i + MAX_CHUNK_TOKENS)
            yield TokenChunk(
                i, tuple(p.piece(k) for k in range(i, j)), p.finish if j >= n else None
            )
            i = j

    async def generate(self, request: Request) -> tuple[str, float, float]:
        """Return (text, ttft_s, service_s) after the modelled service time."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        ttft: float | None = None
        pieces: list[str] = []
        async for chunk in self.stream(request):
            if ttft is None:
                ttft = loop.time() - start
            pieces.extend(chunk.texts)
        return "".join(pieces), ttft or 0.0, loop.time() - start


def profiles_for(
    timing: str, gpu: str | None, models: Sequence[str], catalog_path: str | None = None
) -> dict[str, PerfProfile]:
    """The catalog's profile of ``gpu`` x each model; a clear error for a pair it lacks.

    ``catalog_path``: a profile catalog YAML (``--profiles``, e.g. one ``haif
    calibrate`` wrote); default the packaged one.
    """
    if not gpu:
        raise EngineError(f"--timing {timing} needs the worker's --gpu-class")
    try:
        catalog = load_catalog(catalog_path)
    except (OSError, ValueError) as exc:
        raise EngineError(f"--profiles {catalog_path}: {exc}") from None
    profiles: dict[str, PerfProfile] = {}
    for model in models:
        try:
            profiles[model] = catalog.get(gpu, model)
        except UnknownProfileError as exc:
            raise EngineError(
                f"--timing {timing}: no performance profile for GPU {gpu!r} x model {model!r} "
                f"(--gpu-class, --models): {exc}"
            ) from None
        except ModelDoesNotFitError as exc:
            fits = sorted(m for g, m in catalog.names() if g == gpu)
            raise EngineError(
                f"--timing {timing}: no performance profile for GPU {gpu!r} x model {model!r} "
                f"(--gpu-class, --models): {exc}; models profiled on {gpu}: {', '.join(fits)}"
            ) from None
    return profiles
