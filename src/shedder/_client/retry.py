"""The retry decision behind ``shedder.client``, shared by its sync and async transports.

Framework-free: :meth:`RetryPolicy.plan` is a generator that makes every decision (whether to
send, retry, wait how long, give up how) and *yields* the I/O it needs. The sync and the async
transport only carry out those steps — send the request, read a response, sleep — so the
retry loop exists once.
"""

from __future__ import annotations

import dataclasses
import email.utils
import logging
import math
import random as _random
import re
import time
from collections.abc import Callable, Collection, Generator, Mapping
from dataclasses import dataclass, field
from datetime import timezone
from typing import Generic, Literal, Protocol, TypeVar, get_args

from shedder._core.checks import (
    check_bool,
    check_callable,
    check_choice,
    check_header_name,
    check_instance,
    check_int,
    check_seconds,
    check_sequence,
    check_strings,
    shown,
    typed,
)
from shedder._core.wire import _DEADLINE, REFUSED_HEADER, current_deadline, deadline_scope

from .budget import AdaptiveThrottle, ClientThrottled, RetryBudget

__all__ = [
    "IDEMPOTENT_METHODS",
    "REFUSED_HEADER",
    "RETRYABLE_STATUSES",
    "DeadlineFormat",
    "GiveUpReason",
    "RetryEvent",
    "RetryPolicy",
    "backoff_delay",
    "current_deadline",
    "deadline_scope",
    "format_timeout",
    "parse_retry_after",
]

logger = logging.getLogger("shedder.client")

IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
"""RFC 9110 idempotent methods: the ones retried by default."""

RETRYABLE_STATUSES: frozenset[int] = frozenset({429, 503})
"""Too Many Requests and Service Unavailable: the server refused, the request did no work."""


GiveUpReason = Literal["retries", "budget", "deadline", "throttled"]
"""Why a call ended on a refusal: retries used up, retry budget spent, no time left before the
call's deadline, or a retry refused locally by adaptive throttling."""

DeadlineFormat = Literal["seconds", "milliseconds", "grpc-timeout"]
"""How the remaining budget is written in ``RetryPolicy.deadline_header``."""

# RFC 9110 delay-seconds = 1*DIGIT, ASCII digits only ([0-9] never matches other scripts).
_DELAY_SECONDS = re.compile(r"[0-9]+")
# RFC 9110 method = token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Significant digits beyond this are more than three thousand years: capped without calling
# int(), which refuses very long strings since Python 3.11.
_MAX_DIGITS = 11


def parse_retry_after(value: str | None, *, now: float, cap: float) -> float | None:
    """Seconds to wait according to a ``Retry-After`` value, or None if absent or invalid.

    Both RFC 9110 forms: delay-seconds (``"120"``, leading zeros allowed: ``"007"`` is 7) and
    an HTTP-date (IMF-fixdate and the obsolete RFC 850 and asctime forms), read as UTC when it
    names no zone. A date in the past gives 0. The result is capped at ``cap`` seconds. ``now``
    is the current time in seconds since the epoch. Anything else (negative, fractional,
    non-ASCII digits, garbage) gives None: the caller falls back to its backoff.
    """
    if value is None:
        return None
    value = value.strip(" \t")
    if _DELAY_SECONDS.fullmatch(value):
        # Leading zeros carry no magnitude: "000000000001" is one second, not "very long".
        digits = value.lstrip("0") or "0"
        return cap if len(digits) > _MAX_DIGITS else min(float(int(digits)), cap)
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        delay = when.timestamp() - now
    except (TypeError, ValueError, OverflowError, IndexError, OSError):
        return None
    if math.isnan(delay):  # pragma: no cover - defensive: timestamps are finite
        return None
    return min(max(0.0, delay), cap)


def backoff_delay(
    retry: int, *, base_delay: float, max_delay: float, random: Callable[[], float]
) -> float:
    """Full jitter: uniform in [0, min(max_delay, base_delay * 2 ** (retry - 1))), seconds.

    ``retry`` is 1 for the first retry. ``random`` returns a float in [0, 1).
    """
    # Past ~1000 doublings the float overflows; long before that the cap applies.
    ceiling = max_delay if retry > 64 else min(max_delay, base_delay * 2.0 ** (retry - 1))
    return random() * ceiling


# --- deadlines: deadline_scope() and current_deadline() live in shedder._core.wire -------


# A grpc-timeout TimeoutValue has at most 8 digits; the finest unit that fits is used.
_GRPC_UNITS = (("m", 1e3), ("S", 1.0), ("M", 1 / 60), ("H", 1 / 3600))
_GRPC_MAX = 10**8 - 1


def format_timeout(seconds: float, format: DeadlineFormat) -> str:
    """Writes a remaining budget for a downstream header, rounded down (never promises more).

    ``"seconds"``: decimal seconds to the millisecond (``"1.25"``); ``"milliseconds"``: whole
    milliseconds (``"1250"``, as in ``x-envoy-expected-rq-timeout-ms``); ``"grpc-timeout"``:
    gRPC's TimeoutValue and unit (``"1250m"``, up to 8 digits, coarser units when needed).
    """
    milliseconds = math.floor(max(0.0, seconds) * 1000)
    if milliseconds and milliseconds / 1000 > seconds:
        milliseconds -= 1  # the product rounded up (large values): never promise more
    if format == "seconds":
        whole, fraction = divmod(milliseconds, 1000)
        return f"{whole}.{fraction:03d}".rstrip("0").rstrip(".")
    if format == "milliseconds":
        return str(milliseconds)
    if format == "grpc-timeout":
        for unit, per_second in _GRPC_UNITS:
            value = math.floor(milliseconds / 1000 * per_second)
            if value <= _GRPC_MAX:
                return f"{value}{unit}"
        return f"{_GRPC_MAX}H"
    raise ValueError(f"format must be one of {get_args(DeadlineFormat)}, got {format!r}")


@dataclass(slots=True)
class Call:
    """One logical call's shared state: its deadline, its sends and the retries it has used.

    A client keeps one per call across redirect hops, so that neither time nor retries start
    afresh at each hop. ``deadline`` is absolute ``time.monotonic()`` seconds (None: none).
    """

    deadline: float | None
    attempts: int = 0
    retries: int = 0

    def remaining(self, now: float) -> float | None:
        return None if self.deadline is None else self.deadline - now


# --- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """What a retry hook receives, once per retry, before the client waits."""

    attempt: int
    """1 for the first retry, 2 for the second, ... (counted over the whole call)."""
    delay: float
    """Seconds the client will wait before sending again."""
    reason: str
    """Why: ``"status 503"``, ``"status 429"``, or the connection error's class name."""
    status: int | None = None
    """The refused response's status, None after a connection error."""
    retry_after: float | None = None
    """The server's ``Retry-After`` in seconds (capped); None if absent or invalid."""
    error: Exception | None = None
    """The connection error being retried, if any."""


class _Response(Protocol):
    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...


R = TypeVar("R", bound=_Response)


@dataclass(frozen=True, slots=True)
class Send:
    """Step: send the request (again); reply with the response or a :class:`Failed`.

    ``remaining``: seconds left before the call's deadline (None: no deadline); the transport
    caps the attempt's timeouts at it and propagates it downstream if the policy says so.
    """

    remaining: float | None = None


@dataclass(frozen=True, slots=True)
class Read(Generic[R]):
    """Step: read the refused response to its end (releases the connection for reuse)."""

    response: R


@dataclass(frozen=True, slots=True)
class Sleep:
    """Step: wait this many seconds."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Failed:
    """Reply to :class:`Send` when sending raised; ``retryable`` for connection errors."""

    error: Exception
    retryable: bool


Step = Send | Read[R] | Sleep
Plan = Generator[Step[R], "R | Failed | None", R]

_WHY: dict[GiveUpReason, str] = {
    "retries": "no retries left",
    "budget": "the retry budget is spent",
    "deadline": "no time left before the call's deadline",
    "throttled": "adaptive throttling refused the retry",
}


def give_up_message(target: str, status: int, attempts: int, reason: GiveUpReason) -> str:
    """The message of the exception a call ends with when it gives up on a refusal."""
    plural = "" if attempts == 1 else "s"
    return f"{target}: still {status} after {attempts} attempt{plural} ({_WHY[reason]})"


def _check_status(name: str, status: object) -> int:
    if isinstance(status, bool) or not isinstance(status, int):
        raise TypeError(f"{name} must hold int statuses, got {typed(status)}")
    if not 100 <= status <= 599:
        raise ValueError(f"{name} must hold statuses 100..599, got {shown(status)}")
    return status


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How a client retries refused requests; immutable, shareable (the budget is shared too).

    - ``max_retries``: retries after the first attempt, over the whole call (redirect hops
      included); 0 disables retrying.
    - ``total_timeout``: the longest a whole call may take, in seconds, attempts, waits and
      redirect hops included (default 10; None: no limit of its own, the other bounds still
      hold). A wait that would end at or after the deadline is not taken: the call gives up at
      once. Each attempt's httpx timeouts are capped at the time left.
    - ``inherit_deadline``: inside :func:`deadline_scope` (which shedder's middlewares set from
      the request being served), the call ends by that deadline too (default True).
    - ``deadline_header``: send the time left downstream in this request header on every
      attempt (default None: not sent); ``deadline_format`` (see :func:`format_timeout`)
      defaults to ``"grpc-timeout"`` for a header named ``grpc-timeout``, ``"milliseconds"``
      for one ending in ``-ms``, else ``"seconds"``.
    - ``base_delay``, ``max_delay``: exponential backoff with full jitter when the server gives
      no usable ``Retry-After``: retry *n* waits uniformly in
      ``[0, min(max_delay, base_delay * 2 ** (n - 1)))`` seconds.
    - ``max_retry_after``: the longest ``Retry-After`` honoured, in seconds; longer ones are
      capped. A ``Retry-After`` wait gets up to ``base_delay`` of extra jitter (never less),
      so clients shed together do not all come back in the same instant.
    - ``retry_statuses``: responses that mean "refused, try later" (default 429 and 503).
    - ``retry_methods``: methods that may be retried (default the idempotent ones). A request
      whose body is a stream that cannot be replayed is never retried.
    - ``retry_unprocessed``: also retry any other method (POST included) when the refusal
      carries :data:`REFUSED_HEADER`, shedder's promise that the app never saw it (default
      True).
    - ``raise_on_exhausted``: when the call gives up on a refusal (retries used up, budget
      spent, no time left, retry throttled), raise ``GaveUp`` carrying the last response
      (default) or return that response.
    - ``budget``: a :class:`RetryBudget` (default: a new one per policy); None: no budget.
    - ``throttle``: an optional :class:`AdaptiveThrottle`; it refuses locally with
      :class:`ClientThrottled` when the server has been refusing most requests.
    - ``on_retry``: called with a :class:`RetryEvent` before each retry's wait (exceptions it
      raises are logged and swallowed). Every retry is also logged on ``shedder.client``.
    - ``clock`` (seconds since the epoch, to read HTTP-dates), ``monotonic`` (seconds, for
      deadlines) and ``random`` (uniform in [0, 1), for jitter) are injectable for tests.
    """

    max_retries: int = 3
    total_timeout: float | None = 10.0
    inherit_deadline: bool = True
    deadline_header: str | None = None
    deadline_format: DeadlineFormat | None = None
    base_delay: float = 0.25
    max_delay: float = 10.0
    max_retry_after: float = 60.0
    retry_statuses: Collection[int] = RETRYABLE_STATUSES
    retry_methods: Collection[str] = IDEMPOTENT_METHODS
    retry_unprocessed: bool = True
    raise_on_exhausted: bool = True
    budget: RetryBudget | None = field(default_factory=RetryBudget)
    throttle: AdaptiveThrottle | None = None
    on_retry: Callable[[RetryEvent], None] | None = None
    clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    random: Callable[[], float] = _random.random

    def __post_init__(self) -> None:
        check_int("max_retries", self.max_retries, 0)
        if self.total_timeout is not None:
            seconds = check_seconds("total_timeout", self.total_timeout, positive=True, finite=True)
            object.__setattr__(self, "total_timeout", seconds)
        for name in ("inherit_deadline", "retry_unprocessed", "raise_on_exhausted"):
            check_bool(name, getattr(self, name))
        self._check_deadline_header()
        for name in ("base_delay", "max_delay", "max_retry_after"):
            object.__setattr__(self, name, check_seconds(name, getattr(self, name), finite=True))
        if self.max_delay < self.base_delay:
            raise ValueError(
                f"max_delay must be >= base_delay, {self.base_delay}, got {self.max_delay}"
            )
        # Normalised once: membership tests on every response, methods in any case.
        statuses = check_sequence("retry_statuses", self.retry_statuses)
        object.__setattr__(
            self,
            "retry_statuses",
            frozenset(_check_status("retry_statuses", status) for status in statuses),
        )
        methods = check_strings("retry_methods", self.retry_methods)
        for method in methods:
            if not _TOKEN.fullmatch(method):
                raise ValueError(f"retry_methods must hold HTTP methods, got {shown(method)}")
        object.__setattr__(self, "retry_methods", frozenset(m.upper() for m in methods))
        if self.budget is not None:
            check_instance("budget", self.budget, RetryBudget, "a RetryBudget")
        if self.throttle is not None:
            check_instance(
                "throttle", self.throttle, AdaptiveThrottle, "an AdaptiveThrottle or None"
            )
        if self.on_retry is not None:
            check_callable("on_retry", self.on_retry)
        for name in ("clock", "monotonic", "random"):
            check_callable(name, getattr(self, name))

    def _check_deadline_header(self) -> None:
        header, fmt = self.deadline_header, self.deadline_format
        if header is not None:
            header = check_header_name("deadline_header", header)
            object.__setattr__(self, "deadline_header", header)
        if fmt is not None:
            check_choice("deadline_format", fmt, get_args(DeadlineFormat))
        if fmt is None and header is not None:
            name = header.lower()
            inferred: DeadlineFormat = (
                "grpc-timeout"
                if name == "grpc-timeout"
                else "milliseconds"
                if name.endswith("-ms")
                else "seconds"
            )
            object.__setattr__(self, "deadline_format", inferred)

    def start_call(self) -> Call:
        """The state of a new logical call: its deadline from ``total_timeout`` and, if
        ``inherit_deadline``, the :func:`deadline_scope` in force, whichever comes first."""
        deadline = None if self.total_timeout is None else self.monotonic() + self.total_timeout
        inherited = _DEADLINE.get() if self.inherit_deadline else None
        if inherited is not None and (deadline is None or inherited < deadline):
            deadline = inherited
        return Call(deadline)

    def deadline_value(self, remaining: float) -> str:
        """The ``deadline_header`` value for ``remaining`` seconds, in ``deadline_format``."""
        return format_timeout(remaining, self.deadline_format or "seconds")

    def plan(
        self,
        method: str,
        *,
        replayable: bool,
        target: str,
        exhausted: Callable[[R, int, GiveUpReason], Exception],
        expired: Callable[[], Exception],
        call: Call | None = None,
    ) -> Plan[R]:
        """Makes every decision for one request, yielding the I/O steps a transport performs.

        ``replayable``: the body can be sent again. ``target`` names the request in logs.
        ``exhausted(response, attempts, reason)`` builds the exception raised when the call
        gives up on a refusal (``attempts``: sends over the whole call); ``expired()`` the one
        raised when the deadline has passed before anything could be sent. ``call``: the
        logical call this request belongs to (a redirect hop); a new one by default. The
        generator returns the response to give the caller or raises; it may raise
        :class:`ClientThrottled` before the first send.
        """
        call = self.start_call() if call is None else call
        method_retryable = replayable and method.upper() in self.retry_methods
        if self.throttle is not None:
            self.throttle.admit()
        if self.budget is not None:
            self.budget.deposit()
        last: R | None = None  # the last refusal, already read
        while True:
            remaining = call.remaining(self.monotonic())
            if remaining is not None and remaining <= 0:
                # Only after a wait that the clock overran: the waits themselves end earlier.
                if last is None:
                    raise expired()
                return (yield from self._give_up(last, call, "deadline", target, exhausted))
            outcome = yield Send(remaining)
            call.attempts += 1
            if isinstance(outcome, Failed):
                event = RetryEvent(0, 0.0, type(outcome.error).__name__, error=outcome.error)
                if not (method_retryable and outcome.retryable):
                    raise outcome.error
                delay = self._delay(event, call.retries + 1)
                if self._stop(call, delay, target) is not None:
                    raise outcome.error
            elif outcome is None:  # pragma: no cover - a transport bug, not a user error
                raise RuntimeError("a transport must answer Send with a response or Failed")
            elif outcome.status_code not in self.retry_statuses:
                if self.throttle is not None:
                    self.throttle.record_accepted()
                return outcome
            else:
                retry_after = parse_retry_after(
                    outcome.headers.get("retry-after"), now=self.clock(), cap=self.max_retry_after
                )
                event = RetryEvent(
                    0, 0.0, f"status {outcome.status_code}", outcome.status_code, retry_after
                )
                unprocessed = self.retry_unprocessed and _refused_by_shedder(outcome.headers)
                if not (method_retryable or (replayable and unprocessed)):
                    return outcome  # not a request this policy retries: no retry was tried
                delay = self._delay(event, call.retries + 1)
                reason = self._stop(call, delay, target)
                if reason is not None:
                    return (yield from self._give_up(outcome, call, reason, target, exhausted))
                yield Read(outcome)
                last = outcome
            call.retries += 1
            yield Sleep(self._announce(event, call.retries, delay, target))

    def _give_up(
        self,
        response: R,
        call: Call,
        reason: GiveUpReason,
        target: str,
        exhausted: Callable[[R, int, GiveUpReason], Exception],
    ) -> Generator[Step[R], R | Failed | None, R]:
        """Ends the call on ``response``: raised inside ``exhausted(...)`` or returned."""
        attempts = call.attempts
        logger.info(
            "%s: gave up on %d after %d attempt%s: %s",
            target,
            response.status_code,
            attempts,
            "" if attempts == 1 else "s",
            _WHY[reason],
            extra={"give_up_reason": reason},
        )
        if not self.raise_on_exhausted:
            return response
        yield Read(response)
        raise exhausted(response, attempts, reason)

    def _delay(self, event: RetryEvent, retry: int) -> float:
        if event.retry_after is None:
            return backoff_delay(
                retry, base_delay=self.base_delay, max_delay=self.max_delay, random=self.random
            )
        return event.retry_after + self.random() * self.base_delay

    def _stop(self, call: Call, delay: float, target: str) -> GiveUpReason | None:
        """Why the next retry (after ``delay`` s) must not happen, or None if it may.

        Checks the retry count, the deadline, the budget and the throttle, in that order: the
        last two spend what they grant, so they come last.
        """
        if call.retries >= self.max_retries:
            return "retries"
        remaining = call.remaining(self.monotonic())
        if remaining is not None and delay >= remaining:
            # Sleeping into the deadline only to be cut off there helps no one: stop now.
            return "deadline"
        if self.budget is not None and not self.budget.try_withdraw():
            return "budget"
        if self.throttle is not None:
            try:
                self.throttle.admit()
            except ClientThrottled as exc:
                logger.info("%s: not retried: %s", target, exc)
                return "throttled"
        return None

    def _announce(self, event: RetryEvent, retry: int, delay: float, target: str) -> float:
        """Logs this retry and calls the hook; returns the delay."""
        event = dataclasses.replace(event, attempt=retry, delay=delay)
        logger.info(
            "%s: retry %d of %d in %.3f s (%s)",
            target,
            retry,
            self.max_retries,
            delay,
            event.reason,
            extra={"retry_attempt": retry, "retry_delay": delay, "retry_reason": event.reason},
        )
        if self.on_retry is not None:
            try:
                self.on_retry(event)
            except Exception:
                logger.exception("shedder retry hook %r failed", self.on_retry)
        return delay


def _refused_by_shedder(headers: Mapping[str, str]) -> bool:
    return headers.get(REFUSED_HEADER, "").strip() == "1"
