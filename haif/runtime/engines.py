"""Inference engines a worker can host, and how the worker's command line picks one.

An engine is anything with ``stream(request, start) -> AsyncIterator[TokenChunk]``
(:class:`Engine`): it yields the response's tokens from index ``start`` on,
in order, as text deltas (``TokenChunk.texts[i]`` is the text of token
``chunk.start + i`` exactly as it appears in the response, so the
concatenation of every chunk is the response). An engine that has to load
something first also has ``async load()`` and ``async close()``
(:class:`ManagedEngine`); the worker awaits ``load()`` before it announces
itself, so a model whose artifact does not verify is never announced.

Engines (``make_engine(name, **options)``):

- ``synthetic`` — :class:`SyntheticEngine`: deterministic text; nothing to
  load. Its timing (``--timing``):

  * ``fixed`` (default): the first token ``ttft_s`` after the call, the rest
    evenly so that a response takes ``mean_s`` (the simulator's abstract
    ``service`` model, one request per slot);
  * ``profile``: the simulator's iteration-level engine
    (:class:`~haif.sim.engine.BatchingWorker`) on the asyncio clock, timed by
    the GPU x model profile of ``--gpu-class`` and the request's model
    (:mod:`haif.runtime.batching`): continuous batching over all of the
    worker's streams, API overhead, prefill-only or chunked prefill
    (``--chunked-prefill-tokens``), KV-cache admission and preemption,
    prefix cache (``--prefix-cache``), ``--max-batch``, model swaps (the first
    of ``--models`` is loaded at start);
  * ``profile-request``: the simulator's request-level engine
    (:class:`~haif.sim.engine.RequestLevelWorker`) with the same profiles.

  Under both profile timings a request's first token and last token come out
  when the simulator would emit them for the same arrivals; the engine
  queues requests itself, as the simulated worker does.
- ``transformers`` — :class:`TransformersEngine`: a causal LM from a signed
  artifact (:mod:`haif.runtime.artifacts`), run with PyTorch on CUDA when
  available, else CPU; greedy decoding, exactly ``max_tokens`` tokens.
- ``vllm`` — :class:`VllmEngine`: the same artifact in an in-process
  ``vllm.AsyncLLMEngine`` (greedy, ``ignore_eos``); needs ``haif[vllm]``.
- ``openai`` — :class:`OpenAIUpstreamEngine`: relays an upstream
  OpenAI-compatible server (``/v1/completions`` or ``/v1/chat/completions``
  with ``stream: true``).

torch, transformers and vllm are optional: they are imported only when an
engine that needs them is built or loaded, so this module imports without them.

Resuming (``start > 0``): the orchestrator does not send the tokens already
delivered, only how many there were. The local engines regenerate them: the
same prompt prefill followed by the same one-token decode steps, with the
regenerated ids appended to the context one by one, then go on from
``start``. The computation is the one an uninterrupted request performs, so on
the same device type and dtype the continuation is bit-for-bit the same (across
device types, greedy decoding can differ where two logits nearly tie). The text
of token ``i`` is a pure function of the prompt and the ids ``0..i``
(:class:`IncrementalDetokenizer`), so every worker cuts the text the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import aiohttp

from haif.configfile import ConfigError
from haif.contracts import ErrorKind, Request
from haif.fleet.profiles import ModelDoesNotFitError, PerfProfile, UnknownProfileError, load_catalog
from haif.runtime.artifacts import ArtifactError, ArtifactRef, ModelCache, fetch, load_manifest
from haif.runtime.batching import BatchingOptions, IterationTimer, Occupancy, RequestTimer, Timer
from haif.runtime.messages import TokenChunk
from haif.runtime.rpc import RpcError
from haif.runtime.security import Keyring
from haif.runtime.supervisor import SPAWNED_AT_ENV

__all__ = [
    "ENGINES",
    "MAX_CHUNK_TOKENS",
    "TIMINGS",
    "Engine",
    "EngineError",
    "EngineUnavailable",
    "IncrementalDetokenizer",
    "ManagedEngine",
    "OpenAIUpstreamEngine",
    "SyntheticEngine",
    "TransformersEngine",
    "VllmEngine",
    "add_worker_engine_args",
    "engine_from_args",
    "make_engine",
    "profiles_for",
    "synthetic_piece",
    "synthetic_token",
]

log = logging.getLogger("haif.engines")

#: Most tokens one frame carries (tokens due at the same instant are batched).
MAX_CHUNK_TOKENS = 256

#: The synthetic engine's timing models (``--timing``).
TIMINGS = ("fixed", "profile", "profile-request")


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


# ------------------------------------------------------------------ synthetic


def _seed(request_id: str) -> bytes:
    return hashlib.sha256(request_id.encode()).digest()


def synthetic_token(seed: bytes, index: int) -> str:
    return f"tok{seed[index % len(seed)] + index}"


def synthetic_piece(seed: bytes, index: int) -> str:
    """Token ``index`` as it appears in the text (space-separated tokens)."""
    token = synthetic_token(seed, index)
    return token if index == 0 else " " + token


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
    """

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
        cold_start: bool = False,
    ) -> None:
        self.mean_s = mean_s
        self.cold_start = cold_start
        self.ttft_s = min(ttft_s, mean_s)
        if timing not in TIMINGS:
            raise EngineError(f"unknown timing {timing!r}; known timings: {', '.join(TIMINGS)}")
        self.timing = timing
        self.timer: Timer | None = None
        profiled_options = max_batch is not None or chunked_prefill_tokens or prefix_cache
        if timing == "fixed":
            if profiles is not None or profiled_options:
                raise EngineError(
                    "profiles, max_batch, chunked_prefill_tokens and prefix_cache apply to "
                    "the profile timings only, not to timing 'fixed'"
                )
            return
        if profiles is None:
            profiles = profiles_for(timing, gpu, models)
        if not profiles:
            raise EngineError(f"timing {timing!r} needs at least one model")
        try:
            options = BatchingOptions(max_batch, chunked_prefill_tokens, prefix_cache)
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

    @staticmethod
    def tokens(request: Request) -> list[str]:
        seed = _seed(request.request_id)
        return [synthetic_token(seed, i) for i in range(request.max_tokens)]

    @staticmethod
    def text(request: Request) -> str:
        """The whole response text (what the concatenated stream must equal)."""
        return " ".join(SyntheticEngine.tokens(request))

    async def stream(self, request: Request, start: int = 0) -> AsyncGenerator[TokenChunk, None]:
        """Tokens ``start..max_tokens-1`` when the timing emits them (fixed: the first
        after ``ttft_s``, then evenly paced); tokens already due make one chunk."""
        n = request.max_tokens
        if start >= n:
            return
        seed = _seed(request.request_id)
        if self.timer is not None:
            emissions = self.timer.emissions(request, start, MAX_CHUNK_TOKENS)
            async with contextlib.aclosing(emissions):
                async for span in emissions:
                    yield TokenChunk(span.start, tuple(synthetic_piece(seed, k) for k in span))
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
            yield TokenChunk(i, tuple(synthetic_piece(seed, k) for k in range(i, j)))
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


# ------------------------------------------------------------ detokenization


class IncrementalDetokenizer:
    """Token ids in, text pieces out: piece ``i`` depends only on the context and ids ``0..i``.

    ``decode`` turns ids into text. The concatenated pieces equal the decoded
    text of all the ids. A piece is held back (``""``) while the text ends in
    an incomplete character (``U+FFFD``, e.g. half of a UTF-8 sequence in a
    byte-level BPE) and released with the next token that completes it; the
    ``final`` token releases everything. The last few prompt ids are decoded
    along (as vLLM does) so tokenizers that drop a leading space when a text
    starts with a token still give the first generated token its space.
    """

    CONTEXT = 5

    def __init__(self, decode: Callable[[list[int]], str], context_ids: Sequence[int] = ()) -> None:
        self._decode = decode
        self.ids: list[int] = list(context_ids[-self.CONTEXT :]) if self.CONTEXT else []
        self._prefix = 0
        self._read = len(self.ids)

    def add(self, token_id: int, final: bool = False) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if final or (len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""


def _tokenizer_decoder(
    tokenizer: Any, lock: threading.Lock | None = None
) -> Callable[[list[int]], str]:
    def decode(ids: list[int]) -> str:
        with lock or contextlib.nullcontext():
            text: str = tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        return text

    return decode


# -------------------------------------------------------- artifact-backed base


def _require_modules(engine: str, modules: Sequence[str], extra: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise EngineUnavailable(
            f"the {engine} engine needs {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'haif[{extra}]'"
        )


def _keyring(keyring: Keyring | str | Path) -> Keyring:
    if isinstance(keyring, Keyring):
        return keyring
    try:
        return Keyring.from_dir(keyring)
    except (OSError, ValueError) as exc:
        raise EngineError(f"keyring {keyring}: {exc}") from None


def _ref(model_ref: ArtifactRef | str) -> ArtifactRef:
    if isinstance(model_ref, ArtifactRef):
        return model_ref
    try:
        return ArtifactRef.parse(model_ref)
    except ArtifactError as exc:
        raise EngineError(exc.message) from None


def _fetch_verified(
    store: Path, ref: ArtifactRef, keyring: Keyring, engine: str, workdir: Path | None
) -> tuple[Path, dict[str, Any]]:
    """Verify ``ref`` and copy it into a fresh private directory; return (dir, manifest).

    Refuses artifacts meant for another engine and weights that are not
    safetensors (a pickled checkpoint can run code when loaded).
    """
    manifest = load_manifest(store, ref.name, ref.version, keyring)
    meant_for = manifest.get("engine")
    if meant_for not in ("transformers", "vllm", "any"):
        raise ArtifactError("bad_manifest", f"{ref} is for the {meant_for} engine, not {engine}")
    names = list(manifest["files"])
    if not any(n.endswith(".safetensors") for n in names):
        raise ArtifactError("bad_file", f"{ref} has no .safetensors weights")
    pickled = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    if pickled:
        raise ArtifactError("bad_file", f"{ref} holds pickled weights ({', '.join(pickled)})")
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix=f"haif-{ref.name}-{ref.version}-", dir=workdir))
    try:
        fetch(store, ref.name, ref.version, keyring, dest)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest, manifest


# --------------------------------------------------------------- transformers


@dataclass
class LoadedModel:
    """A model and tokenizer ready to run (what :class:`TransformersEngine` caches)."""

    ref: ArtifactRef
    model: Any
    tokenizer: Any
    torch: Any
    device: str
    context: int
    bos_id: int
    directory: Path
    manifest: dict[str, Any]

    def unload(self) -> None:
        self.model = None
        shutil.rmtree(self.directory, ignore_errors=True)


def _context_length(config: Any) -> int:
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _unload(_key: str, model: LoadedModel) -> None:
    model.unload()


def _prompt_ids(tokenizer: Any, prompt: str | None, bos_id: int) -> list[int]:
    if not prompt:
        return [bos_id]
    ids: list[int] = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return ids or [bos_id]


def _fit_context(ids: list[int], max_tokens: int, context: int, model: str) -> list[int]:
    if max_tokens >= context:
        raise RpcError(
            ErrorKind.BAD_REQUEST,
            f"max_tokens {max_tokens} does not fit {model}'s {context}-token context",
        )
    keep = context - max_tokens
    return ids[-keep:] if len(ids) > keep else ids


class TransformersEngine:
    """A causal LM from a verified artifact, run with transformers + PyTorch.

    ``load()`` verifies the artifact (signature and every digest) and copies
    it into a private directory before anything is deserialised, then loads
    it with ``local_files_only`` and safetensors only, on ``device``
    (``"auto"``: CUDA if available, else CPU), in ``dtype`` (``"auto"``: as
    saved). Models live in a :class:`ModelCache` (its own, of one model, or a
    shared one passed as ``cache``), pinned while this engine uses them.

    Decoding is greedy and produces exactly ``max_tokens`` tokens (EOS is not
    a stop, as in the simulator). Each request runs in a thread of a pool of
    ``concurrency``; the model steps of concurrent requests are serialised
    token by token (fair interleaving, no batching), so the event loop never
    blocks and a long response does not hold up a short one.
    """

    name = "transformers"

    def __init__(
        self,
        store: str | Path,
        model_ref: ArtifactRef | str,
        keyring: Keyring | str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        concurrency: int = 4,
        cache: ModelCache[LoadedModel] | None = None,
        workdir: str | Path | None = None,
    ) -> None:
        _require_modules("transformers", ("torch", "transformers"), "torch")
        if concurrency < 1:
            raise EngineError("concurrency must be >= 1")
        self.store = Path(store)
        self.ref = _ref(model_ref)
        self.keyring = _keyring(keyring)
        self.device = device
        self.dtype = dtype
        self.concurrency = concurrency
        self._own_cache = cache is None
        self.cache: ModelCache[LoadedModel] = cache or ModelCache(1, on_evict=_unload)
        self.workdir = Path(workdir) if workdir is not None else None
        self._loaded: LoadedModel | None = None
        self._step_lock = threading.Lock()
        # HF fast tokenizers may refuse concurrent use from threads ("Already borrowed").
        self._tokenizer_lock = threading.Lock()
        self._stops: set[threading.Event] = set()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    def stats(self) -> dict[str, Any]:
        return {"engine": self.name, "model": str(self.ref), "cache": self.cache.stats()}

    async def load(self) -> None:
        """Verify and load the model (idempotent); raises ArtifactError / EngineUnavailable."""
        key = str(self.ref)
        self.cache.pin(key)
        try:
            self._loaded = await self.cache.get_async(
                key, lambda: asyncio.to_thread(self._load_blocking)
            )
        except BaseException:
            self.cache.unpin(key)
            raise
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self.concurrency, thread_name_prefix=f"haif-{self.ref.name}"
            )

    def _load_blocking(self) -> LoadedModel:
        directory, manifest = _fetch_verified(
            self.store, self.ref, self.keyring, self.name, self.workdir
        )
        try:
            torch: Any = importlib.import_module("torch")
            transformers: Any = importlib.import_module("transformers")
            transformers.utils.logging.disable_progress_bar()  # a server has no terminal
            device = self.device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(directory), local_files_only=True, trust_remote_code=False
            )
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(directory), local_files_only=True, use_safetensors=True, trust_remote_code=False
            )
            if self.dtype != "auto":
                model = model.to(dtype=getattr(torch, self.dtype))
            model = model.to(device)
            model.eval()
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        bos = tokenizer.bos_token_id
        if bos is None:
            bos = tokenizer.eos_token_id
        log.info("loaded %s on %s from verified artifact %s", self.ref, device, directory)
        return LoadedModel(
            ref=self.ref,
            model=model,
            tokenizer=tokenizer,
            torch=torch,
            device=device,
            context=_context_length(model.config),
            bos_id=int(bos) if bos is not None else 0,
            directory=directory,
            manifest=manifest,
        )

    async def close(self) -> None:
        for stop in list(self._stops):
            stop.set()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if self._loaded is not None:
            self.cache.unpin(str(self.ref))
            if self._own_cache:  # a shared cache keeps it warm for the next user
                self.cache.evict(str(self.ref))
            self._loaded = None

    def prompt_ids(self, request: Request) -> list[int]:
        """The prompt's token ids as the model sees them (BOS if empty, left-truncated)."""
        m = self._require_loaded()
        with self._tokenizer_lock:
            ids = _prompt_ids(m.tokenizer, request.prompt, m.bos_id)
        return _fit_context(ids, request.max_tokens, m.context, str(self.ref))

    def _require_loaded(self) -> LoadedModel:
        if self._loaded is None:
            raise RpcError(ErrorKind.UNAVAILABLE, f"{self.ref} is not loaded")
        return self._loaded

    def _generate(
        self,
        request: Request,
        start: int,
        emit: Callable[[int, str], None],
        stop: threading.Event,
    ) -> None:
        """Greedy decoding in the calling thread; ``emit(i, text)`` for tokens ``i >= start``."""
        m = self._require_loaded()
        torch = m.torch
        n = request.max_tokens
        ids = self.prompt_ids(request)
        detok = IncrementalDetokenizer(_tokenizer_decoder(m.tokenizer, self._tokenizer_lock), ids)
        with torch.inference_mode():
            with self._step_lock:
                out = m.model(input_ids=torch.tensor([ids], device=m.device), use_cache=True)
            for i in range(n):
                if stop.is_set():
                    return
                token = int(out.logits[0, -1].argmax())
                piece = detok.add(token, final=i == n - 1)
                if i >= start:
                    emit(i, piece)
                if i + 1 == n:
                    return
                with self._step_lock:
                    out = m.model(
                        input_ids=torch.tensor([[token]], device=m.device),
                        past_key_values=out.past_key_values,
                        use_cache=True,
                    )

    async def stream(self, request: Request, start: int = 0) -> AsyncGenerator[TokenChunk, None]:
        n = request.max_tokens
        if start >= n:
            return
        self._require_loaded()
        executor = self._executor
        if executor is None:
            raise RpcError(ErrorKind.UNAVAILABLE, f"{self.ref} is not loaded")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
        failure: list[BaseException] = []
        stop = threading.Event()

        def put(item: tuple[int, str] | None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                stop.set()

        def work() -> None:
            try:
                self._generate(request, start, lambda i, piece: put((i, piece)), stop)
            except BaseException as exc:
                failure.append(exc)
            finally:
                put(None)

        self._stops.add(stop)
        try:
            loop.run_in_executor(executor, work)
        except RuntimeError:
            self._stops.discard(stop)
            raise RpcError(ErrorKind.UNAVAILABLE, f"{self.ref} is shutting down") from None
        try:
            done = False
            while not done:
                item = await queue.get()
                batch: list[tuple[int, str]] = []
                while item is not None:
                    batch.append(item)
                    if len(batch) >= MAX_CHUNK_TOKENS or queue.empty():
                        break
                    item = queue.get_nowait()
                done = item is None
                if batch:
                    yield TokenChunk(batch[0][0], tuple(p for _, p in batch))
            if failure:
                exc = failure[0]
                if isinstance(exc, RpcError):
                    raise exc
                raise RpcError(
                    ErrorKind.INTERNAL, f"{self.ref}: generation failed: {exc!r}"
                ) from exc
        finally:
            stop.set()
            self._stops.discard(stop)


# ----------------------------------------------------------------------- vLLM


class VllmEngine:
    """A verified artifact served by an in-process ``vllm.AsyncLLMEngine``.

    Greedy sampling with ``ignore_eos`` and ``max_tokens`` (exactly
    ``max_tokens`` tokens); ``engine_args`` go to ``vllm.AsyncEngineArgs``
    (``gpu_memory_utilization``, ``max_model_len``, ``dtype``,
    ``tensor_parallel_size``...). Text pieces come from the artifact's
    tokenizer through :class:`IncrementalDetokenizer`, as in
    :class:`TransformersEngine`. A resumed request is regenerated from the
    prompt and its first ``start`` tokens are not sent again.
    """

    name = "vllm"

    def __init__(
        self,
        store: str | Path,
        model_ref: ArtifactRef | str,
        keyring: Keyring | str | Path,
        *,
        engine_args: Mapping[str, Any] | None = None,
        workdir: str | Path | None = None,
    ) -> None:
        try:
            self._vllm: Any = importlib.import_module("vllm")
        except ImportError:
            raise EngineUnavailable("vllm is not installed: pip install 'haif[vllm]'") from None
        self.store = Path(store)
        self.ref = _ref(model_ref)
        self.keyring = _keyring(keyring)
        self.engine_args = dict(engine_args or {})
        self.workdir = Path(workdir) if workdir is not None else None
        self._engine: Any = None
        self._tokenizer: Any = None
        self._directory: Path | None = None

    async def load(self) -> None:
        if self._engine is not None:
            return
        directory, _manifest = await asyncio.to_thread(
            _fetch_verified, self.store, self.ref, self.keyring, self.name, self.workdir
        )
        try:
            transformers: Any = importlib.import_module("transformers")
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(directory), local_files_only=True, trust_remote_code=False
            )
            args = self._vllm.AsyncEngineArgs(
                model=str(directory), tokenizer=str(directory), **self.engine_args
            )
            self._engine = self._vllm.AsyncLLMEngine.from_engine_args(args)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self._directory = directory

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None and hasattr(engine, "shutdown"):
            with contextlib.suppress(Exception):
                engine.shutdown()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    async def stream(self, request: Request, start: int = 0) -> AsyncGenerator[TokenChunk, None]:
        n = request.max_tokens
        if start >= n:
            return
        if self._engine is None:
            raise RpcError(ErrorKind.UNAVAILABLE, f"{self.ref} is not loaded")
        bos = self._tokenizer.bos_token_id
        if bos is None:
            bos = self._tokenizer.eos_token_id
        ids = _prompt_ids(self._tokenizer, request.prompt, int(bos or 0))
        params = self._vllm.SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        rid = f"{request.request_id}-{uuid.uuid4().hex[:12]}"
        detok = IncrementalDetokenizer(_tokenizer_decoder(self._tokenizer), ids)
        seen = 0
        finished = False
        try:
            async for out in self._engine.generate({"prompt_token_ids": ids}, params, rid):
                token_ids = list(out.outputs[0].token_ids)[:n]
                first = max(seen, start)
                pieces: list[str] = []
                for i in range(seen, len(token_ids)):
                    piece = detok.add(int(token_ids[i]), final=i == n - 1)
                    if i >= start:
                        pieces.append(piece)
                seen = len(token_ids)
                if pieces:
                    yield TokenChunk(first, tuple(pieces))
                if out.finished:
                    finished = True
        finally:
            if not finished and self._engine is not None:
                with contextlib.suppress(Exception):
                    await self._engine.abort(rid)


# ------------------------------------------------------------ OpenAI upstream


async def _lines_then_eof(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The body's lines, then one empty line (ends an event the server left open)."""
    async for line in content:
        yield line
    yield b""


def _sse_events(lines: Sequence[str]) -> str | None:
    data = [line[5:].removeprefix(" ") for line in lines if line.startswith("data:")]
    return "\n".join(data) if data else None


class OpenAIUpstreamEngine:
    """Relays an upstream OpenAI-compatible server over streaming HTTP (aiohttp).

    Each request is sent as ``/v1/completions`` (or ``/v1/chat/completions``
    with ``chat=True``) with ``stream: true`` and ``temperature`` (0: greedy).
    Each server-sent delta is one token of the response (as vLLM and OpenAI
    stream them); when a delta carries ``logprobs.tokens`` that spell its text,
    those are the tokens. A resumed request (``start > 0``) is sent again and
    its first ``start`` tokens are skipped, which continues the same text when
    the upstream decodes deterministically. The response may end before
    ``max_tokens`` (the upstream stopped): the worker reports the tokens
    actually produced. Upstream trouble is an ``RpcError``: ``unavailable``
    (retryable elsewhere) for connection errors, timeouts, 401/403/429/5xx,
    ``bad_request`` for other 4xx.

    ``load()`` checks that the upstream answers ``/v1/models`` and lists
    ``model`` (``check_model=False`` skips the listing check).
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        chat: bool = False,
        temperature: float = 0.0,
        timeout_s: float = 300.0,
        idle_timeout_s: float = 60.0,
        check_model: bool = True,
        forward_request_id: bool = False,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise EngineError(f"upstream URL {base_url!r} must start with http:// or https://")
        if not model:
            raise EngineError("the openai engine needs the upstream model name")
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.model = model
        self._api_key = api_key
        self.chat = chat
        self.temperature = temperature
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.check_model = check_model
        self.forward_request_id = forward_request_id
        self.extra_body = dict(extra_body or {})
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"OpenAIUpstreamEngine({self.base_url!r}, {self.model!r})"

    def _headers(self, request: Request | None = None) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        if request is not None and self.forward_request_id:
            headers["x-request-id"] = request.request_id
        return headers

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def load(self) -> None:
        url = f"{self.base_url}/models"
        try:
            async with self._client().get(
                url, headers=self._headers(), timeout=aiohttp.ClientTimeout(total=10.0)
            ) as resp:
                if resp.status != 200:
                    raise EngineUnavailable(f"upstream {url} answered HTTP {resp.status}")
                listing = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise EngineUnavailable(f"upstream {url} is unreachable: {exc!r}") from None
        if self.check_model:
            data = listing.get("data") if isinstance(listing, dict) else None
            entries = data if isinstance(data, list) else []
            ids = [m.get("id") for m in entries if isinstance(m, dict)]
            if self.model not in ids:
                raise EngineError(f"upstream {self.base_url} does not serve {self.model!r} ({ids})")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _body(self, request: Request) -> dict[str, Any]:
        body: dict[str, Any] = {
            **self.extra_body,
            "model": self.model,
            "max_tokens": request.max_tokens,
            "stream": True,
            "temperature": self.temperature,
        }
        if self.chat:
            body["messages"] = [{"role": "user", "content": request.prompt or ""}]
        else:
            body["prompt"] = request.prompt or ""
        return body

    def _tokens(self, event: Any) -> list[str]:
        """The tokens of one SSE chunk (raises RpcError for an error event)."""
        if not isinstance(event, dict):
            raise RpcError(ErrorKind.BAD_REPLY, "upstream sent a non-object event")
        if "error" in event:
            error = event["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise RpcError(ErrorKind.UNAVAILABLE, f"upstream error: {message}")
        choices = event.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return []
        choice = choices[0]
        if self.chat:
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else None
        else:
            text = choice.get("text")
        if not isinstance(text, str) or not text:
            return []
        logprobs = choice.get("logprobs")
        tokens = logprobs.get("tokens") if isinstance(logprobs, dict) else None
        if (
            isinstance(tokens, list)
            and tokens
            and all(isinstance(t, str) for t in tokens)
            and "".join(tokens) == text
        ):
            return list(tokens)
        return [text]

    async def stream(self, request: Request, start: int = 0) -> AsyncGenerator[TokenChunk, None]:
        n = request.max_tokens
        if start >= n:
            return
        path = "/chat/completions" if self.chat else "/completions"
        timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_read=self.idle_timeout_s)
        index = 0
        finished = False
        try:
            async with self._client().post(
                self.base_url + path,
                json=self._body(request),
                headers=self._headers(request),
                timeout=timeout,
            ) as resp:
                if resp.status != 200:
                    detail = (await resp.text())[:300]
                    retryable = resp.status in (401, 403, 408, 429) or resp.status >= 500
                    code = ErrorKind.UNAVAILABLE if retryable else ErrorKind.BAD_REQUEST
                    raise RpcError(code, f"upstream answered HTTP {resp.status}: {detail}")
                lines: list[str] = []
                async for raw in _lines_then_eof(resp.content):
                    line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                    if line:
                        lines.append(line)
                        continue
                    data = _sse_events(lines)
                    lines = []
                    if data is None:
                        continue
                    if data.strip() == "[DONE]":
                        return
                    try:
                        event = json.loads(data)
                    except ValueError:
                        raise RpcError(ErrorKind.BAD_REPLY, "upstream event is not JSON") from None
                    finished = finished or self._finished(event)
                    tokens = self._tokens(event)[: n - index]
                    first = max(index, start)
                    texts = tokens[first - index :]
                    index += len(tokens)
                    if texts:
                        yield TokenChunk(first, tuple(texts))
                    if index >= n:
                        return
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RpcError(ErrorKind.UNAVAILABLE, f"upstream {self.base_url}: {exc!r}") from None
        if not finished:  # cut off: neither [DONE] nor a finish_reason
            raise RpcError(ErrorKind.UNAVAILABLE, f"upstream {self.base_url} broke off the stream")

    @staticmethod
    def _finished(event: Any) -> bool:
        choices = event.get("choices") if isinstance(event, dict) else None
        return bool(
            isinstance(choices, list)
            and choices
            and isinstance(choices[0], dict)
            and choices[0].get("finish_reason")
        )


# ------------------------------------------------------------------- registry

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


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def add_worker_engine_args(parser: argparse.ArgumentParser) -> None:
    """The worker's engine options; the defaults keep the synthetic engine."""
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--engine",
        default="synthetic",
        choices=sorted(ENGINES),
        help="what generates the tokens (default synthetic)",
    )
    group.add_argument("--artifact-store", help="artifact store directory (transformers, vllm)")
    group.add_argument("--model-ref", help="artifact to serve, NAME:VERSION (transformers, vllm)")
    group.add_argument("--keyring", help="directory of trusted *.pub keys that sign artifacts")
    group.add_argument("--device", default="auto", help="transformers: auto, cpu, cuda, cuda:1")
    group.add_argument("--dtype", default="auto", help="transformers: auto, float32, bfloat16...")
    group.add_argument(
        "--engine-concurrency",
        type=int,
        default=4,
        help="transformers: requests generating at once (default 4)",
    )
    group.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="vllm: an AsyncEngineArgs field (value parsed as JSON if it is)",
    )
    group.add_argument("--upstream-url", help="openai: base URL of the upstream server")
    group.add_argument("--upstream-model", help="openai: the upstream's model name")
    group.add_argument(
        "--upstream-api-key-env",
        default="HAIF_UPSTREAM_API_KEY",
        help="openai: environment variable holding the upstream API key",
    )
    group.add_argument("--upstream-chat", action="store_true", help="openai: use chat completions")
    group.add_argument(
        "--timing",
        default="fixed",
        choices=TIMINGS,
        help="synthetic: fixed (--mean-s, --ttft-s; default), or the simulator's engine timed by "
        "the profile of --gpu-class x model: profile (iteration level, continuous batching) "
        "or profile-request (request level)",
    )
    group.add_argument(
        "--max-batch",
        type=_positive_int,
        metavar="N",
        help="synthetic, profile timings: most sequences per step (default: the profile's)",
    )
    group.add_argument(
        "--chunked-prefill-tokens",
        type=_positive_int,
        metavar="N",
        help="synthetic, --timing profile: chunked prefill with this token budget per step "
        "(default: prefill-only steps)",
    )
    group.add_argument(
        "--cold-start",
        action="store_true",
        help="synthetic, profile timings: the worker restarted; load the warm model first "
        "(the profile's load_time_s), as the simulator does (haif up adds it on restarts)",
    )
    group.add_argument(
        "--profiles",
        metavar="PATH",
        help="synthetic, profile timings: profile catalog YAML (default: the packaged one)",
    )
    group.add_argument(
        "--prefix-cache",
        action="store_true",
        help="synthetic, --timing profile: reuse cached prompt prefix blocks (prefix_hashes)",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _synthetic_from_args(args: argparse.Namespace) -> Engine:
    timing = getattr(args, "timing", None) or "fixed"
    options: dict[str, Any] = {"mean_s": args.mean_s, "ttft_s": args.ttft_s}
    profiled = {
        "--max-batch": getattr(args, "max_batch", None),
        "--chunked-prefill-tokens": getattr(args, "chunked_prefill_tokens", None),
        "--prefix-cache": getattr(args, "prefix_cache", False) or None,
        "--profiles": getattr(args, "profiles", None),
        "--cold-start": getattr(args, "cold_start", False) or None,
    }
    if timing == "fixed":
        given = [flag for flag, value in profiled.items() if value is not None]
        if given:
            raise EngineError(
                f"{', '.join(given)} apply to --timing profile and profile-request only"
            )
        return make_engine("synthetic", **options)
    models = tuple(m for m in str(getattr(args, "models", "") or "").split(",") if m)
    gpu = getattr(args, "gpu_class", None)
    return make_engine(
        "synthetic",
        **options,
        timing=timing,
        gpu=gpu,
        models=models,
        profiles=profiles_for(timing, gpu, models, getattr(args, "profiles", None)),
        max_batch=profiled["--max-batch"],
        chunked_prefill_tokens=profiled["--chunked-prefill-tokens"],
        prefix_cache=bool(profiled["--prefix-cache"]),
        cold_start=bool(getattr(args, "cold_start", False)),
    )


def engine_from_args(args: argparse.Namespace) -> Engine:
    """The engine the worker's command line asks for (synthetic when no ``--engine``)."""
    name = getattr(args, "engine", None) or "synthetic"
    if name == "synthetic":
        return _synthetic_from_args(args)
    if name in ("transformers", "vllm"):
        needed = {"--artifact-store": "artifact_store", "--model-ref": "model_ref"}
        needed["--keyring"] = "keyring"
        missing = [flag for flag, attr in needed.items() if not getattr(args, attr, None)]
        if missing:
            raise EngineError(f"--engine {name} needs {', '.join(missing)}")
        common: dict[str, Any] = {
            "store": args.artifact_store,
            "model_ref": args.model_ref,
            "keyring": args.keyring,
        }
        if name == "transformers":
            return make_engine(
                name,
                **common,
                device=args.device,
                dtype=args.dtype,
                concurrency=args.engine_concurrency,
            )
        engine_args: dict[str, Any] = {}
        for item in args.engine_arg:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise EngineError(f"--engine-arg {item!r}: expected KEY=VALUE")
            engine_args[key] = _json_value(value)
        return make_engine(name, **common, engine_args=engine_args)
    if name == "openai":
        if not getattr(args, "upstream_url", None) or not getattr(args, "upstream_model", None):
            raise EngineError("--engine openai needs --upstream-url and --upstream-model")
        return make_engine(
            name,
            base_url=args.upstream_url,
            model=args.upstream_model,
            api_key=os.environ.get(args.upstream_api_key_env) or None,
            chat=args.upstream_chat,
        )
    return make_engine(name)
