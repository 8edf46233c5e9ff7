"""The ASGI middleware under a real uvicorn on 127.0.0.1, driven by httpx clients.

The app (``tests/web/asgi_server_app.py``) runs max_concurrency=2, max_queue=2.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.support.servers import python_server, server_process

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def uvicorn_url() -> Iterator[str]:
    """One uvicorn for the module: the tests reset its state through ``/control/``."""
    command = python_server("uvicorn", "tests.web.asgi_server_app:app", "--no-access-log")
    with server_process(command, ready="/health/load") as process:
        yield process.url


@pytest.fixture
async def client(uvicorn_url: str) -> Any:
    async with httpx.AsyncClient(base_url=uvicorn_url, timeout=20) as client:
        await client.post("/control/reset")
        yield client
        await client.post("/control/open")  # let anything still waiting finish


async def health_when(
    client: httpx.AsyncClient, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5
) -> httpx.Response:
    """Poll /health/load (it is what load balancers do) until ``predicate`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        response = await client.get("/health/load")
        if predicate(response.json()):
            return response
        if time.monotonic() > deadline:
            pytest.fail(f"health never matched; last: {response.json()}")
        await asyncio.sleep(0.01)


async def test_saturation_queue_refusal_and_recovery(client: httpx.AsyncClient) -> None:
    slow = [asyncio.create_task(client.get("/slow", params={"id": f"s{i}"})) for i in range(4)]
    full = await health_when(client, lambda h: h["in_flight"] == 2 and h["queued"] == 2)
    assert full.status_code == 503
    assert full.json()["status"] == "overloaded"

    durations = []
    for _ in range(5):
        started = time.perf_counter()
        refused = await client.get("/slow", params={"id": "refused"})
        durations.append(time.perf_counter() - started)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["reason"] == "queue_full"
    # A refusal costs about a millisecond; the median of five, with room for a shared machine.
    assert statistics.median(durations) < 0.05

    await client.post("/control/open")
    assert [r.status_code for r in await asyncio.gather(*slow)] == [200] * 4
    stats = (await client.get("/control/stats")).json()
    assert stats["max_running"] == 2
    assert "refused" not in stats["started"]
    recovered = await health_when(client, lambda h: h["in_flight"] == 0)
    assert recovered.status_code == 200
    assert recovered.json()["shed_total"]["queue_full"] >= 5


async def test_streaming_response_keeps_its_slot_until_the_last_chunk(
    client: httpx.AsyncClient,
) -> None:
    async with client.stream("GET", "/stream") as response:
        chunks = response.aiter_text()
        assert await anext(chunks) == "first\n"
        await health_when(client, lambda h: h["in_flight"] == 1)
        await client.post("/control/open")
        rest = "".join([chunk async for chunk in chunks])
    assert rest == "last\n"
    await health_when(client, lambda h: h["in_flight"] == 0)


async def test_client_that_disconnects_while_queued_never_runs(
    client: httpx.AsyncClient, uvicorn_url: str
) -> None:
    holders = [asyncio.create_task(client.get("/slow", params={"id": f"h{i}"})) for i in range(2)]
    await health_when(client, lambda h: h["in_flight"] == 2)
    cancelled_before = (await client.get("/health/load")).json()["cancelled_total"]

    async with httpx.AsyncClient(base_url=uvicorn_url, timeout=0.5) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            await impatient.get("/slow", params={"id": "ghost"})
    # It gave up and closed its connection: its place in the queue is freed promptly.
    left = await health_when(client, lambda h: h["queued"] == 0, timeout=2)
    assert left.json()["cancelled_total"] == cancelled_before + 1
    assert left.json()["in_flight"] == 2

    await client.post("/control/open")
    await asyncio.gather(*holders)
    await health_when(client, lambda h: h["in_flight"] == 0)
    assert sorted((await client.get("/control/stats")).json()["started"]) == ["h0", "h1"]


async def test_exception_in_the_app_frees_its_slot(client: httpx.AsyncClient) -> None:
    before = (await client.get("/health/load")).json()["admitted_total"]
    for _ in range(3):  # more than max_concurrency: a leaked slot would show
        # uvicorn drops the connection after an app error, so do not try to reuse it.
        boom = await client.get("/boom", headers={"connection": "close"})
        assert boom.status_code == 500
    after = await health_when(client, lambda h: h["in_flight"] == 0)
    assert after.json()["admitted_total"] == before + 3
    await client.post("/control/open")
    assert (await client.get("/slow")).status_code == 200  # slots are still there
