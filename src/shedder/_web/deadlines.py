"""Request deadlines from the wire: how long the caller will wait, and how long it already has.

Formats read (each can be switched off in :class:`Deadlines`):

- ``grpc-timeout``: ``<1-8 digits><unit>``, unit one of ``H M S m u n`` (gRPC over HTTP/2).
- ``x-envoy-expected-rq-timeout-ms``: whole milliseconds (Envoy's router); ``0`` is Envoy's
  "no timeout", so it sets no deadline.
- an operator-named header in seconds (``Deadlines(header="x-request-timeout")``).
- ``x-request-start``: when a proxy in front (nginx, Heroku's router) first saw the request,
  ``t=<unix time>`` in seconds (``1700000000.123``), milliseconds, microseconds or
  nanoseconds; the time since then was already spent before the request reached this process.

A malformed, negative, huge or overflowing value is ignored, never an error: a header is the
client's word, and a bad one must not cost it a 500. Ignored values are counted, and reported
at debug level on the ``shedder`` logger: the first of each header at once, then at most one
record a minute per header with the count since the last one.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from shedder._core.checks import check_bool, check_header_name, check_seconds

__all__ = [
    "Deadlines",
    "parse_grpc_timeout",
    "parse_milliseconds",
    "parse_request_start",
    "parse_seconds",
]

logger = logging.getLogger("shedder")

_GRPC_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_GRPC_TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")
_MILLISECONDS = re.compile(r"[0-9]{1,12}")
_SECONDS = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP field name (RFC 9110)
_REQUEST_START = re.compile(r"(?:t=)?([0-9]{1,20}(?:\.[0-9]{1,9})?)")

# Values above these are garbage, not deadlines: a year of budget, a day spent in front (or,
# for a start in the future, a day of clock skew).
_MAX_BUDGET = 365 * 86_400.0
_MAX_SPENT = 86_400.0

_LOG_INTERVAL = 60.0
# Per header name: [values ignored since the last record, time of the last record or None].
_ignored_since: dict[str, list[float]] = {}


def _ignored(header: str, value: str) -> None:
    """Count one ignored value; a debug record for the first, then at most one a minute.

    A flood of bad values must not flood the logs, nor cost a log call per request; and a
    record is only "spent" while debug logging is on, so turning it on later still shows one.
    """
    state = _ignored_since.get(header)
    if state is None:
        state = _ignored_since[header] = [0, -math.inf]
    state[0] += 1
    now = time.monotonic()
    if now - state[1] < _LOG_INTERVAL or not logger.isEnabledFor(logging.DEBUG):
        return
    count, state[0], state[1] = int(state[0]), 0, now
    logger.debug(
        "shedder ignored %d malformed %s header value(s), the latest %.64r",
        count,
        header,
        value,
    )


def parse_grpc_timeout(value: str) -> float | None:
    """Seconds from a ``grpc-timeout`` value (``"100m"`` -> 0.1), or None if malformed."""
    match = _GRPC_TIMEOUT.fullmatch(value.strip())
    if match is None:
        _ignored("grpc-timeout", value)
        return None
    return _budget(int(match.group(1)) * _GRPC_UNITS[match.group(2)], "grpc-timeout", value)


def parse_milliseconds(value: str, header: str = "x-envoy-expected-rq-timeout-ms") -> float | None:
    """Seconds from whole milliseconds (``"250"`` -> 0.25), or None if malformed.

    ``"0"`` is None too: Envoy sends it for a route without a timeout.
    """
    stripped = value.strip()
    if _MILLISECONDS.fullmatch(stripped) is None:
        _ignored(header, value)
        return None
    milliseconds = int(stripped)
    if milliseconds == 0:
        return None
    return _budget(milliseconds / 1000.0, header, value)


def parse_seconds(value: str, header: str) -> float | None:
    """Seconds from a decimal number of seconds (``"1.5"``), or None if malformed."""
    stripped = value.strip()
    if _SECONDS.fullmatch(stripped) is None:
        _ignored(header, value)
        return None
    return _budget(float(stripped), header, value)


def _budget(seconds: float, header: str, value: str) -> float | None:
    if seconds > _MAX_BUDGET:  # well formed, but garbage: no caller waits a year
        _ignored(header, value)
        return None
    return seconds


def parse_request_start(value: str, now: float) -> float | None:
    """Seconds already spent since ``X-Request-Start`` (``t=`` unix s, ms or µs), or None.

    ``now`` is the current unix time. The unit is told by magnitude (a unix time in seconds
    has 10 digits before the point, in milliseconds 13, in microseconds 16, in nanoseconds
    19). A start slightly in the future (clock skew between hosts) counts as nothing spent; one
    more than a day away from ``now``, either way, is garbage.
    """
    match = _REQUEST_START.fullmatch(value.strip())
    if match is None:
        _ignored("x-request-start", value)
        return None
    stamp = float(match.group(1))
    if stamp >= 1e17:
        stamp /= 1e9
    elif stamp >= 1e14:
        stamp /= 1e6
    elif stamp >= 1e11:
        stamp /= 1e3
    spent = now - stamp
    if not math.isfinite(spent) or abs(spent) > _MAX_SPENT:
        _ignored("x-request-start", value)
        return None
    return max(spent, 0.0)


@dataclass(frozen=True, slots=True)
class Deadlines:
    """Where a request's deadline comes from, for the middlewares' ``deadlines=`` argument.

    Args:
        grpc_timeout: read ``grpc-timeout``.
        envoy: read ``x-envoy-expected-rq-timeout-ms``.
        header: also read this header, a number of seconds (None: none).
        request_start: subtract the time since ``x-request-start`` (set by nginx or Heroku's
            router) from the budget, and count it against ``queue_timeout``.
        max_budget: the longest budget taken from a peer that is not in the middleware's
            ``trusted_peers``, in seconds (a longer one is cut to this).
        margin: seconds kept for the work itself: a request waits for a slot at most until
            ``deadline - margin`` (one that arrives with less than ``margin`` left is refused
            at once). ``"auto"`` (the default): the throttler's observed service time
            (:attr:`shedder.Throttler.service_time`; nothing before the first request is
            served). The deadline the app sees is not moved by it.

    The first of ``grpc-timeout``, Envoy's header and ``header`` present and well formed gives
    the budget. ``TypeError`` or ``ValueError`` for a bad setting, naming it.
    """

    grpc_timeout: bool = True
    envoy: bool = True
    header: str | None = None
    request_start: bool = True
    max_budget: float = 60.0
    margin: float | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        for name in ("grpc_timeout", "envoy", "request_start"):
            check_bool(name, getattr(self, name))
        if self.header is not None:
            object.__setattr__(self, "header", check_header_name("header", self.header))
        check_seconds("max_budget", self.max_budget)
        if isinstance(self.margin, str) and self.margin != "auto":
            raise TypeError(f'margin must be a number of seconds or "auto", got {self.margin!r}')
        if self.margin != "auto":
            # An infinite margin would refuse every request that carries a deadline.
            check_seconds("margin", self.margin, finite=True)

    def header_names(self) -> tuple[str, ...]:
        """The (lower-case) request headers these settings read."""
        names = []
        if self.grpc_timeout:
            names.append("grpc-timeout")
        if self.envoy:
            names.append("x-envoy-expected-rq-timeout-ms")
        if self.header is not None:
            names.append(self.header.lower())
        if self.request_start:
            names.append("x-request-start")
        return tuple(names)

    def read(self, get: Callable[[str], str | None], wall_now: float) -> tuple[float | None, float]:
        """``(budget, spent)``: the seconds the caller allows (None: no deadline), and the
        seconds of them already spent in front of this process (0.0 if unknown), so
        ``budget - spent`` are left. ``get`` reads a lower-case header (None if absent);
        ``wall_now`` is ``time.time()``. The budget is not yet capped for untrusted peers
        (see ``max_budget``)."""
        budget: float | None = None
        if self.grpc_timeout and (value := get("grpc-timeout")) is not None:
            budget = parse_grpc_timeout(value)
        envoy = get("x-envoy-expected-rq-timeout-ms") if budget is None and self.envoy else None
        if envoy is not None:
            budget = parse_milliseconds(envoy)
        own = get(self.header.lower()) if budget is None and self.header is not None else None
        if own is not None:
            budget = parse_seconds(own, self.header or "")
        spent = 0.0
        if self.request_start and (value := get("x-request-start")) is not None:
            spent = parse_request_start(value, wall_now) or 0.0
        return budget, spent
