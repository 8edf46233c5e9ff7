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

from ._core.disciplines import FIFO, LIFO, CoDel, Discipline
from ._core.errors import Overloaded, ShedReason
from ._core.throttler import (
    DEFAULT_PRIORITIES,
    SHED_REASONS,
    Outcome,
    Permit,
    Throttler,
    ThrottlerListener,
    ThrottlerStats,
    Waiting,
    throttlers,
)
from ._core.wire import REFUSED_HEADER, current_deadline, deadline_scope
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
from ._web.deadlines import Deadlines
from ._web.gate import Classification, Request
from ._web.http import HTTPResponse, ShedResponder

__all__ = [
    "DEFAULT_PRIORITIES",
    "FIFO",
    "LIFO",
    "REFUSED_HEADER",
    "SHED_REASONS",
    "UNBOUNDED",
    "AdaptiveBatchSizer",
    "AdaptiveSampler",
    "BlockingQueue",
    "Classification",
    "CoDel",
    "Deadlines",
    "Discipline",
    "DropPolicy",
    "DroppingQueue",
    "HTTPResponse",
    "IterablePublisher",
    "MonitoredQueue",
    "MonitoredQueueStats",
    "Outcome",
    "Overloaded",
    "Permit",
    "Pipeline",
    "PipelineRun",
    "Publisher",
    "PublisherIterator",
    "QueuePolicy",
    "QueueStats",
    "Request",
    "ShedReason",
    "ShedResponder",
    "Subscriber",
    "Subscription",
    "SupportsLoad",
    "Throttler",
    "ThrottlerListener",
    "ThrottlerStats",
    "Waiting",
    "__version__",
    "current_deadline",
    "deadline_scope",
    "iterate",
    "throttlers",
]
