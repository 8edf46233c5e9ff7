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
from typing import Generic, Protocol, TypeVar

from .budget import AdaptiveThrottle, ClientThrottled, RetryBudget

__all__ = [
    "IDEMPOTENT_METHODS",
    "RETRYABLE_STATUSES",
    "RetryEvent",
    "RetryPolicy",
    "backoff_delay",
    "parse_retry_after",
]

logger = logging.getLogger("shedder.client")

IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
"""RFC 9110 idempotent methods: the ones retried by default."""

RETRYABLE_STATUSES: frozenset[int] = frozenset({429, 503})
"""Too Many Requests and Service Unavailable: the server refused, the request did no work."""

# RFC 9110 delay-seconds = 1*DIGIT, ASCII digits only ([0-9] never matches other scripts).
_DELAY_SECONDS = re.compile(r"[0-9]+")
# More digits than this is more than three thousand years: capped without calling int(),
# which refuses very long strings since Python 3.11.
_MAX_DIGITS = 11


def parse_retry_after(value: str | None, *, now: float, cap: float) -> float | None:
    """Seconds to wait according to a ``Retry-After`` value, or None if absent or invalid.

    Both RFC 9110 forms: delay-seconds (``"120"``) and an HTTP-date, read as UTC when it names
    no zone. A date in the past gives 0. The result is capped at ``cap`` seconds. ``now`` is
    the current time in seconds since the epoch. Anything else (negative, fractional,
    non-ASCII digits, garbage) gives None: the caller falls back to its backoff.
    """
    if value is None:
        return None
    value = value.strip(" \t")
    if _DELAY_SECONDS.fullmatch(value):
        return cap if len(value) > _MAX_DIGITS else min(float(int(value)), cap)
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        delay = when.timestamp() - now
    except (TypeError, ValueError, OverflowError, IndexError, OSError):
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


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """What a retry hook receives, once per retry, before the client waits."""

    attempt: int
    """1 for the first retry, 2 for the second, ..."""
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
    """Step: send the request (again); reply with the response or a :class:`Failed`."""


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
_SEND = Send()


def _check_delay(name: str, value: float, minimum: float = 0.0) -> None:
    if not minimum <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How a client retries refused requests; immutable, shareable (the budget is shared too).

    - ``max_retries``: retries after the first attempt (0 disables retrying).
    - ``base_delay``, ``max_delay``: exponential backoff with full jitter when the server gives
      no usable ``Retry-After``: retry *n* waits uniformly in
      ``[0, min(max_delay, base_delay * 2 ** (n - 1)))`` seconds.
    - ``max_retry_after``: the longest ``Retry-After`` honoured, in seconds; longer ones are
      capped. A ``Retry-After`` wait gets up to ``base_delay`` of extra jitter (never less),
      so clients shed together do not all come back in the same instant.
    - ``retry_statuses``: responses that mean "refused, try later" (default 429 and 503).
    - ``retry_methods``: methods that may be retried (default the idempotent ones). A request
      whose body is a stream that cannot be replayed is never retried.
    - ``raise_on_exhausted``: after the last retry, raise ``MaxRetriesExceeded`` (default)
      or return the last response.
    - ``budget``: a :class:`RetryBudget` (default: a new one per policy); when it is spent the
      refusal goes back to the caller at once. None: no budget.
    - ``throttle``: an optional :class:`AdaptiveThrottle`; it refuses locally with
      :class:`ClientThrottled` when the server has been refusing most requests.
    - ``on_retry``: called with a :class:`RetryEvent` before each retry's wait (exceptions it
      raises are logged and swallowed). Every retry is also logged on ``shedder.client``.
    - ``clock`` (seconds since the epoch, to read HTTP-dates) and ``random`` (uniform in
      [0, 1), for jitter) are injectable for tests.
    """

    max_retries: int = 3
    base_delay: float = 0.25
    max_delay: float = 10.0
    max_retry_after: float = 60.0
    retry_statuses: Collection[int] = RETRYABLE_STATUSES
    retry_methods: Collection[str] = IDEMPOTENT_METHODS
    raise_on_exhausted: bool = True
    budget: RetryBudget | None = field(default_factory=RetryBudget)
    throttle: AdaptiveThrottle | None = None
    on_retry: Callable[[RetryEvent], None] | None = None
    clock: Callable[[], float] = time.time
    random: Callable[[], float] = _random.random

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int):
            raise TypeError(f"max_retries must be an int, got {self.max_retries!r}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        _check_delay("base_delay", self.base_delay)
        _check_delay("max_delay", self.max_delay, self.base_delay)
        _check_delay("max_retry_after", self.max_retry_after)
        for status in self.retry_statuses:
            if not (isinstance(status, int) and 100 <= status <= 599):
                raise ValueError(f"retry_statuses must hold statuses 100..599, got {status!r}")
        # Normalised once: membership tests on every response, methods in any case.
        object.__setattr__(self, "retry_statuses", frozenset(self.retry_statuses))
        object.__setattr__(self, "retry_methods", frozenset(m.upper() for m in self.retry_methods))

    def plan(
        self,
        method: str,
        *,
        replayable: bool,
        target: str,
        exhausted: Callable[[R, int], Exception],
    ) -> Plan[R]:
        """Makes every decision for one request, yielding the I/O steps a transport performs.

        ``replayable``: the body can be sent again. ``target`` names the request in logs.
        ``exhausted(response, attempts)`` builds the exception raised after the last retry.
        The generator returns the response to give the caller or raises; it may raise
        :class:`ClientThrottled` before the first send.
        """
        may_retry = replayable and method.upper() in self.retry_methods
        if self.throttle is not None:
            self.throttle.admit()
        if self.budget is not None:
            self.budget.deposit()
        retries = 0
        while True:
            outcome = yield _SEND
            if isinstance(outcome, Failed):
                event = RetryEvent(0, 0.0, type(outcome.error).__name__, error=outcome.error)
                if not (may_retry and outcome.retryable and self._may_retry(retries, target)):
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
                if not may_retry:
                    return outcome
                if retries >= self.max_retries:
                    if not self.raise_on_exhausted:
                        return outcome
                    yield Read(outcome)
                    raise exhausted(outcome, retries + 1)
                if not self._may_retry(retries, target):
                    return outcome
                yield Read(outcome)
            retries += 1
            yield Sleep(self._announce(event, retries, target))

    def _may_retry(self, retries: int, target: str) -> bool:
        """Checks the retry count, the budget and the throttle, in that order."""
        if retries >= self.max_retries:
            return False
        if self.budget is not None and not self.budget.try_withdraw():
            logger.info("%s: not retried, the retry budget is spent", target)
            return False
        if self.throttle is not None:
            try:
                self.throttle.admit()
            except ClientThrottled as exc:
                logger.info("%s: not retried: %s", target, exc)
                return False
        return True

    def _announce(self, event: RetryEvent, retry: int, target: str) -> float:
        """Picks the delay for this retry, logs it and calls the hook; returns the delay."""
        if event.retry_after is None:
            delay = backoff_delay(
                retry, base_delay=self.base_delay, max_delay=self.max_delay, random=self.random
            )
        else:
            delay = event.retry_after + self.random() * self.base_delay
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
