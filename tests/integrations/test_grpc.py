"""shedder.grpc against real grpc servers on 127.0.0.1, sync ``grpc.server`` and ``grpc.aio``.

Generic handlers with raw-bytes messages (no serializers), so no protoc step is needed.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from contextlib import asynccontextmanager, contextmanager
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shedder import Throttler, ThrottlerListener
from shedder.grpc import (
    PUSHBACK_KEY,
    AsyncThrottlingInterceptor,
    HealthReporter,
    ThrottlingInterceptor,
    iter_bounded,
    write_bounded,
)

pytestmark = pytest.mark.grpc

SERVICE = "test.Work"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
Handlers = dict[str, "grpc.RpcMethodHandler[Any, Any]"]


class Probe:
    """Counts handlers running right now, measured inside them, and the most ever at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running = 0
        self.most = 0

    def __enter__(self) -> None:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._lock:
            self.running -= 1


class Releases(ThrottlerListener):
    """Counts released slots and signals each release (threads and tasks alike)."""

    def __init__(self) -> None:
        self.count = 0
        self.event = threading.Event()

    def on_release(self, throttler: Throttler, held: float) -> None:
        self.count += 1
        self.event.set()


@contextmanager
def sync_server(handlers: Handlers, *, workers: int, **server_options: Any) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), **server_options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait(5)


@asynccontextmanager
async def aio_server(
    handlers: Handlers, setup: Callable[[grpc.aio.Server], None] = lambda _: None, **options: Any
) -> AsyncIterator[str]:
    server = grpc.aio.server(**options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    setup(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=1.0)


def refusal(error: grpc.RpcError) -> tuple[grpc.StatusCode, str | None]:
    """The status code and pushback trailer of a failed call."""
    assert isinstance(error, grpc.Call)
    trailers = dict(error.trailing_metadata() or ())
    return error.code(), trailers.get(PUSHBACK_KEY)


def assert_waves_were_exact(
    outcomes: list[tuple[str, str | None]], probe: Probe, throttler: Throttler, limit: int
) -> None:
    admitted = [o for o in outcomes if o[0] == "ok"]
    refused = [o for o in outcomes if o[0] == "RESOURCE_EXHAUSTED"]
    assert probe.most == limit, f"at most {limit} at once, measured {probe.most}"
    assert admitted, outcomes
    assert refused, "a burst of 10x the limit must be shed in part"
    assert all(pushback == "1000" for _, pushback in refused)
    assert throttler.in_flight == 0
    assert throttler.queued == 0


# -- the limit is exact ------------------------------------------------------------------------


def test_sync_limit_is_exact_under_bursts_of_ten_times_n() -> None:
    limit = 4
    throttler = Throttler(limit, max_queue=limit, queue_timeout=0.05)
    probe = Probe()

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        with probe:
            time.sleep(0.01)
        return request

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        with probe:
            for _ in range(3):
                time.sleep(0.003)
                yield request

    handlers: Handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    }
    interceptor = ThrottlingInterceptor(throttler)
    # Threads for every slot and queue place, and more: the throttler, not the pool, decides.
    with (
        sync_server(handlers, workers=4 * limit, interceptors=[interceptor]) as target,
        grpc.insecure_channel(target) as channel,
    ):
        unary_call = channel.unary_unary(f"/{SERVICE}/Unary")
        stream_call = channel.unary_stream(f"/{SERVICE}/Stream")

        def call(i: int) -> tuple[str, str | None]:
            try:
                if i % 2:
                    assert unary_call(b"u", timeout=5) == b"u"
                else:
                    assert list(stream_call(b"s", timeout=5)) == [b"s"] * 3
            except grpc.RpcError as error:
                code, pushback = refusal(error)
                return code.name, pushback
            return "ok", None

        outcomes: list[tuple[str, str | None]] = []
        with futures.ThreadPoolExecutor(10 * limit) as clients:
            for _wave in range(3):
                outcomes += clients.map(call, range(10 * limit))
    assert_waves_were_exact(outcomes, probe, throttler, limit)


async def test_aio_limit_is_exact_under_bursts_with_cancellations() -> None:
    limit = 4
    throttler = Throttler(limit, max_queue=limit, queue_timeout=0.05)
    probe = Probe()

    async def unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        with probe:
            await asyncio.sleep(0.01)
        return request

    async def stream(
        request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        with probe:
            for _ in range(3):
                await asyncio.sleep(0.003)
                yield request

    handlers: Handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    }
    interceptors = [AsyncThrottlingInterceptor(throttler)]
    async with (
        aio_server(handlers, interceptors=interceptors) as target,
        grpc.aio.insecure_channel(target) as channel,
    ):
        unary_call = channel.unary_unary(f"/{SERVICE}/Unary")
        stream_call = channel.unary_stream(f"/{SERVICE}/Stream")

        async def call(i: int) -> tuple[str, str | None]:
            # Every fifth call gives up early: cancellations while queued and while running
            # must neither leak nor double a slot.
            timeout = 0.008 if i % 5 == 0 else 5.0
            try:
                if i % 2:
                    assert await unary_call(b"u", timeout=timeout) == b"u"
                else:
                    assert [r async for r in stream_call(b"s", timeout=timeout)] == [b"s"] * 3
            except grpc.aio.AioRpcError as error:
                return error.code().name, dict(error.trailing_metadata()).get(PUSHBACK_KEY)
            return "ok", None

        outcomes: list[tuple[str, str | None]] = []
        for _wave in range(3):
            outcomes += await asyncio.gather(*(call(i) for i in range(10 * limit)))
    assert {code for code, _ in outcomes} <= {"ok", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
    assert_waves_were_exact(outcomes, probe, throttler, limit)


# -- refusals ----------------------------------------------------------------------------------


def test_refusal_code_is_configurable_and_carries_the_pushback() -> None:
    throttler = Throttler(1, max_queue=0, retry_after=3)
    entered, gate = threading.Event(), threading.Event()

    def hold(request: bytes, context: grpc.ServicerContext) -> bytes:
        entered.set()
        gate.wait(5)
        return b"done"

    interceptor = ThrottlingInterceptor(throttler, code=grpc.StatusCode.UNAVAILABLE)
    handlers: Handlers = {"Hold": grpc.unary_unary_rpc_method_handler(hold)}
    with (
        sync_server(handlers, workers=4, interceptors=[interceptor]) as target,
        grpc.insecure_channel(target) as channel,
    ):
        call = channel.unary_unary(f"/{SERVICE}/Hold")
        first = call.future(b"")
        assert entered.wait(5)
        with pytest.raises(grpc.RpcError) as refused:
            call(b"", timeout=5)
        gate.set()
        assert first.result(timeout=5) == b"done"
    assert refusal(refused.value) == (grpc.StatusCode.UNAVAILABLE, "3000")
    assert "queue_full" in refused.value.details()  # type: ignore[attr-defined]


class Sheds(ThrottlerListener):
    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.event = threading.Event()

    def on_shed(self, throttler: Throttler, reason: Any, waited: float, priority: str) -> None:
        self.reasons.append(reason)
        self.event.set()


def test_sync_queue_wait_is_capped_by_the_client_deadline() -> None:
    throttler = Throttler(1, max_queue=1, queue_timeout=10)
    sheds = Sheds()
    throttler.add_listener(sheds)
    entered, gate = threading.Event(), threading.Event()

    def hold(request: bytes, context: grpc.ServicerContext) -> bytes:
        entered.set()
        gate.wait(5)
        return request

    handlers: Handlers = {"Hold": grpc.unary_unary_rpc_method_handler(hold)}
    interceptor = ThrottlingInterceptor(throttler)
    with (
        sync_server(handlers, workers=4, interceptors=[interceptor]) as target,
        grpc.insecure_channel(target) as channel,
    ):
        call = channel.unary_unary(f"/{SERVICE}/Hold")
        first = call.future(b"first")
        assert entered.wait(5)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as expired:
            call(b"second", timeout=0.2)
        # The server gives up its queue place at the deadline, not after queue_timeout (10 s).
        assert sheds.event.wait(5)
        gave_up_after = time.monotonic() - started
        assert throttler.queued == 0
        gate.set()
        assert first.result(timeout=5) == b"first"
    # Whichever side notices first: the server's refusal can beat the client's own deadline.
    assert expired.value.code() in {  # type: ignore[attr-defined]
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
    assert sheds.reasons == ["deadline_exceeded"]  # the client's deadline ended the wait
    assert gave_up_after < 2.0


def test_sync_errors_and_aborts_release_the_slot() -> None:
    throttler = Throttler(1, max_queue=0)
    releases = Releases()
    throttler.add_listener(releases)

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"abort":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        raise ValueError("handler failed")

    def fail_midway(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"x"
        raise ValueError("stream failed")

    handlers: Handlers = {
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "FailMidway": grpc.unary_stream_rpc_method_handler(fail_midway),
    }
    interceptor = ThrottlingInterceptor(throttler)
    codes = []
    with (
        sync_server(handlers, workers=4, interceptors=[interceptor]) as target,
        grpc.insecure_channel(target) as channel,
    ):
        for request in (b"raise", b"abort"):
            with pytest.raises(grpc.RpcError) as failed:
                channel.unary_unary(f"/{SERVICE}/Fail")(request, timeout=5)
            codes.append(failed.value.code())  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as failed:
            list(channel.unary_stream(f"/{SERVICE}/FailMidway")(b"", timeout=5))
        codes.append(failed.value.code())  # type: ignore[attr-defined]
    assert codes == [grpc.StatusCode.UNKNOWN, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNKNOWN]
    assert releases.count == 3
    assert throttler.in_flight == 0


class Timeline(ThrottlerListener):
    """When the throttler refused and admitted, and lets the blocker go at the first refusal."""

    def __init__(self, on_first_shed: threading.Event) -> None:
        self.shed: list[float] = []
        self.admitted: list[float] = []
        self.first_admitted = threading.Event()
        self._on_first_shed = on_first_shed

    def on_admit(self, throttler: Throttler, waited: float, priority: str) -> None:
        self.admitted.append(time.monotonic())
        self.first_admitted.set()

    def on_shed(self, throttler: Throttler, reason: Any, waited: float, priority: str) -> None:
        self.shed.append(time.monotonic())
        self._on_first_shed.set()


def test_a_retrying_grpc_client_waits_out_the_pushback() -> None:
    throttler = Throttler(1, max_queue=0, retry_after=1)
    gate = threading.Event()
    timeline = Timeline(on_first_shed=gate)
    throttler.add_listener(timeline)

    def hold(request: bytes, context: grpc.ServicerContext) -> bytes:
        gate.wait(5)  # until the other call has been refused once
        return request

    # The client's own backoff is 10 ms at most: a wait near 1 s can only be the pushback.
    service_config = {
        "methodConfig": [
            {
                "name": [{"service": SERVICE}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.01s",
                    "maxBackoff": "0.01s",
                    "backoffMultiplier": 1,
                    "retryableStatusCodes": ["RESOURCE_EXHAUSTED"],
                },
            }
        ]
    }
    options = [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(service_config))]
    handlers: Handlers = {"Hold": grpc.unary_unary_rpc_method_handler(hold)}
    interceptor = ThrottlingInterceptor(throttler)
    with (
        sync_server(handlers, workers=4, interceptors=[interceptor]) as target,
        grpc.insecure_channel(target, options=options) as channel,
    ):
        call = channel.unary_unary(f"/{SERVICE}/Hold")
        blocker = call.future(b"first")
        assert timeline.first_admitted.wait(5)  # the blocker holds the slot first
        started = time.monotonic()
        assert call(b"second", timeout=10) == b"second"
        elapsed = time.monotonic() - started
        assert blocker.result(timeout=5) == b"first"
    assert len(timeline.shed) == 1
    retried_after = timeline.admitted[-1] - timeline.shed[0]
    assert 0.9 <= retried_after < 3.0, retried_after
    assert elapsed >= 0.9


# -- streams hold their slot -------------------------------------------------------------------


def test_sync_stream_holds_its_slot_until_the_client_cancels() -> None:
    throttler = Throttler(1, max_queue=0)
    releases = Releases()
    throttler.add_listener(releases)
    gate = threading.Event()

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        while True:
            yield b"x"
            gate.wait(5)

    handlers: Handlers = {
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Unary": grpc.unary_unary_rpc_method_handler(lambda request, context: request),
    }
    interceptor = ThrottlingInterceptor(throttler)
    with (
        sync_server(handlers, workers=4, interceptors=[interceptor]) as target,
        grpc.insecure_channel(target) as channel,
    ):
        responses = channel.unary_stream(f"/{SERVICE}/Stream")(b"")
        assert next(responses) == b"x"
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(f"/{SERVICE}/Unary")(b"", timeout=5)
        assert throttler.in_flight == 1
        responses.cancel()  # type: ignore[attr-defined]
        gate.set()  # the handler's next response finds the stream gone
        assert releases.event.wait(5)
        assert channel.unary_unary(f"/{SERVICE}/Unary")(b"after", timeout=5) == b"after"
    assert refusal(refused.value) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "1000")
    assert releases.count == 2  # the stream's slot once, then the unary call's
    assert throttler.in_flight == 0


async def test_aio_stream_holds_its_slot_and_frees_it_on_cancel_and_on_error() -> None:
    throttler = Throttler(1, max_queue=0)
    releases = Releases()
    throttler.add_listener(releases)
    closed = asyncio.Event()

    async def stream(
        request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        try:
            yield b"x"
            if request == b"fail":
                raise RuntimeError("handler failed mid-stream")
            await asyncio.Event().wait()  # until cancelled
        finally:
            closed.set()

    async def unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return request

    handlers: Handlers = {
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
    }
    interceptors = [AsyncThrottlingInterceptor(throttler)]
    async with (
        aio_server(handlers, interceptors=interceptors) as target,
        grpc.aio.insecure_channel(target) as channel,
    ):
        stream_call = channel.unary_stream(f"/{SERVICE}/Stream")
        unary_call = channel.unary_unary(f"/{SERVICE}/Unary")
        call = stream_call(b"")
        assert await call.read() == b"x"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await unary_call(b"", timeout=5)
        assert throttler.in_flight == 1
        call.cancel()
        await asyncio.wait_for(closed.wait(), 5)  # the generator is closed, not left to GC
        assert await unary_call(b"after", timeout=5) == b"after"

        failing = stream_call(b"fail")
        assert await failing.read() == b"x"
        assert await failing.code() == grpc.StatusCode.UNKNOWN
        assert await unary_call(b"again", timeout=5) == b"again"
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert releases.count == 4  # each admitted call released its slot exactly once
    assert throttler.in_flight == 0


# -- health ------------------------------------------------------------------------------------


def test_sync_health_is_not_serving_while_the_throttler_sheds() -> None:
    throttler = Throttler(1, max_queue=0)
    reporter = HealthReporter(throttler)
    entered, gate = threading.Event(), threading.Event()

    def hold(request: bytes, context: grpc.ServicerContext) -> bytes:
        entered.set()
        gate.wait(5)
        return request

    handlers: Handlers = {"Hold": grpc.unary_unary_rpc_method_handler(hold)}
    interceptor = ThrottlingInterceptor(throttler)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[interceptor])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    reporter.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert next(watch).status == SERVING
            held = channel.unary_unary(f"/{SERVICE}/Hold").future(b"held")
            assert next(watch).status == NOT_SERVING
            assert entered.wait(5)
            # The health service answers although every slot is taken: it is never throttled.
            check = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert check.status == NOT_SERVING
            gate.set()
            assert held.result(timeout=5) == b"held"
            assert next(watch).status == SERVING
            watch.cancel()
    finally:
        server.stop(grace=None).wait(5)
        reporter.close()
    assert reporter.serving


async def test_aio_health_follows_the_throttler() -> None:
    throttler = Throttler(1, max_queue=0)
    reporter = HealthReporter(throttler, health.aio.HealthServicer())
    gate = asyncio.Event()

    async def hold(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        await gate.wait()
        return request

    handlers: Handlers = {"Hold": grpc.unary_unary_rpc_method_handler(hold)}
    interceptors = [AsyncThrottlingInterceptor(throttler)]
    async with (
        aio_server(handlers, reporter.add_to_server, interceptors=interceptors) as target,
        grpc.aio.insecure_channel(target) as channel,
    ):
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert (await watch.read()).status == SERVING
        held = asyncio.ensure_future(channel.unary_unary(f"/{SERVICE}/Hold")(b"held"))
        assert (await watch.read()).status == NOT_SERVING
        check = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert check.status == NOT_SERVING
        gate.set()
        assert await held == b"held"
        assert (await watch.read()).status == SERVING
        watch.cancel()
    reporter.close()


def test_health_reporter_for_aio_needs_the_running_loop() -> None:
    async def make_servicer() -> health.aio.HealthServicer:
        return health.aio.HealthServicer()

    servicer = asyncio.run(make_servicer())
    with pytest.raises(RuntimeError, match="running event loop"):
        HealthReporter(Throttler(1), servicer)


# -- bounded response streams ------------------------------------------------------------------

BIG = b"x" * (256 * 1024)
TOTAL = 200  # 50 MiB in all: far more than HTTP/2 windows and buffers hold


def test_sync_bounded_stream_backpressures_and_stops_on_cancel() -> None:
    produced = [0]
    closed = threading.Event()
    producers: list[threading.Thread] = []

    def produce(requests: Iterator[bytes]) -> Iterator[bytes]:
        producers.append(threading.current_thread())
        try:
            for request in requests:
                for _ in range(int(request)):
                    produced[0] += 1
                    yield BIG
        finally:
            closed.set()

    def bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        return iter_bounded(context, produce(requests), maxsize=4)

    handlers: Handlers = {"Bidi": grpc.stream_stream_rpc_method_handler(bidi)}
    with sync_server(handlers, workers=4) as target, grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(f"/{SERVICE}/Bidi")
        responses = call(iter([str(TOTAL).encode()]), timeout=20)
        assert next(responses) == BIG
        # A runaway producer would finish the 200 in well under this; a held-back one stalls.
        time.sleep(0.5)
        stalled_at = produced[0]
        assert stalled_at < TOTAL // 2, stalled_at
        assert sum(1 for _ in responses) == TOTAL - 1

        closed.clear()
        responses = call(iter([str(TOTAL).encode()]), timeout=20)
        assert next(responses) == BIG
        responses.cancel()  # type: ignore[attr-defined]
        assert closed.wait(5)
        producers[-1].join(5)
        assert not producers[-1].is_alive()
        assert produced[0] < TOTAL + TOTAL // 2


async def test_aio_bounded_stream_backpressures_and_leaves_no_task() -> None:
    throttler = Throttler(2, max_queue=0)
    produced = [0]
    closed = asyncio.Event()
    handled = asyncio.Event()

    async def produce(requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            async for request in requests:
                if request == b"fail":
                    raise ValueError("producer failed")
                for _ in range(int(request)):
                    produced[0] += 1
                    yield BIG
        finally:
            closed.set()

    async def bidi(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        try:
            await write_bounded(context, produce(requests), maxsize=4)
        finally:
            handled.set()

    handlers: Handlers = {"Bidi": grpc.stream_stream_rpc_method_handler(bidi)}
    interceptors = [AsyncThrottlingInterceptor(throttler)]
    async with (
        aio_server(handlers, interceptors=interceptors) as target,
        grpc.aio.insecure_channel(target) as channel,
    ):
        call = channel.stream_stream(f"/{SERVICE}/Bidi")
        stream = call(timeout=20)
        await stream.write(str(TOTAL).encode())
        await stream.done_writing()
        assert await stream.read() == BIG
        await asyncio.sleep(0.5)  # room for a runaway producer to show itself
        stalled_at = produced[0]
        assert stalled_at < TOTAL // 2, stalled_at
        assert throttler.in_flight == 1  # the stream holds its slot while it stalls
        rest = 0
        while (message := await stream.read()) is not grpc.aio.EOF:
            assert message == BIG
            rest += 1
        assert rest == TOTAL - 1

        closed.clear()
        handled.clear()
        stream = call(timeout=20)
        await stream.write(str(TOTAL).encode())
        assert await stream.read() == BIG
        stream.cancel()
        await asyncio.wait_for(handled.wait(), 5)
        assert closed.is_set()
        leftovers = [t for t in asyncio.all_tasks() if t.get_name() == "shedder-grpc-producer"]
        assert leftovers == []

        failing = call(timeout=20)
        await failing.write(b"fail")
        assert await failing.code() == grpc.StatusCode.UNKNOWN
        assert "producer failed" in await failing.details()
    assert throttler.in_flight == 0


# -- configuration -----------------------------------------------------------------------------


def test_bad_configuration_names_the_parameter() -> None:
    throttler = Throttler(1)
    with pytest.raises(TypeError, match="throttler"):
        ThrottlingInterceptor(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="code"):
        AsyncThrottlingInterceptor(throttler, code=grpc.StatusCode.OK)
    with pytest.raises(TypeError, match="code"):
        ThrottlingInterceptor(throttler, code=8)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="exempt"):
        ThrottlingInterceptor(throttler, exempt="/grpc.health.v1.Health/")
    with pytest.raises(TypeError, match="services"):
        HealthReporter(throttler, services="svc")
    with pytest.raises(ValueError, match="services"):
        HealthReporter(throttler, services=())


async def test_bounded_helpers_check_maxsize() -> None:
    async def nothing() -> AsyncIterator[bytes]:
        yield b""

    with pytest.raises(ValueError, match="maxsize must be >= 1, got 0"):
        await write_bounded(None, nothing(), maxsize=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="maxsize"):
        iter_bounded(None, [], maxsize=2.5)  # type: ignore[arg-type]


async def test_aio_server_throttles_sync_handlers_in_its_thread_pool() -> None:
    throttler = Throttler(1, max_queue=0)
    entered, gate = threading.Event(), threading.Event()

    def hold(request: bytes, context: Any) -> bytes:
        entered.set()
        gate.wait(5)
        return request

    handlers: Handlers = {"Hold": grpc.unary_unary_rpc_method_handler(hold)}
    interceptors = [AsyncThrottlingInterceptor(throttler)]
    async with (
        aio_server(handlers, interceptors=interceptors) as target,
        grpc.aio.insecure_channel(target) as channel,
    ):
        call = channel.unary_unary(f"/{SERVICE}/Hold")
        first = asyncio.ensure_future(call(b"first", timeout=5))
        assert await asyncio.to_thread(entered.wait, 5)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(b"second", timeout=5)
        gate.set()
        assert await first == b"first"
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (PUSHBACK_KEY, "1000") in tuple(refused.value.trailing_metadata() or ())
    assert throttler.in_flight == 0
