"""Prometheus metrics for throttlers (extra ``prometheus``).

``instrument(throttler)`` attaches a throttler's metrics to a registry in one call; every
series carries a ``throttler`` label (the throttler's ``name``), so a global throttler and
per-route ones share one registry. The admitted and shed counters also carry a ``priority``
label: the throttler's class names, a short fixed list (never the flow: a label per tenant
would grow the series without bound). ``metrics_response()`` renders a registry for
``/metrics``.

Two implementations behind the same metric names:

* **collector** (one process): gauges and counters are read from ``throttler.stats()`` at scrape
  time by a custom collector; only the two histograms are updated per request, with a bisect
  and a lock each.
* **multiprocess** (``PROMETHEUS_MULTIPROC_DIR`` set, e.g. gunicorn with several workers):
  prometheus_client allows no custom collectors there, so real ``Gauge``/``Counter``/
  ``Histogram`` objects are updated from a :class:`~shedder.ThrottlerListener` and the
  workers' files are aggregated at scrape time (gauges with ``livesum``).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ._core.errors import ShedReason
from ._core.throttler import SHED_REASONS, Throttler, ThrottlerListener
from ._web.http import HTTPResponse

__all__ = [
    "DEFAULT_BUCKETS",
    "ThrottlerMetrics",
    "ensure_instrumented",
    "instrument",
    "instrument_queue",
    "metrics_endpoint",
    "metrics_response",
]

try:
    import prometheus_client
    from prometheus_client import exposition, multiprocess
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector, CollectorRegistry
    from prometheus_client.utils import floatToGoString
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'shedder.prometheus needs prometheus_client: pip install "loadshedder[prometheus]"'
    ) from None

from ._metrics.queue import instrument_queue  # imported after the check above, for its hint

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Histogram bounds in seconds: from a millisecond (a fast hand-off) to a minute."""

# Every throttler metric is ``<prefix>throttler_<name>``: the subsystem keeps them apart from
# the toolkit's queue metrics (``<prefix>queue_<name>``, label ``queue``), per Prometheus'
# namespace_subsystem_name convention.
_SUBSYSTEM = "throttler_"

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")

# Counters broken down by priority class. The class names are the throttler's own short list:
# bounded label values, unlike the flow (a tenant or client), which is never a label.
_ADMITTED_LABELS = ["throttler", "priority"]
_SHED_LABELS = ["throttler", "priority", "reason"]

# Help texts, shared by both implementations so the exposition is the same either way.
_HELP = {
    "in_flight": "Requests holding a slot of the throttler.",
    "queued": "Requests waiting in the throttler's queue for a slot.",
    "concurrency_limit": "Slots of the throttler (max_concurrency).",
    "queue_limit": "Places in the throttler's wait queue (max_queue).",
    "admitted": "Requests given a slot, by priority class.",
    "cancelled": "Waiters that gave up (cancelled, interrupted) before getting a slot.",
    "shed": (
        "Requests refused, by priority class and reason"
        " (overloaded, queue_full, queue_timeout, deadline_exceeded)."
    ),
    "queue_wait_seconds": "Time admitted requests waited for a slot (0 on the fast path).",
    "slot_hold_seconds": "Time a slot was held, from admission to release.",
}


# The metrics, one row each: (key, kind, labels). Both implementations are built from it, so
# the exposition is the same whichever mode a process uses.
_THROTTLER = ("throttler",)
_SPECS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("in_flight", "gauge", _THROTTLER),
    ("queued", "gauge", _THROTTLER),
    ("concurrency_limit", "gauge", _THROTTLER),
    ("queue_limit", "gauge", _THROTTLER),
    ("admitted", "counter", tuple(_ADMITTED_LABELS)),
    ("cancelled", "counter", _THROTTLER),
    ("shed", "counter", tuple(_SHED_LABELS)),
    ("queue_wait_seconds", "histogram", _THROTTLER),
    ("slot_hold_seconds", "histogram", _THROTTLER),
)


def metrics_response(registry: Any = None, accept: str | None = None) -> HTTPResponse:
    """The text exposition of ``registry`` as a complete ``/metrics`` response.

    With no ``registry``: in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set) a fresh
    registry aggregating every worker's files, as prometheus_client documents; otherwise the
    global ``prometheus_client.REGISTRY``. ``accept`` is the request's ``Accept`` header, used
    to pick the exposition format.
    """
    if registry is None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry = prometheus_client.REGISTRY
    encoder, content_type = exposition.choose_encoder(accept or "")
    body = encoder(registry)
    return HTTPResponse(
        200,
        (("content-type", content_type), ("content-length", str(len(body)))),
        body,
    )


def metrics_endpoint(
    throttlers: Sequence[Throttler], registry: Any = None
) -> Callable[[str | None], HTTPResponse]:
    """What a middleware's ``metrics_path`` serves: metrics by default.

    Instruments every throttler in ``throttlers`` that is not yet (see
    :func:`ensure_instrumented`), and returns the builder of the ``/metrics`` response for a
    request's ``Accept`` header. ``TypeError`` for a ``registry`` that is not one.
    """
    # Duck-typed like prometheus_client itself: a registry registers and collects.
    if registry is not None and not all(
        callable(getattr(registry, verb, None)) for verb in ("register", "collect")
    ):
        raise TypeError(
            "metrics_registry must be a prometheus_client.CollectorRegistry or None,"
            f" got {type(registry).__name__}"
        )
    for throttler in throttlers:
        ensure_instrumented(throttler, registry=registry)
    return functools.partial(metrics_response, registry)


# -- collector mode ----------------------------------------------------------------------------


class _Histogram:
    """A lean histogram for one process: a bisect and a lock per observation.

    prometheus_client's ``Histogram.observe`` takes a lock per bucket it touches and for the
    sum, about three times the cost of this; it stays in use where it must (multiprocess).
    """

    __slots__ = ("_bounds", "_counts", "_lock", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        # Buckets are "less than or equal": bisect_left puts a value equal to a bound in it.
        index = bisect_left(self._bounds, value)
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    def buckets(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative ``(le, count)`` pairs ending with ``+Inf``, and the sum."""
        with self._lock:
            counts = list(self._counts)
            total = self._sum
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self._bounds, math.inf), counts, strict=True):
            running += count
            cumulative.append((floatToGoString(bound), running))  # type: ignore[no-untyped-call]
        return cumulative, total


class _Listener(ThrottlerListener):
    def publish(self, throttler: Throttler) -> None:
        """Write the state a new process must start from (nothing, unless overridden)."""


class _CollectorListener(_Listener):
    """Feeds the histograms; everything else is read from ``stats()`` at scrape time."""

    def __init__(self, wait: _Histogram, hold: _Histogram) -> None:
        # Bound methods, looked up once: this runs on every request.
        self._observe_wait = wait.observe
        self._observe_hold = hold.observe

    def on_admit(self, throttler: Throttler, waited: float, priority: str) -> None:
        self._observe_wait(waited)

    def on_release(self, throttler: Throttler, held: float) -> None:
        self._observe_hold(held)


class _Entry:
    __slots__ = ("hold", "throttler", "wait")

    def __init__(self, throttler: Throttler, buckets: tuple[float, ...]) -> None:
        self.throttler = weakref.ref(throttler)
        self.wait = _Histogram(buckets)
        self.hold = _Histogram(buckets)


class _ThrottlerCollector(Collector):
    """Every instrumented throttler of one (registry, prefix), read at scrape time."""

    multiprocess = False

    def __init__(self, prefix: str, buckets: tuple[float, ...], registry: Any) -> None:
        self.prefix = prefix
        self.buckets = buckets
        self.entries: dict[str, _Entry] = {}
        self.lock = threading.Lock()
        registry.register(self)

    def holder(self, name: str) -> Throttler | None:
        """The live throttler instrumented under ``name``, if any."""
        with self.lock:
            entry = self.entries.get(name)
        return None if entry is None else entry.throttler()

    def attach(self, throttler: Throttler) -> _Listener:
        entry = _Entry(throttler, self.buckets)
        with self.lock:
            self.entries[throttler.name] = entry
        return _CollectorListener(entry.wait, entry.hold)

    def forget(self, name: str, listener: ThrottlerListener) -> None:
        with self.lock:
            del self.entries[name]

    def _families(self) -> dict[str, Any]:
        p = self.prefix + _SUBSYSTEM
        return {
            key: _FAMILY[kind](f"{p}{key}", _HELP[key], labels=list(labels))
            for key, kind, labels in _SPECS
        }

    def describe(self) -> Iterator[Metric]:
        # Lets the registry reject a name clash at register() time, without any samples.
        yield from self._families().values()

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        with self.lock:
            entries = list(self.entries.items())
        for name, entry in entries:
            throttler = entry.throttler()
            if throttler is None:
                continue
            stats = throttler.stats()
            label = [name]
            families["in_flight"].add_metric(label, stats.in_flight)
            families["queued"].add_metric(label, stats.queued)
            families["concurrency_limit"].add_metric(label, stats.max_concurrency)
            families["queue_limit"].add_metric(label, stats.max_queue)
            for priority, count in stats.admitted_by_priority.items():
                families["admitted"].add_metric([name, priority], count)
            families["cancelled"].add_metric(label, stats.cancelled_total)
            for priority, shed in stats.shed_by_priority.items():
                for reason in SHED_REASONS:
                    families["shed"].add_metric([name, priority, reason], shed.get(reason, 0))
            for key, histogram in (
                ("queue_wait_seconds", entry.wait),
                ("slot_hold_seconds", entry.hold),
            ):
                buckets, total = histogram.buckets()
                families[key].add_metric(label, buckets, total)
        yield from families.values()


_FAMILY: dict[str, Any] = {
    "gauge": GaugeMetricFamily,
    "counter": CounterMetricFamily,
    "histogram": HistogramMetricFamily,
}


# -- multiprocess mode -------------------------------------------------------------------------


class _MetricObjects:
    """prometheus_client metric objects for one (registry, prefix), shared by its throttlers."""

    multiprocess = True

    def __init__(self, prefix: str, buckets: tuple[float, ...], registry: Any) -> None:
        self.prefix = prefix
        self.buckets = buckets
        self.names: dict[str, weakref.ref[Throttler]] = {}
        self.lock = threading.Lock()
        p = prefix + _SUBSYSTEM
        # livesum for all four gauges: each worker has its own throttler, so the service's
        # in-flight and queued are the sums over live workers, and so are its slots and queue
        # places; summing the limits too keeps in_flight / concurrency_limit a utilisation in
        # [0, 1] across workers, as in one process ("max" would compare a service-wide
        # in-flight with one worker's limit; "liveall" adds a pid label the ratio cannot join).
        options: dict[str, dict[str, Any]] = {
            "gauge": {"multiprocess_mode": "livesum"},
            "counter": {},
            "histogram": {"buckets": buckets},
        }
        kinds = {
            "gauge": prometheus_client.Gauge,
            "counter": prometheus_client.Counter,
            "histogram": prometheus_client.Histogram,
        }
        self.metrics: dict[str, Any] = {
            key: kinds[kind](
                f"{p}{key}", _HELP[key], list(labels), registry=registry, **options[kind]
            )
            for key, kind, labels in _SPECS
        }

    def holder(self, name: str) -> Throttler | None:
        """The live throttler instrumented under ``name``, if any."""
        ref = self.names.get(name)
        return None if ref is None else ref()

    def attach(self, throttler: Throttler) -> _Listener:
        self.names[throttler.name] = weakref.ref(throttler)
        return _ObjectsListener(self.metrics, throttler)

    def forget(self, name: str, listener: ThrottlerListener) -> None:
        del self.names[name]
        # prometheus_client cannot remove series in multiprocess mode: zero this process's
        # gauges so that livesum no longer counts them (its counters stay).
        if isinstance(listener, _ObjectsListener):
            for gauge in (
                listener.in_flight,
                listener.queued,
                listener.concurrency_limit,
                listener.queue_limit,
            ):
                gauge.set(0)


class _ObjectsListener(_Listener):
    """Keeps one throttler's metric objects up to date, event by event."""

    def __init__(self, metrics: dict[str, Any], throttler: Throttler) -> None:
        name = throttler.name
        self.in_flight = metrics["in_flight"].labels(name)
        self.queued = metrics["queued"].labels(name)
        self.concurrency_limit = metrics["concurrency_limit"].labels(name)
        self.queue_limit = metrics["queue_limit"].labels(name)
        # Children bound once per class (and reason): events only look them up in a dict.
        classes = throttler.priorities
        self.admitted = {p: metrics["admitted"].labels(name, p) for p in classes}
        self.cancelled = metrics["cancelled"].labels(name)
        self.shed: dict[tuple[str, ShedReason], Any] = {
            (p, r): metrics["shed"].labels(name, p, r) for p in classes for r in SHED_REASONS
        }
        self.wait = metrics["queue_wait_seconds"].labels(name)
        self.hold = metrics["slot_hold_seconds"].labels(name)
        self.pid = 0

    def publish(self, throttler: Throttler) -> None:
        """Write the current state (limits, and in-flight/queued counts) for this process."""
        stats = throttler.stats()
        self.concurrency_limit.set(stats.max_concurrency)
        self.queue_limit.set(stats.max_queue)
        self.in_flight.set(stats.in_flight)
        self.queued.set(stats.queued)
        self.pid = os.getpid()

    def on_queue(self, throttler: Throttler, priority: str) -> None:
        self.queued.inc()

    def on_admit(self, throttler: Throttler, waited: float, priority: str) -> None:
        if self.pid != os.getpid():
            # A forked worker (gunicorn --preload): its files start empty, publish its limits.
            self.publish(throttler)
        # The fast path reports exactly 0.0; a waiter's wait is a clock difference, > 0.
        if waited > 0.0:
            self.queued.dec()
        self.in_flight.inc()
        self.admitted[priority].inc()
        self.wait.observe(waited)

    def on_shed(
        self, throttler: Throttler, reason: ShedReason, waited: float, priority: str
    ) -> None:
        if waited > 0.0:  # a waiter refused (timed out, evicted), not an arrival
            self.queued.dec()
        self.shed[priority, reason].inc()

    def on_cancel(self, throttler: Throttler, waited: float) -> None:
        self.queued.dec()
        self.cancelled.inc()

    def on_release(self, throttler: Throttler, held: float) -> None:
        self.in_flight.dec()
        self.hold.observe(held)


# -- attaching ---------------------------------------------------------------------------------

_Families = _ThrottlerCollector | _MetricObjects

# One set of metric families per (registry, prefix): a second throttler adds label values to
# the families instead of registering the same names again (a duplicate-timeseries error).
_families: weakref.WeakKeyDictionary[Any, dict[str, _Families]] = weakref.WeakKeyDictionary()
_families_lock = threading.Lock()


class ThrottlerMetrics:
    """A throttler's metrics as attached by :func:`instrument`; :meth:`detach` undoes it."""

    def __init__(
        self,
        throttler: Throttler,
        registry: Any,
        prefix: str,
        multiprocess: bool,
        families: _Families,
        listener: ThrottlerListener,
    ) -> None:
        self.throttler = throttler
        self.registry = registry
        self.prefix = prefix
        self.multiprocess = multiprocess
        """True when metric objects are updated per event (multiprocess mode)."""
        self._families = families
        self._listener: ThrottlerListener | None = listener

    @property
    def attached(self) -> bool:
        return self._listener is not None

    def detach(self) -> None:
        """Stop observing the throttler and drop its series (idempotent).

        In multiprocess mode prometheus_client cannot remove series: this process's gauges are
        set to 0 instead (so ``livesum`` no longer counts them) and its counters stay.
        """
        with _families_lock:
            listener, self._listener = self._listener, None
            if listener is None:
                return
            self.throttler.remove_listener(listener)
            self._families.forget(self.throttler.name, listener)

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        mode = "multiprocess" if self.multiprocess else "collector"
        return f"<ThrottlerMetrics {state} {self.throttler.name!r} prefix={self.prefix!r} {mode}>"


def _check_buckets(buckets: Sequence[float]) -> tuple[float, ...]:
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Sequence):
        raise TypeError(f"buckets must be a sequence of seconds, got {buckets!r}")
    bounds = tuple(float(b) for b in buckets if b != math.inf)
    if not bounds:
        raise ValueError(f"buckets must hold at least one finite bound, got {buckets!r}")
    if any(math.isnan(b) for b in bounds) or list(bounds) != sorted(set(bounds)):
        raise ValueError(f"buckets must be strictly increasing numbers, got {buckets!r}")
    return bounds


def instrument(
    throttler: Throttler,
    *,
    registry: Any = None,
    prefix: str = "shedder_",
    multiprocess: bool | None = None,
    buckets: Sequence[float] = DEFAULT_BUCKETS,
) -> ThrottlerMetrics:
    """Publish ``throttler``'s metrics in ``registry``, labelled ``throttler=<its name>``.

    Args:
        throttler: the throttler to observe; its ``name`` must be unique per registry and
            prefix (``ValueError`` otherwise).
        registry: a ``CollectorRegistry``; default ``prometheus_client.REGISTRY``.
        prefix: the namespace prepended to every metric name (``shedder_`` gives
            ``shedder_throttler_in_flight``, ...); may be empty.
        multiprocess: use per-event metric objects that prometheus_client's multiprocess mode
            aggregates across workers. Default: True when ``PROMETHEUS_MULTIPROC_DIR`` is set.
            Every throttler of one registry and prefix must use the same mode.
        buckets: histogram bounds in seconds (``+Inf`` is implied); default
            :data:`DEFAULT_BUCKETS`. Must match the ones of throttlers already instrumented
            in the same registry and prefix.

    Metrics, each ``<prefix>throttler_<name>``: gauges ``in_flight``, ``queued``,
    ``concurrency_limit``, ``queue_limit``; counters ``admitted_total{priority}``,
    ``cancelled_total``, ``shed_total{priority,reason}`` (a series for every class of the
    throttler); histograms ``queue_wait_seconds`` (every admission, 0 on the fast path) and
    ``slot_hold_seconds``.

    Raises:
        TypeError: ``throttler`` is not a Throttler, or ``buckets`` is not a sequence.
        ValueError: a bad ``prefix`` or ``buckets``, a throttler name already instrumented in
            this registry and prefix, or a mode or buckets mismatch with it.
    """
    if not isinstance(throttler, Throttler):
        raise TypeError(f"throttler must be a shedder.Throttler, got {type(throttler).__name__}")
    if not isinstance(prefix, str) or (prefix and not _METRIC_NAME.fullmatch(prefix)):
        raise ValueError(f"prefix must match [a-zA-Z_:][a-zA-Z0-9_:]* or be empty, got {prefix!r}")
    bounds = _check_buckets(buckets)
    if registry is None:
        registry = prometheus_client.REGISTRY
    if multiprocess is None:
        multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    name = throttler.name
    with _families_lock:
        by_prefix = _families.setdefault(registry, {})
        families = by_prefix.get(prefix)
        if families is None:
            kind = _MetricObjects if multiprocess else _ThrottlerCollector
            families = by_prefix[prefix] = kind(prefix, bounds, registry)
        elif families.multiprocess is not multiprocess:
            mode = "multiprocess" if multiprocess else "collector"
            raise ValueError(
                f"multiprocess={multiprocess} ({mode} mode) differs from the throttlers already"
                f" instrumented in this registry with prefix {prefix!r}"
            )
        if families.buckets != bounds:
            raise ValueError(
                f"buckets {bounds} differ from {families.buckets}, used by the throttlers"
                f" already instrumented in this registry with prefix {prefix!r}"
            )
        holder = families.holder(name)
        if holder is not None:
            raise _duplicate(name, prefix, holder is throttler)
        listener = families.attach(throttler)
        throttler.add_listener(listener)
        # After add_listener, so later events adjust this snapshot rather than miss it.
        listener.publish(throttler)
    return ThrottlerMetrics(throttler, registry, prefix, multiprocess, families, listener)


logger = logging.getLogger("shedder")


def ensure_instrumented(throttler: Throttler, *, registry: Any = None) -> bool:
    """:func:`instrument` ``throttler`` with the defaults unless it already is; True if it is now.

    What the middlewares' ``metrics_path`` calls for every throttler they report, so that
    ``/metrics`` serves them from the first scrape without an ``instrument()`` of your own (one
    of your own made before, with the default prefix, is kept). A *different* live throttler
    already instrumented under the same name keeps its series: this one is skipped with a
    warning on the ``shedder`` logger (give each throttler its own ``name=``).
    """
    registry = prometheus_client.REGISTRY if registry is None else registry
    with _families_lock:
        families = _families.get(registry, {}).get("shedder_")
        if families is not None:
            holder = families.holder(throttler.name)
            if holder is throttler:
                return True
            if holder is not None:
                logger.warning(
                    "shedder: not exporting metrics of a second throttler named %r: another "
                    "one already has that name in this registry; give each its own name=",
                    throttler.name,
                )
                return False
    instrument(throttler, registry=registry)
    return True


def _duplicate(name: str, prefix: str, same: bool = False) -> ValueError:
    if same:
        return ValueError(
            f"throttler {name!r} is already instrumented in this registry with prefix {prefix!r}"
            " (a middleware's metrics_path instruments the throttlers it reports by itself)"
        )
    return ValueError(
        f"a throttler named {name!r} is already instrumented in this registry with prefix"
        f" {prefix!r}; give each throttler its own name=..."
    )
