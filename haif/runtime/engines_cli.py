"""The worker's engine options (``--engine``, ``--timing``, ...) and the engine they ask for.

:func:`add_worker_engine_args` adds the options to a parser (``haif worker``,
``python -m haif.runtime.worker``); :func:`engine_from_args` maps a parsed
command line onto the typed constructor arguments of an engine of
:mod:`haif.runtime.engines` and builds it. Errors name the option at fault.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

from haif.runtime.engines import (
    ENGINES,
    TIMINGS,
    Engine,
    EngineError,
    make_engine,
    profiles_for,
)

__all__ = ["add_worker_engine_args", "engine_from_args"]


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
    group.add_argument(
        "--upstream-chat",
        action="store_true",
        help="openai: deprecated and ignored (chat goes to the upstream as chat, "
        "completions as completions)",
    )
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
        help="synthetic, --timing profile: reuse cached prompt prefix blocks (prefix_hashes), "
        "kept in the KV pool",
    )
    group.add_argument(
        "--prefix-cache-max-tokens",
        type=_non_negative_int,
        metavar="N",
        help="synthetic, --timing profile, with --prefix-cache: cap the cached blocks no "
        "request is using at N tokens (default: whatever the KV pool holds)",
    )


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number >= ``minimum``, or a clear error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a whole number >= {minimum}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _synthetic_from_args(args: argparse.Namespace) -> Engine:
    timing = getattr(args, "timing", None) or "fixed"
    options: dict[str, Any] = {"mean_s": args.mean_s, "ttft_s": args.ttft_s}
    profiled = {
        "--max-batch": getattr(args, "max_batch", None),
        "--chunked-prefill-tokens": getattr(args, "chunked_prefill_tokens", None),
        "--prefix-cache": getattr(args, "prefix_cache", False) or None,
        "--prefix-cache-max-tokens": getattr(args, "prefix_cache_max_tokens", None),
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
    if profiled["--prefix-cache-max-tokens"] is not None and not profiled["--prefix-cache"]:
        raise EngineError("--prefix-cache-max-tokens needs --prefix-cache")
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
        prefix_cache_max_tokens=profiled["--prefix-cache-max-tokens"],
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
