"""shedder.kafka against a real Kafka-protocol broker (Tansu, started by these tests)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from shedder import AdaptiveBatchSizer, Throttler
from tests.support.brokers import KafkaBroker, kafka_broker
from tests.support.net import free_port

aiokafka = pytest.importorskip("aiokafka")
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402
from aiokafka.abc import ConsumerRebalanceListener  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402
from aiokafka.errors import KafkaConnectionError  # noqa: E402

from shedder.kafka import BatchConsumer, BrokerUnavailable  # noqa: E402

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(60)]

_names = itertools.count()


@pytest.fixture(scope="module")
def broker() -> Iterator[KafkaBroker]:
    with kafka_broker() as running:
        yield running


@pytest.fixture
async def topic(broker: KafkaBroker) -> str:
    name = f"t{next(_names)}"
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=3, replication_factor=1)])
    finally:
        await admin.close()
    return name


async def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for index, value in enumerate(values):
            await producer.send(topic, value, partition=index % 3)
        await producer.flush()
    finally:
        await producer.stop()


def new_consumer(bootstrap: str, group: str, **options: Any) -> AIOKafkaConsumer:
    # Short session: Tansu waits about half of it before answering a JoinGroup.
    settings: dict[str, Any] = {
        "group_id": group,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": 2000,
        "heartbeat_interval_ms": 300,
        "rebalance_timeout_ms": 1000,
        "request_timeout_ms": 3000,
    }
    settings.update(options)
    return AIOKafkaConsumer(bootstrap_servers=bootstrap, **settings)


class Assignments(ConsumerRebalanceListener):  # type: ignore[misc]
    """Sets ``changed`` at every assignment the loop's consumer receives."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        pass

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.changed.set()


class Saturated:
    """``downstream`` for the loop: a full throttler, with an event after ``checks`` looks."""

    def __init__(self, throttler: Throttler, checks: int) -> None:
        self.throttler = throttler
        self.looked = 0
        self.checks = checks
        self.seen_enough = asyncio.Event()

    def __call__(self) -> bool:
        full = self.throttler.in_flight >= self.throttler.max_concurrency
        if full:
            self.looked += 1
            if self.looked >= self.checks:
                self.seen_enough.set()
        return full


async def committed_total(consumer: AIOKafkaConsumer, topic: str) -> int:
    total = 0
    for partition in range(3):
        offset = await consumer.committed(TopicPartition(topic, partition))
        total += offset or 0
    return total


async def run_until(loop: BatchConsumer, done: asyncio.Event, timeout: float = 20) -> None:
    task = asyncio.create_task(loop.run())
    waiter = asyncio.create_task(done.wait())
    finished, _ = await asyncio.wait({task, waiter}, timeout=timeout, return_when="FIRST_COMPLETED")
    if task in finished:
        waiter.cancel()
        task.result()  # raise what run() raised
        raise AssertionError("run() returned before the test was done")
    loop.stop()
    await asyncio.wait_for(task, 10)
    assert waiter in finished, "timed out"


async def test_processes_every_record_once_and_commits_them(
    broker: KafkaBroker, topic: str
) -> None:
    values = [str(i).encode() for i in range(600)]
    await produce(broker.bootstrap, topic, values)
    seen: Counter[bytes] = Counter()
    done = asyncio.Event()

    async def handle(record: Any) -> None:
        seen[record.value] += 1
        if len(seen) == len(values):
            done.set()

    sizer = AdaptiveBatchSizer(1.0, max_size=200)
    async with new_consumer(broker.bootstrap, "g-all") as consumer:
        loop = BatchConsumer(consumer, [topic], handle, sizer=sizer)
        await run_until(loop, done)
        assert await committed_total(consumer, topic) == len(values)
    assert set(seen) == set(values)
    assert max(seen.values()) == 1
    assert sizer.size > 1  # fast processing grew the batches
    assert loop.stats.processed == loop.stats.committed == len(values)
    assert loop.stats.rebalances == 0


async def test_malformed_records_reach_on_error_and_the_loop_goes_on(
    broker: KafkaBroker, topic: str
) -> None:
    values = [json.dumps({"n": i}).encode() for i in range(30)]
    values[7] = b"{not json"
    values[20] = b"\xff\xfe"
    await produce(broker.bootstrap, topic, values)
    decoded: list[int] = []
    failed: list[tuple[bytes, type[BaseException]]] = []
    done = asyncio.Event()

    def check_done() -> None:
        if len(decoded) + len(failed) == len(values):
            done.set()

    async def handle(record: Any) -> None:
        decoded.append(json.loads(record.value)["n"])
        check_done()

    def on_error(record: Any, exc: Exception) -> None:
        failed.append((record.value, type(exc)))
        check_done()

    async with new_consumer(broker.bootstrap, "g-bad") as consumer:
        loop = BatchConsumer(consumer, [topic], handle, on_error=on_error)
        await run_until(loop, done)
        assert await committed_total(consumer, topic) == len(values)
    assert sorted(value for value, _ in failed) == sorted([b"{not json", b"\xff\xfe"])
    assert {kind for _, kind in failed} <= {json.JSONDecodeError, UnicodeDecodeError}
    assert sorted(decoded) == [i for i in range(30) if i not in (7, 20)]
    assert loop.stats.errors == 2


async def test_on_error_that_raises_stops_the_loop_committing_what_came_before(
    broker: KafkaBroker, topic: str
) -> None:
    await produce(broker.bootstrap, topic, [b"ok"] * 5 + [b"poison"])  # poison: partition 2

    async def handle(record: Any) -> None:
        if record.value == b"poison":
            raise ValueError("poison")

    def on_error(record: Any, exc: Exception) -> None:
        raise RuntimeError("give up") from exc

    async with new_consumer(broker.bootstrap, "g-raise", max_poll_records=10) as consumer:
        loop = BatchConsumer(consumer, [topic], handle, on_error=on_error)
        with pytest.raises(RuntimeError, match="give up"):
            await asyncio.wait_for(loop.run(), 20)
        poison = TopicPartition(topic, 2)
        # Everything before the poison record was committed, the poison record was not.
        assert await consumer.committed(poison) in (None, 1)
        assert loop.stats.processed <= 5


async def test_a_record_slower_than_max_poll_interval_causes_no_rebalance(
    broker: KafkaBroker, topic: str
) -> None:
    await produce(broker.bootstrap, topic, [b"fast"] * 8 + [b"slow"] + [b"fast"] * 8)
    done = asyncio.Event()
    count = 0

    async def handle(record: Any) -> None:
        nonlocal count
        if record.value == b"slow":
            await asyncio.sleep(2.5)  # the work itself: longer than max_poll_interval
        count += 1
        if count == 17:
            done.set()

    async with new_consumer(broker.bootstrap, "g-slow", max_poll_interval_ms=1500) as consumer:
        loop = BatchConsumer(consumer, [topic], handle, poll_timeout=0.2)
        await run_until(loop, done)
        assert await committed_total(consumer, topic) == 17
    assert loop.stats.rebalances == 0
    assert loop.stats.commit_failures == 0
    assert loop.stats.longest_poll_gap < 0.5 * 1.5


async def test_pauses_while_the_throttler_is_full_and_resumes_after(
    broker: KafkaBroker, topic: str
) -> None:
    downstream = Throttler(max_concurrency=1, max_queue=0)
    held = downstream.acquire()
    await produce(broker.bootstrap, topic, [b"x"] * 12)
    handled: list[float] = []
    done = asyncio.Event()

    async def handle(record: Any) -> None:
        async with downstream:
            handled.append(time.monotonic())
        if len(handled) == 12:
            done.set()

    async with new_consumer(broker.bootstrap, "g-pause") as consumer:
        probe = Saturated(downstream, checks=10)
        loop = BatchConsumer(consumer, [topic], handle, downstream=probe, keepalive=0.1)
        task = asyncio.create_task(run_until(loop, done))
        # Ten looks (a keep-alive poll each) while paused: it stays in the group, takes nothing.
        await asyncio.wait_for(probe.seen_enough.wait(), 10)
        assert consumer.paused() == consumer.assignment() != set()
        assert handled == []
        released_at = time.monotonic()
        held.release()
        await task
    assert len(handled) == 12
    assert min(handled) >= released_at
    assert loop.stats.pauses >= 1
    assert loop.stats.rebalances == 0


async def test_pause_survives_rebalances(broker: KafkaBroker, topic: str) -> None:
    """KAFKA-13463: partitions assigned while saturated must come paused."""
    downstream = Throttler(max_concurrency=1, max_queue=0)
    held = downstream.acquire()
    await produce(broker.bootstrap, topic, [str(i).encode() for i in range(30)])
    first: list[bytes] = []
    second: list[bytes] = []
    done = asyncio.Event()

    async def handle_first(record: Any) -> None:
        first.append(record.value)
        if len(first) + len(second) >= 30:
            done.set()

    second_got_some = asyncio.Event()

    async def handle_second(record: Any) -> None:
        second.append(record.value)
        second_got_some.set()

    async with new_consumer(broker.bootstrap, "g-13463") as consumer:
        probe = Saturated(downstream, checks=2)
        assignments = Assignments()
        loop = BatchConsumer(
            consumer, [topic], handle_first, downstream=probe, keepalive=0.1, listener=assignments
        )
        task = asyncio.create_task(run_until(loop, done, timeout=40))
        await asyncio.wait_for(assignments.changed.wait(), 10)
        await asyncio.wait_for(probe.seen_enough.wait(), 10)
        # A second member joins (rebalance), takes its share, and leaves (rebalance again):
        # the first member is handed partitions twice while its downstream is still full.
        async with new_consumer(broker.bootstrap, "g-13463") as other_consumer:
            other = BatchConsumer(other_consumer, [topic], handle_second, poll_timeout=0.2)
            other_task = asyncio.create_task(other.run())
            await asyncio.wait_for(second_got_some.wait(), 10)
            assignments.changed.clear()
            other.stop()
            await other_task
        await asyncio.wait_for(assignments.changed.wait(), 10)  # the leave hands all back
        assert (
            consumer.paused()
            == consumer.assignment()
            == {TopicPartition(topic, p) for p in range(3)}
        )
        assert first == []  # saturated all along: nothing came through either rebalance
        held.release()
        await task
    assert loop.stats.rebalances >= 2
    assert sorted(first + second, key=int) == [str(i).encode() for i in range(30)]


async def test_broker_gone_mid_run_raises_instead_of_stalling() -> None:
    with kafka_broker() as own:
        admin = AIOKafkaAdminClient(bootstrap_servers=own.bootstrap)
        await admin.start()
        await admin.create_topics([NewTopic("gone", num_partitions=1, replication_factor=1)])
        await admin.close()
        consumer = new_consumer(own.bootstrap, "g-gone")
        await consumer.start()
        try:
            assignments = Assignments()
            loop = BatchConsumer(
                consumer,
                ["gone"],
                _ignore,
                broker_timeout=1.5,
                poll_timeout=0.1,
                keepalive=0.1,
                listener=assignments,
            )
            task = asyncio.create_task(loop.run())
            await asyncio.wait_for(assignments.changed.wait(), 10)
            own.kill()
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable, match="broker_timeout"):
                await asyncio.wait_for(task, 10)
            assert time.monotonic() - started < 5
        finally:
            # aiokafka's stop() lets a fetch task's CancelledError out when the broker is gone.
            with contextlib.suppress(asyncio.CancelledError):
                await consumer.stop()


async def test_a_slowdown_at_the_end_of_a_batch_sizes_the_next_one() -> None:
    consumer = new_consumer("127.0.0.1:9", "g-unit")
    try:
        sizer = AdaptiveBatchSizer(1.0, max_size=10_000, initial=330)
        loop = BatchConsumer(consumer, ["t"], _ignore, sizer=sizer)
        now = time.monotonic()
        started = now - 1.0
        # 300 records at 2 ms, then 40 at 10 ms: the batch's average hides the new speed.
        finished = [started + 0.002 * (i + 1) for i in range(300)]
        finished += [started + 0.6 + 0.010 * (i + 1) for i in range(40)]
        loop._record_batch(started, finished)
    finally:
        await consumer.stop()
    # Sized on the 10 ms tail (0.8 s / 10 ms = 80), not on the 2.9 ms average (~270).
    assert 70 <= sizer.size <= 90


async def test_broker_down_at_start_is_a_clear_error() -> None:
    dead = f"127.0.0.1:{free_port()}"
    consumer = new_consumer(dead, "g-dead")
    loop = BatchConsumer(consumer, ["t"], _ignore)
    with pytest.raises(RuntimeError, match="start the consumer"):
        await loop.run()
    with pytest.raises(KafkaConnectionError):
        await consumer.start()
    await consumer.stop()


async def _ignore(record: Any) -> None:
    pass


async def test_bad_configuration_names_the_parameter(broker: KafkaBroker) -> None:
    consumer = new_consumer(broker.bootstrap, "g-conf")
    try:
        with pytest.raises(TypeError, match="consumer"):
            BatchConsumer(object(), ["t"], _ignore)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="topics"):
            BatchConsumer(consumer, [], _ignore)
        with pytest.raises(ValueError, match="poll_timeout"):
            BatchConsumer(consumer, ["t"], _ignore, poll_timeout=0)
        with pytest.raises(ValueError, match="keepalive"):
            BatchConsumer(consumer, ["t"], _ignore, max_poll_interval=1.0, keepalive=0.6)
        with pytest.raises(TypeError, match="sizer"):
            BatchConsumer(consumer, ["t"], _ignore, sizer=10)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="downstream"):
            BatchConsumer(consumer, ["t"], _ignore, downstream=3)  # type: ignore[arg-type]
    finally:
        await consumer.stop()
