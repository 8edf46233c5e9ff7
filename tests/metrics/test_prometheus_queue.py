"""Prometheus export of monitored queues, checked by parsing the real exposition text."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import shedder
from shedder import BlockingQueue, MonitoredQueue
from shedder._metrics.queue import instrument_queue


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_exports_depth_counters_drops_and_put_waits() -> None:
    registry = CollectorRegistry()
    queue = instrument_queue(
        MonitoredQueue[int](3, "drop_oldest", put_wait_buckets=(0.01, 1.0)),
        registry=registry,
        name="jobs",
    )
    for value in range(5):
        queue.put(value)
    assert queue.get_nowait() == 2
    samples = scrape(registry)
    label = (("queue", "jobs"),)
    assert samples["shedder_queue_depth", label] == 2
    assert samples["shedder_queue_capacity", label] == 3
    assert samples["shedder_queue_put_total", label] == 5
    assert samples["shedder_queue_get_total", label] == 1
    assert samples["shedder_queue_dropped_total", label] == 2
    assert samples["shedder_queue_put_wait_seconds_count", label] == 5
    assert samples["shedder_queue_put_wait_seconds_bucket", (("le", "0.01"), *label)] == 5
    assert samples["shedder_queue_put_wait_seconds_bucket", (("le", "+Inf"), *label)] == 5
    # A rate is for rate() of the counters, not a gauge of its own.
    assert not any(name == "shedder_queue_throughput" for name, _ in samples)


async def test_blocked_put_lands_in_a_higher_bucket() -> None:
    registry = CollectorRegistry()
    queue = instrument_queue(
        MonitoredQueue[int](1, put_wait_buckets=(0.005, 10.0)), registry=registry, name="q"
    )
    await queue.put_async(1)
    waiting = asyncio.create_task(queue.put_async(2))
    await asyncio.sleep(0.02)  # the put waits measurably for room
    await queue.get_async()
    await asyncio.wait_for(waiting, 5)
    samples = scrape(registry)
    assert samples["shedder_queue_put_wait_seconds_bucket", (("le", "0.005"), ("queue", "q"))] == 1
    assert samples["shedder_queue_put_wait_seconds_bucket", (("le", "10.0"), ("queue", "q"))] == 2
    assert samples["shedder_queue_put_wait_seconds_sum", (("queue", "q"),)] >= 0.015


def test_many_queues_share_one_registry_and_prefix_is_honoured() -> None:
    registry = CollectorRegistry()
    first = instrument_queue(MonitoredQueue[int](2), registry=registry, name="a", prefix="app_")
    second = instrument_queue(MonitoredQueue[int](4), registry=registry, name="b", prefix="app_")
    first.put(1)
    samples = scrape(registry)
    assert samples["app_queue_depth", (("queue", "a"),)] == 1
    assert samples["app_queue_capacity", (("queue", "b"),)] == 4
    assert second.size == 0
    with pytest.raises(ValueError, match="'a' is already instrumented"):
        instrument_queue(MonitoredQueue[int](1), registry=registry, name="a", prefix="app_")


def test_collected_queue_leaves_the_export() -> None:
    registry = CollectorRegistry()
    instrument_queue(MonitoredQueue[int](2), registry=registry, name="gone")
    gc.collect()
    assert not any(labels for (_, labels) in scrape(registry))


def test_only_monitored_queues_can_be_instrumented() -> None:
    with pytest.raises(TypeError, match="must be a shedder MonitoredQueue"):
        instrument_queue(
            BlockingQueue[int](1),  # type: ignore[type-var]
            registry=CollectorRegistry(),
            name="x",
        )


def test_import_shedder_does_not_import_prometheus_client() -> None:
    code = "import sys, shedder; assert 'prometheus_client' not in sys.modules"
    src = str(Path(shedder.__file__).parents[1])
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": src})
