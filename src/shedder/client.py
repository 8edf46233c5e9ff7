"""An httpx client that honours backpressure (extra ``client``).

On 429/503 it waits as long as ``Retry-After`` says (or backs off with full jitter), retries
only idempotent requests whose body can be sent again, and never spends more than its
:class:`RetryBudget` allows; optional adaptive throttling refuses locally when the server
refuses most work anyway. All decisions live in :class:`RetryPolicy` (shared with nothing
httpx-specific); the transports here only send, read and sleep.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from ._client.budget import AdaptiveThrottle, ClientThrottled, RetryBudget
from ._client.retry import (
    IDEMPOTENT_METHODS,
    RETRYABLE_STATUSES,
    Failed,
    Plan,
    Read,
    RetryEvent,
    RetryPolicy,
    Send,
    Sleep,
    backoff_delay,
    parse_retry_after,
)

try:
    import anyio
    import httpx
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError('shedder.client needs httpx: pip install "loadshedder[client]"') from None

__all__ = [
    "IDEMPOTENT_METHODS",
    "RETRYABLE_ERRORS",
    "RETRYABLE_STATUSES",
    "AdaptiveThrottle",
    "AsyncBackpressureAwareClient",
    "AsyncBackpressureTransport",
    "BackpressureAwareClient",
    "BackpressureTransport",
    "ClientThrottled",
    "MaxRetriesExceeded",
    "RetryBudget",
    "RetryEvent",
    "RetryPolicy",
    "backoff_delay",
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


class MaxRetriesExceeded(httpx.HTTPStatusError):
    """Every attempt was refused (429/503); ``response`` is the last one, already read.

    ``attempts`` counts all sends, the first included. Being an ``httpx.HTTPStatusError``, it
    is caught where ``raise_for_status()`` errors are.
    """

    def __init__(self, request: httpx.Request, response: httpx.Response, attempts: int) -> None:
        response.request = request  # a transport's response is not yet bound to its request
        super().__init__(
            f"{request.method} {_target_url(request)}: still {response.status_code} "
            f"after {attempts} attempt{'' if attempts == 1 else 's'}",
            request=request,
            response=response,
        )
        self.attempts = attempts


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
            exhausted=lambda response, attempts: MaxRetriesExceeded(request, response, attempts),
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


class BackpressureTransport(httpx.BaseTransport):
    """Wraps a sync httpx transport (default ``httpx.HTTPTransport()``) with ``policy``.

    ``sleep`` (seconds) is injectable for tests. Raises :class:`MaxRetriesExceeded` when
    retries run out (unless the policy says to return the response) and
    :class:`ClientThrottled` when adaptive throttling refuses locally.
    """

    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self.transport = httpx.HTTPTransport() if transport is None else transport
        self.policy = RetryPolicy() if policy is None else policy
        self._sleep = sleep

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        run = _Run(self.policy, request)
        for step in run:
            if isinstance(step, Sleep):
                self._sleep(step.seconds)
            elif isinstance(step, Read):
                step.response.read()
            else:
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
        self.transport = httpx.AsyncHTTPTransport() if transport is None else transport
        self.policy = RetryPolicy() if policy is None else policy
        self._sleep = sleep

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        run = _Run(self.policy, request)
        for step in run:
            if isinstance(step, Sleep):
                await self._sleep(step.seconds)
            elif isinstance(step, Read):
                await step.response.aread()
            else:
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
    ``httpx.Client``.
    """

    def __init__(
        self,
        *,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], object] = time.sleep,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        wrap = functools.partial(BackpressureTransport, policy=policy or RetryPolicy(), sleep=sleep)
        self._transport, self._mounts = _wrap_all(self._transport, self._mounts, wrap)


class AsyncBackpressureAwareClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` whose transports (mounts included) honour backpressure.

    ``policy`` and ``sleep`` as for :class:`AsyncBackpressureTransport`; every other keyword
    goes to ``httpx.AsyncClient``.
    """

    def __init__(
        self,
        *,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[object]] = anyio.sleep,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        wrap = functools.partial(
            AsyncBackpressureTransport, policy=policy or RetryPolicy(), sleep=sleep
        )
        self._transport, self._mounts = _wrap_all(self._transport, self._mounts, wrap)
