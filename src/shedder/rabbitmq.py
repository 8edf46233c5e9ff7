"""A RabbitMQ consumer whose prefetch follows its processing speed (extra ``rabbitmq``).

:class:`PrefetchConsumer` consumes a queue on aio-pika with ``basic.qos`` set from an
:class:`~shedder.AdaptiveBatchSizer` (deliveries wait at most about ``budget`` seconds in this
process) or from a :class:`~shedder.Throttler` (as many deliveries as it has slots). It acks
after processing, nacks with requeue on failure up to ``max_deliveries`` and then rejects
without requeue (the queue's dead-letter exchange gets it, if it has one), and on :meth:`stop`
cancels the subscription, lets the running handlers finish and requeues the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from shedder import AdaptiveBatchSizer, Overloaded, Throttler

try:
    from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'shedder.rabbitmq needs aio-pika: pip install "loadshedder[rabbitmq]"'
    ) from None

__all__ = ["PrefetchConsumer", "PrefetchConsumerStats"]

logger = logging.getLogger("shedder.rabbitmq")

Handler = Callable[[AbstractIncomingMessage], Awaitable[object]]
ErrorHandler = Callable[[AbstractIncomingMessage, Exception], "Awaitable[object] | object"]


@dataclass
class PrefetchConsumerStats:
    """Counters of a :class:`PrefetchConsumer` (a live object: read, don't write)."""

    delivered: int = 0
    acked: int = 0
    requeued: int = 0
    """Failed deliveries put back for another try (below ``max_deliveries``)."""
    rejected: int = 0
    """Deliveries that failed ``max_deliveries`` times: rejected without requeue."""
    returned: int = 0
    """Deliveries put back unprocessed at :meth:`PrefetchConsumer.stop`."""
    errors: int = 0
    """Handler failures (each reached ``on_error``)."""
    prefetch: int = 0
    """The prefetch count in force."""
    prefetch_changes: int = 0
    max_unacked: int = 0
    """Most deliveries held unsettled at once."""
    over_prefetch: int = 0
    """Deliveries that arrived while more than the prefetch in force were unsettled (0 if the
    broker keeps to it). After a lowered channel-wide prefetch the old one stays in force
    until the unsettled count has come down to the new one: RabbitMQ's queues may have
    granted deliveries under the old limit just before it changed."""


class PrefetchConsumer:
    """Consume ``queue`` on ``channel`` with a prefetch that follows the processing speed.

    Args:
        channel: an aio-pika channel of its own (the prefetch is set on it).
        queue: the queue (name or declared queue).
        handler: ``async def handler(message)``; acked when it returns.
        sizer: the prefetch follows ``sizer.size``; deliveries are handled one at a time, each
            measured, so a delivery waits at most about ``sizer.budget`` seconds here.
        throttler: instead of ``sizer``: the prefetch follows ``throttler.max_concurrency``
            and up to that many deliveries are handled at once, each holding a slot.
        prefetch: a fixed prefetch when neither ``sizer`` nor ``throttler`` is given.
        max_deliveries: deliveries of one message before it is rejected without requeue (>= 1).
            Counted from the ``x-delivery-count`` header of quorum queues, else by this
            consumer (per process: a restart starts counting again).
        on_error: called as ``on_error(message, exc)`` (may be async) each time the handler
            raises; it cannot stop the loop: a raising ``on_error`` is logged.
        global_qos: set the prefetch per channel, which RabbitMQ applies to the running
            subscription at once (default). Quorum queues refuse it: pass False, and a new
            prefetch is applied by re-subscribing once the unsettled deliveries are settled.
        min_change: relative change of the target below which the prefetch is left alone.

    Raises ``ConnectionError`` from :meth:`run` when the channel closes under it.
    """

    def __init__(
        self,
        channel: AbstractChannel,
        queue: str | AbstractQueue,
        handler: Handler,
        *,
        sizer: AdaptiveBatchSizer | None = None,
        throttler: Throttler | None = None,
        prefetch: int = 10,
        max_deliveries: int = 5,
        on_error: ErrorHandler | None = None,
        global_qos: bool = True,
        min_change: float = 0.2,
    ) -> None:
        if sizer is not None and throttler is not None:
            raise ValueError("pass sizer or throttler, not both")
        if sizer is not None and not isinstance(sizer, AdaptiveBatchSizer):
            raise TypeError(f"sizer must be an AdaptiveBatchSizer, got {type(sizer).__name__}")
        if throttler is not None and not isinstance(throttler, Throttler):
            raise TypeError(f"throttler must be a Throttler, got {type(throttler).__name__}")
        for name, value in (("prefetch", prefetch), ("max_deliveries", max_deliveries)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= min_change < 1:
            raise ValueError(f"min_change must be in [0, 1), got {min_change}")
        if not callable(handler):
            raise TypeError(f"handler must be an async callable, got {handler!r}")
        self._channel = channel
        self._queue_ref = queue
        self._handler = handler
        self.sizer = sizer
        self.throttler = throttler
        self._fixed = prefetch
        self.max_deliveries = max_deliveries
        self._on_error = on_error
        self.global_qos = global_qos
        self.min_change = float(min_change)
        self.stats = PrefetchConsumerStats()
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._open: set[int] = set()  # delivery tags not yet acked, nacked or rejected
        self._in_force = 0  # the limit the broker applies to deliveries arriving now
        self._serial = asyncio.Lock()  # sizer mode: one delivery at a time, in arrival order
        self._settled = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._stopped: asyncio.Event | None = None
        self._closed_by: BaseException | None = None
        self._resizing = False
        self._failures: OrderedDict[str, int] = OrderedDict()  # message key -> failed deliveries

    # -- prefetch ------------------------------------------------------------------------------

    def _target(self) -> int:
        if self.sizer is not None:
            return self.sizer.size
        if self.throttler is not None:
            return self.throttler.max_concurrency
        return self._fixed

    async def _set_qos(self, count: int) -> None:
        await self._channel.set_qos(prefetch_count=count, global_=self.global_qos)
        # Deliveries sent under the old limit precede Qos-Ok on the channel, except those a
        # queue granted just before a lowered channel-wide limit (see over_prefetch).
        self.stats.prefetch = count
        if count > self._in_force or len(self._open) <= count:
            self._in_force = count

    async def _maybe_resize(self) -> None:
        target = self._target()
        current = self.stats.prefetch
        if self._resizing or self._stopping or target == current:
            return
        if abs(target - current) < self.min_change * current and target > 1:
            return
        self._resizing = True
        try:
            if self.global_qos:
                await self._set_qos(target)
            else:
                # A consumer's own prefetch is fixed when it subscribes: re-subscribe, after the
                # deliveries made under the old one are settled so the new limit holds exactly.
                await self._cancel()
                async with self._settled:
                    await self._settled.wait_for(lambda: not self._open or self._stopping)
                if self._stopping:
                    return
                await self._set_qos(self._target())
                await self._subscribe()
            self.stats.prefetch_changes += 1
        finally:
            self._resizing = False

    # -- running -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until :meth:`stop`; returns once every delivery is settled."""
        self._stopping = False
        self._stopped = asyncio.Event()
        self._closed_by = None
        self._open.clear()
        self._in_force = 0
        if isinstance(self._queue_ref, str):
            self._queue = await self._channel.get_queue(self._queue_ref, ensure=True)
        else:
            self._queue = self._queue_ref
        self._channel.close_callbacks.add(self._on_channel_closed)
        try:
            await self._set_qos(self._target())
            await self._subscribe()
            await self._stopped.wait()
            if self._closed_by is not None:
                raise ConnectionError(
                    f"the RabbitMQ channel closed: {self._closed_by!r}"
                ) from self._closed_by
        finally:
            self._channel.close_callbacks.discard(self._on_channel_closed)
            await self._shutdown()

    def stop(self) -> None:
        """Take no new deliveries; :meth:`run` returns once the running handlers finished.

        Call it from the event loop's thread (a signal handler, another task)."""
        self._stopping = True
        if self._stopped is not None:
            self._stopped.set()

    def _on_channel_closed(self, _channel: object, exc: BaseException | None) -> None:
        if not self._stopping:
            self._closed_by = exc or ConnectionError("channel closed")
            self._stopping = True
            if self._stopped is not None:
                self._stopped.set()

    async def _subscribe(self) -> None:
        assert self._queue is not None
        self._tag = await self._queue.consume(self._on_delivery)

    async def _cancel(self) -> None:
        if self._tag is not None and self._queue is not None and not self._channel.is_closed:
            tag, self._tag = self._tag, None
            await self._queue.cancel(tag)

    async def _shutdown(self) -> None:
        self._stopping = True
        async with self._settled:
            self._settled.notify_all()  # a resize waiting for a drain gives up
        with contextlib.suppress(Exception):
            await self._cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- deliveries ----------------------------------------------------------------------------

    async def _on_delivery(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        tag = message.delivery_tag or 0
        self._open.add(tag)
        self.stats.delivered += 1
        self.stats.max_unacked = max(self.stats.max_unacked, len(self._open))
        if len(self._open) > self._in_force:
            self.stats.over_prefetch += 1
        try:
            await self._process(message)
        finally:
            self._open.discard(tag)
            if len(self._open) <= self.stats.prefetch:
                self._in_force = self.stats.prefetch
            async with self._settled:
                self._settled.notify_all()
            if task is not None:
                self._tasks.discard(task)
        try:
            await self._maybe_resize()
        except Exception:
            if not (self._stopping or self._channel.is_closed):
                logger.exception("could not change the prefetch")

    def _settle(self, message: AbstractIncomingMessage) -> None:
        """Count ``message`` settled *before* its ack/nack goes out: once the broker has it, a
        new delivery may arrive before this task runs again."""
        self._open.discard(message.delivery_tag or 0)
        if len(self._open) <= self.stats.prefetch:
            self._in_force = self.stats.prefetch

    async def _process(self, message: AbstractIncomingMessage) -> None:
        if self.throttler is not None:
            try:
                permit = await self.throttler.acquire_async(timeout=math.inf)
            except Overloaded:
                await self._give_back(message)  # its waiting room is full: try again later
                return
            with permit:
                if self._stopping:
                    await self._give_back(message)
                    return
                await self._run_handler(message)
        elif self.sizer is not None:
            async with self._serial:
                if self._stopping:
                    await self._give_back(message)
                    return
                with self.sizer.measure(1):
                    await self._run_handler(message)
        else:
            await self._run_handler(message)

    async def _give_back(self, message: AbstractIncomingMessage) -> None:
        self.stats.returned += 1
        with contextlib.suppress(Exception):
            self._settle(message)
            await message.nack(requeue=True)

    async def _run_handler(self, message: AbstractIncomingMessage) -> None:
        if self._stopping and self.throttler is None and self.sizer is None:
            await self._give_back(message)
            return
        try:
            await self._handler(message)
        except Exception as exc:
            await self._failed(message, exc)
        else:
            self._settle(message)
            await message.ack()
            self.stats.acked += 1
            if message.redelivered and self._failures:
                self._failures.pop(_key(message), None)

    async def _failed(self, message: AbstractIncomingMessage, exc: Exception) -> None:
        self.stats.errors += 1
        deliveries = self._deliveries(message)
        if self._on_error is not None:
            try:
                outcome = self._on_error(message, exc)
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception:
                logger.exception("on_error failed")
        else:
            logger.error("handler failed (delivery %d)", deliveries, exc_info=exc)
        if deliveries >= self.max_deliveries:
            self.stats.rejected += 1
            self._failures.pop(_key(message), None)
            logger.warning("rejecting a message after %d deliveries (max_deliveries)", deliveries)
            self._settle(message)
            await message.reject(requeue=False)
        else:
            self.stats.requeued += 1
            self._settle(message)
            await message.nack(requeue=True)

    def _deliveries(self, message: AbstractIncomingMessage) -> int:
        """How many times this message has been delivered, this one included."""
        count = (message.headers or {}).get("x-delivery-count")
        if isinstance(count, int):  # quorum queues count for us, across consumers and restarts
            return count + 1
        key = _key(message)
        failed = self._failures.pop(key, 0) if message.redelivered else 0
        self._failures[key] = failed + 1
        while len(self._failures) > 100_000:  # bounded: forget the oldest
            self._failures.popitem(last=False)
        return failed + 1


def _key(message: AbstractIncomingMessage) -> str:
    if message.message_id:
        return message.message_id
    digest = hashlib.blake2b(message.body, digest_size=16)
    digest.update(repr(sorted((message.headers or {}).items())).encode())
    return digest.hexdigest()
