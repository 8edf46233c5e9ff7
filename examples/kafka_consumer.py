"""Save orders from a Kafka topic in batches sized to the work, pausing while the DB is busy.

    python -m examples.kafka_consumer [BOOTSTRAP_SERVERS] [TOPIC]

Needs ``pip install "loadshedder[kafka]"`` and a Kafka broker (default 127.0.0.1:9092).
Ctrl-C stops it after the current record, with everything processed committed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from typing import Any

from aiokafka import AIOKafkaConsumer

from shedder import Throttler
from shedder.kafka import BatchConsumer, BatchConsumerStats

logger = logging.getLogger("orders")

# The downstream this consumer must not flood: at most 4 writes at once. While it has no free
# slot the consumer pauses its partitions (staying in its group) instead of piling up work.
database = Throttler(max_concurrency=4, name="database")


async def save(order: dict[str, Any]) -> None:
    async with database:
        await asyncio.sleep(0.001)  # stands in for an INSERT


async def handle(record: Any) -> None:
    order = json.loads(record.value)  # a malformed record raises here and goes to on_error
    await save(order)


def on_error(record: Any, exc: Exception) -> None:
    logger.warning("skipping %s[%d]@%d: %r", record.topic, record.partition, record.offset, exc)


async def consume(
    bootstrap: str, topic: str, stop: asyncio.Event, **options: Any
) -> BatchConsumerStats:
    """Consume ``topic`` until ``stop`` is set; returns the loop's counters."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id="orders",
        enable_auto_commit=False,  # the loop commits what it processed, after processing
        auto_offset_reset="earliest",
        max_poll_interval_ms=60_000,  # batches aim at 30 % of it, stop taking records at 40 %
        **options,
    )
    async with consumer:
        loop = BatchConsumer(consumer, [topic], handle, on_error=on_error, downstream=database)
        running = asyncio.create_task(loop.run())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        loop.stop()
        stopping.cancel()
        await running  # raises BrokerUnavailable if the broker stayed away too long
    return loop.stats


async def main() -> None:
    bootstrap = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9092"
    topic = sys.argv[2] if len(sys.argv) > 2 else "orders"
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    stats = await consume(bootstrap, topic, stop)
    print(f"processed {stats.processed} records ({stats.errors} malformed)")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    asyncio.run(main())
