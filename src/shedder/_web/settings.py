"""The configuration both web adapters take, checked once, in one place."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shedder._core.checks import (
    check_callable,
    check_choice,
    check_instance,
    check_sequence,
    check_str,
)
from shedder._core.throttler import Throttler, ThrottlerOptions

from .http import ShedResponder, normalize_path_rules
from .instance import InstanceTable, instance_table

__all__ = ["AdapterSettings", "adapter_settings", "check_keywords", "check_status_code"]

_THROTTLER_KEYWORDS = frozenset(ThrottlerOptions.__annotations__)
_ADAPTER_KEYWORDS = (
    "throttler",
    "health_path",
    "exempt",
    "status_code",
    "responder",
    "health_throttlers",
    "metrics_path",
    "metrics_registry",
    "live_path",
    "instance_dir",
    "limit_websockets",
)


def check_keywords(options: Iterable[str], known: Iterable[str] = ()) -> None:
    """``TypeError`` naming the first unknown keyword, with the closest known one if any.

    Known: the throttler's keyword arguments, the middlewares' options and ``known``.
    """
    names = sorted(_THROTTLER_KEYWORDS.union(_ADAPTER_KEYWORDS, known))
    for option in options:
        if option not in names:
            close = difflib.get_close_matches(option, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"unknown keyword argument {option!r}{hint}")


def check_status_code(status_code: object) -> int:
    """The refusal status: the int 503 (the contract) or 429 (``503.0`` is a ``TypeError``:
    servers refuse a float status, turning every refusal into a 500)."""
    return check_choice("status_code", status_code, (503, 429))


@dataclass(frozen=True, slots=True)
class AdapterSettings:
    """What a middleware needs, validated: see ``LoadSheddingMiddleware`` for the meanings."""

    throttler: Throttler
    health_path: str | None
    metrics_path: str | None
    live_path: str | None
    exempt_exact: frozenset[str]
    exempt_prefixes: tuple[str, ...]
    status_code: int
    responder: ShedResponder | None
    health_throttlers: tuple[Throttler, ...]  # the adapter's own first
    metrics_registry: Any
    table: InstanceTable | None


def adapter_settings(
    throttler: Throttler | None,
    throttler_options: Mapping[str, Any],
    *,
    health_path: str | None,
    exempt: Iterable[str],
    status_code: int,
    responder: ShedResponder | None,
    health_throttlers: Sequence[Throttler] | Throttler,
    metrics_path: str | None,
    metrics_registry: Any,
    live_path: str | None,
    instance_dir: str | os.PathLike[str] | None,
) -> AdapterSettings:
    """Check a middleware's arguments; ``TypeError``/``ValueError`` name the culprit."""
    check_keywords(throttler_options)
    if throttler is not None and throttler_options:
        raise TypeError(
            "pass either a throttler or its keyword arguments, not both "
            f"(got throttler and {', '.join(sorted(throttler_options))})"
        )
    if throttler is None:
        if "max_concurrency" not in throttler_options:
            raise TypeError(
                "pass a throttler, or the keyword arguments of a new one (at least max_concurrency)"
            )
        throttler = Throttler(**throttler_options)  # checks its own arguments
    elif not isinstance(throttler, Throttler):
        raise TypeError(f"throttler must be a shedder.Throttler, got {throttler!r}")
    check_status_code(status_code)
    for name, path in (
        ("health_path", health_path),
        ("metrics_path", metrics_path),
        ("live_path", live_path),
    ):
        if path is not None:
            check_str(name, path)
            if not path.startswith("/"):
                raise ValueError(f"{name} must be None or a path starting with '/', got {path!r}")
    if isinstance(health_throttlers, Throttler):
        health_throttlers = (health_throttlers,)
    health_throttlers = check_sequence("health_throttlers", health_throttlers)
    for extra in health_throttlers:
        check_instance("health_throttlers", extra, Throttler, "a sequence of shedder.Throttler")
    if responder is not None:
        check_callable("responder", responder)
    exact, prefixes = normalize_path_rules(exempt)
    return AdapterSettings(
        throttler=throttler,
        health_path=health_path,
        metrics_path=metrics_path,
        live_path=live_path,
        exempt_exact=exact,
        exempt_prefixes=prefixes,
        status_code=status_code,
        responder=responder,
        health_throttlers=(throttler, *health_throttlers),
        metrics_registry=metrics_registry,
        table=instance_table(instance_dir),
    )
