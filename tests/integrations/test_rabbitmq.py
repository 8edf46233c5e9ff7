"""shedder.rabbitmq against the real RabbitMQ server at 127.0.0.1:5672."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shedder import AdaptiveBatchSizer, Throttler
from tests.support.brokers import RABBITMQ_URL, missing, rabbitmq_reachable
from tests.support.net import free_port

aio_pika = pytest.importorskip("aio_pika")
from aio_pika.abc import AbstractIncomingMessage  # noqa: E402

from shedder.rabbitmq import PrefetchConsumer  # noqa: E402

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(60)]

_names = itertools.count()


@pytest.fixture
async def connection() -> AsyncIterator[Any]:
    if not rabbitmq_reachable():
        missing("no RabbitMQ at 127.0.0.1:5672")
    conn = await aio_pika.connect(RABBITMQ_URL)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def queue_name(connection: Any) -> AsyncIterator[str]:
    name = f"shedder-test-{os.getpid()}-{next(_names)}"
    channel = await connection.channel()
    await channel.declare_queue(name, auto_delete=False)
    yield name
    await channel.queue_delete(name)
    await channel.close()


async def publish(connection: Any, queue: str, bodies: list[bytes]) -> None:
    channel = await connection.channel()  # publisher confirms: every message is in the queue
    for body in bodies:
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue)
    await channel.close()


async def queue_depth(connection: Any, queue: str) -> int:
    channel = await connection.channel()
    declared = await channel.declare_queue(queue, passive=True)
    await channel.close()
    return int(declared.declaration_result.message_count)


async def consume_until(
    consumer: PrefetchConsumer, done: asyncio.Event, timeout: float = 20
) -> None:
    task = asyncio.create_task(consumer.run())
    waiter = asyncio.create_task(done.wait())
    finished, _ = await asyncio.wait({task, waiter}, timeout=timeout, return_when="FIRST_COMPLETED")
    if task in finished:
        waiter.cancel()
        task.result()
        raise AssertionError("run() returned early")
    consumer.stop()
    await asyncio.wait_for(task, 10)
    assert waiter in finished, "timed out"


async def test_prefetch_follows_the_sizer_and_never_is_exceeded(
    connection: Any, queue_name: str
) -> None:
    bodies = [str(i).encode() for i in range(300)]
    await publish(connection, queue_name, bodies)
    seen: Counter[bytes] = Counter()
    prefetches: list[int] = []
    done = asyncio.Event()
    halfway = asyncio.Event()
    slow = False

    async def handle(message: AbstractIncomingMessage) -> None:
        seen[message.body] += 1
        if len(seen) == 150:
            halfway.set()
        prefetches.append(consumer.stats.prefetch)
        await asyncio.sleep(0.01 if slow else 0)
        if len(seen) == len(bodies):
            done.set()

    sizer = AdaptiveBatchSizer(0.1, max_size=100)
    channel = await connection.channel()
    consumer = PrefetchConsumer(channel, queue_name, handle, sizer=sizer)
    task = asyncio.create_task(consume_until(consumer, done))
    await asyncio.wait_for(halfway.wait(), 10)
    fast_prefetch = consumer.stats.prefetch
    slow = True  # processing slows many times over: the prefetch must come down
    await task
    assert set(seen) == set(bodies)
    assert max(seen.values()) == 1
    assert consumer.stats.acked == len(bodies)
    assert fast_prefetch >= 16  # a ms or two each with a 100 ms budget
    assert consumer.stats.prefetch <= fast_prefetch / 3
    assert consumer.stats.over_prefetch == 0
    assert consumer.stats.max_unacked <= max(prefetches)
    assert await queue_depth(connection, queue_name) == 0


async def test_prefetch_follows_the_throttler_and_its_slots_bound_concurrency(
    connection: Any, queue_name: str
) -> None:
    await publish(connection, queue_name, [b"x"] * 60)
    throttler = Throttler(max_concurrency=4)
    running = peak = handled = 0
    done = asyncio.Event()

    async def handle(message: AbstractIncomingMessage) -> None:
        nonlocal running, peak, handled
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.005)
        running -= 1
        handled += 1
        if handled == 60:
            done.set()

    channel = await connection.channel()
    consumer = PrefetchConsumer(channel, queue_name, handle, throttler=throttler)
    await consume_until(consumer, done)
    assert consumer.stats.prefetch == 4
    assert peak == 4
    assert consumer.stats.max_unacked <= 4
    assert consumer.stats.over_prefetch == 0


async def test_a_poison_message_is_rejected_after_max_deliveries(
    connection: Any, queue_name: str
) -> None:
    await publish(connection, queue_name, [b"ok1", b"poison", b"ok2"])
    attempts: Counter[bytes] = Counter()
    errors: list[str] = []
    done = asyncio.Event()

    def check_done() -> None:
        if attempts[b"ok1"] + attempts[b"ok2"] == 2 and len(errors) == 3:
            done.set()  # the third failure is rejected as run() winds down

    async def handle(message: AbstractIncomingMessage) -> None:
        attempts[message.body] += 1
        if message.body == b"poison":
            raise ValueError("cannot parse")
        check_done()

    def on_error(message: AbstractIncomingMessage, exc: Exception) -> None:
        errors.append(str(exc))
        check_done()

    channel = await connection.channel()
    consumer = PrefetchConsumer(channel, queue_name, handle, max_deliveries=3, on_error=on_error)
    await consume_until(consumer, done)
    assert attempts == {b"ok1": 1, b"ok2": 1, b"poison": 3}
    assert errors == ["cannot parse"] * 3
    assert consumer.stats.rejected == 1
    assert consumer.stats.requeued == 2
    assert await queue_depth(connection, queue_name) == 0


async def test_quorum_queue_counts_deliveries_with_x_delivery_count(connection: Any) -> None:
    name = f"shedder-test-quorum-{os.getpid()}"
    setup = await connection.channel()
    await setup.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    try:
        oks = [f"ok{i}".encode() for i in range(60)]
        await publish(connection, name, [b"poison", *oks])
        attempts: Counter[bytes] = Counter()
        done = asyncio.Event()

        async def handle(message: AbstractIncomingMessage) -> None:
            attempts[message.body] += 1
            if attempts[b"poison"] == 2 and len(attempts) == 61:
                done.set()
            if message.body == b"poison":
                raise ValueError("poison")

        sizer = AdaptiveBatchSizer(0.05, max_size=20)
        channel = await connection.channel()
        consumer = PrefetchConsumer(
            channel, name, handle, sizer=sizer, max_deliveries=2, global_qos=False
        )
        await consume_until(consumer, done)
        assert consumer.stats.rejected == 1
        assert attempts == {b"poison": 2, **dict.fromkeys(oks, 1)}
        # The prefetch grew by re-subscribing (quorum queues refuse a channel-wide one) and
        # the broker never had more deliveries out than the prefetch in force.
        assert consumer.stats.prefetch_changes >= 1
        assert consumer.stats.over_prefetch == 0
    finally:
        await setup.queue_delete(name)
        await setup.close()


async def test_restarts_lose_no_message(connection: Any, queue_name: str) -> None:
    bodies = [str(i).encode() for i in range(200)]
    await publish(connection, queue_name, bodies)
    seen: Counter[bytes] = Counter()
    for _ in range(4):  # four consumers in turn, each stopped mid-stream
        handled = 0
        done = asyncio.Event()

        async def handle(message: AbstractIncomingMessage, done: asyncio.Event = done) -> None:
            nonlocal handled
            seen[message.body] += 1
            handled += 1
            await asyncio.sleep(0.001)
            if handled == 40:
                done.set()

        channel = await connection.channel()
        consumer = PrefetchConsumer(
            channel, queue_name, handle, sizer=AdaptiveBatchSizer(0.05, max_size=50)
        )
        await consume_until(consumer, done)
        assert consumer.stats.acked + consumer.stats.returned == consumer.stats.delivered
        await channel.close()
    assert await queue_depth(connection, queue_name) == len(bodies) - len(seen)
    assert max(seen.values()) == 1  # a clean stop acks or requeues: no duplicate


async def test_a_closed_connection_ends_run_with_an_error(queue_name: str) -> None:
    # A loopback proxy between us and RabbitMQ, to cut the connection mid-run.
    peers: list[asyncio.StreamWriter] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5672)
        peers.extend([writer, up_writer])
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    proxy = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    conn = await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{port}/")
    try:
        channel = await conn.channel()
        delivered = asyncio.Event()

        async def handle(message: AbstractIncomingMessage) -> None:
            delivered.set()

        await publish(conn, queue_name, [b"x"])
        consumer = PrefetchConsumer(channel, queue_name, handle)
        task = asyncio.create_task(consumer.run())
        await asyncio.wait_for(delivered.wait(), 10)
        proxy.close()
        for writer in peers:
            writer.transport.abort()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(task, 10)
    finally:
        with contextlib.suppress(Exception):
            await conn.close()


async def test_broker_down_at_start_is_a_clear_error() -> None:
    with pytest.raises(ConnectionError, match="Connect call failed"):
        await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{free_port()}/")


async def _ignore(message: AbstractIncomingMessage) -> None:
    pass


async def test_bad_configuration_names_the_parameter(connection: Any) -> None:
    channel = await connection.channel()
    with pytest.raises(ValueError, match="not both"):
        PrefetchConsumer(
            channel, "q", _ignore, sizer=AdaptiveBatchSizer(1.0), throttler=Throttler(1)
        )
    with pytest.raises(ValueError, match="max_deliveries"):
        PrefetchConsumer(channel, "q", _ignore, max_deliveries=0)
    with pytest.raises(TypeError, match="prefetch"):
        PrefetchConsumer(channel, "q", _ignore, prefetch=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sizer"):
        PrefetchConsumer(channel, "q", _ignore, sizer=5)  # type: ignore[arg-type]
    await channel.close()
