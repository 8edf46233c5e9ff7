"""Argument checks, one behaviour everywhere: a wrong type is a ``TypeError``, a bad value a
``ValueError``, and both name the parameter, its value and the bound.

Every public constructor checks its arguments here, at construction, so that a bad
configuration fails when the service starts rather than on the first request.
"""

from __future__ import annotations

import math

__all__ = ["check_fraction", "check_int", "check_number", "check_seconds"]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_number(name: str, value: object, low: float = -math.inf, high: float = math.inf) -> float:
    """``value`` as a finite-or-infinite float in ``[low, high]`` (never NaN)."""
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except OverflowError:
        raise ValueError(f"{name} is too large, got {value!r}") from None
    if math.isnan(number) or not low <= number <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")
    return number


def check_seconds(name: str, value: object) -> float:
    """A duration: a number of seconds >= 0 (``math.inf`` allowed for 'no limit')."""
    if not _is_number(value):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__} {value!r}")
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except OverflowError:
        raise ValueError(f"{name} is too large, got {value!r}") from None
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"{name} must be >= 0 seconds, got {value}")
    return seconds


def check_fraction(name: str, value: object, low: float = 0.0, high: float = 1.0) -> float:
    """A number in ``[low, high]`` (a ratio, a probability, a threshold)."""
    return check_number(name, value, low, high)
