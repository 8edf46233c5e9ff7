"""Request deadlines from the wire: how long the caller will wait, and how long it already has.

Formats read (each can be switched off in :class:`Deadlines`):

- ``grpc-timeout``: ``<1-8 digits><unit>``, unit one of ``H M S m u n`` (gRPC over HTTP/2).
- ``x-envoy-expected-rq-timeout-ms``: whole milliseconds (Envoy's router).
- an operator-named header in seconds (``Deadlines(header="x-request-timeout")``).
- ``x-request-start``: when a proxy in front (nginx, Heroku's router) first saw the request,
  ``t=<unix time>`` in seconds (``1700000000.123``), milliseconds or microseconds; the time
  since then was already spent before the request reached this process.

A malformed, negative, huge or overflowing value is ignored (and logged once at debug level),
never an error: a header is the client's word, and a bad one must not cost it a 500.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

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
_REQUEST_START = re.compile(r"(?:t=)?([0-9]{1,20}(?:\.[0-9]{1,9})?)")

# Values above these are garbage, not deadlines: a year of budget, a day spent in front.
_MAX_BUDGET = 365 * 86_400.0
_MAX_SPENT = 86_400.0

_warned: set[str] = set()


def _ignored(header: str, value: str) -> None:
    if header not in _warned:  # once per header name: a flood of bad values must not flood logs
        _warned.add(header)
        logger.debug("shedder ignored a malformed %s header: %.64r", header, value)


def parse_grpc_timeout(value: str) -> float | None:
    """Seconds from a ``grpc-timeout`` value (``"100m"`` -> 0.1), or None if malformed."""
    match = _GRPC_TIMEOUT.fullmatch(value.strip())
    if match is None:
        _ignored("grpc-timeout", value)
        return None
    return int(match.group(1)) * _GRPC_UNITS[match.group(2)]


def parse_milliseconds(value: str, header: str = "x-envoy-expected-rq-timeout-ms") -> float | None:
    """Seconds from whole milliseconds (``"250"`` -> 0.25), or None if malformed."""
    value = value.strip()
    if _MILLISECONDS.fullmatch(value) is None:
        _ignored(header, value)
        return None
    return int(value) / 1000.0


def parse_seconds(value: str, header: str) -> float | None:
    """Seconds from a decimal number of seconds (``"1.5"``), or None if malformed."""
    value = value.strip()
    if _SECONDS.fullmatch(value) is None:
        _ignored(header, value)
        return None
    return float(value)


def parse_request_start(value: str, now: float) -> float | None:
    """Seconds already spent since ``X-Request-Start`` (``t=`` unix s, ms or µs), or None.

    ``now`` is the current unix time. The unit is told by magnitude (a unix time in seconds
    has 10 digits before the point, in milliseconds 13, in microseconds 16). A start in the
    future (clock skew between hosts) counts as nothing spent.
    """
    match = _REQUEST_START.fullmatch(value.strip())
    if match is None:
        _ignored("x-request-start", value)
        return None
    stamp = float(match.group(1))
    if stamp >= 1e14:
        stamp /= 1e6
    elif stamp >= 1e11:
        stamp /= 1e3
    spent = now - stamp
    if not math.isfinite(spent) or spent > _MAX_SPENT:
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
            ``deadline - margin``.
    """

    grpc_timeout: bool = True
    envoy: bool = True
    header: str | None = None
    request_start: bool = True
    max_budget: float = 60.0
    margin: float = 0.0

    def __post_init__(self) -> None:
        for name in ("grpc_timeout", "envoy", "request_start"):
            check_bool(name, getattr(self, name))
        if self.header is not None:
            object.__setattr__(self, "header", check_header_name("header", self.header))
        check_seconds("max_budget", self.max_budget)
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
        """``(budget, spent)``: seconds the caller allows from now (None: no deadline), and
        seconds already spent in front of this process (0.0 if unknown). The budget is not
        yet capped for untrusted peers (see ``max_budget``)."""
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
        if budget is not None and budget > _MAX_BUDGET:
            budget = None  # garbage, not a deadline
        return budget, spent
