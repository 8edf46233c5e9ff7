"""gRPC servers under a :class:`shedder.Throttler` (extra ``grpc``).

- :class:`ThrottlingInterceptor` (``grpc.server``) and :class:`AsyncThrottlingInterceptor`
  (``grpc.aio.server``) admit every RPC through a throttler. A refused RPC ends with
  ``RESOURCE_EXHAUSTED`` (or the code you choose) and the ``grpc-retry-pushback-ms`` trailer,
  which gRPC clients with a retry policy obey as they would ``Retry-After``. Unary RPCs hold
  their slot for the call, streaming RPCs for the life of the stream.
- :class:`HealthReporter` keeps the standard ``grpc.health.v1`` service at ``NOT_SERVING``
  while the throttler sheds and ``SERVING`` otherwise, driven by the throttler's events.
- :func:`write_bounded` (``grpc.aio``) and :func:`iter_bounded` (``grpc.server``) run a
  response producer ahead of the writer into a bounded buffer, so a slow reader holds the
  producer back through HTTP/2 flow control, and stop it when either side ends the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from shedder import Overloaded, Permit, Throttler, ThrottlerListener

try:
    import grpc
    import grpc.aio
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError('shedder.grpc needs grpcio: pip install "loadshedder[grpc]"') from None

__all__ = [
    "DEFAULT_EXEMPT",
    "PUSHBACK_KEY",
    "AsyncThrottlingInterceptor",
    "HealthReporter",
    "ThrottlingInterceptor",
    "iter_bounded",
    "write_bounded",
]

T = TypeVar("T")

PUSHBACK_KEY = "grpc-retry-pushback-ms"
"""Trailer (milliseconds) that gRPC retry policies wait out before retrying (gRFC A6)."""

DEFAULT_EXEMPT: tuple[str, ...] = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Method-name prefixes never throttled: a health check must answer most when the server is busy."""

_Metadata = tuple[tuple[str, str], ...]
_Behavior = Callable[..., Any]


class _Admission:
    """What both interceptors share: the configuration and the shape of a refusal."""

    def __init__(
        self,
        throttler: Throttler,
        *,
        code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED,
        exempt: Iterable[str] = DEFAULT_EXEMPT,
    ) -> None:
        if not isinstance(throttler, Throttler):
            raise TypeError(f"throttler must be a shedder.Throttler, got {throttler!r}")
        if not isinstance(code, grpc.StatusCode):
            raise TypeError(f"code must be a grpc.StatusCode, got {code!r}")
        if code is grpc.StatusCode.OK:
            raise ValueError("code must be an error status, got grpc.StatusCode.OK")
        if isinstance(exempt, str):
            raise TypeError(f"exempt must be an iterable of method-name prefixes, got {exempt!r}")
        self.throttler = throttler
        self.code = code
        self.exempt = tuple(exempt)
        if not all(isinstance(prefix, str) for prefix in self.exempt):
            raise TypeError(f"exempt must hold strings, got {self.exempt!r}")

    def _passes(self, method: str) -> bool:
        return method.startswith(self.exempt)

    def _deadline(self, context: Any) -> float | None:
        """The call's deadline on the throttler's clock, or None without one: a queued call
        waits at most until then (refused as ``deadline_exceeded``), and one that by the pace
        of service could not start before it is refused at once, as the middlewares do."""
        remaining = context.time_remaining()
        if remaining is None:
            return None
        return self.throttler._clock() + max(float(remaining), 0.0)

    @staticmethod
    def _pushback(refusal: Overloaded) -> _Metadata:
        return ((PUSHBACK_KEY, str(refusal.retry_after * 1000)),)

    @staticmethod
    def _details(refusal: Overloaded) -> str:
        return f"overloaded ({refusal.reason}); retry after {refusal.retry_after} s"

    def _admit_blocking(self, context: Any) -> Permit:
        """Take a slot on this (pool) thread; a refusal aborts the RPC with the pushback."""
        try:
            permit = self.throttler.acquire(deadline=self._deadline(context))
        except Overloaded as refusal:
            context.set_trailing_metadata(self._pushback(refusal))
            context.abort(self.code, self._details(refusal))
        is_active = getattr(context, "is_active", None)  # grpc.aio's sync-handler context has none
        if is_active is not None and not is_active():
            # The client left while this thread waited: hand the slot on instead of running.
            permit.release()
            context.abort(grpc.StatusCode.CANCELLED, "cancelled while queued")
        return permit

    # Wrappers for blocking behaviors (grpc.server, and sync handlers on grpc.aio servers).

    def _blocking_unary(self, behavior: _Behavior) -> _Behavior:
        def throttled(request: Any, context: Any) -> Any:
            permit = self._admit_blocking(context)
            try:
                return behavior(request, context)
            finally:
                permit.release()

        return _same_hints(behavior, throttled)

    def _blocking_stream(self, behavior: _Behavior) -> _Behavior:
        if getattr(behavior, "experimental_non_blocking", False):
            # The behavior returns at once and streams through send_response_callback later:
            # only the end of the RPC can end the hold.
            def throttled_non_blocking(request: Any, context: Any, send_response: Any) -> Any:
                permit = self._admit_blocking(context)
                try:
                    if not context.add_callback(permit.release):
                        permit.release()
                    return behavior(request, context, send_response)
                except BaseException:
                    permit.release()
                    raise

            return _same_hints(behavior, throttled_non_blocking)

        def throttled(request: Any, context: Any) -> Iterator[Any]:
            permit = self._admit_blocking(context)
            try:
                responses = behavior(request, context)
            except BaseException:
                permit.release()
                raise
            return _HeldIterator(responses, permit)

        return _same_hints(behavior, throttled)


class _HeldIterator(Iterator[T]):
    """Responses of a streaming RPC that hold its permit until exhausted, failed or closed.

    Released on the thread that runs the handler, never from gRPC's callback thread: a slot
    freed while the handler still runs would let N + 1 RPCs run.
    """

    __slots__ = ("_permit", "_responses")

    def __init__(self, responses: Iterable[T], permit: Permit) -> None:
        self._permit = permit  # first: __del__ must release even if iter() raises
        self._responses = iter(responses)

    def __next__(self) -> T:
        try:
            return next(self._responses)
        except BaseException:
            self._permit.release()
            raise

    def close(self) -> None:
        self._permit.release()
        close = getattr(getattr(self, "_responses", None), "close", None)
        if close is not None:
            close()

    def __del__(self) -> None:
        # The server drops the iterator when the client cancels; CPython frees it at once.
        self.close()


def _same_hints(behavior: _Behavior, wrapper: _Behavior) -> _Behavior:
    """Carry grpc's per-behavior hints (thread pool, non-blocking) over to the wrapper."""
    for hint in ("experimental_non_blocking", "experimental_thread_pool"):
        if hasattr(behavior, hint):
            setattr(wrapper, hint, getattr(behavior, hint))
    return wrapper


def _behavior(handler: grpc.RpcMethodHandler[Any, Any]) -> _Behavior | None:
    if handler.request_streaming:
        return handler.stream_stream if handler.response_streaming else handler.stream_unary
    return handler.unary_stream if handler.response_streaming else handler.unary_unary


def _with_behavior(
    handler: grpc.RpcMethodHandler[Any, Any], behavior: _Behavior
) -> grpc.RpcMethodHandler[Any, Any]:
    if handler.request_streaming:
        if handler.response_streaming:
            make = grpc.stream_stream_rpc_method_handler
        else:
            make = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    return make(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class ThrottlingInterceptor(_Admission, grpc.ServerInterceptor):
    """Admits every RPC of a ``grpc.server`` through ``throttler``.

    ``grpc.server(executor, interceptors=[ThrottlingInterceptor(throttler)])``. A queued RPC
    blocks its pool thread in :meth:`Throttler.acquire`, so give the executor at least
    ``max_concurrency + max_queue`` threads (``max_queue`` per priority class the RPCs use):
    RPCs beyond the pool wait in the executor, where the throttler cannot see or refuse them.

    Args:
        throttler: the :class:`shedder.Throttler` that admits the RPCs.
        code: status of a refused RPC: ``RESOURCE_EXHAUSTED`` (default) or e.g.
            ``UNAVAILABLE``, which clients retry on other backends. Either way the refusal
            carries ``grpc-retry-pushback-ms`` = ``Overloaded.retry_after`` in milliseconds.
        exempt: method-name prefixes served without a slot (default: health and reflection).

    A queued RPC waits at most ``queue_timeout`` or the client's remaining deadline, whichever
    is shorter (refused as ``deadline_exceeded`` when the deadline ends the wait), and one that
    by the observed pace of service could not start before its deadline is refused at once.
    Unary RPCs hold the slot while the handler runs; streaming responses hold it until the
    response iterator is exhausted, raises or is dropped (client cancelled).
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        # Runs on the server's single polling thread: decide nothing here that could block.
        handler = continuation(handler_call_details)
        if handler is None or self._passes(handler_call_details.method):
            return handler
        behavior = _behavior(handler)
        if behavior is None:
            return handler
        if handler.response_streaming:
            return _with_behavior(handler, self._blocking_stream(behavior))
        return _with_behavior(handler, self._blocking_unary(behavior))


class AsyncThrottlingInterceptor(_Admission, grpc.aio.ServerInterceptor):
    """Admits every RPC of a ``grpc.aio.server`` through ``throttler``.

    ``grpc.aio.server(interceptors=[AsyncThrottlingInterceptor(throttler)])``; same options
    as :class:`ThrottlingInterceptor`. A queued RPC awaits :meth:`Throttler.acquire_async`;
    a client that cancels leaves the queue at once. Coroutine handlers hold the slot until
    they return; async-generator handlers until the last response is written, the generator
    raises or the RPC is cancelled (the generator is then closed at once, not when garbage
    collected). Sync handlers, which grpc.aio runs in its thread pool, block that thread
    while queued.

    Use it instead of ``maximum_concurrent_rpcs``, which grpc.aio once ignored and then could
    exceed (grpc#30424, grpc#41531): this limit holds exactly, and refusals carry the pushback.
    """

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or self._passes(handler_call_details.method):
            return handler
        behavior = _behavior(handler)
        if behavior is None:
            return handler
        # The same tests grpc.aio applies to decide how to drive the behavior.
        if inspect.iscoroutinefunction(behavior):
            return _with_behavior(handler, self._async_call(behavior))
        if inspect.isasyncgenfunction(behavior):
            return _with_behavior(handler, self._async_stream(behavior))
        if handler.response_streaming:
            return _with_behavior(handler, self._blocking_stream(behavior))
        return _with_behavior(handler, self._blocking_unary(behavior))

    async def _admit(self, context: grpc.aio.ServicerContext[Any, Any]) -> Permit:
        try:
            return await self.throttler.acquire_async(deadline=self._deadline(context))
        except Overloaded as refusal:
            await context.abort(self.code, self._details(refusal), self._pushback(refusal))

    def _async_call(self, behavior: _Behavior) -> _Behavior:
        async def throttled(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            permit = await self._admit(context)
            try:
                return await behavior(request, context)
            finally:
                permit.release()

        return throttled

    def _async_stream(self, behavior: _Behavior) -> _Behavior:
        # Driven here rather than by grpc.aio, so that cancellation closes the generator and
        # frees the slot at once, in this task.
        async def throttled(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            permit = await self._admit(context)
            try:
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        await context.write(response)
            finally:
                permit.release()

        return throttled


class HealthReporter(ThrottlerListener):
    """Keeps a ``grpc.health.v1`` servicer ``NOT_SERVING`` while ``throttler`` sheds.

    Status follows :attr:`ThrottlerStats.overloaded` on every throttler event (no polling) and
    is set only when it changes, for each name in ``services`` (``""`` is the whole server).

    Args:
        throttler: the :class:`shedder.Throttler` to follow.
        servicer: a ``grpc_health.v1.health.HealthServicer`` (``grpc.server``) or
            ``grpc_health.v1.health.aio.HealthServicer`` (``grpc.aio``, then create the
            reporter inside the running event loop). Default: a new sync servicer.
        services: the service names to report.

    Register the servicer with :meth:`add_to_server`; the interceptors never throttle it.
    With a sync servicer, Watch streams are written on the thread whose admission or release
    changed the status; with the aio servicer the update runs in one short task on the loop.
    """

    def __init__(
        self,
        throttler: Throttler,
        servicer: health.HealthServicer | health.aio.HealthServicer | None = None,
        *,
        services: Iterable[str] = ("",),
    ) -> None:
        if not isinstance(throttler, Throttler):
            raise TypeError(f"throttler must be a shedder.Throttler, got {throttler!r}")
        if isinstance(services, str):
            raise TypeError(f"services must be an iterable of service names, got {services!r}")
        self.services = tuple(services)
        if not self.services or not all(isinstance(name, str) for name in self.services):
            raise ValueError(f"services must be one or more strings, got {self.services!r}")
        self.throttler = throttler
        self.servicer = health.HealthServicer() if servicer is None else servicer
        self._loop: asyncio.AbstractEventLoop | None = None
        if inspect.iscoroutinefunction(self.servicer.set):
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError(
                    "HealthReporter with a grpc.aio HealthServicer must be created inside the"
                    " server's running event loop"
                ) from None
        self._lock = threading.Lock()
        self._serving: bool | None = None  # what the servicer should say
        self._reported: bool | None = None  # what the aio servicer says (loop thread only)
        self._flush: asyncio.Task[None] | None = None
        throttler.add_listener(self)
        self._update()

    @property
    def serving(self) -> bool:
        """The status last decided: True for SERVING."""
        return bool(self._serving)

    def add_to_server(self, server: grpc.Server | grpc.aio.Server) -> None:
        """Register the health servicer on ``server`` (sync or aio)."""
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    def close(self) -> None:
        """Stop following the throttler (the servicer keeps its last status)."""
        self.throttler.remove_listener(self)

    def _update(self) -> None:
        # Decide and set under one lock: the last event's caller reads the last state, so the
        # final status is right even when events race on several threads.
        with self._lock:
            serving = not self.throttler.stats().overloaded
            if serving == self._serving:
                return
            self._serving = serving
            if self._loop is None:
                status = _status(serving)
                for name in self.services:
                    self.servicer.set(name, status)
                return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody left to tell
            self._loop.call_soon_threadsafe(self._kick)

    def _kick(self) -> None:
        """On the loop: start the one flushing task unless it is already running."""
        if self._flush is None or self._flush.done():
            assert self._loop is not None  # only scheduled for an aio servicer
            self._flush = self._loop.create_task(self._flush_aio())

    async def _flush_aio(self) -> None:
        set_status: Callable[[str, int], Awaitable[None]] = self.servicer.set  # type: ignore[assignment]
        while self._reported != self._serving:
            serving = self._serving
            for name in self.services:
                await set_status(name, _status(bool(serving)))
            self._reported = serving

    def on_queue(self, throttler: Throttler, priority: str) -> None:
        self._update()

    def on_admit(self, throttler: Throttler, waited: float, priority: str) -> None:
        self._update()

    def on_shed(self, throttler: Throttler, reason: Any, waited: float, priority: str) -> None:
        self._update()

    def on_cancel(self, throttler: Throttler, waited: float) -> None:
        self._update()

    def on_release(self, throttler: Throttler, held: float) -> None:
        self._update()


def _status(serving: bool) -> int:
    if serving:
        return health_pb2.HealthCheckResponse.SERVING
    return health_pb2.HealthCheckResponse.NOT_SERVING


def _check_maxsize(maxsize: object) -> int:
    if not isinstance(maxsize, int) or isinstance(maxsize, bool):
        raise TypeError(f"maxsize must be an int, got {type(maxsize).__name__} {maxsize!r}")
    if maxsize < 1:
        raise ValueError(f"maxsize must be >= 1, got {maxsize}")
    return maxsize


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


async def write_bounded(
    context: grpc.aio.ServicerContext[Any, T], responses: AsyncIterable[T], *, maxsize: int
) -> None:
    """Write ``responses`` to a grpc.aio stream, produced ahead into a buffer of ``maxsize``.

    ``responses`` (typically an async generator reading the request stream) runs in its own
    task, so producing overlaps writing; when the client reads slowly, ``context.write`` waits
    on HTTP/2 flow control, the buffer fills and the producer waits too. Await it from a
    coroutine handler: ``await write_bounded(context, produce(request_iterator), maxsize=8)``.

    When the stream ends, the handler is cancelled (client cancel, deadline) or the producer
    raises (re-raised here), the producer task is cancelled, its generator closed and awaited:
    nothing outlives the call.
    """
    _check_maxsize(maxsize)
    buffer: asyncio.Queue[Any] = asyncio.Queue(maxsize)

    async def produce() -> None:
        try:
            async for response in responses:
                await buffer.put(response)
        except Exception as error:
            await buffer.put(_Failure(error))
        else:
            await buffer.put(_END)
        finally:
            aclose = getattr(responses, "aclose", None)
            if aclose is not None:
                await aclose()

    producer = asyncio.get_running_loop().create_task(produce(), name="shedder-grpc-producer")
    try:
        while (item := await buffer.get()) is not _END:
            if isinstance(item, _Failure):
                raise item.error
            await context.write(item)
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer


class _Buffer(Generic[T]):
    """A bounded hand-over between one producer thread and one consumer; close wakes both."""

    def __init__(self, maxsize: int) -> None:
        self._items: deque[Any] = deque()
        self._maxsize = maxsize
        self._closed = False
        self._changed = threading.Condition(threading.Lock())

    def put(self, item: Any) -> bool:
        """Wait for room; False once closed (the consumer is gone)."""
        with self._changed:
            while len(self._items) >= self._maxsize and not self._closed:
                self._changed.wait()
            if self._closed:
                return False
            self._items.append(item)
            self._changed.notify_all()
            return True

    def finish(self, item: Any) -> None:
        """Append the terminal marker, ignoring the bound (the producer must not block on it)."""
        with self._changed:
            self._items.append(item)
            self._changed.notify_all()

    def get(self) -> Any:
        """The next item; the end marker once closed (the RPC is over)."""
        with self._changed:
            while not self._items and not self._closed:
                self._changed.wait()
            if not self._items:
                return _END
            item = self._items.popleft()
            self._changed.notify_all()
            return item

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._items.clear()
            self._changed.notify_all()


def iter_bounded(
    context: grpc.ServicerContext, responses: Iterable[T], *, maxsize: int
) -> Iterator[T]:
    """Responses for a ``grpc.server`` streaming handler, produced ahead by a thread.

    ``responses`` (typically a generator reading the request iterator) runs on its own daemon
    thread into a buffer of ``maxsize``; the handler returns this iterator and the server's
    pool thread writes from it. A slow reader stalls the writes (HTTP/2 flow control), the
    buffer fills and the producer waits. When the client cancels or the stream ends the buffer
    closes, and the producer stops at its next response, closing ``responses``; an exception
    in the producer is re-raised to the handler.
    """
    _check_maxsize(maxsize)
    buffer: _Buffer[T] = _Buffer(maxsize)
    # A cancelled RPC may leave the pool thread's iterator alive a moment; close at once.
    if not context.add_callback(buffer.close):
        buffer.close()

    def produce() -> None:
        iterator = iter(responses)
        try:
            for response in iterator:
                if not buffer.put(response):
                    return
        except BaseException as error:
            buffer.finish(_Failure(error))
        else:
            buffer.finish(_END)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    producer = threading.Thread(target=produce, name="shedder-grpc-producer", daemon=True)
    producer.start()
    return _drain(buffer)


def _drain(buffer: _Buffer[T]) -> Iterator[T]:
    try:
        while (item := buffer.get()) is not _END:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        buffer.close()
