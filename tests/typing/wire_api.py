"""Type-checked, never run: shedder.kafka and shedder.rabbitmq as users write them.

Check with ``MYPYPATH=src mypy --strict tests/typing``.
"""

from __future__ import annotations

from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiokafka import AIOKafkaConsumer

from shedder import AdaptiveBatchSizer, BlockingQueue, Throttler
from shedder.kafka import BatchConsumer, BatchConsumerStats, BrokerUnavailable
from shedder.rabbitmq import PrefetchConsumer, PrefetchConsumerStats


async def handle_record(record: Any) -> None:
    print(record.value)


async def on_record_error(record: Any, exc: Exception) -> None:
    print(record.offset, exc)


async def kafka(consumer: AIOKafkaConsumer, queue: BlockingQueue[bytes]) -> BatchConsumerStats:
    loop = BatchConsumer(
        consumer,
        ["orders"],
        handle_record,
        on_error=on_record_error,
        sizer=AdaptiveBatchSizer(10.0, max_size=1000),
        downstream=queue,
        broker_timeout=30.0,
    )
    BatchConsumer(consumer, "orders", handle_record, downstream=Throttler(4))
    BatchConsumer(consumer, ["orders"], handle_record, downstream=lambda: False)
    try:
        await loop.run()
    except BrokerUnavailable:
        loop.stop()
    return loop.stats


async def handle_message(message: AbstractIncomingMessage) -> None:
    print(message.body)


def on_message_error(message: AbstractIncomingMessage, exc: Exception) -> None:
    print(message.delivery_tag, exc)


async def rabbitmq(channel: AbstractChannel) -> PrefetchConsumerStats:
    consumer = PrefetchConsumer(
        channel,
        "orders",
        handle_message,
        sizer=AdaptiveBatchSizer(0.5),
        max_deliveries=3,
        on_error=on_message_error,
        global_qos=False,
    )
    PrefetchConsumer(channel, "orders", handle_message, throttler=Throttler(8))
    await consumer.run()
    consumer.stop()
    return consumer.stats
