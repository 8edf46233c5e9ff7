"""Save orders from a RabbitMQ queue with a prefetch that follows the processing speed.

    python -m examples.rabbitmq_consumer [AMQP_URL] [QUEUE]

Needs ``pip install "loadshedder[rabbitmq]"`` and RabbitMQ (default amqp://guest:guest@127.0.0.1/).
Ctrl-C stops taking deliveries, finishes the running one and requeues the rest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from shedder import AdaptiveBatchSizer
from shedder.rabbitmq import PrefetchConsumer, PrefetchConsumerStats

logger = logging.getLogger("orders")

saved: list[dict[str, Any]] = []


async def handle(message: AbstractIncomingMessage) -> None:
    order = json.loads(message.body)  # a malformed message raises: nacked, then rejected
    await asyncio.sleep(0.001)  # stands in for an INSERT
    saved.append(order)


def on_error(message: AbstractIncomingMessage, exc: Exception) -> None:
    logger.warning("order %s failed: %r", message.message_id, exc)


async def consume(url: str, queue: str, stop: asyncio.Event) -> PrefetchConsumerStats:
    """Consume ``queue`` until ``stop`` is set; returns the consumer's counters."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True)
        consumer = PrefetchConsumer(
            channel,
            queue,
            handle,
            # A delivery waits here at most ~0.5 s: the prefetch is what the last ones took.
            sizer=AdaptiveBatchSizer(0.5, max_size=500),
            max_deliveries=3,  # a poison message is tried 3 times, then dead-lettered/dropped
            on_error=on_error,
        )
        running = asyncio.create_task(consumer.run())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        consumer.stop()
        stopping.cancel()
        await running  # raises ConnectionError if the connection dropped
    return consumer.stats


async def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "amqp://guest:guest@127.0.0.1/"
    queue = sys.argv[2] if len(sys.argv) > 2 else "orders"
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    stats = await consume(url, queue, stop)
    print(f"acked {stats.acked}, rejected {stats.rejected}, prefetch now {stats.prefetch}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    asyncio.run(main())
