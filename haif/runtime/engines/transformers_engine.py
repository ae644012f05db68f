"""The ``transformers`` engine: a causal LM from a signed artifact, run with PyTorch.

torch and transformers (``haif[torch]``) are imported only when the engine is
built (checked) and loaded (imported), so this module imports without them.

Sampling (every parameter of :data:`~haif.contracts.SAMPLING_PARAMETERS`), one
token at a time, as vLLM orders it: ``presence_penalty`` and
``frequency_penalty`` subtract ``presence + frequency x count`` from the logit
of each token already generated (OpenAI's definition; the prompt does not
count), then ``temperature`` (omitted: 1, OpenAI's default; 0: greedy) divides
the logits, ``top_k`` keeps the k most likely tokens, ``top_p`` the smallest
set whose probability reaches p, and the token is drawn with a
``torch.Generator`` seeded by ``seed`` — without one, by a digest of the
request id, so a resumed attempt draws the same tokens again. End of
sequence (the tokenizer's EOS token, whose text is not returned) ends the
response with ``finish_reason`` ``stop`` unless ``ignore_eos``; so does a
``stop`` string, found in the decoded text: the text is cut before it, and
text that could be the start of a stop string is held back until it cannot
(or the response ends). A request without sampling parameters (the
simulator's semantics) is greedy and runs to ``max_tokens``.

Usage: the last chunk reports ``(prompt ids, tokens made)`` (the prompt as
the model saw it: rendered, left-truncated to the context), which is billed.

Chat: the messages are rendered with the model's chat template (the
tokenizer's ``apply_chat_template(..., add_generation_prompt=True)``), as
vLLM's OpenAI server renders them; a model without a chat template refuses
chat requests with a 400 (vLLM's behaviour), and still serves completions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import shutil
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from haif.contracts import ErrorKind, Request, SamplingParams
from haif.runtime.artifacts import ArtifactRef, ModelCache
from haif.runtime.engines.base import (
    ALL_SAMPLING,
    MAX_CHUNK_TOKENS,
    EngineError,
    request_seed,
    sampling_of,
)
from haif.runtime.engines.loading import (
    artifact_ref,
    fetch_verified,
    require_modules,
    trusted_keyring,
)
from haif.runtime.engines.text import (
    IncrementalDetokenizer,
    StopStrings,
    encode_request,
    tokenizer_decoder,
)
from haif.runtime.messages import TokenChunk
from haif.runtime.rpc import RpcError
from haif.runtime.security import Keyring

__all__ = ["LoadedModel", "TransformersEngine"]

log = logging.getLogger("haif.engines")


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
    eos_id: int | None = None

    def unload(self) -> None:
        self.model = None
        shutil.rmtree(self.directory, ignore_errors=True)


def _context_length(config: Any) -> int:
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def next_token(
    torch: Any, logits: Any, sampling: SamplingParams, counts: dict[int, int], generator: Any
) -> int:
    """The next token id from the last position's ``logits`` (see the module docstring)."""
    logits = logits.float().clone()
    presence = sampling.presence_penalty or 0.0
    frequency = sampling.frequency_penalty or 0.0
    if counts and (presence or frequency):
        ids = torch.tensor(list(counts), device=logits.device)
        seen = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
        logits[ids] -= presence + frequency * seen
    temperature = 1.0 if sampling.temperature is None else sampling.temperature
    if temperature < 1e-5:
        return int(logits.argmax())
    logits = logits / temperature
    if sampling.top_k is not None and 0 < sampling.top_k < logits.numel():
        kth = torch.topk(logits, sampling.top_k).values[-1]
        logits[logits < kth] = -float("inf")
    if sampling.top_p is not None and sampling.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the more likely tokens
        drop = before >= sampling.top_p  # the most likely token is always kept
        logits[order[drop]] = -float("inf")
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _unload(_key: str, model: LoadedModel) -> None:
    model.unload()


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

    Sampling and stopping: see the module docstring (every parameter is
    honoured). Each request runs in a thread of a pool of
    ``concurrency``; the model steps of concurrent requests are serialised
    token by token (fair interleaving, no batching), so the event loop never
    blocks and a long response does not hold up a short one.
    """

    name = "transformers"
    SUPPORTED_SAMPLING = ALL_SAMPLING

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
        require_modules("transformers", ("torch", "transformers"), "torch")
        if concurrency < 1:
            raise EngineError("concurrency must be >= 1")
        self.store = Path(store)
        self.ref = artifact_ref(model_ref)
        self.keyring = trusted_keyring(keyring)
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
        directory, manifest = fetch_verified(
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
            eos_id=int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else None,
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
        """The prompt's token ids as the model sees them (BOS if empty, left-truncated).

        A chat is rendered with the tokenizer's chat template
        (:func:`~haif.runtime.engines.text.encode_chat`; none: a 400).
        """
        m = self._require_loaded()
        with self._tokenizer_lock:
            ids = encode_request(m.tokenizer, request, m.bos_id)
        return _fit_context(ids, request.max_tokens, m.context, str(self.ref))

    def _require_loaded(self) -> LoadedModel:
        if self._loaded is None:
            raise RpcError(ErrorKind.UNAVAILABLE, f"{self.ref} is not loaded")
        return self._loaded

    def _generate(
        self,
        request: Request,
        start: int,
        emit: Callable[[int, str, str | None], None],
        stop: threading.Event,
        counted: list[int] | None = None,
    ) -> None:
        """Decoding in the calling thread; ``emit(i, text, finish)`` for tokens ``i >= start``
        (``finish``: ``stop`` / ``length`` on the last token, else None). The prompt's
        token count is appended to ``counted`` (what is billed)."""
        m = self._require_loaded()
        torch = m.torch
        n = request.max_tokens
        sampling = sampling_of(request)
        ids = self.prompt_ids(request)
        if counted is not None:
            counted.append(len(ids))
        detok = IncrementalDetokenizer(tokenizer_decoder(m.tokenizer, self._tokenizer_lock), ids)
        stops = StopStrings(sampling.stop)
        eos = None if sampling.ignore_eos else m.eos_id
        generator = torch.Generator(device=m.device)
        generator.manual_seed(request_seed(request))
        counts: dict[int, int] = {}
        with torch.inference_mode():
            with self._step_lock:
                out = m.model(input_ids=torch.tensor([ids], device=m.device), use_cache=True)
            for i in range(n):
                if stop.is_set():
                    return
                token = next_token(torch, out.logits[0, -1], sampling, counts, generator)
                counts[token] = counts.get(token, 0) + 1
                if token == eos:  # its text is not part of the response
                    if i >= start:
                        emit(i, stops.flush(), "stop")
                    return
                last = i == n - 1
                text, cut = stops.feed(detok.add(token, final=last))
                finish = "stop" if cut else "length" if last else None
                if last and not cut:
                    text += stops.flush()
                if i >= start:
                    emit(i, text, finish)
                if finish is not None:
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
        queue: asyncio.Queue[tuple[int, str, str | None] | None] = asyncio.Queue()
        failure: list[BaseException] = []
        counted: list[int] = []  # the prompt's token count, as the model saw it
        stop = threading.Event()

        def put(item: tuple[int, str, str | None] | None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                stop.set()

        def work() -> None:
            try:
                self._generate(request, start, lambda i, t, f: put((i, t, f)), stop, counted)
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
                batch: list[tuple[int, str, str | None]] = []
                while item is not None:
                    batch.append(item)
                    if len(batch) >= MAX_CHUNK_TOKENS or queue.empty():
                        break
                    item = queue.get_nowait()
                done = item is None
                if batch:
                    last, finish = batch[-1][0], batch[-1][2]
                    # The last chunk bills the model's own count: prompt ids, tokens made.
                    usage = (counted[0], last + 1) if finish is not None and counted else None
                    yield TokenChunk(batch[0][0], tuple(p for _, p, _ in batch), finish, usage)
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
