"""RabbitMQ: prefetch that follows the processing speed, and consumer restarts, for real.

    python benchmarks/bench_rabbitmq.py [--messages 4000] [--restarts 4]

Needs the ``rabbitmq`` extra and the RabbitMQ server at 127.0.0.1:5672 (guest/guest).
Publishes ``--messages`` persistent messages to a fresh queue (classic with the channel-wide
prefetch, then quorum with the per-consumer one), consumes them with
:class:`shedder.rabbitmq.PrefetchConsumer` (sizer budget 100 ms; work 1 ms a message, 5 ms
from halfway), restarting the consumer ``--restarts`` times: cleanly (stop) and, every other
time, by dropping its connection with deliveries unacknowledged. Counts every delivery
against the prefetch in force when it arrived, and every message (lost, duplicated).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "src"):  # run from a checkout without installing
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import aio_pika  # noqa: E402
from tests.support.brokers import RABBITMQ_URL  # noqa: E402

from shedder import AdaptiveBatchSizer  # noqa: E402
from shedder.rabbitmq import PrefetchConsumer  # noqa: E402


async def run(kind: str, messages: int, restarts: int) -> None:
    name = f"shedder-bench-{kind}-{os.getpid()}"
    admin = await aio_pika.connect(RABBITMQ_URL)
    setup = await admin.channel()
    arguments = {"x-queue-type": kind}
    await setup.declare_queue(name, durable=True, arguments=arguments)
    for i in range(messages):
        await setup.default_exchange.publish(
            aio_pika.Message(str(i).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=name,
        )
    acked: Counter[bytes] = Counter()
    delivered = over = max_unacked = peak_prefetch = 0
    prefetches: set[int] = set()
    share = messages // (restarts + 1)
    for round_ in range(restarts + 1):
        crash = round_ % 2 == 1 and round_ < restarts
        connection = await aio_pika.connect(RABBITMQ_URL)
        channel = await connection.channel()
        stop_at = messages if round_ == restarts else share * (round_ + 1)
        reached = asyncio.Event()

        current: list[PrefetchConsumer] = []

        async def handle(
            message: Any,
            stop_at: int = stop_at,
            reached: Any = reached,
            crash: bool = crash,
            current: list[PrefetchConsumer] = current,
        ) -> None:
            await asyncio.sleep(0.005 if len(acked) > messages // 2 else 0.001)
            if crash and len(acked) >= stop_at:
                reached.set()
                await asyncio.Event().wait()  # hang: the connection drop ends this delivery
            acked[message.body] += 1  # acked right after this returns
            prefetches.add(current[0].stats.prefetch)
            if len(acked) >= stop_at:
                reached.set()

        consumer = PrefetchConsumer(
            channel,
            name,
            handle,
            sizer=AdaptiveBatchSizer(0.1, max_size=200),
            global_qos=kind == "classic",
        )
        current.append(consumer)
        task = asyncio.create_task(consumer.run())
        await asyncio.wait_for(reached.wait(), 120)
        if crash:
            await connection.close()  # unacked deliveries go back to the queue
            try:
                await asyncio.wait_for(task, 10)
            except (Exception, asyncio.CancelledError):  # run() may end either way: it was cut off
                pass
            task.cancel()
        else:
            consumer.stop()
            await task
            await connection.close()
        stats = consumer.stats
        delivered += stats.delivered
        over += stats.over_prefetch
        max_unacked = max(max_unacked, stats.max_unacked)
        peak_prefetch = max(peak_prefetch, *prefetches) if prefetches else peak_prefetch
    depth = (await setup.declare_queue(name, passive=True)).declaration_result.message_count
    await setup.queue_delete(name)
    await admin.close()
    lost = messages - len(acked)
    duplicated = sum(count - 1 for count in acked.values())
    print(
        f"{kind} queue, {messages} messages, {restarts} restarts "
        f"({(restarts + 1) // 2} by dropping the connection):"
    )
    print(
        f"  prefetch seen: {min(prefetches)}..{peak_prefetch}, deliveries {delivered}, "
        f"most unacked at once {max_unacked}, deliveries over the prefetch in force {over}"
    )
    print(
        f"  acked {sum(acked.values())}, lost {lost}, duplicated {duplicated}, "
        f"left in queue {depth}"
    )


async def main(messages: int, restarts: int) -> None:
    for kind in ("classic", "quorum"):
        await run(kind, messages, restarts)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--restarts", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(main(args.messages, args.restarts))
