"""msgpack codec for the shared contracts.

Each contract is encoded as ``{"_t": "<ClassName>", "<field>": value, ...}``;
nested contracts are encoded the same way, tuples travel as arrays and come
back as tuples. Only the classes in :data:`haif.contracts.WIRE_TYPES` (and
ones passed to :func:`register`) can be decoded, so a peer cannot make us
build arbitrary objects.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import msgpack

from haif import contracts

_TYPES: dict[str, type] = {}
_TUPLE_FIELDS: dict[type, frozenset[str]] = {}
# Every RPC envelope goes through to_plain/from_plain, a few hundred values
# per request: plain values return at once and each class's field names are
# looked up once (dataclasses.fields() per object cost ~0.2 ms a request).
_SCALARS = frozenset({str, int, float, bool, bytes, type(None)})
_FIELD_NAMES: dict[type, tuple[str, ...] | None] = {}


def _field_names(cls: type) -> tuple[str, ...] | None:
    """The field names of dataclass ``cls`` (None for any other class), cached."""
    try:
        return _FIELD_NAMES[cls]
    except KeyError:
        pass
    names = (
        tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else None
    )
    _FIELD_NAMES[cls] = names
    return names


class WireError(ValueError):
    """A message that does not decode to a known contract."""


def register(cls: type) -> type:
    """Allow ``cls`` (a dataclass) on the wire."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    _TYPES[cls.__name__] = cls
    _TUPLE_FIELDS[cls] = frozenset(name for name, hint in hints.items() if _is_tuple(hint))
    return cls


def _is_tuple(hint: Any) -> bool:
    """A tuple, or an optional tuple (``tuple[int, int] | None``)."""
    if typing.get_origin(hint) is tuple:
        return True
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = typing.get_args(hint) if union else ()
    return any(typing.get_origin(a) is tuple for a in args)


for _cls in contracts.WIRE_TYPES:
    register(_cls)


def to_plain(obj: Any) -> Any:
    """Contracts -> msgpack-able dicts/lists, recursively."""
    cls = type(obj)
    if cls in _SCALARS:
        return obj
    names = _field_names(cls)
    if names is not None:
        out: dict[str, Any] = {"_t": cls.__name__}
        for name in names:
            value = getattr(obj, name)
            out[name] = value if type(value) in _SCALARS else to_plain(value)
        return out
    if isinstance(obj, tuple | list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def from_plain(data: Any) -> Any:
    """Inverse of :func:`to_plain`; raises :class:`WireError` on unknown types."""
    if type(data) in _SCALARS:
        return data
    if isinstance(data, dict):
        tag = data.get("_t")
        if tag is None:
            return {k: from_plain(v) for k, v in data.items()}
        cls = _TYPES.get(tag)
        if cls is None:
            raise WireError(f"unknown message type {tag!r}")
        tuples = _TUPLE_FIELDS[cls]
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key == "_t":
                continue
            if type(value) in _SCALARS:
                kwargs[key] = value
                continue
            decoded = from_plain(value)
            kwargs[key] = tuple(decoded) if key in tuples and decoded is not None else decoded
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise WireError(f"bad {tag} message: {exc}") from None
    if isinstance(data, list):
        return [from_plain(v) for v in data]
    return data


def encode(obj: Any) -> bytes:
    """Serialize a contract (or plain data holding contracts) to msgpack."""
    packed: bytes = msgpack.packb(to_plain(obj), use_bin_type=True)
    return packed


def decode(payload: bytes) -> Any:
    """Deserialize msgpack produced by :func:`encode`."""
    try:
        data = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (msgpack.UnpackException, ValueError) as exc:
        raise WireError(f"malformed msgpack: {exc}") from None
    return from_plain(data)
