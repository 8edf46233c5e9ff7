"""examples/kafka_consumer.py and examples/rabbitmq_consumer.py do what their docs promise."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from shedder import Throttler, ThrottlerListener
from tests.support.brokers import (
    RABBITMQ_URL,
    KafkaBroker,
    kafka_broker,
    missing,
    rabbitmq_reachable,
)

pytest.importorskip("aiokafka")
pytest.importorskip("aio_pika")

import aio_pika
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from examples import kafka_consumer, rabbitmq_consumer

ORDERS = [json.dumps({"order": i}).encode() for i in range(20)]


class StopAfter(ThrottlerListener):
    def __init__(self, count: int, stop: asyncio.Event) -> None:
        self.left = count
        self.stop = stop

    def on_release(self, throttler: Throttler, held: float) -> None:
        self.left -= 1
        if self.left == 0:
            self.stop.set()


@pytest.fixture(scope="module")
def broker() -> Iterator[KafkaBroker]:
    with kafka_broker() as running:
        yield running


@pytest.mark.kafka
@pytest.mark.timeout(60)
async def test_kafka_example_saves_the_good_orders_and_skips_a_malformed_one(
    broker: KafkaBroker,
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic("orders", num_partitions=2, replication_factor=1)])
    await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    async with producer:
        for value in [*ORDERS[:10], b"{oops", *ORDERS[10:]]:
            await producer.send_and_wait("orders", value)
    stop = asyncio.Event()
    listener = StopAfter(len(ORDERS), stop)
    kafka_consumer.database.add_listener(listener)
    try:
        stats = await asyncio.wait_for(
            kafka_consumer.consume(
                broker.bootstrap, "orders", stop, session_timeout_ms=2000, heartbeat_interval_ms=300
            ),
            30,
        )
    finally:
        kafka_consumer.database.remove_listener(listener)
    assert listener.left == 0
    assert stats.errors == 1
    assert stats.processed == stats.committed == len(ORDERS) + 1


@pytest.mark.rabbitmq
@pytest.mark.timeout(60)
async def test_rabbitmq_example_saves_the_good_orders_and_rejects_a_malformed_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not rabbitmq_reachable():
        missing("no RabbitMQ at 127.0.0.1:5672")
    queue = f"shedder-example-{os.getpid()}"
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True)
        for body in [*ORDERS[:10], b"{oops", *ORDERS[10:]]:
            await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue)
        rabbitmq_consumer.saved.clear()
        stop = asyncio.Event()
        errors: list[Exception] = []
        on_error, handle = rabbitmq_consumer.on_error, rabbitmq_consumer.handle

        def check_done() -> None:  # 20 orders saved, the bad one tried 3 times
            if len(errors) == 3 and len(rabbitmq_consumer.saved) == len(ORDERS):
                stop.set()

        def watched_on_error(message: Any, exc: Exception) -> None:
            errors.append(exc)
            on_error(message, exc)
            check_done()

        async def watched_handle(message: Any) -> None:
            await handle(message)
            check_done()

        monkeypatch.setattr(rabbitmq_consumer, "on_error", watched_on_error)
        monkeypatch.setattr(rabbitmq_consumer, "handle", watched_handle)
        stats = await asyncio.wait_for(rabbitmq_consumer.consume(RABBITMQ_URL, queue, stop), 30)
        depth = (await channel.declare_queue(queue, passive=True)).declaration_result
        await channel.queue_delete(queue)
    assert sorted(order["order"] for order in rabbitmq_consumer.saved) == list(range(20))
    assert stats.rejected == 1
    assert depth.message_count == 0
