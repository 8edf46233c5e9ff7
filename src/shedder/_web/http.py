"""HTTP pieces shared by the ASGI and WSGI adapters: the shed and health responses.

Framework-free: a response is a status, a header list and a body, which each adapter turns
into its own protocol's messages.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus

from shedder._core.checks import check_sequence
from shedder._core.errors import Overloaded
from shedder._core.throttler import Throttler
from shedder._core.wire import REFUSED_HEADER

from .instance import InstanceStats, InstanceTable

__all__ = [
    "DEFAULT_HEALTH_PATH",
    "DEFAULT_LIVE_PATH",
    "SHED_LOG_INTERVAL",
    "HTTPResponse",
    "ShedLog",
    "ShedResponder",
    "health_response",
    "instance_stats",
    "live_response",
    "method_not_allowed_response",
    "normalize_path_rules",
    "path_matches",
    "shed_response",
]

DEFAULT_HEALTH_PATH = "/health/load"
DEFAULT_LIVE_PATH = "/health/live"

_REASON_PHRASES = {200: "OK", 429: "Too Many Requests", 503: "Service Unavailable"}


def _reason_phrase(status: int) -> str:
    phrase = _REASON_PHRASES.get(status)
    if phrase is None:
        # Custom responders may pick any status; PEP 3333 wants a reason phrase with it.
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
    return phrase


@dataclass(frozen=True, slots=True)
class HTTPResponse:
    """A complete small response: ``headers`` are latin-1 ``(name, value)`` pairs."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def status_line(self) -> str:
        """``"503 Service Unavailable"``: the WSGI ``start_response`` status."""
        return f"{self.status} {_reason_phrase(self.status)}".rstrip()

    def without_body(self) -> HTTPResponse:
        """The same response for a HEAD request: headers kept, content-length included."""
        return HTTPResponse(self.status, self.headers, b"")


ShedResponder = Callable[[Overloaded], HTTPResponse]
"""Builds the response for a refused request; pass one to an adapter to customise 503s."""


SHED_LOG_INTERVAL = 10.0
"""Seconds between two shed log lines of one adapter: one line, then a summary per interval."""

logger = logging.getLogger("shedder")


class ShedLog:
    """One structured WARNING on the ``shedder`` logger per refusal, at most one per interval.

    Under overload an adapter may refuse thousands of requests a second; a line for each would
    cost more than the refusal. The first refusal is logged at once; later ones within
    ``interval`` seconds are counted and reported with the next line. The fields are also in
    the record's ``extra``: ``shedder_throttler``, ``shedder_reason``, ``shedder_retry_after``
    and ``shedder_suppressed``.
    """

    __slots__ = ("_interval", "_lock", "_next", "_suppressed", "_throttler")

    def __init__(self, throttler: str, interval: float = SHED_LOG_INTERVAL) -> None:
        self._throttler = throttler
        self._interval = interval
        self._next = 0.0  # monotonic time from which the next line may be written
        self._suppressed = 0
        self._lock = threading.Lock()

    def __call__(self, refusal: Overloaded) -> None:
        now = time.monotonic()
        if now < self._next:
            # The common case under overload, read without the lock: a count lost to a race
            # only makes the next line's "more shed" figure a little low.
            self._suppressed += 1
            return
        with self._lock:
            if now < self._next:
                self._suppressed += 1
                return
            self._next = now + self._interval
            suppressed, self._suppressed = self._suppressed, 0
        if not logger.isEnabledFor(logging.WARNING):
            return
        logger.warning(
            "shed a request: throttler=%s reason=%s priority=%s retry_after=%d (%d more shed"
            " since the last line)",
            self._throttler,
            refusal.reason,
            refusal.priority,
            refusal.retry_after,
            suppressed,
            extra={
                "shedder_throttler": self._throttler,
                "shedder_reason": refusal.reason,
                "shedder_priority": refusal.priority,
                "shedder_retry_after": refusal.retry_after,
                "shedder_suppressed": suppressed,
            },
        )


def _json_response(
    status: int, payload: object, extra: Iterable[tuple[str, str]] = ()
) -> HTTPResponse:
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = (
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("cache-control", "no-store"),
        *extra,
    )
    return HTTPResponse(status, headers, body)


def shed_response(refusal: Overloaded, status: int = 503) -> HTTPResponse:
    """The contract's refusal: ``status`` (503, or 429), ``Retry-After`` and a small JSON body."""
    return _json_response(
        status,
        {"error": "overloaded", "reason": refusal.reason, "retry_after": refusal.retry_after},
        (("retry-after", str(refusal.retry_after)), (REFUSED_HEADER, "1")),
    )


def instance_stats(
    throttlers: Sequence[Throttler], table: InstanceTable | None = None
) -> list[InstanceStats]:
    """Figures of ``throttlers``: this process's, or the whole instance's through ``table``.

    A throttler listed twice is reported once (the first time); distinct throttlers that share
    a name are each reported. Publishes this process's throttlers to ``table`` first (once per
    process). Never fails because of the table (see :meth:`InstanceTable.report`).
    """
    unique = list({id(throttler): throttler for throttler in throttlers}.values())
    if table is None:
        return [InstanceStats(throttler.stats(), None) for throttler in unique]
    table.publish_all(unique)
    return [table.report(throttler) for throttler in unique]


def health_response(
    throttlers: Sequence[Throttler], table: InstanceTable | None = None
) -> HTTPResponse:
    """``/health/load``: the status of everything, and every throttler's figures.

    ``status`` (and the HTTP code: 200 or 503) is the worst over all ``throttlers`` and, with
    ``table`` (several worker processes), over all workers: one worker that is shedding, or
    shed within the last second, makes the instance ``"overloaded"``. The other top-level
    fields are the first throttler's (the adapter's own); ``throttlers`` lists each one's
    figures, with its own ``status``, and with a table ``workers`` (records summed) and
    ``shedding_workers``.
    """
    if not throttlers:
        raise ValueError("health_response needs at least one throttler")
    reports = instance_stats(throttlers, table)
    entries = []
    for report in reports:
        entry = report.stats.as_dict()
        entry["status"] = "overloaded" if report.overloaded else "ok"
        if report.workers is not None:
            entry["workers"] = report.workers
            entry["shedding_workers"] = report.shedding_workers
        entries.append(entry)
    overloaded = any(report.overloaded for report in reports)
    payload = dict(entries[0])
    payload["status"] = "overloaded" if overloaded else "ok"
    payload["throttlers"] = entries
    return _json_response(503 if overloaded else 200, payload)


def live_response() -> HTTPResponse:
    """``/health/live``: always ``200 {"status": "alive"}``, whatever the load.

    For liveness (and readiness) probes that must not fail because the instance is busy: a
    process that can answer this is alive, and shedding already protects it from overload.
    """
    return _json_response(200, {"status": "alive"})


def method_not_allowed_response(allow: Sequence[str] = ("GET", "HEAD")) -> HTTPResponse:
    """``405 Method Not Allowed`` with the ``Allow`` header, for a method an endpoint refuses."""
    allowed = ", ".join(allow)
    return _json_response(
        405, {"error": "method_not_allowed", "allow": allowed}, (("allow", allowed),)
    )


def normalize_path_rules(exempt: Iterable[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    """Split exemption rules into exact paths and prefixes (rules ending in ``/`` or ``*``).

    ``"/metrics"`` exempts exactly that path; ``"/static/"`` and ``"/static*"`` exempt every
    path under the prefix. Raises ``ValueError`` for a rule that is not an absolute path.
    """
    if isinstance(exempt, str):
        raise TypeError("exempt must be an iterable of paths, not a single string")
    exact: set[str] = set()
    prefixes: list[str] = []
    for rule in check_sequence("exempt", exempt):
        if not isinstance(rule, str) or not rule.startswith("/"):
            raise ValueError(f"exempt paths must start with '/', got {rule!r}")
        if rule.endswith("*"):
            prefixes.append(rule[:-1])
        elif rule.endswith("/") and rule != "/":
            prefixes.append(rule)
        else:
            exact.add(rule)
    return frozenset(exact), tuple(prefixes)


def path_matches(path: str, exact: Collection[str], prefixes: tuple[str, ...]) -> bool:
    """True if ``path`` is one of ``exact`` or starts with one of ``prefixes``."""
    return path in exact or (bool(prefixes) and path.startswith(prefixes))
