"""examples/grpc_server.py serves what its docstring promises, on a real grpc.aio server."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest
from examples.grpc_server import serve, throttler
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shedder.grpc import PUSHBACK_KEY

pytestmark = pytest.mark.grpc


async def test_example_grpc_server() -> None:
    server, port = await serve("127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            echo = channel.unary_unary("/demo.Demo/Echo")
            assert await echo(b"hello", timeout=5) == b"hello"

            numbers = channel.stream_stream("/demo.Demo/Count")(iter([b"3", b"2"]), timeout=5)
            assert [n async for n in numbers] == [b"0", b"1", b"2", b"0", b"1"]

            health = health_pb2_grpc.HealthStub(channel)
            check = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.SERVING

            permits = [throttler.acquire() for _ in range(throttler.max_concurrency)]
            try:
                # Every slot taken: the call waits its queue_timeout (0.5 s), then is refused.
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await echo(b"late", timeout=5)
            finally:
                for permit in permits:
                    permit.release()
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (PUSHBACK_KEY, "1000") in tuple(refused.value.trailing_metadata() or ())
    finally:
        await server.stop(grace=None)
