"""The configuration both web adapters take, checked once, in one place."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from shedder._core.checks import (
    check_callable,
    check_choice,
    check_instance,
    check_sequence,
    check_str,
)
from shedder._core.throttler import Throttler, ThrottlerOptions

from .deadlines import Deadlines
from .gate import DEFAULT_DEADLINES, Classifier, Gate, OutcomeOf, default_outcome
from .http import (
    DEFAULT_HEALTH_PATH,
    DEFAULT_LIVE_PATH,
    HTTPResponse,
    ShedResponder,
    normalize_path_rules,
)
from .instance import InstanceTable, instance_table

__all__ = [
    "AdapterSettings",
    "MiddlewareOptions",
    "adapter_settings",
    "check_keywords",
    "check_status_code",
    "middleware_settings",
]


E = TypeVar("E")


class MiddlewareOptions(ThrottlerOptions, total=False):
    """The keyword arguments of both middlewares: a new throttler's, and their own.

    One definition for ASGI and WSGI (and ``**options`` that Starlette's ``add_middleware``
    type-checks); the defaults are in :data:`MIDDLEWARE_DEFAULTS`.
    """

    health_path: str | None
    exempt: Iterable[str]
    status_code: int
    responder: ShedResponder | None
    health_throttlers: Sequence[Throttler]
    metrics_path: str | None
    metrics_registry: Any
    live_path: str | None
    instance_dir: str | os.PathLike[str] | None
    classify: Classifier | None
    priority_header: str | None
    trusted_peers: Iterable[str]
    deadlines: Deadlines | None
    outcome: OutcomeOf


MIDDLEWARE_DEFAULTS: dict[str, Any] = {
    "health_path": DEFAULT_HEALTH_PATH,
    "exempt": (),
    "status_code": 503,
    "responder": None,
    "health_throttlers": (),
    "metrics_path": None,
    "metrics_registry": None,
    "live_path": DEFAULT_LIVE_PATH,
    "instance_dir": None,
    "classify": None,
    "priority_header": None,
    "trusted_peers": (),
    "deadlines": DEFAULT_DEADLINES,
    "outcome": default_outcome,
}
_GATE_KEYWORDS = ("classify", "priority_header", "trusted_peers", "deadlines", "outcome")
_THROTTLER_KEYWORDS = frozenset(ThrottlerOptions.__annotations__)
_ADAPTER_KEYWORDS = ("throttler", "limit_websockets", *MIDDLEWARE_DEFAULTS)


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
    gate_options: Mapping[str, Any]  # classify, priority_header, ...: for Gate(**...)

    def gate(self, encode: Callable[[HTTPResponse], E]) -> Gate[E]:
        """The adapter's :class:`Gate`, refusals encoded with ``encode``."""
        return Gate(
            self.throttler,
            encode,
            status_code=self.status_code,
            responder=self.responder,
            **self.gate_options,
        )


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
    gate_options: Mapping[str, Any] | None = None,
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
        gate_options={} if gate_options is None else dict(gate_options),
    )


def middleware_settings(throttler: Throttler | None, options: Mapping[str, Any]) -> AdapterSettings:
    """A middleware's ``throttler`` and ``**options``, split into a new throttler's keyword
    arguments and the middleware's own (defaults from :data:`MIDDLEWARE_DEFAULTS`), checked."""
    check_keywords(options)
    own = {name: options.get(name, default) for name, default in MIDDLEWARE_DEFAULTS.items()}
    throttler_options = {k: v for k, v in options.items() if k not in MIDDLEWARE_DEFAULTS}
    gate_options = {name: own.pop(name) for name in _GATE_KEYWORDS}
    return adapter_settings(throttler, throttler_options, gate_options=gate_options, **own)
