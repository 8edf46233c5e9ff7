"""An httpx client that honours backpressure (extra ``client``).

On 429/503 it waits as long as ``Retry-After`` says (or backs off with full jitter), retries
only idempotent requests whose body can be sent again (any method when shedder says the app
never saw it), never spends more than its :class:`RetryBudget` allows and never runs past the
call's deadline (``total_timeout``, or the deadline of the request being served); optional
adaptive throttling refuses locally when the server refuses most work anyway. All decisions
live in :class:`RetryPolicy` (shared with nothing httpx-specific); the transports here only
send, read and sleep.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from ._client.budget import AdaptiveThrottle, ClientThrottled, RetryBudget
from ._client.retry import (
    IDEMPOTENT_METHODS,
    REFUSED_HEADER,
    RETRYABLE_STATUSES,
    Call,
    DeadlineFormat,
    Failed,
    GiveUpReason,
    Plan,
    Read,
    RetryEvent,
    RetryPolicy,
    Send,
    Sleep,
    backoff_delay,
    current_deadline,
    deadline_scope,
    format_timeout,
    give_up_message,
    parse_retry_after,
)
from ._core.checks import check_callable, check_instance

try:
    import anyio
    import httpx
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError('shedder.client needs httpx: pip install "loadshedder[client]"') from None

__all__ = [
    "IDEMPOTENT_METHODS",
    "REFUSED_HEADER",
    "RETRYABLE_ERRORS",
    "RETRYABLE_STATUSES",
    "AdaptiveThrottle",
    "AsyncBackpressureAwareClient",
    "AsyncBackpressureTransport",
    "BackpressureAwareClient",
    "BackpressureTransport",
    "ClientThrottled",
    "DeadlineExceeded",
    "DeadlineFormat",
    "GaveUp",
    "GiveUpReason",
    "MaxRetriesExceeded",
    "RetryBudget",
    "RetryEvent",
    "RetryPolicy",
    "backoff_delay",
    "current_deadline",
    "deadline_scope",
    "format_timeout",
    "parse_retry_after",
]

RETRYABLE_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,  # refused, unreachable: the request never left
    httpx.ReadError,  # reset while waiting for the response
    httpx.WriteError,
    httpx.RemoteProtocolError,  # closed without a response
)
"""Connection errors retried (with backoff) for idempotent requests. Timeouts are not: a
server too slow to answer is not helped by more requests."""


class GaveUp(httpx.HTTPStatusError):
    """The call ended on a refusal (429/503); ``response`` is the last one, already read.

    ``reason`` says what stopped it (:data:`GiveUpReason`): ``"retries"`` (none left),
    ``"budget"`` (the retry budget is spent), ``"deadline"`` (the next wait would pass the
    call's deadline) or ``"throttled"`` (adaptive throttling refused the retry). ``attempts``
    counts the call's sends, the first included (redirect hops too, with the clients below).
    Raised only if the policy's ``raise_on_exhausted`` is true; otherwise the response is
    returned. Being an ``httpx.HTTPStatusError``, it is caught where ``raise_for_status()``
    errors are.
    """

    def __init__(
        self,
        request: httpx.Request,
        response: httpx.Response,
        attempts: int,
        reason: GiveUpReason = "retries",
    ) -> None:
        response.request = request  # a transport's response is not yet bound to its request
        target = f"{request.method} {_target_url(request)}"
        super().__init__(
            give_up_message(target, response.status_code, attempts, reason),
            request=request,
            response=response,
        )
        self.attempts = attempts
        self.reason: GiveUpReason = reason


MaxRetriesExceeded = GaveUp
"""The former name of :class:`GaveUp` (which is now raised for every reason, not only when
retries run out)."""


class DeadlineExceeded(httpx.TimeoutException):
    """The call's deadline passed before the request could be sent (nothing was sent).

    Raised whatever ``raise_on_exhausted`` says: there is no response to return. An
    ``httpx.TimeoutException``, so it is caught where timeouts are.
    """

    def __init__(self, request: httpx.Request) -> None:
        super().__init__(
            f"{request.method} {_target_url(request)}: not sent, the call's deadline has passed",
            request=request,
        )


def _target_url(request: httpx.Request) -> str:
    # Logs and messages name the resource but never credentials or query strings.
    url = request.url
    return f"{url.scheme}://{url.netloc.decode('ascii')}{url.path}"


class _Run:
    """One request's trip through a policy: iterate over the I/O steps, set ``reply``.

    After a :class:`Send` step, set ``reply`` with :meth:`sent` or :meth:`failed`; when the
    iteration ends, ``response`` is the answer for the caller (or the plan raised).
    """

    def __init__(self, policy: RetryPolicy, request: httpx.Request) -> None:
        # Bytes given up front (or a body already read) can be sent again; a generator, file
        # or multipart stream is sent once.
        self._plan: Plan[httpx.Response] = policy.plan(
            request.method,
            replayable=isinstance(request.stream, httpx.ByteStream),
            target=f"{request.method} {_target_url(request)}",
            exhausted=lambda response, attempts, reason: GaveUp(
                request, response, attempts, reason
            ),
            expired=lambda: DeadlineExceeded(request),
            call=_call_of(policy),
        )
        self._reply: httpx.Response | Failed | None = None
        self.response: httpx.Response | None = None

    def __iter__(self) -> Iterator[Send | Read[httpx.Response] | Sleep]:
        while True:
            try:
                step = self._plan.send(self._reply)
            except StopIteration as done:
                self.response = done.value
                return
            self._reply = None
            yield step

    def sent(self, response: httpx.Response) -> None:
        self._reply = response

    def failed(self, error: Exception) -> None:
        self._reply = Failed(error, retryable=isinstance(error, RETRYABLE_ERRORS))

    def result(self) -> httpx.Response:
        if self.response is None:  # pragma: no cover - only if iteration was cut short
            raise RuntimeError("the request's retry plan has not finished")
        return self.response


_TIMEOUTS = ("connect", "read", "write", "pool")


def _policy(policy: RetryPolicy | None) -> RetryPolicy:
    """``policy``, checked, or the default one."""
    if policy is None:
        return RetryPolicy()
    return check_instance("policy", policy, RetryPolicy, "a shedder.client.RetryPolicy or None")


def _prepare(policy: RetryPolicy, request: httpx.Request, step: Send) -> None:
    """Fits one attempt into the time left: caps its timeouts, tells the server if asked."""
    if step.remaining is None:
        return
    timeouts = request.extensions.get("timeout", {})
    request.extensions["timeout"] = {
        name: step.remaining if timeouts.get(name) is None else min(timeouts[name], step.remaining)
        for name in _TIMEOUTS
    }
    if policy.deadline_header is not None:
        request.headers[policy.deadline_header] = policy.deadline_value(step.remaining)


# The logical call in progress (a client's send(), redirect hops included) and whose policy it
# runs under: transports sharing that policy count its time and retries, not their own.
_CALL: contextvars.ContextVar[tuple[RetryPolicy, Call] | None] = contextvars.ContextVar(
    "shedder_client_call", default=None
)


def _call_of(policy: RetryPolicy) -> Call | None:
    current = _CALL.get()
    return current[1] if current is not None and current[0] is policy else None


@contextlib.contextmanager
def _logical_call(policy: RetryPolicy) -> Iterator[None]:
    token = _CALL.set((policy, policy.start_call()))
    try:
        yield
    finally:
        _CALL.reset(token)


class BackpressureTransport(httpx.BaseTransport):
    """Wraps a sync httpx transport (default ``httpx.HTTPTransport()``) with ``policy``.

    ``sleep`` (seconds) is injectable for tests. Raises :class:`GaveUp` when the call gives
    up on a refusal (unless the policy says to return the response), :class:`DeadlineExceeded`
    when there is no time left to send, and :class:`ClientThrottled` when adaptive throttling
    refuses locally. Used on its own, each request (each redirect hop) gets its own
    ``total_timeout`` and retries; the clients below share them across a call's hops.
    """

    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self.transport = (
            httpx.HTTPTransport()
            if transport is None
            else check_instance(
                "transport", transport, httpx.BaseTransport, "a sync httpx transport"
            )
        )
        self.policy = _policy(policy)
        self._sleep = check_callable("sleep", sleep)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        run = _Run(self.policy, request)
        for step in run:
            if isinstance(step, Sleep):
                self._sleep(step.seconds)
            elif isinstance(step, Read):
                step.response.read()
            else:
                _prepare(self.policy, request, step)
                try:
                    run.sent(self.transport.handle_request(request))
                except Exception as exc:
                    run.failed(exc)
        return run.result()

    def close(self) -> None:
        self.transport.close()


class AsyncBackpressureTransport(httpx.AsyncBaseTransport):
    """Wraps an async httpx transport (default ``httpx.AsyncHTTPTransport()``) with ``policy``.

    The async twin of :class:`BackpressureTransport`; ``sleep`` defaults to ``anyio.sleep``
    (asyncio and trio).
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[object]] = anyio.sleep,
    ) -> None:
        self.transport = (
            httpx.AsyncHTTPTransport()
            if transport is None
            else check_instance(
                "transport", transport, httpx.AsyncBaseTransport, "an async httpx transport"
            )
        )
        self.policy = _policy(policy)
        self._sleep = check_callable("sleep", sleep)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        run = _Run(self.policy, request)
        for step in run:
            if isinstance(step, Sleep):
                await self._sleep(step.seconds)
            elif isinstance(step, Read):
                await step.response.aread()
            else:
                _prepare(self.policy, request, step)
                try:
                    run.sent(await self.transport.handle_async_request(request))
                except Exception as exc:
                    run.failed(exc)
        return run.result()

    async def aclose(self) -> None:
        await self.transport.aclose()


K = TypeVar("K")
T = TypeVar("T")


def _wrap_all(
    transport: T, mounts: dict[K, T | None], wrap: Callable[[T], T]
) -> tuple[T, dict[K, T | None]]:
    # Wrapping what httpx built keeps all its transport options (verify, limits, proxies,
    # mounts) working without restating them; mounts share the policy and so its budget.
    return wrap(transport), {k: None if t is None else wrap(t) for k, t in mounts.items()}


class BackpressureAwareClient(httpx.Client):
    """An ``httpx.Client`` whose transports (mounts included) honour backpressure.

    ``policy`` and ``sleep`` as for :class:`BackpressureTransport`; every other keyword goes to
    ``httpx.Client``. One call (``get``, ``send``, ...) is one logical call: its
    ``total_timeout`` and ``max_retries`` span all its redirect hops.
    """

    def __init__(
        self,
        *,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], object] = time.sleep,
        **kwargs: Any,
    ) -> None:
        policy = _policy(policy)  # checked before httpx builds anything
        check_callable("sleep", sleep)
        super().__init__(**kwargs)
        self.policy = policy
        wrap = functools.partial(BackpressureTransport, policy=self.policy, sleep=sleep)
        self._transport, self._mounts = _wrap_all(self._transport, self._mounts, wrap)

    def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        with _logical_call(self.policy):
            return super().send(request, **kwargs)


class AsyncBackpressureAwareClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` whose transports (mounts included) honour backpressure.

    ``policy`` and ``sleep`` as for :class:`AsyncBackpressureTransport`; every other keyword
    goes to ``httpx.AsyncClient``. Redirect hops share the call's time and retries.
    """

    def __init__(
        self,
        *,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[object]] = anyio.sleep,
        **kwargs: Any,
    ) -> None:
        policy = _policy(policy)
        check_callable("sleep", sleep)
        super().__init__(**kwargs)
        self.policy = policy
        wrap = functools.partial(AsyncBackpressureTransport, policy=self.policy, sleep=sleep)
        self._transport, self._mounts = _wrap_all(self._transport, self._mounts, wrap)

    async def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        with _logical_call(self.policy):
            return await super().send(request, **kwargs)
