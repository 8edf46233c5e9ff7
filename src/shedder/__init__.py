"""shedder: load shedding for Python web services.

At most ``max_concurrency`` requests run at once, up to ``max_queue`` more wait in order for at
most ``queue_timeout`` seconds, and the rest are refused at once with :class:`Overloaded`
(``503 Service Unavailable`` + ``Retry-After`` in the web adapters).

Importing ``shedder`` imports no web framework; the adapters live in ``shedder.asgi``,
``shedder.wsgi``, ``shedder.starlette``, ``shedder.flask``, ``shedder.client`` and
``shedder.prometheus``.

The backpressure toolkit needs no web app: bounded queues (:class:`BlockingQueue`,
:class:`DroppingQueue`, :class:`MonitoredQueue`), :class:`AdaptiveSampler`, pull-based streams
(:class:`IterablePublisher`, :func:`iterate`), bounded async :class:`Pipeline` and
:class:`AdaptiveBatchSizer`.
"""

from ._core.errors import Overloaded, ShedReason
from ._core.throttler import (
    SHED_REASONS,
    Permit,
    Throttler,
    ThrottlerListener,
    ThrottlerStats,
    throttlers,
)
from ._toolkit.batching import AdaptiveBatchSizer
from ._toolkit.pipeline import Pipeline, PipelineRun
from ._toolkit.queues import (
    BlockingQueue,
    DroppingQueue,
    DropPolicy,
    MonitoredQueue,
    MonitoredQueueStats,
    QueuePolicy,
    QueueStats,
)
from ._toolkit.sampler import AdaptiveSampler, SupportsLoad
from ._toolkit.streams import (
    UNBOUNDED,
    IterablePublisher,
    Publisher,
    PublisherIterator,
    Subscriber,
    Subscription,
    iterate,
)
from ._version import __version__

__all__ = [
    "SHED_REASONS",
    "UNBOUNDED",
    "AdaptiveBatchSizer",
    "AdaptiveSampler",
    "BlockingQueue",
    "DropPolicy",
    "DroppingQueue",
    "IterablePublisher",
    "MonitoredQueue",
    "MonitoredQueueStats",
    "Overloaded",
    "Permit",
    "Pipeline",
    "PipelineRun",
    "Publisher",
    "PublisherIterator",
    "QueuePolicy",
    "QueueStats",
    "ShedReason",
    "Subscriber",
    "Subscription",
    "SupportsLoad",
    "Throttler",
    "ThrottlerListener",
    "ThrottlerStats",
    "__version__",
    "iterate",
    "throttlers",
]
