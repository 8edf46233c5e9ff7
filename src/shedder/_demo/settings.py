"""The target app's settings, passed from the harness to the server process in the environment.

One module serves the bare and the shedded variants, so the server command line stays the same
and only ``SHEDDER_DEMO_SHEDDER`` (JSON keyword arguments for ``LoadSheddingMiddleware``, empty
for the bare app) changes. ``SHEDDER_DEMO_SLOWDOWN`` (JSON ``[[start_s, end_s, factor], ...]``)
makes the database slower for stretches of the run, so capacity changes mid-run.

JSON cannot carry a :class:`shedder.limits.Limit`, so the shedder options may name one:
``{"limit": {"vegas": {"max_limit": 100}}}`` becomes ``max_concurrency=VegasLimit(max_limit=100)``
(see :func:`throttler_options`); ``{"classify": "tenant-header"}`` names a classifier the same way,
and ``{"deadlines": {"margin": 0.03}}`` gives ``deadlines=Deadlines(margin=0.03)``.

``SHEDDER_DEMO_RECORD`` (a sampling period in seconds, e.g. ``0.1``; empty: off) makes the app
record, for the benchmark: the throttler's state every period (limit, in flight, queued, CoDel's
standing state, the limit algorithm's figures, refusals by reason), and, for each request that
reaches the app, whether it started after the client's deadline (the scheduled send time in
``x-bench-scheduled`` plus ``x-envoy-expected-rq-timeout-ms``). ``GET /bench/stats`` returns it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CLASSIFIERS", "LIMITS", "AppSettings", "throttler_options"]

POOL_ENV = "SHEDDER_DEMO_POOL"
HOLD_ENV = "SHEDDER_DEMO_HOLD_MS"
SHEDDER_ENV = "SHEDDER_DEMO_SHEDDER"
SLOWDOWN_ENV = "SHEDDER_DEMO_SLOWDOWN"
RECORD_ENV = "SHEDDER_DEMO_RECORD"

LIMITS = {
    "fixed": "FixedLimit",
    "aimd": "AIMDLimit",
    "vegas": "VegasLimit",
    "gradient2": "Gradient2Limit",
}
"""Limit algorithms by the name the ``limit`` option uses, and their class in shedder.limits."""

CLASSIFIERS = ("tenant-header",)
"""Classifiers by the name the ``classify`` option uses (see :func:`throttler_options`)."""

_TUPLE_OPTIONS = ("priorities", "trusted_peers")
"""Options JSON carries as lists that the middleware takes as tuples."""

Slowdown = tuple[tuple[float, float, float], ...]


def _tenant_header(request: Any) -> Any:
    """Each tenant (the ``x-tenant`` header) is a flow of the default class."""
    import shedder

    # By name: written against the API of issue 15, before it exists in every checkout.
    return getattr(shedder, "Classification")(flow=request.headers.get("x-tenant"))  # noqa: B009


def throttler_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The middleware's keyword arguments, with a named ``limit`` built into ``max_concurrency``
    and a ``deadlines`` object into :class:`shedder.Deadlines`.

    ``{"limit": {"vegas": {}}}`` gives ``max_concurrency=VegasLimit()``; ``ValueError`` for an
    unknown name, a malformed entry, or both ``limit`` and ``max_concurrency``.
    """
    built = dict(options)
    for key in _TUPLE_OPTIONS:
        if isinstance(built.get(key), list):
            built[key] = tuple(built[key])
    classifier = built.get("classify")
    if isinstance(classifier, str):
        if classifier not in CLASSIFIERS:
            raise ValueError(f"classify must name one of {', '.join(CLASSIFIERS)}")
        built["classify"] = _tenant_header
    if isinstance(built.get("deadlines"), dict):
        from shedder import Deadlines

        built["deadlines"] = Deadlines(**built["deadlines"])
    spec = built.pop("limit", None)
    if spec is None:
        return built
    if "max_concurrency" in built:
        raise ValueError("give either limit or max_concurrency, not both")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f'limit must be {{"name": {{kwargs}}}} with one name, got {spec!r}')
    ((name, kwargs),) = spec.items()
    if name not in LIMITS or not isinstance(kwargs, dict):
        raise ValueError(f"limit must name one of {', '.join(LIMITS)} with a kwargs object")
    from shedder import limits

    built["max_concurrency"] = getattr(limits, LIMITS[name])(**kwargs)
    return built


def _parse_slowdown(raw: str) -> Slowdown:
    value = json.loads(raw) if raw else []
    if not isinstance(value, list):
        raise ValueError(f"{SLOWDOWN_ENV} must be a JSON list of [start, end, factor]")
    return tuple(_check_stretch(item) for item in value)


def _check_stretch(item: object) -> tuple[float, float, float]:
    if (
        not isinstance(item, (list, tuple))
        or len(item) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in item)
    ):
        raise ValueError(f"a slowdown stretch must be [start_s, end_s, factor], got {item!r}")
    start, end, factor = (float(v) for v in item)
    if not 0 <= start < end or not factor > 0:
        raise ValueError(f"a slowdown needs 0 <= start < end and factor > 0, got {item!r}")
    return start, end, factor


@dataclass(frozen=True)
class AppSettings:
    """A route that holds one of ``pool`` database connections for ``hold_ms`` milliseconds.

    Capacity is ``pool / hold_ms * 1000`` requests per second. ``shedder`` holds the keyword
    arguments for ``LoadSheddingMiddleware`` (``max_concurrency``, ``max_queue``, ...), or is
    empty for the bare app. ``slowdown`` holds ``(start_s, end_s, factor)`` stretches, in
    seconds from the first query, during which a query holds its connection ``factor`` times
    longer.
    """

    pool: int = 8
    hold_ms: float = 20.0
    shedder: Mapping[str, Any] = field(default_factory=dict)
    slowdown: Slowdown = ()
    record: float = 0.0

    def __post_init__(self) -> None:
        if self.pool < 1:
            raise ValueError(f"pool must be >= 1, got {self.pool}")
        if not self.hold_ms > 0:
            raise ValueError(f"hold_ms must be > 0, got {self.hold_ms}")
        for stretch in self.slowdown:
            _check_stretch(stretch)

    @property
    def capacity(self) -> float:
        """Requests per second the simulated database can serve."""
        return self.pool * 1000.0 / self.hold_ms

    def factor_at(self, elapsed: float) -> float:
        """How many times slower a query is ``elapsed`` seconds after the first one."""
        for start, end, factor in self.slowdown:
            if start <= elapsed < end:
                return factor
        return 1.0

    def to_env(self) -> dict[str, str]:
        """The environment variables that make a server process build this app."""
        return {
            POOL_ENV: str(self.pool),
            HOLD_ENV: repr(self.hold_ms),
            SHEDDER_ENV: json.dumps(dict(self.shedder)) if self.shedder else "",
            SLOWDOWN_ENV: json.dumps([list(s) for s in self.slowdown]) if self.slowdown else "",
            RECORD_ENV: repr(self.record) if self.record else "",
        }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AppSettings:
        """Read the settings back; ``ValueError`` names a malformed variable."""
        env = os.environ if environ is None else environ
        try:
            pool = int(env.get(POOL_ENV, "8"))
            hold_ms = float(env.get(HOLD_ENV, "20"))
        except ValueError as exc:
            raise ValueError(f"{POOL_ENV} must be an int and {HOLD_ENV} a number: {exc}") from None
        raw = env.get(SHEDDER_ENV, "")
        options = json.loads(raw) if raw else {}
        if not isinstance(options, dict):
            raise ValueError(f"{SHEDDER_ENV} must be a JSON object, got {raw!r}")
        slowdown = _parse_slowdown(env.get(SLOWDOWN_ENV, ""))
        try:
            record = float(env.get(RECORD_ENV) or 0.0)
        except ValueError:
            raise ValueError(f"{RECORD_ENV} must be a period in seconds") from None
        return cls(pool=pool, hold_ms=hold_ms, shedder=options, slowdown=slowdown, record=record)
