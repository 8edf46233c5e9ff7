"""A grpc.aio server under shedder: admission, pushback, health and a bounded stream.

    python examples/grpc_server.py            # serves on 127.0.0.1:50051

``demo.Demo/Echo`` (unary) runs at most 8 at once, 16 more wait up to 0.5 s, the rest are
refused with RESOURCE_EXHAUSTED and ``grpc-retry-pushback-ms``. ``demo.Demo/Count`` (bidi)
answers each request ``n`` with ``n`` numbers, produced ahead into a buffer of 16 that a slow
reader holds back. ``grpc.health.v1.Health`` says NOT_SERVING while the throttler sheds.
Messages are raw bytes: no protoc step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health

from shedder import Throttler
from shedder.grpc import AsyncThrottlingInterceptor, HealthReporter, write_bounded

throttler = Throttler(max_concurrency=8, max_queue=16, queue_timeout=0.5, name="grpc")


async def echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    await asyncio.sleep(0.01)  # the work
    return request


async def count(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
) -> None:
    async def numbers() -> AsyncIterator[bytes]:
        async for request in requests:
            for i in range(int(request)):
                yield str(i).encode()

    await write_bounded(context, numbers(), maxsize=16)


async def serve(address: str = "127.0.0.1:50051") -> tuple[grpc.aio.Server, int]:
    """Start the server (inside a running event loop); returns it and its port."""
    server = grpc.aio.server(interceptors=[AsyncThrottlingInterceptor(throttler)])
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Count": grpc.stream_stream_rpc_method_handler(count),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("demo.Demo", handlers),))
    HealthReporter(throttler, health.aio.HealthServicer()).add_to_server(server)
    port = server.add_insecure_port(address)
    await server.start()
    return server, port


async def main() -> None:
    server, port = await serve()
    print(f"serving demo.Demo on 127.0.0.1:{port}")
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
