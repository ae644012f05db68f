"""Loading YAML configuration with errors a user can act on.

Every config file (scenarios, clusters) goes through :func:`load_model`:
YAML is parsed, ``--set a.b=value`` overrides are applied, the result is
validated by a pydantic model once, and any error names the file, the line
and the dotted field path, with pydantic's description of what is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

M = TypeVar("M", bound=pydantic.BaseModel)
_FIELD_PREFIX = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[A-Za-z0-9_.-]+?)*): ")
# Errors whose message already says what was given (our own validators end
# theirs with "got ..."), or for which no single value was given.
_INPUT_SHOWN = {"value_error", "assertion_error", "missing", "extra_forbidden"}


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


def format_validation_error(
    exc: pydantic.ValidationError, source: str, root: yaml.Node | None
) -> str:
    lines = [f"{source}: invalid configuration ({exc.error_count()} error(s))"]
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
        field = ".".join(str(p) for p in loc) or "(top level)"
        line = _node_line(root, loc)
        where = f"{source}:{line}" if line else source
        lines.append(f"  {where}: {field}: {msg}")
    return "\n".join(lines)


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
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    data = apply_overrides(data, overrides)
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path), root)) from None
