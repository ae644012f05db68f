"""The cluster YAML reference, generated from :class:`haif.runtime.cluster.ClusterConfig`.

``haif up --schema`` prints it; ``clusters/SCHEMA.md`` is its output (a test
checks that the file is current). Each key's text is its field's
``description``; a test checks that every field has one, so a new key cannot
go undocumented.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
from collections.abc import Iterator
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from haif.control.config import CoreConfig
from haif.runtime.cluster import ClusterConfig

#: How to regenerate the reference file.
REGENERATE = "haif up --schema > clusters/SCHEMA.md"

_INTRO = f"""\
# Cluster YAML reference

Generated from `haif.runtime.cluster.ClusterConfig` by `{REGENERATE}`;
do not edit by hand. Every key is optional unless marked *required*; an unknown
key is an error that names it. Paths are relative to the cluster YAML.
Examples: the other files in `clusters/`. `haif up`'s flags `--host`, `--port`,
`--orchestrator-port`, `--control-port`, `--worker-port` and `--store`
override the YAML.
"""


def _bounds(metadata: list[Any]) -> str:
    """``0-65535``, ``>= 1``, ``non-empty``: the constraints of ``Annotated`` metadata."""
    found: dict[str, Any] = {}
    for meta in metadata:
        if isinstance(meta, FieldInfo):
            meta = _bounds(list(meta.metadata))
            if meta:
                found["text"] = meta
            continue
        for name in ("ge", "gt", "le", "lt", "min_length"):
            value = getattr(meta, name, None)
            if value is not None:
                found[name] = f"{value:g}" if isinstance(value, float) else str(value)
    if "text" in found:
        return str(found["text"])
    low = f">= {found['ge']}" if "ge" in found else f"> {found['gt']}" if "gt" in found else ""
    high = f"<= {found['le']}" if "le" in found else f"< {found['lt']}" if "lt" in found else ""
    if "ge" in found and "le" in found:
        text = f"{found['ge']}-{found['le']}"
    else:
        text = " ".join(t for t in (low, high) if t)
    if found.get("min_length") == "1":
        text = " ".join(t for t in (text, "non-empty") if t)
    return text


def type_name(tp: Any) -> str:
    """A YAML-minded name of a field type: ``int >= 0``, ``list of worker``, ``one of a, b``."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *meta = get_args(tp)
        bounds = _bounds(meta)
        return f"{type_name(base)} {bounds}" if bounds else type_name(base)
    if origin in (Union, types.UnionType):
        parts = [a for a in get_args(tp) if a is not type(None)]
        text = " or ".join(type_name(a) for a in parts)
        return f"{text} or null" if len(parts) < len(get_args(tp)) else text
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if origin in (tuple, list):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is not None and getattr(origin, "__name__", "") in ("Mapping", "dict"):
        return "mapping"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "mapping (below)"
    if tp is CoreConfig:
        return "mapping (below)"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "*required*"
    value = info.get_default(call_default_factory=True)
    return _value(value)


def _value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, BaseModel) or dataclasses.is_dataclass(value):
        return "(below)"
    if isinstance(value, tuple) and value and isinstance(value[0], BaseModel):
        return "(see description)"
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    try:
        return json.dumps(value)
    except TypeError:
        return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(model: type[BaseModel]) -> Iterator[str]:
    yield "| key | type | default | description |"
    yield "|---|---|---|---|"
    hints = get_type_hints(model, include_extras=True)
    for name, info in model.model_fields.items():
        cells = (f"`{name}`", type_name(hints[name]), _default(info), info.description or "")
        yield "| " + " | ".join(_cell(c) for c in cells) + " |"


def _sections() -> Iterator[tuple[str, type[BaseModel]]]:
    from haif.runtime.cluster import (
        AuthConfig,
        JwtSettings,
        OrchestratorSettings,
        TlsFiles,
        WorkerConfig,
    )

    yield "Top level", ClusterConfig
    yield "`orchestrator`", OrchestratorSettings
    yield "`workers[]` (each entry)", WorkerConfig
    yield "`auth`", AuthConfig
    yield "`auth.jwt`", JwtSettings
    yield "`gateway_tls`", TlsFiles


def models() -> list[type[BaseModel]]:
    """Every model the reference documents."""
    return [model for _, model in _sections()]


def _policy_rows() -> Iterator[str]:
    yield "| key | type | default |"
    yield "|---|---|---|"
    default = ClusterConfig().policy
    hints = get_type_hints(CoreConfig, include_extras=True)
    for f in dataclasses.fields(CoreConfig):
        value = getattr(default, f.name)
        shown = _value(value)
        if shown == "(below)":
            shown = json.dumps(dataclasses.asdict(value), default=str)
        cells = (f"`{f.name}`", type_name(hints[f.name]), shown)
        yield "| " + " | ".join(_cell(c) for c in cells) + " |"


def _plain(doc: str) -> str:
    """A docstring's first paragraph in Markdown (no Sphinx roles)."""
    text = " ".join(doc.strip().split("\n\n")[0].split())
    return re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text).replace("``", "`")


def reference() -> str:
    """The Markdown reference of the cluster YAML."""
    lines = [_INTRO]
    for title, model in _sections():
        lines += [f"## {title}", "", _plain(model.__doc__ or ""), ""]
        lines += [*_rows(model), ""]
    lines += [
        "## `policy`",
        "",
        "The control core's settings (`haif.control.config.CoreConfig`), the same keys as a "
        "scenario's `policy` (placement, retries, breakers, quotas, shedding); "
        "`resume_partial` defaults to true in a cluster.",
        "",
        *_policy_rows(),
        "",
    ]
    return "\n".join(lines).rstrip() + "\n"
