"""What both sides of the wire agree on: the deadline of the request being served, and the
header that marks shedder's own refusals.

The middlewares set the deadline (from ``grpc-timeout``, Envoy's header, ...) for the app's
code; the client reads it, so a call made while serving a request ends by that request's
deadline and can pass the rest of the budget downstream.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

__all__ = ["REFUSED_HEADER", "current_deadline", "deadline_scope"]

REFUSED_HEADER = "x-shedder-refused"
"""Response header shedder sends (value ``1``) on every refusal of its own: the application
never saw the request, so any method may be sent again, POST included."""


# The deadline of the request being served (absolute time.monotonic() seconds), set by
# shedder's middlewares or by deadline_scope(); read by every client call made meanwhile.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "shedder_deadline", default=None
)


@contextlib.contextmanager
def deadline_scope(deadline: float | None) -> Iterator[float | None]:
    """Within the block, client calls end by ``deadline`` (absolute ``time.monotonic()`` s).

    Give it the deadline of the request being served, e.g. ``scope["shedder.deadline"]`` (the
    WSGI environ has the same key); None leaves the current deadline as it is. Scopes nest: an
    inner scope can shorten the deadline, never extend it. Yields the deadline in force. Works
    in threads and tasks alike (a context variable).
    """
    if deadline is not None:
        if isinstance(deadline, bool) or not isinstance(deadline, (int, float)):
            raise TypeError(f"deadline must be a number or None, got {deadline!r}")
        if math.isnan(deadline):
            raise ValueError(f"deadline must be a number, got {deadline!r}")
    outer = _DEADLINE.get()
    if deadline is None or (outer is not None and outer <= deadline):
        effective = outer
    else:
        effective = float(deadline)
    token = _DEADLINE.set(effective)
    try:
        yield effective
    finally:
        _DEADLINE.reset(token)


def current_deadline() -> float | None:
    """The deadline in force (absolute ``time.monotonic()`` seconds), or None if there is none."""
    return _DEADLINE.get()
