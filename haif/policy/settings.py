"""What a policy setting accepts, declared once in its type.

Theory of operation
-------------------
Every policy setting (``BreakerConfig``, ``Backoff``, ``QuotaConfig``, the
placement strategies' parameters, ...) is a frozen pydantic dataclass, made
by the :func:`setting` decorator, whose fields carry their constraints in
their types: ``Positive``, ``Fraction``, ``Count``, ... below. The
declaration is the only validation there is, and it runs once, wherever a
value enters:

* at the edge: the scenario and cluster YAML models (pydantic) embed these
  dataclasses and validate them in the same pass, so an error names the
  file, the line and the dotted field (:mod:`haif.configfile`);
* in code: constructing a setting directly runs the same validation and
  raises pydantic's ``ValidationError`` -- a ``ValueError`` -- naming the
  field, what it accepts and what it got.

Policy objects (``CircuitBreaker``, ``RetryPolicy``, the strategies) then
take the already-valid values and never re-check them. A rule that spans
fields (a count window's size is a whole number) is a pydantic validator on
the field it constrains, so its error names that field too.

Conventions: numbers are strict (a bool or a numeric string is refused; an
int is a fine float) and finite; unknown keys are refused (``SETTINGS``), so
a misspelt setting never silently falls back to its default.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, cast, dataclass_transform, overload

import pydantic.dataclasses
from pydantic import AfterValidator, ConfigDict, Field

__all__ = [
    "SETTINGS",
    "AtLeastOne",
    "Count",
    "Finite",
    "Flag",
    "Fraction",
    "NonNegative",
    "NonNegativeCount",
    "Positive",
    "one_of",
    "setting",
]

SETTINGS = ConfigDict(extra="forbid")
"""The pydantic config of every policy setting: unknown keys are errors."""

T = TypeVar("T")


@overload
def setting(cls: type[T], /) -> type[T]: ...
@overload
def setting(*, title: str) -> Callable[[type[T]], type[T]]: ...
@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, Field))
def setting(
    cls: type[T] | None = None, /, *, title: str | None = None
) -> type[T] | Callable[[type[T]], type[T]]:
    """Make ``cls`` a frozen, slotted pydantic dataclass validated by its field types.

    Embedded in a pydantic model it is validated with the model (one pass,
    errors located by field); constructed directly, with keyword or
    positional arguments, it raises pydantic's ``ValidationError`` (a
    ``ValueError``) naming the field. ``title`` replaces the class name in
    that error (for a private class that checks a public one's arguments).
    """

    def make(cls: type[T]) -> type[T]:
        config = SETTINGS if title is None else ConfigDict(**SETTINGS, title=title)
        made: Any = pydantic.dataclasses.dataclass(frozen=True, slots=True, config=config)(cls)
        names = tuple(f.name for f in dataclasses.fields(made) if f.init)
        validate = made.__init__

        # Pydantic locates an error in a positional argument by its index;
        # pass every argument by name so that the error names the field.
        def __init__(self: T, *args: Any, **kwargs: Any) -> None:
            if len(args) > len(names):
                raise TypeError(
                    f"{cls.__name__}() takes {len(names)} positional arguments, got {len(args)}"
                )
            for name, value in zip(names, args, strict=False):
                if name in kwargs:
                    raise TypeError(f"{cls.__name__}() got multiple values for {name!r}")
                kwargs[name] = value
            validate(self, **kwargs)

        made.__init__ = functools.wraps(validate)(__init__)
        return cast(type[T], made)

    return make if cls is None else make(cls)


Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
"""Any finite number."""

NonNegative = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0)]
"""A finite number ``>= 0``."""

Positive = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0)]
"""A finite number ``> 0``."""

AtLeastOne = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=1)]
"""A finite number ``>= 1`` (multipliers, ratios that must not shrink)."""

Fraction = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=1)]
"""A number in ``(0, 1]`` (rate thresholds)."""

Count = Annotated[int, Field(strict=True, ge=1)]
"""An int ``>= 1``."""

NonNegativeCount = Annotated[int, Field(strict=True, ge=0)]
"""An int ``>= 0``."""

Flag = Annotated[bool, Field(strict=True)]
"""``True`` or ``False`` (not ``"yes"``, not ``1``)."""


def one_of(*choices: str) -> AfterValidator:
    """Annotated metadata for a ``str`` field that takes one of ``choices``.

    (A plain ``str`` type rather than a ``Literal``, so that callers passing
    a ``str`` keep type-checking.)
    """

    def check(value: str) -> str:
        if value not in choices:
            allowed = ", ".join(repr(choice) for choice in choices)
            raise ValueError(f"must be one of {allowed}, got {value!r}")
        return value

    return AfterValidator(check)
