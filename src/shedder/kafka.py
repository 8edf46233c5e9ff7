"""A backpressured Kafka consumer loop on aiokafka (extra ``kafka``).

:class:`BatchConsumer` polls ``getmany(max_records=n)`` with ``n`` from an
:class:`~shedder.AdaptiveBatchSizer` aimed well inside ``max_poll_interval_ms``, hands each
record to your handler, commits only what was processed, and pauses its partitions while a
downstream :class:`~shedder.Throttler` (or queue, or any predicate) is saturated. Processing
time never makes the consumer leave its group: a batch stops taking records at a deadline, and
a record that runs past it keeps the consumer polling (with its partitions paused) meanwhile.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from shedder import AdaptiveBatchSizer, Throttler, ThrottlerListener

try:
    from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
    from aiokafka.abc import ConsumerRebalanceListener
    from aiokafka.errors import CommitFailedError, KafkaError
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError('shedder.kafka needs aiokafka: pip install "loadshedder[kafka]"') from None

__all__ = [
    "BatchConsumer",
    "BatchConsumerStats",
    "BrokerUnavailable",
    "SupportsIsFull",
]

logger = logging.getLogger("shedder.kafka")

Handler = Callable[[ConsumerRecord], Awaitable[object]]
ErrorHandler = Callable[[ConsumerRecord, Exception], "Awaitable[object] | object"]


class SupportsIsFull(Protocol):
    """A bounded queue (e.g. :class:`shedder.BlockingQueue`): saturated while ``is_full``."""

    @property
    def is_full(self) -> bool: ...


Downstream = Throttler | SupportsIsFull | Callable[[], bool]


class BrokerUnavailable(ConnectionError):
    """The broker could not be reached for longer than ``broker_timeout`` seconds."""


@dataclass
class BatchConsumerStats:
    """Counters of a :class:`BatchConsumer` (a live object: read, don't write)."""

    polls: int = 0
    """``getmany`` calls, keep-alive polls included."""
    batches: int = 0
    """Non-empty batches processed."""
    processed: int = 0
    """Records handled (successfully or through ``on_error``) and so committed or to commit."""
    errors: int = 0
    """Records whose handler raised (each reached ``on_error``)."""
    committed: int = 0
    """Records whose offsets were committed."""
    commit_failures: int = 0
    """Commits refused because the group rebalanced meanwhile (those records come again)."""
    rebalances: int = 0
    """Partition assignments after the first one."""
    pauses: int = 0
    """Times the partitions were paused for a saturated downstream."""
    cut_batches: int = 0
    """Batches stopped early (deadline, saturation or stop); the rest is fetched again."""
    longest_poll_gap: float = 0.0
    """Longest time between two consecutive polls, seconds (keep under max_poll_interval)."""


class BatchConsumer:
    """Consume records in batches sized to the processing speed, with backpressure.

    Args:
        consumer: an :class:`aiokafka.AIOKafkaConsumer` with a ``group_id`` and
            ``enable_auto_commit=False``; start it before :meth:`run` (``async with``) and stop
            it after. Don't give it a ``value_deserializer`` that can fail: a failing one raises
            out of ``getmany``; decode in ``handler`` instead, where failures reach ``on_error``.
        topics: the topics to subscribe to (the loop subscribes with its own rebalance listener).
        handler: ``async def handler(record)``; a record counts as processed when it returns.
        on_error: called as ``on_error(record, exc)`` (may be async) when ``handler`` raises;
            the record then counts as processed. If ``on_error`` raises, :meth:`run` commits what
            came before that record and raises. Default: log the exception and go on.
        sizer: chooses ``max_records``; default: an :class:`AdaptiveBatchSizer` with a budget
            of 30 % of ``max_poll_interval`` and ``max_size=max_batch``.
        max_batch: largest batch when ``sizer`` is not given.
        downstream: pause while this is saturated: a :class:`Throttler` (no free slot), a
            bounded queue (``is_full``) or a callable returning True while saturated.
        max_poll_interval: the consumer's ``max_poll_interval_ms`` in seconds (read from the
            consumer when not given). A batch takes no new record after 40 % of it.
        poll_timeout: seconds one ``getmany`` waits for records.
        keepalive: seconds between polls while paused (saturated downstream, or a record that
            runs past the batch deadline); default ``max_poll_interval / 10``, at most 1 s.
        broker_timeout: seconds without any sign of the broker (records, commits, metadata)
            before :meth:`run` raises :class:`BrokerUnavailable`; aiokafka reconnects meanwhile.
        listener: your own ``ConsumerRebalanceListener``, called after the loop's.

    Delivery is at least once: records processed but not yet committed (a crash, a
    cancellation, a rebalance) come again.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        topics: Iterable[str],
        handler: Handler,
        *,
        on_error: ErrorHandler | None = None,
        sizer: AdaptiveBatchSizer | None = None,
        max_batch: int = 500,
        downstream: Downstream | None = None,
        max_poll_interval: float | None = None,
        poll_timeout: float = 1.0,
        keepalive: float | None = None,
        broker_timeout: float = 30.0,
        listener: ConsumerRebalanceListener | None = None,
    ) -> None:
        if not isinstance(consumer, AIOKafkaConsumer):
            raise TypeError(f"consumer must be an AIOKafkaConsumer, got {type(consumer).__name__}")
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        if not self.topics:
            raise ValueError("topics must name at least one topic, got none")
        if not callable(handler):
            raise TypeError(f"handler must be an async callable, got {handler!r}")
        if max_poll_interval is None:
            # aiokafka keeps it private; the constructor argument is the public source of truth.
            max_poll_interval = getattr(consumer, "_max_poll_interval_ms", 300_000) / 1000
        self.max_poll_interval = _positive("max_poll_interval", max_poll_interval)
        self.poll_timeout = _positive("poll_timeout", poll_timeout)
        self.broker_timeout = _positive("broker_timeout", broker_timeout)
        if keepalive is None:
            keepalive = min(1.0, self.max_poll_interval / 10)
        self.keepalive = _positive("keepalive", keepalive)
        if self.keepalive >= self.max_poll_interval / 2:
            raise ValueError(
                f"keepalive must be < max_poll_interval / 2 ({self.max_poll_interval / 2}),"
                f" got {keepalive}"
            )
        if sizer is None:
            sizer = AdaptiveBatchSizer(0.3 * self.max_poll_interval, max_size=max_batch)
        elif not isinstance(sizer, AdaptiveBatchSizer):
            raise TypeError(f"sizer must be an AdaptiveBatchSizer, got {type(sizer).__name__}")
        self.sizer = sizer
        # Past this a batch takes no new record: the poll interval stays under half the limit.
        self.batch_deadline = 0.4 * self.max_poll_interval
        self._consumer = consumer
        self._handler = handler
        self._on_error = on_error
        self._user_listener = listener
        self._saturated, self._throttler = _saturation_check(downstream)
        self.stats = BatchConsumerStats()
        self._stopping = False
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._want_paused = False  # pause state to re-apply after a rebalance (KAFKA-13463)
        self._assignments = 0
        self._last_poll: float | None = None
        self._last_contact = 0.0

    # -- control -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Finish the current record, commit what was processed and return from :meth:`run`."""
        self._stopping = True
        if self._wake is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        """Consume until :meth:`stop`; raises :class:`BrokerUnavailable` or ``on_error``'s error."""
        if getattr(self._consumer, "_coordinator", None) is None:
            # aiokafka would fail on its first getmany with an AttributeError; say what is wrong.
            raise RuntimeError(
                "start the consumer before run(): `await consumer.start()` or `async with consumer`"
                " (start() raises KafkaConnectionError when no broker answers)"
            )
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._consumer.subscribe(self.topics, listener=_Listener(self))
        wake_on_release = _WakeOnRelease(self) if self._throttler is not None else None
        if self._throttler is not None and wake_on_release is not None:
            self._throttler.add_listener(wake_on_release)
        self._last_contact = time.monotonic()
        try:
            while not self._stopping:
                if self._saturated():
                    await self._wait_while_saturated()
                    continue
                batch = await self._poll(self.poll_timeout, self.sizer.size)
                if batch:
                    await self._process(batch)
                else:
                    await self._check_broker()
        finally:
            if self._throttler is not None and wake_on_release is not None:
                self._throttler.remove_listener(wake_on_release)

    # -- polling -------------------------------------------------------------------------------

    async def _poll(self, timeout: float, max_records: int) -> dict[Any, list[Any]]:
        now = time.monotonic()
        if self._last_poll is not None:
            self.stats.longest_poll_gap = max(self.stats.longest_poll_gap, now - self._last_poll)
        try:
            batch: dict[Any, list[Any]] = await self._consumer.getmany(
                timeout_ms=int(timeout * 1000), max_records=max_records
            )
        finally:
            self._last_poll = time.monotonic()
            self.stats.polls += 1
        if batch:
            self._last_contact = self._last_poll
        return batch

    async def _keepalive_poll(self) -> None:
        """Poll with every partition paused: the group sees a live consumer, no record comes."""
        consumer = self._consumer
        paused_here = consumer.assignment() - consumer.paused()
        consumer.pause(*paused_here)
        try:
            batch = await self._poll(0, 1)
        finally:
            still = paused_here & consumer.assignment()
            if not self._want_paused:
                consumer.resume(*still)
        # A rebalance can land between pause() and getmany(): its fresh partitions are not
        # paused. Give back whatever came, to be fetched again later.
        self._give_back(batch)

    def _give_back(self, batch: dict[Any, list[Any]]) -> None:
        assigned = self._consumer.assignment()
        for tp, records in batch.items():
            if records and tp in assigned:
                self._consumer.seek(tp, records[0].offset)

    async def _wait_while_saturated(self) -> None:
        """Pause the partitions, poll to stay in the group, resume when downstream has room."""
        assert self._wake is not None
        consumer = self._consumer
        self._want_paused = True
        self.stats.pauses += 1
        logger.debug("downstream saturated: pausing %s", consumer.assignment())
        try:
            while self._saturated() and not self._stopping:
                consumer.pause(*consumer.assignment())  # again: the assignment may have changed
                self._wake.clear()
                if self._throttler is None or self._saturated():
                    try:
                        await asyncio.wait_for(self._wake.wait(), self.keepalive)
                    except asyncio.TimeoutError:
                        pass
                await self._keepalive_poll()
                await self._check_broker()
        finally:
            self._want_paused = False
            consumer.resume(*consumer.assignment())
            logger.debug("downstream has room: resumed %s", consumer.assignment())

    async def _check_broker(self) -> None:
        """After a quiet spell, ask the broker for metadata: an idle poll looks like a dead one."""
        quiet = time.monotonic() - self._last_contact
        if quiet < min(self.keepalive * 5, self.broker_timeout / 3):
            return
        try:
            await asyncio.wait_for(self._consumer.topics(), self.broker_timeout / 3)
        except (KafkaError, asyncio.TimeoutError) as exc:
            if time.monotonic() - self._last_contact >= self.broker_timeout:
                raise BrokerUnavailable(
                    f"no answer from the Kafka broker for {self.broker_timeout:g} s"
                    f" (broker_timeout): {exc!r}"
                ) from exc
            return
        self._last_contact = time.monotonic()

    # -- processing ----------------------------------------------------------------------------

    async def _process(self, batch: dict[Any, list[Any]]) -> None:
        started = time.monotonic()
        deadline = started + self.batch_deadline
        finished: list[float] = []  # when each record was done
        next_offsets: dict[Any, int] = {}
        counts: dict[Any, int] = {}
        done = 0
        failure: BaseException | None = None
        cut = False
        try:
            for tp, records in batch.items():
                for index, record in enumerate(records):
                    if self._stopping or time.monotonic() >= deadline or self._saturated():
                        cut = True
                    elif tp not in self._consumer.assignment():
                        cut = True  # revoked by a rebalance: its new owner takes it from here
                    if cut:
                        if tp in self._consumer.assignment():
                            self._consumer.seek(tp, records[index].offset)
                        break
                    await self._handle(record, deadline)
                    next_offsets[tp] = record.offset + 1
                    counts[tp] = counts.get(tp, 0) + 1
                    done += 1
                    finished.append(time.monotonic())
                else:
                    continue
                # Cut: give back the untouched partitions too.
                later = list(batch)[list(batch).index(tp) + 1 :]
                self._give_back({t: batch[t] for t in later})
                break
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self._record_batch(started, finished)
            self.stats.batches += 1
            self.stats.processed += done
            self.stats.cut_batches += cut
            if not isinstance(failure, asyncio.CancelledError):
                await self._commit(next_offsets, counts)

    def _record_batch(self, started: float, finished: list[float]) -> None:
        """Tell the sizer how long the batch took, and how slow its end was if slower.

        A slowdown that starts mid-batch is diluted in the batch's average: sized on that
        alone, the next batch would overrun too. So the slowest of the batch's last quarter,
        eighth and sixteenth (8 records at least) is reported as well when clearly slower; the
        sizer believes a slower rate at once.
        """
        elapsed = time.monotonic() - started
        done = len(finished)
        self.sizer.record(done, elapsed)
        if done < 16:
            return
        slowest: tuple[float, int, float] | None = None  # (seconds per record, records, seconds)
        for tail in (done // 4, done // 8, done // 16):
            if tail < 8:
                break
            tail_elapsed = finished[-1] - finished[-tail - 1]
            if slowest is None or tail_elapsed / tail > slowest[0]:
                slowest = (tail_elapsed / tail, tail, tail_elapsed)
        if slowest is not None and slowest[0] > 1.2 * elapsed / done:
            self.sizer.record(slowest[1], slowest[2])

    async def _handle(self, record: Any, deadline: float) -> None:
        task = asyncio.ensure_future(self._handler(record))
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    await asyncio.wait({task}, timeout=remaining)
                if task.done():
                    break
                # A record past the batch deadline: stay in the group while it runs.
                deadline = time.monotonic() + self.keepalive
                await self._keepalive_poll()
        except BaseException:
            task.cancel()
            raise
        exc = task.exception()
        if exc is None:
            return
        if not isinstance(exc, Exception):
            raise exc
        self.stats.errors += 1
        if self._on_error is None:
            logger.error(
                "handler failed on %s[%d]@%d",
                record.topic,
                record.partition,
                record.offset,
                exc_info=exc,
            )
            return
        outcome = self._on_error(record, exc)
        if inspect.isawaitable(outcome):
            await outcome

    async def _commit(self, next_offsets: dict[Any, int], counts: dict[Any, int]) -> None:
        assigned = self._consumer.assignment()
        offsets = {tp: offset for tp, offset in next_offsets.items() if tp in assigned}
        count = sum(counts[tp] for tp in offsets)
        if not offsets:
            return
        try:
            await asyncio.wait_for(self._consumer.commit(offsets), self.broker_timeout)
        except CommitFailedError:
            # The group rebalanced under us: the new owner gets these records again.
            self.stats.commit_failures += 1
            logger.warning("commit refused after a rebalance; %d records come again", count)
            return
        except asyncio.TimeoutError:
            raise BrokerUnavailable(
                f"commit got no answer in {self.broker_timeout:g} s (broker_timeout);"
                f" {count} processed records were not committed and will come again"
            ) from None
        self.stats.committed += count
        self._last_contact = time.monotonic()

    # -- rebalances ----------------------------------------------------------------------------

    async def _on_assigned(self, assigned: set[Any]) -> None:
        self._assignments += 1
        if self._assignments > 1:
            self.stats.rebalances += 1
        if self._want_paused and assigned:
            # KAFKA-13463: a rebalance forgets the pause; saturation has not gone away.
            self._consumer.pause(*assigned)
        await _maybe_await(self._user_listener, "on_partitions_assigned", assigned)

    async def _on_revoked(self, revoked: set[Any]) -> None:
        await _maybe_await(self._user_listener, "on_partitions_revoked", revoked)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: BatchConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._owner._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._owner._on_assigned(assigned)


class _WakeOnRelease(ThrottlerListener):
    """Wakes the paused loop when the downstream throttler frees a slot (from any thread)."""

    def __init__(self, owner: BatchConsumer) -> None:
        self._owner = owner

    def on_release(self, throttler: Throttler, held: float) -> None:
        owner = self._owner
        if owner._want_paused and owner._wake is not None and owner._loop is not None:
            owner._loop.call_soon_threadsafe(owner._wake.set)


async def _maybe_await(listener: object, method: str, partitions: set[Any]) -> None:
    if listener is None:
        return
    outcome = getattr(listener, method)(partitions)
    if inspect.isawaitable(outcome):
        await outcome


def _saturation_check(
    downstream: Downstream | None,
) -> tuple[Callable[[], bool], Throttler | None]:
    if downstream is None:
        return (lambda: False), None
    if isinstance(downstream, Throttler):
        throttler = downstream
        # No free slot: new work would only queue in memory; better it waits in Kafka.
        return (lambda: throttler.in_flight >= throttler.max_concurrency), throttler
    if hasattr(downstream, "is_full"):
        queue = downstream
        return (lambda: bool(queue.is_full)), None
    if callable(downstream):
        return downstream, None
    raise TypeError(
        "downstream must be a Throttler, a queue with is_full or a callable,"
        f" got {type(downstream).__name__}"
    )


def _positive(name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be > 0 and finite seconds, got {value}")
    return float(value)
