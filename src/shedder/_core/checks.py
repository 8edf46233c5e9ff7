"""Argument checks, one behaviour everywhere: a wrong type is a ``TypeError``, a bad value a
``ValueError``, and both name the parameter, its value and the bound.

Every public constructor checks its arguments here, at construction, so that a bad
configuration fails when the service starts rather than on the first request.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any, TypeVar

__all__ = [
    "check_bool",
    "check_callable",
    "check_choice",
    "check_fraction",
    "check_header_name",
    "check_instance",
    "check_int",
    "check_mapping",
    "check_number",
    "check_seconds",
    "check_sequence",
    "check_str",
    "check_strings",
    "shown",
    "typed",
]

T = TypeVar("T")

# RFC 9110 field-name = token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def shown(value: object) -> str:
    """``repr(value)`` for an error message: short, and never failing (an int of 5,000
    digits cannot even be printed)."""
    try:
        text = repr(value)
    except ValueError:
        return f"an int of {value.bit_length()} bits" if isinstance(value, int) else "?"
    return text if len(text) <= 80 else text[:77] + "..."


def typed(value: object) -> str:
    """``value`` shown with its type, for a ``TypeError``."""
    return f"{type(value).__name__} {shown(value)}"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {typed(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {shown(value)}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {shown(value)}")
    return value


def check_number(name: str, value: object, low: float = -math.inf, high: float = math.inf) -> float:
    """``value`` as a finite-or-infinite float in ``[low, high]`` (never NaN)."""
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {typed(value)}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except OverflowError:
        raise ValueError(f"{name} is too large, got {shown(value)}") from None
    if math.isnan(number) or not low <= number <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {shown(value)}")
    return number


def check_seconds(
    name: str, value: object, *, positive: bool = False, finite: bool = False
) -> float:
    """A duration: a number of seconds >= 0 (``math.inf`` allowed for 'no limit').

    ``positive``: > 0 as well; ``finite``: not ``math.inf``.
    """
    if not _is_number(value):
        raise TypeError(f"{name} must be a number of seconds, got {typed(value)}")
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except OverflowError:
        raise ValueError(f"{name} is too large, got {shown(value)}") from None
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"{name} must be >= 0 seconds, got {shown(value)}")
    if positive and seconds == 0:
        raise ValueError(f"{name} must be > 0 seconds, got {shown(value)}")
    if finite and seconds == math.inf:
        raise ValueError(f"{name} must be a finite number of seconds, got {shown(value)}")
    return seconds


def check_fraction(name: str, value: object, low: float = 0.0, high: float = 1.0) -> float:
    """A number in ``[low, high]`` (a ratio, a probability, a threshold)."""
    return check_number(name, value, low, high)


def check_bool(name: str, value: object) -> bool:
    """``value`` as a bool: only ``True`` or ``False`` (a truthy string is a mistake)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {typed(value)}")
    return value


def check_str(name: str, value: object, *, empty: bool = False) -> str:
    """``value`` as a str, non-empty unless ``empty``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {typed(value)}")
    if not value and not empty:
        raise ValueError(f"{name} must be a non-empty string, got {shown(value)}")
    return value


def check_header_name(name: str, value: object) -> str:
    """``value`` as a lower-case HTTP header name (an RFC 9110 token)."""
    header = check_str(name, value)
    if not _TOKEN.fullmatch(header):
        raise ValueError(f"{name} must be an HTTP header name, got {shown(value)}")
    return header.lower()


def check_callable(name: str, value: T) -> T:
    """``value`` if it is callable."""
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {typed(value)}")
    return value


def check_instance(name: str, value: object, kind: type[T], what: str | None = None) -> T:
    """``value`` if it is a ``kind``; ``what`` names the expected type in the message."""
    if not isinstance(value, kind):
        expected = what or kind.__name__
        raise TypeError(f"{name} must be {expected}, got {typed(value)}")
    return value


def check_choice(name: str, value: object, choices: Collection[T]) -> T:
    """``value`` if it is one of ``choices`` (compared by type and value: ``503.0`` is not
    ``503``)."""
    for choice in choices:
        if type(value) is type(choice) and value == choice:
            return choice
    shown_choices = [repr(choice) for choice in choices]
    listed = (
        " or ".join(shown_choices)
        if len(shown_choices) <= 2
        else f"one of {', '.join(shown_choices)}"
    )
    kinds = {type(choice) for choice in choices}
    if not any(isinstance(value, kind) and not isinstance(value, bool) for kind in kinds):
        raise TypeError(f"{name} must be {listed}, got {typed(value)}")
    raise ValueError(f"{name} must be {listed}, got {shown(value)}")


def check_strings(name: str, value: object, *, empty: bool = True) -> tuple[str, ...]:
    """``value`` as a tuple of non-empty strings. A bare ``str`` is refused: it would be taken
    as a collection of one-letter strings. ``empty``: whether no strings at all is fine."""
    if isinstance(value, (str, bytes)):
        raise TypeError(
            f"{name} must be a collection of strings, not a single {type(value).__name__}"
            f" {shown(value)} (did you mean [{shown(value)}]?)"
        )
    if not isinstance(value, Iterable) or isinstance(value, Mapping):
        raise TypeError(f"{name} must be a collection of strings, got {typed(value)}")
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{name} must hold strings, got {typed(item)}")
        if not item:
            raise ValueError(f"{name} must hold non-empty strings, got {shown(item)}")
    if not items and not empty:
        raise ValueError(f"{name} must hold at least one string")
    return items


def check_mapping(name: str, value: object) -> Mapping[Any, Any]:
    """``value`` if it is a mapping (a dict or the like)."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping, got {typed(value)}")
    return value


def check_sequence(name: str, value: object) -> tuple[Any, ...]:
    """``value`` as a tuple: any iterable but a str, bytes or mapping."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a sequence, got {typed(value)}")
    return tuple(value)
