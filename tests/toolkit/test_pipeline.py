"""Bounded async pipelines: results, order, backpressure, and clean stops with no leaked task."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shedder import Pipeline


@pytest.fixture
async def no_leaked_tasks() -> AsyncIterator[None]:
    before = asyncio.all_tasks()
    yield
    leaked = asyncio.all_tasks() - before - {asyncio.current_task()}
    assert not leaked, f"tasks left behind: {leaked}"


async def double(item: int) -> int:
    await asyncio.sleep(0)
    return item * 2


async def twice(item: int) -> AsyncIterator[int]:
    yield item
    await asyncio.sleep(0)
    yield item


async def jittery(item: int) -> int:
    await asyncio.sleep(random.random() / 500)  # simulated work of varying length
    return item


@pytest.mark.usefixtures("no_leaked_tasks")
async def test_functions_and_generators_compose() -> None:
    pipeline = Pipeline(range(5)).then(double).then(twice)
    assert await pipeline.collect() == [0, 0, 2, 2, 4, 4, 6, 6, 8, 8]
    assert await pipeline.collect() == [0, 0, 2, 2, 4, 4, 6, 6, 8, 8]  # reusable


@pytest.mark.usefixtures("no_leaked_tasks")
async def test_async_source() -> None:
    async def numbers() -> AsyncIterator[int]:
        for value in range(4):
            yield value

    assert await Pipeline(numbers()).then(double).collect() == [0, 2, 4, 6]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    count=st.integers(0, 40),
    concurrency=st.integers(1, 6),
    buffer=st.integers(1, 4),
    ordered=st.booleans(),
)
async def test_concurrent_stage_loses_nothing_and_keeps_order_when_asked(
    count: int, concurrency: int, buffer: int, ordered: bool
) -> None:
    before = asyncio.all_tasks()
    pipeline = Pipeline(range(count), buffer=buffer).then(
        jittery, concurrency=concurrency, ordered=ordered
    )
    results = await pipeline.collect()
    if ordered:
        assert results == list(range(count))
    else:
        assert sorted(results) == list(range(count))
    assert asyncio.all_tasks() == before


@pytest.mark.usefixtures("no_leaked_tasks")
async def test_concurrency_is_bounded_and_used() -> None:
    running = peak = 0
    release = asyncio.Event()

    async def work(item: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if running == 3:
            release.set()
        await release.wait()
        running -= 1
        return item

    results = await Pipeline(range(20)).then(work, concurrency=3, ordered=False).collect()
    assert sorted(results) == list(range(20))
    assert peak == 3


@pytest.mark.usefixtures("no_leaked_tasks")
async def test_slow_consumer_holds_the_source_back() -> None:
    pulled = 0

    def source() -> Iterator[int]:
        nonlocal pulled
        for value in range(1000):
            pulled += 1
            yield value

    async with Pipeline(source(), buffer=2).then(double, buffer=2).open() as items:
        async for item in items:
            await asyncio.sleep(0.001)  # a slow consumer
            if item == 20:
                break
    # 11 consumed; beyond that, 2 per buffer, concurrency + 1 in the stage (one being processed,
    # one taken and waiting for a slot) and 1 the feeder holds while it waits for room.
    assert pulled <= 11 + 2 + 2 + (1 + 1) + 1


@pytest.mark.usefixtures("no_leaked_tasks")
@pytest.mark.parametrize("concurrency", [1, 4])
@pytest.mark.parametrize("ordered", [True, False])
async def test_stage_error_stops_everything_and_is_raised(concurrency: int, ordered: bool) -> None:
    closed = asyncio.Event()

    async def slow_forever(item: int) -> AsyncIterator[int]:
        try:
            yield item
            await asyncio.Event().wait()  # would never finish on its own
        finally:
            closed.set()

    async def fail_on_five(item: int) -> int:
        if item == 5:
            raise KeyError("bad item")
        return item

    pipeline = (
        Pipeline(range(100))
        .then(fail_on_five, concurrency=concurrency, ordered=ordered)
        .then(slow_forever)
    )
    with pytest.raises(KeyError, match="bad item"):
        await asyncio.wait_for(pipeline.collect(), 10)
    assert closed.is_set()  # the other stage's generator was closed


@pytest.mark.usefixtures("no_leaked_tasks")
async def test_source_error_is_raised() -> None:
    def source() -> Iterator[int]:
        yield 1
        raise ValueError("broken source")

    with pytest.raises(ValueError, match="broken source"):
        await Pipeline(source()).then(double).collect()


@pytest.mark.usefixtures("no_leaked_tasks")
async def test_error_reaches_a_consumer_busy_in_its_own_body() -> None:
    async def fail(item: int) -> int:
        raise OSError("disk full")

    async def consume() -> None:
        async with Pipeline([1]).then(fail).open() as items:
            await asyncio.Event().wait()  # not even iterating: must still be woken
            async for _ in items:
                pass

    with pytest.raises(OSError, match="disk full"):
        await asyncio.wait_for(consume(), 10)


@pytest.mark.usefixtures("no_leaked_tasks")
async def test_cancelling_the_consumer_cancels_every_stage() -> None:
    started = asyncio.Event()
    cancelled = 0

    async def hang(item: int) -> int:
        nonlocal cancelled
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return item

    consumer = asyncio.create_task(
        Pipeline(range(10)).then(hang, concurrency=3, ordered=False).collect()
    )
    await started.wait()
    await asyncio.sleep(0)  # let the other workers start too
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert cancelled == 3


@pytest.mark.usefixtures("no_leaked_tasks")
async def test_consumer_error_stops_the_pipeline() -> None:
    async def consume() -> None:
        async with Pipeline(range(1000)).then(double).open() as items:
            async for item in items:
                if item == 4:
                    raise LookupError("consumer gave up")

    with pytest.raises(LookupError, match="consumer gave up"):
        await consume()


@pytest.mark.usefixtures("no_leaked_tasks")
async def test_stage_must_be_async() -> None:
    def not_async(item: int) -> int:
        return item

    with pytest.raises(TypeError, match="must be an async function"):
        await Pipeline([1]).then(not_async).collect()  # type: ignore[arg-type, type-var]


def test_configuration_errors_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="concurrency must be >= 1, got 0"):
        Pipeline([1]).then(double, concurrency=0)
    with pytest.raises(ValueError, match="buffer must be >= 1, got 0"):
        Pipeline([1], buffer=0)


async def test_iterating_outside_the_block_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="async with"):
        await Pipeline([1]).open().__anext__()
