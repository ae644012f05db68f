"""The gateway's prompt measure: the model's token count and prefix block hashes.

Before a request is submitted, the gateway tokenizes its prompt (a chat: its
messages, rendered as the engine renders them) with *the model's tokenizer*,
and from those token ids computes

- ``Request.prompt_tokens``: how many there are (what quotas reserve and
  what is billed, unless the engine reports its own count);
- ``Request.prefix_hashes``: the chained hashes of the prompt's full KV
  blocks (:func:`haif.fleet.prefix.block_hashes`), ``prefix_block_tokens``
  tokens each — the model's KV block size from the profile catalog
  (:meth:`haif.fleet.profiles.ProfileCatalog.block_tokens`: vLLM's 16 unless
  the catalog says otherwise) — so prefix-aware placement
  (``placement: prefix_affinity``) and the workers' prefix caches work on
  live traffic.

Which tokenizer is the model's (:func:`prompt_tokens_for`, from the cluster
YAML's workers):

- ``synthetic`` workers: the synthetic model's own tokenizer, whitespace
  words (:func:`haif.fleet.prefix.word_token_ids`), so a prompt of ``n``
  words is ``n`` tokens (``haif replay`` sends a trace prompt of ``n``
  tokens as ``n`` words); also every model the cluster does not name (the
  orchestrator answers 404 for those anyway);
- ``transformers`` and ``vllm`` workers: the tokenizer files of the signed
  artifact they serve (``model_ref``), verified against the keyring (the
  signature, then each file's digest while it is copied; the weights are
  not read) and loaded with ``transformers.AutoTokenizer`` as the engines
  load them; prompts and chats are encoded by the engines' own function
  (:func:`haif.runtime.engines.text.encode_request`: the chat template,
  no special tokens added), so the ids the gateway hashes are the ids the
  engine computes: the same files, the same code;
- ``openai`` workers (an upstream server whose tokenizer HAIF does not
  have): the words are an estimate for the quota, no prefix hashes are
  computed, and the upstream's reported usage is billed.

Cost: one tokenization and one SHA-256 per full block per request; the
tokenizers are loaded once (:meth:`PromptTokens.load`, at the gateway's
start) and the per-model block size and chain root are cached. The words
are counted and hashed on the event loop (tens to hundreds of microseconds);
an artifact's tokenizer runs in its own thread (:meth:`PromptTokens.measure_async`:
a BPE tokenizer takes milliseconds on a long prompt, which would stall every
other stream of the gateway; the Rust tokenizer releases the GIL while it
encodes; one thread per tokenizer, as a fast tokenizer must not be used by
two threads at once). ``bench/prompt_tokens.py`` measures it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from haif.configfile import ConfigError
from haif.contracts import ChatTurn, Request, chat_text
from haif.fleet.prefix import block_hashes, prefix_root, word_token_ids
from haif.fleet.profiles import ProfileCatalog, load_catalog
from haif.runtime.artifacts import ArtifactError, ArtifactRef, fetch
from haif.runtime.security import Keyring

__all__ = [
    "ArtifactTokenizer",
    "PromptError",
    "PromptMeasure",
    "PromptTokenizer",
    "PromptTokens",
    "WordTokenizer",
    "prompt_tokens_for",
]

log = logging.getLogger("haif.prompt_tokens")

#: Files of an artifact the tokenizer never needs (weights: large, and never read here).
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt", ".gguf", ".msgpack", ".h5")
_CACHE_MAX = 1024  # models remembered (names come from clients: bounded)


@dataclass(frozen=True, slots=True)
class PromptMeasure:
    """A prompt as the gateway submits it: its token count and prefix block hashes."""

    tokens: int
    prefix_hashes: tuple[int, ...] = ()
    block_tokens: int = 0


class PromptError(Exception):
    """A prompt the model's tokenizer cannot encode (a 400 naming ``param``)."""

    def __init__(self, param: str, message: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.message = message
        self.code = code


class PromptTokenizer(Protocol):
    """A model's tokenizer as the gateway uses it."""

    @property
    def name(self) -> str:
        """What it is (logs, errors)."""
        ...

    async def load(self) -> None:
        """Make it ready (read its files); before the first :meth:`encode`."""
        ...

    def encode(self, model: str, prompt: str | None, messages: tuple[ChatTurn, ...]) -> list[int]:
        """The prompt's token ids, as the model's engine computes them."""
        ...


class WordTokenizer:
    """The synthetic model's tokenizer: whitespace-separated words (``word_token_ids``)."""

    name = "words"

    async def load(self) -> None:
        pass

    def encode(self, model: str, prompt: str | None, messages: tuple[ChatTurn, ...]) -> list[int]:
        return word_token_ids(chat_text(messages) if messages else prompt or "")


class ArtifactTokenizer:
    """The tokenizer of a signed model artifact, verified, loaded as the engines load it."""

    def __init__(
        self,
        store: str | Path,
        ref: ArtifactRef | str,
        keyring: Keyring | str | Path,
        workdir: str | Path | None = None,
    ) -> None:
        self.store = Path(store)
        self.ref = ref if isinstance(ref, ArtifactRef) else ArtifactRef.parse(ref)
        self.keyring_source = keyring
        self.workdir = Path(workdir) if workdir is not None else None
        self.tokenizer: Any = None
        self.bos_id = 0
        #: Where :meth:`PromptTokens.measure_async` encodes (one thread: a fast tokenizer
        #: refuses concurrent use); made when the tokenizer is loaded.
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def name(self) -> str:
        return f"artifact {self.ref}"

    async def load(self) -> None:
        if self.tokenizer is None:
            await asyncio.to_thread(self._load_blocking)

    def _load_blocking(self) -> None:
        keyring = (
            self.keyring_source
            if isinstance(self.keyring_source, Keyring)
            else Keyring.from_dir(self.keyring_source)
        )
        transformers: Any = importlib.import_module("transformers")
        transformers.utils.logging.disable_progress_bar()
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
        directory = Path(tempfile.mkdtemp(prefix=f"haif-tok-{self.ref.name}-", dir=self.workdir))
        try:
            fetch(
                self.store,
                self.ref.name,
                self.ref.version,
                keyring,
                directory,
                only=lambda name: not name.endswith(_WEIGHTS),
            )
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(directory), local_files_only=True, trust_remote_code=False
            )
        finally:
            shutil.rmtree(directory, ignore_errors=True)  # loaded: the files are not read again
        bos = tokenizer.bos_token_id
        if bos is None:
            bos = tokenizer.eos_token_id
        self.bos_id = int(bos) if bos is not None else 0
        self.tokenizer = tokenizer
        self.executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"haif-tokenizer-{self.ref.name}"
        )
        log.info("loaded the tokenizer of %s from its verified artifact", self.ref)

    def encode(self, model: str, prompt: str | None, messages: tuple[ChatTurn, ...]) -> list[int]:
        # The engines' own function, so the ids are theirs (see the module docstring).
        from haif.runtime.engines.text import NoChatTemplate, encode_request

        if self.tokenizer is None:
            raise RuntimeError(f"the tokenizer of {self.ref} is not loaded")
        probe = Request("", "", model, 0, 1, 0.0, prompt=prompt, messages=messages)
        try:
            return encode_request(self.tokenizer, probe, self.bos_id)
        except NoChatTemplate as exc:
            raise PromptError("messages", exc.message, "unsupported_value") from None


class PromptTokens:
    """Each model's tokenizer and KV block size; :meth:`measure` a prompt with them.

    ``tokenizers``: model -> its tokenizer, or ``None`` for a model whose
    tokenizer is unknown (its words estimate the count; no hashes).
    ``default``: the tokenizer of every other model (the synthetic words).
    ``catalog``: where block sizes come from (the packaged profile catalog).
    """

    def __init__(
        self,
        tokenizers: Mapping[str, PromptTokenizer | None] | None = None,
        *,
        default: PromptTokenizer | None = None,
        catalog: ProfileCatalog | None = None,
    ) -> None:
        self.tokenizers = dict(tokenizers or {})
        self.default: PromptTokenizer = default or WordTokenizer()
        self.catalog = catalog
        self._blocks: dict[str, int] = {}
        self._roots: dict[str, int] = {}

    async def load(self) -> None:
        """Load every tokenizer (each artifact's files are verified first) and the catalog
        of block sizes, so that the first request does not pay for reading it (30 ms)."""
        if self.catalog is None:
            self.catalog = load_catalog()
        for tokenizer in {id(t): t for t in self.tokenizers.values() if t is not None}.values():
            await tokenizer.load()

    def close(self) -> None:
        """Stop the tokenizers' threads (a measure in progress finishes)."""
        for tokenizer in self.tokenizers.values():
            executor = getattr(tokenizer, "executor", None)
            if executor is not None:
                executor.shutdown(wait=False)

    def block_tokens(self, model: str) -> int:
        """``model``'s KV block size (the profile catalog's), cached."""
        block = self._blocks.get(model)
        if block is None:
            catalog = self.catalog if self.catalog is not None else load_catalog()
            block = catalog.block_tokens(model)
            if len(self._blocks) >= _CACHE_MAX:
                self._blocks.clear()
            self._blocks[model] = block
        return block

    def _root(self, model: str) -> int:
        root = self._roots.get(model)
        if root is None:
            root = prefix_root(model)
            if len(self._roots) >= _CACHE_MAX:
                self._roots.clear()
            self._roots[model] = root
        return root

    async def measure_async(
        self, model: str, prompt: str | None, messages: tuple[ChatTurn, ...] = ()
    ) -> PromptMeasure:
        """:meth:`measure`, in the tokenizer's own thread when it has one (an artifact's)."""
        tokenizer = self.tokenizers.get(model, self.default)
        executor = getattr(tokenizer, "executor", None)
        if executor is None:
            return self.measure(model, prompt, messages)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, self.measure, model, prompt, messages)

    def measure(
        self, model: str, prompt: str | None, messages: tuple[ChatTurn, ...] = ()
    ) -> PromptMeasure:
        """The prompt's token count (at least 1) and prefix hashes under ``model``'s tokenizer.

        Raises :class:`PromptError` when the tokenizer cannot encode it (a
        chat for a model without a chat template).
        """
        tokenizer = self.tokenizers.get(model, self.default)
        if tokenizer is None:  # an upstream's model: estimate, no hashes
            return PromptMeasure(
                max(1, len((chat_text(messages) if messages else prompt or "").split()))
            )
        ids = tokenizer.encode(model, prompt, messages)
        block = self.block_tokens(model)
        return PromptMeasure(max(1, len(ids)), block_hashes(ids, block, self._root(model)), block)


def prompt_tokens_for(workers: Any, base: Path | None = None) -> PromptTokens:
    """The models' tokenizers as the cluster's ``workers`` (``WorkerConfig``\\ s) serve them.

    Paths (``artifact_store``, ``keyring``) are relative to ``base`` (the
    cluster YAML's directory). A model that two workers serve with different
    tokenizers is a :class:`ConfigError` naming it: its token counts and
    prefix hashes would depend on where it runs.
    """
    from haif.runtime.cluster import beside

    chosen: dict[str, tuple[str, PromptTokenizer | None, str]] = {}
    artifacts: dict[tuple[str, str, str], ArtifactTokenizer] = {}
    for worker in workers:
        tokenizer: PromptTokenizer | None
        if worker.engine in ("transformers", "vllm"):
            store = str(beside(base, worker.artifact_store))
            keyring = str(beside(base, worker.keyring))
            key = (store, str(worker.model_ref), keyring)
            if key not in artifacts:
                try:
                    artifacts[key] = ArtifactTokenizer(store, worker.model_ref, keyring)
                except ArtifactError as exc:
                    raise ConfigError(f"workers ({worker.id}).model_ref: {exc.message}") from None
            tokenizer = artifacts[key]
            what = f"the tokenizer of {worker.model_ref}"
        elif worker.engine == "openai":
            tokenizer, what = None, "an upstream's own tokenizer"
        else:
            tokenizer, what = WordTokenizer(), "the synthetic words"
        for model in worker.models:
            seen = chosen.get(model)
            if seen is None:
                chosen[model] = (worker.id, tokenizer, what)
            elif seen[2] != what:
                raise ConfigError(
                    f"model {model!r} is served with {seen[2]} by worker {seen[0]!r} and "
                    f"with {what} by worker {worker.id!r}: one model, one tokenizer"
                )
    return PromptTokens({model: t for model, (_w, t, _what) in chosen.items()})
