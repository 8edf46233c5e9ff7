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

from ._batching import AdaptiveBatchSizer
from ._errors import Overloaded, ShedReason
from ._http import HTTPResponse, ShedResponder
from ._pipeline import Pipeline, PipelineRun
from ._queues import (
    BlockingQueue,
    DroppingQueue,
    DropPolicy,
    MonitoredQueue,
    MonitoredQueueStats,
    QueuePolicy,
    QueueStats,
)
from ._sampler import AdaptiveSampler, SupportsLoad
from ._streams import (
    UNBOUNDED,
    IterablePublisher,
    Publisher,
    PublisherIterator,
    Subscriber,
    Subscription,
    iterate,
)
from ._throttler import (
    SHED_REASONS,
    Permit,
    Throttler,
    ThrottlerListener,
    ThrottlerStats,
    throttlers,
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
    "HTTPResponse",
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
    "ShedResponder",
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
