"""Loading YAML configuration with errors a user can act on.

Every config file (scenarios, clusters) goes through :func:`load_model`:
YAML is parsed, ``--set a.b=value`` overrides are applied, the result is
validated by a pydantic model once, and any error names the file, the line
and the dotted field path, with pydantic's description of what is allowed.
An error in a field an override set names the override (``--set
workload.rate_scal=2``) instead of the file; an unknown key gets the
nearest known one (``did you mean workload.rate_scale?``). A YAML syntax
error names the file, the line and the column.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import io
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

M = TypeVar("M", bound=pydantic.BaseModel)
_FIELD_PREFIX = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[A-Za-z0-9_.-]+?)*): ")
# Errors whose message already says what was given (our own validators end
# theirs with "got ..."), or for which no single value was given.
_INPUT_SHOWN = {
    "value_error",
    "assertion_error",
    "missing",
    "extra_forbidden",
    "unexpected_keyword_argument",
}
# An unknown key: in a model (extra="forbid"), or in a pydantic dataclass.
_UNKNOWN_KEY = {"extra_forbidden", "unexpected_keyword_argument"}


class ConfigError(Exception):
    """User input that cannot be used; the message is meant for the user."""


def _node_line(node: yaml.Node | None, loc: Sequence[int | str]) -> int | None:
    """1-based line of the YAML node at ``loc`` (or of its nearest parent)."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int):
            node = node.value[key] if 0 <= key < len(node.value) else None
        else:
            node = None
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``path.to.field=value`` overrides; values are parsed as YAML."""
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"--set {item!r}: expected path=value, e.g. workload.rate=20")
        keys = path.split(".")
        target: Any = data
        for i, key in enumerate(keys[:-1]):
            if isinstance(target, list):
                if not key.isdigit() or int(key) >= len(target):
                    raise ConfigError(f"--set {path}: {'.'.join(keys[: i + 1])} is not an index")
                target = target[int(key)]
            else:
                target = target.setdefault(key, {})
            if not isinstance(target, dict | list):
                raise ConfigError(f"--set {path}: {'.'.join(keys[: i + 1])} is not a mapping")
        value = yaml.safe_load(raw) if raw else None
        last = keys[-1]
        if isinstance(target, list):
            if not last.isdigit() or int(last) >= len(target):
                raise ConfigError(f"--set {path}: {last!r} is not an index of the list")
            target[int(last)] = value
        else:
            target[last] = value
    return data


def _unwrap(tp: Any) -> list[Any]:
    """The alternatives of a type, with ``Annotated`` and ``X | None`` taken apart."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [t for arg in typing.get_args(tp) for t in _unwrap(arg)]
    return [tp]


def _fields_of(tp: Any) -> dict[str, Any] | None:
    """Field name -> annotation of a pydantic model or pydantic dataclass, else None."""
    if not isinstance(tp, type):
        return None
    if issubclass(tp, pydantic.BaseModel):
        return {(f.alias or name): f.annotation for name, f in tp.model_fields.items()}
    fields = getattr(tp, "__pydantic_fields__", None)
    if isinstance(fields, dict) and dataclasses.is_dataclass(tp):
        return {name: f.annotation for name, f in fields.items()}
    return None


def _tagged(candidates: list[Any], tag: str) -> list[Any]:
    """The candidates whose ``kind`` field is the literal ``tag`` (a discriminated union)."""
    chosen = []
    for tp in candidates:
        kind = (_fields_of(tp) or {}).get("kind")
        if kind is not None and tag in typing.get_args(kind):
            chosen.append(tp)
    return chosen


def _walk(model: Any, loc: Sequence[int | str]) -> tuple[list[int | str], list[Any]]:
    """Follow ``loc`` through ``model``'s types: (``loc`` without the tags pydantic puts
    in it for a discriminated union, the types found there; empty if lost)."""
    candidates = _unwrap(model)
    path: list[int | str] = []
    for i, key in enumerate(loc):
        if not candidates:
            return path + list(loc[i:]), []
        models = [tp for tp in candidates if _fields_of(tp) is not None]
        if (
            isinstance(key, str)
            and models
            and all(key not in (_fields_of(t) or {}) for t in models)
        ):
            tagged = _tagged(models, key)
            if tagged:
                candidates = tagged
                continue
        path.append(key)
        following: list[Any] = []
        for tp in candidates:
            fields = _fields_of(tp)
            if fields is not None:
                if isinstance(key, str) and key in fields:
                    following += _unwrap(fields[key])
                continue
            origin, args = typing.get_origin(tp), typing.get_args(tp)
            if origin in (list, tuple, Sequence) and isinstance(key, int) and args:
                following += _unwrap(args[0])
            elif origin in (dict, Mapping) and len(args) == 2:
                following += _unwrap(args[1])
        candidates = following
    return path, candidates


def known_keys(model: Any, loc: Sequence[int | str]) -> list[str] | None:
    """The keys a mapping at ``loc`` in ``model`` may have (None: not a model, or unknown)."""
    _path, candidates = _walk(model, loc)
    keys = [k for tp in candidates for k in (_fields_of(tp) or {})]
    return list(dict.fromkeys(keys)) or None


def _suggestion(model: Any, loc: Sequence[int | str]) -> str:
    """For an unknown key at ``loc``: "; did you mean a.b?" (or the keys allowed there)."""
    if not loc or not isinstance(loc[-1], str):
        return ""
    keys = known_keys(model, loc[:-1])
    if not keys:
        return ""
    parent = "".join(f"{p}." for p in loc[:-1])
    close = difflib.get_close_matches(loc[-1], keys, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {parent}{close[0]}?"
    return f" (allowed here: {', '.join(keys)})"


def _in_data(data: Any, loc: Sequence[int | str]) -> bool:
    """Whether the file's own data has a value at ``loc``."""
    for key in loc:
        in_mapping = isinstance(data, Mapping) and key in data
        in_list = isinstance(data, list) and isinstance(key, int) and 0 <= key < len(data)
        if not (in_mapping or in_list):
            return False
        data = data[key]
    return True


def _override_for(loc: Sequence[int | str], overrides: Sequence[str], original: Any) -> str | None:
    """The override to blame for an error at ``loc``: the last one whose path is
    ``loc`` or a parent of it (it set the value), or, where the file has nothing
    at ``loc``, the last one that made it (its path goes through ``loc``)."""
    parts = [str(p) for p in loc]
    found = None
    for item in overrides:
        path = item.partition("=")[0].split(".")
        sets_it = parts[: len(path)] == path  # the override's path is loc or a parent
        made_it = path[: len(parts)] == parts and not _in_data(original, loc)
        if sets_it or made_it:
            found = item
    return found


def format_validation_error(
    exc: pydantic.ValidationError,
    source: str,
    root: yaml.Node | None,
    *,
    model: Any = None,
    overrides: Sequence[str] = (),
    original: Any = None,
) -> str:
    """pydantic's errors, one per line, each located at ``file:line`` or at the
    ``--set`` override that set the field; unknown keys get a suggestion from
    ``model`` (the validated type)."""
    lines: list[str] = []
    flagged = 0
    for err in exc.errors():
        loc: list[int | str] = [
            p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))
        ]
        msg = err["msg"].removeprefix("Value error, ")
        given = err.get("input")
        if err["type"] not in _INPUT_SHOWN and isinstance(given, str | int | float | None):
            msg += f" (got {given!r})"  # pydantic's own messages do not say
        # Validators that check several fields name the one at fault as "a.b.0: ...".
        if match := _FIELD_PREFIX.match(msg):
            loc += [int(p) if p.isdigit() else p for p in match.group(1).split(".")]
            msg = msg[match.end() :]
        if model is not None:
            loc = _walk(model, loc)[0]  # without a union's tags: the path as written
            if err["type"] in _UNKNOWN_KEY:
                msg += _suggestion(model, loc)
        field = ".".join(str(p) for p in loc) or "(top level)"
        override = _override_for(loc, overrides, original)
        if override is not None:
            flagged += 1
            where = f"--set {override}"
        else:
            line = _node_line(root, loc)
            where = f"{source}:{line}" if line else source
        lines.append(f"  {where}: {field}: {msg}")
    count = exc.error_count()
    if flagged == count:
        head = f"--set: invalid override of {source} ({count} error(s))"
    elif flagged:
        head = f"{source} with its --set overrides: invalid configuration ({count} error(s))"
    else:
        head = f"{source}: invalid configuration ({count} error(s))"
    return "\n".join([head, *lines])


def _yaml_error(path: Path, exc: yaml.YAMLError) -> ConfigError:
    """``file:line:column: not valid YAML: what`` (PyYAML's marks are 0-based)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        what = exc.problem or "syntax error"
        if exc.context and exc.context_mark is not None:
            what += f" ({exc.context} at line {exc.context_mark.line + 1})"
        return ConfigError(f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {what}")
    return ConfigError(f"{path}: not valid YAML: {exc}")


def _named_stream(text: str, path: Path) -> io.StringIO:
    """``text`` as a stream PyYAML names by ``path`` (not ``<unicode string>``)."""
    stream = io.StringIO(text)
    stream.name = str(path)
    return stream


def load_model(model: type[M], path: str | Path, overrides: Iterable[str] = ()) -> M:
    """Read ``path``, apply overrides, validate with ``model``; raise ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        root = yaml.compose(_named_stream(text, path))
        data = yaml.safe_load(_named_stream(text, path))
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    overrides = list(overrides)
    original = copy.deepcopy(data) if overrides else data
    data = apply_overrides(data, overrides)
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        message = format_validation_error(
            exc, str(path), root, model=model, overrides=overrides, original=original
        )
        raise ConfigError(message) from None
