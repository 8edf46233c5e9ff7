"""Prometheus export of :class:`shedder.MonitoredQueue` (extra ``prometheus``).

Re-exported as ``shedder.prometheus.instrument_queue``. The numbers are read from
``queue.stats()`` at scrape time by one collector per registry and prefix, so instrumenting
costs nothing between scrapes and every sample of a scrape comes from one consistent snapshot.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import Any, TypeVar

from shedder._toolkit.queues import MonitoredQueue

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'shedder.prometheus needs prometheus_client: pip install "loadshedder[prometheus]"'
    ) from None

__all__ = ["instrument_queue"]

Q = TypeVar("Q", bound=MonitoredQueue[Any])


class _QueueCollector:
    """Reports every queue instrumented into one registry under one prefix, labelled by name."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._queues: weakref.WeakValueDictionary[str, MonitoredQueue[Any]] = (
            weakref.WeakValueDictionary()
        )

    def add(self, name: str, queue: MonitoredQueue[Any]) -> None:
        if self._queues.get(name) is not None:
            raise ValueError(f"a queue named {name!r} is already instrumented in this registry")
        self._queues[name] = queue

    def describe(self) -> list[Metric]:
        return []  # names are checked when the collector is registered, by collect()

    def collect(self) -> Iterator[Metric]:
        p = self._prefix
        depth = GaugeMetricFamily(f"{p}queue_depth", "Items in the queue.", labels=["queue"])
        capacity = GaugeMetricFamily(
            f"{p}queue_capacity", "Most items the queue holds.", labels=["queue"]
        )
        puts = CounterMetricFamily(f"{p}queue_put", "Items put, kept or dropped.", labels=["queue"])
        gets = CounterMetricFamily(f"{p}queue_get", "Items taken out.", labels=["queue"])
        drops = CounterMetricFamily(
            f"{p}queue_dropped", "Items dropped by the queue's policy.", labels=["queue"]
        )
        waits = HistogramMetricFamily(
            f"{p}queue_put_wait_seconds",
            "Seconds a put waited for room.",
            labels=["queue"],
        )
        for name, queue in sorted(self._queues.items()):
            stats = queue.stats()
            depth.add_metric([name], stats.size)
            capacity.add_metric([name], stats.capacity)
            puts.add_metric([name], stats.put_total)
            gets.add_metric([name], stats.get_total)
            drops.add_metric([name], stats.dropped_total)
            waits.add_metric(
                [name],
                [(_bound(bound), count) for bound, count in stats.put_wait_buckets],
                stats.put_wait_sum,
            )
        yield from (depth, capacity, puts, gets, drops, waits)


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, _QueueCollector]] = (
    weakref.WeakKeyDictionary()
)
_collectors_lock = threading.Lock()


def instrument_queue(
    queue: Q,
    *,
    registry: CollectorRegistry | None = None,
    prefix: str = "shedder_",
    name: str,
) -> Q:
    """Export ``queue``'s depth, capacity, puts, gets, drops and put waits.

    Metrics (label ``queue=name``): ``{prefix}queue_depth``, ``{prefix}queue_capacity``,
    ``{prefix}queue_put_total``,
    ``{prefix}queue_get_total``, ``{prefix}queue_dropped_total`` and the histogram
    ``{prefix}queue_put_wait_seconds``. The queue is held weakly: once collected, it disappears
    from the export. For throughput, take ``rate()`` of the counters. Returns ``queue``.
    Raises ``ValueError`` if ``name`` is already used in ``registry`` (default: the global
    one) and ``TypeError`` for a queue that is not monitored.
    """
    if not isinstance(queue, MonitoredQueue):
        raise TypeError(f"queue must be a shedder MonitoredQueue, got {type(queue).__name__}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    registry = REGISTRY if registry is None else registry
    with _collectors_lock:
        by_prefix = _collectors.setdefault(registry, {})
        collector = by_prefix.get(prefix)
        if collector is None:
            collector = _QueueCollector(prefix)
            collector.add(name, queue)
            registry.register(collector)
            by_prefix[prefix] = collector
        else:
            collector.add(name, queue)
    return queue
