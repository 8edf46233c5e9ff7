"""Type-checked, never run: the public API of shedder.grpc as users write it.

Check with ``MYPYPATH=src mypy --strict tests/typing``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health

from shedder import Throttler
from shedder.grpc import (
    DEFAULT_EXEMPT,
    PUSHBACK_KEY,
    AsyncThrottlingInterceptor,
    HealthReporter,
    ThrottlingInterceptor,
    iter_bounded,
    write_bounded,
)

throttler = Throttler(max_concurrency=8, max_queue=16)
sync_interceptor = ThrottlingInterceptor(throttler)
aio_interceptor = AsyncThrottlingInterceptor(
    throttler, code=grpc.StatusCode.UNAVAILABLE, exempt=(*DEFAULT_EXEMPT, "/admin.")
)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=24), interceptors=[sync_interceptor])
aio_server = grpc.aio.server(interceptors=[aio_interceptor])
reporter = HealthReporter(throttler, services=("", "demo.Demo"))
reporter.add_to_server(server)
serving: bool = reporter.serving
key: str = PUSHBACK_KEY


def numbers(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    return iter_bounded(context, (request * 2 for request in requests), maxsize=8)


async def count(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
) -> None:
    async def produce() -> AsyncIterator[bytes]:
        async for request in requests:
            yield request

    await write_bounded(context, produce(), maxsize=8)


async def aio_health(server: grpc.aio.Server) -> None:
    aio_reporter = HealthReporter(throttler, health.aio.HealthServicer())
    aio_reporter.add_to_server(server)
    aio_reporter.close()


handler: Any = grpc.stream_stream_rpc_method_handler(numbers)
