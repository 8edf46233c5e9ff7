"""shedder.starlette: the shed_load decorator and the health route, with Starlette and FastAPI."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio.to_thread
import httpx
import pytest
from fastapi import Depends, FastAPI
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from shedder import Throttler
from shedder.asgi import LoadSheddingMiddleware
from shedder.starlette import health_endpoint, health_route, shed_load


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_async_endpoint_admitted_then_shed_while_busy() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=0, retry_after=3)
    inside, gate = asyncio.Event(), asyncio.Event()
    calls = 0

    @shed_load(throttler)
    async def work(request: Request) -> PlainTextResponse:
        nonlocal calls
        calls += 1
        inside.set()
        await gate.wait()
        return PlainTextResponse("done")

    assert work.__name__ == "work"
    async with client_for(Starlette(routes=[Route("/work", work)])) as client:
        first = asyncio.create_task(client.get("/work"))
        await inside.wait()
        refused = await client.get("/work")
        gate.set()
        assert (await first).text == "done"
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "3"
    assert refused.json() == {"error": "overloaded", "reason": "queue_full", "retry_after": 3}
    assert calls == 1
    assert throttler.in_flight == 0


async def test_sync_endpoint_takes_its_slot_before_the_thread_pool() -> None:
    """With every pool thread busy, a full throttler still refuses at once, not after a wait."""
    throttler = Throttler(max_concurrency=1, max_queue=0)
    release_pool = threading.Event()
    blocked = threading.Event()
    ran: list[str] = []

    def hog(request: Request) -> PlainTextResponse:  # unguarded, holds the only thread
        blocked.set()
        release_pool.wait(10)
        return PlainTextResponse("hog")

    @shed_load(throttler, status_code=429)
    def guarded(request: Request) -> PlainTextResponse:
        ran.append(threading.current_thread().name)
        return PlainTextResponse("guarded")

    limiter = anyio.to_thread.current_default_thread_limiter()
    saved = limiter.total_tokens
    limiter.total_tokens = 1
    try:
        app = Starlette(routes=[Route("/hog", hog), Route("/guarded", guarded)])
        async with client_for(app) as client:
            hogging = asyncio.create_task(client.get("/hog"))
            await asyncio.to_thread(blocked.wait, 10)  # asyncio's own pool, not anyio's
            with throttler.acquire():
                refused = await asyncio.wait_for(client.get("/guarded"), 5)
            release_pool.set()
            assert (await hogging).text == "hog"
            admitted = await client.get("/guarded")
    finally:
        limiter.total_tokens = saved
        release_pool.set()
    assert refused.status_code == 429
    assert "retry-after" in refused.headers
    assert admitted.text == "guarded"
    assert len(ran) == 1
    assert ran[0] != threading.current_thread().name  # ran in the pool
    assert throttler.in_flight == 0


async def test_streaming_response_holds_the_slot_until_the_stream_ends() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=0)
    first_chunk_sent, finish = asyncio.Event(), asyncio.Event()
    observed: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"a"
        first_chunk_sent.set()
        await finish.wait()
        yield b"b"

    @shed_load(throttler)
    async def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(body())

    async def watch() -> None:
        await first_chunk_sent.wait()
        observed.append(throttler.in_flight)
        finish.set()

    async with client_for(Starlette(routes=[Route("/s", stream)])) as client:
        response, _ = await asyncio.gather(client.get("/s"), watch())
    assert response.text == "ab"
    assert observed == [1]
    assert throttler.in_flight == 0


async def test_endpoint_exception_frees_the_slot() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=0)

    @shed_load(throttler)
    async def broken(request: Request) -> PlainTextResponse:
        raise RuntimeError("boom")

    @shed_load(throttler)
    def broken_sync(request: Request) -> PlainTextResponse:
        raise RuntimeError("boom")

    app = Starlette(routes=[Route("/a", broken), Route("/s", broken_sync)])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/a")).status_code == 500
        assert (await client.get("/s")).status_code == 500
    assert throttler.in_flight == 0
    assert throttler.stats().admitted_total == 2


def test_decorator_configuration_errors() -> None:
    throttler = Throttler(max_concurrency=1)
    with pytest.raises(TypeError, match=r"shedder\.Throttler"):
        shed_load("nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="503 or 429, got 500"):
        shed_load(throttler, status_code=500)
    with pytest.raises(TypeError, match="generator endpoint"):

        @shed_load(throttler)
        async def agen() -> AsyncIterator[bytes]:
            yield b""


# -- health route --------------------------------------------------------------------------------


async def test_health_route_reports_every_live_throttler_or_the_named_ones() -> None:
    gc.collect()  # throttlers left by earlier tests must not be reported (or be busy)
    alpha = Throttler(max_concurrency=1, max_queue=0, name="alpha-route")
    beta = Throttler(max_concurrency=2, name="beta-route")
    app = Starlette(
        routes=[
            health_route(),
            health_route(beta, path="/health/beta", name="beta"),
            health_route("alpha-route", path="/health/alpha", name="alpha"),
            Route("/health/missing", health_endpoint("no-such-throttler")),
        ]
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        every = await client.get("/health/load")
        only_beta = await client.get("/health/beta")
        head = await client.head("/health/beta")
        post = await client.post("/health/beta")
        with alpha.acquire():
            busy = await client.get("/health/alpha")
            busy_all = await client.get("/health/load")
        missing = await client.get("/health/missing")
    assert every.status_code == 200
    assert {"alpha-route", "beta-route"} <= {t["name"] for t in every.json()["throttlers"]}
    assert only_beta.json()["name"] == "beta-route"
    assert only_beta.json()["max_concurrency"] == 2
    assert [t["name"] for t in only_beta.json()["throttlers"]] == ["beta-route"]
    assert head.status_code == 200
    assert head.content == b""
    assert post.status_code == 405
    assert busy.status_code == 503
    assert busy.json()["status"] == "overloaded"
    assert busy_all.status_code == 503
    assert missing.status_code == 500


# -- FastAPI -------------------------------------------------------------------------------------


class Item(BaseModel):
    name: str
    quantity: int


def current_user() -> str:
    return "ada"


def make_fastapi(route_throttler: Throttler, app_throttler: Throttler) -> FastAPI:
    app = FastAPI()
    app.add_middleware(LoadSheddingMiddleware, throttler=app_throttler)

    @app.post("/items/{item_id}")
    @shed_load(route_throttler)
    async def create(item_id: int, item: Item, user: str = Depends(current_user)) -> dict[str, Any]:
        return {"id": item_id, "name": item.name, "quantity": item.quantity, "user": user}

    @app.get("/sync/{word}")
    @shed_load(route_throttler)
    def shout(word: str, times: int = 1) -> dict[str, str]:
        return {"word": word.upper() * times}

    return app


async def test_fastapi_keeps_the_signature_dependencies_body_and_openapi() -> None:
    route_throttler = Throttler(max_concurrency=1, max_queue=0, name="fastapi-route")
    app_throttler = Throttler(max_concurrency=2, max_queue=0, name="fastapi-app")
    app = make_fastapi(route_throttler, app_throttler)
    async with client_for(app) as client:
        created = await client.post("/items/7", json={"name": "pen", "quantity": 2})
        invalid = await client.post("/items/7", json={"name": "pen"})
        shouted = await client.get("/sync/hi", params={"times": 2})
        with route_throttler.acquire():
            refused = await client.post("/items/7", json={"name": "pen", "quantity": 2})
        with app_throttler.acquire(), app_throttler.acquire():
            refused_by_middleware = await client.get("/sync/hi")
        health = await client.get("/health/load")
        schema = (await client.get("/openapi.json")).json()
    assert created.json() == {"id": 7, "name": "pen", "quantity": 2, "user": "ada"}
    assert invalid.status_code == 422  # the body model is still validated
    assert shouted.json() == {"word": "HIHI"}
    assert refused.status_code == 503
    assert refused.json()["reason"] == "queue_full"
    assert refused_by_middleware.status_code == 503
    assert health.json()["name"] == "fastapi-app"

    post = schema["paths"]["/items/{item_id}"]["post"]
    assert [p["name"] for p in post["parameters"]] == ["item_id"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/Item")
    get = schema["paths"]["/sync/{word}"]["get"]
    assert {p["name"] for p in get["parameters"]} == {"word", "times"}
    assert route_throttler.in_flight == 0
    assert app_throttler.in_flight == 0


def test_shed_load_above_the_route_decorator_is_an_error() -> None:
    from fastapi import FastAPI

    app = FastAPI()
    throttler = Throttler(max_concurrency=1)
    with pytest.raises(TypeError, match=r"above the route decorator of .*misplaced.*'/items'"):

        @shed_load(throttler)
        @app.get("/items")
        async def misplaced() -> dict[str, int]:
            return {}


# -- priority and deadlines ----------------------------------------------------------------------


def test_an_unknown_priority_is_named_at_decoration() -> None:
    throttler = Throttler(max_concurrency=1, priorities=("critical", "default"))
    with pytest.raises(ValueError, match=r"priority must be one of .*critical, default.*'urgent'"):
        shed_load(throttler, priority="urgent")
    with pytest.raises(TypeError, match="deadlines"):
        shed_load(throttler, deadlines=5.0)  # type: ignore[arg-type]


async def test_priority_and_deadlines_on_a_starlette_endpoint() -> None:
    import time

    from shedder import Deadlines, current_deadline

    throttler = Throttler(max_concurrency=1, max_queue=4, queue_timeout=10.0)
    inside, gate = asyncio.Event(), asyncio.Event()
    seen: list[tuple[float, float | None]] = []

    @shed_load(throttler, priority="critical")
    async def work(request: Request) -> PlainTextResponse:
        if request.query_params.get("hold"):
            inside.set()
            await gate.wait()
        else:
            seen.append((request.scope["shedder.deadline"], current_deadline()))
        return PlainTextResponse("done")

    @shed_load(throttler, deadlines=None)
    async def ignores(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(request.scope.get("shedder.deadline")))

    @shed_load(throttler, deadlines=Deadlines(margin=0.05))
    def sync_work(request: Request) -> PlainTextResponse:
        seen.append((request.scope["shedder.deadline"], current_deadline()))
        return PlainTextResponse("done")

    app = Starlette(
        routes=[Route("/work", work), Route("/ignores", ignores), Route("/sync", sync_work)]
    )
    async with client_for(app) as client:
        before = time.monotonic()
        assert (await client.get("/work", headers={"grpc-timeout": "2S"})).text == "done"
        assert (await client.get("/sync", headers={"grpc-timeout": "2S"})).text == "done"
        expired = await client.get("/work", headers={"grpc-timeout": "0n"})
        assert (await client.get("/ignores", headers={"grpc-timeout": "0n"})).text == "None"
        holder = asyncio.create_task(client.get("/work", params={"hold": "1"}))
        await inside.wait()
        started = time.monotonic()
        late = await client.get("/work", headers={"x-envoy-expected-rq-timeout-ms": "100"})
        waited = time.monotonic() - started
        gate.set()
        await holder
    for deadline, current in seen:
        assert before + 1.9 < deadline <= time.monotonic() + 2.0
        assert current == deadline  # shedder.client calls made meanwhile end by it
    assert len(seen) == 2
    assert expired.status_code == 503
    assert expired.json()["reason"] == "deadline_exceeded"
    assert late.json()["reason"] == "deadline_exceeded"
    assert 0.09 <= waited < 1.0
    stats = throttler.stats()
    assert stats.admitted_by_priority["critical"] == 2  # /work (and the held one)
    assert stats.shed_by_priority["critical"]["deadline_exceeded"] == 2


async def test_fastapi_endpoints_get_deadlines_without_asking_for_the_request() -> None:
    import time

    from shedder import current_deadline

    throttler = Throttler(max_concurrency=2)
    app = FastAPI()

    @app.get("/items/{item_id}")
    @shed_load(throttler)
    async def item(item_id: int) -> dict[str, Any]:
        deadline = current_deadline()
        return {"id": item_id, "left": None if deadline is None else deadline - time.monotonic()}

    @app.get("/sync")
    @shed_load(throttler)
    def sync(request: Request) -> dict[str, Any]:
        deadline = current_deadline()  # in the thread pool's copy of the context
        assert deadline == request.scope["shedder.deadline"]
        return {"left": deadline - time.monotonic()}

    async with client_for(app) as client:
        fast = (await client.get("/items/3", headers={"grpc-timeout": "1500m"})).json()
        plain = (await client.get("/items/4")).json()
        refused = await client.get(
            "/items/5",
            headers={
                "x-envoy-expected-rq-timeout-ms": "1",
                "x-request-start": f"t={time.time() - 1:.3f}",
            },
        )
        sync = (await client.get("/sync", headers={"grpc-timeout": "3S"})).json()
        schema = (await client.get("/openapi.json")).json()
    assert fast["id"] == 3
    assert 1.4 < fast["left"] <= 1.5
    assert plain == {"id": 4, "left": None}
    assert refused.json()["reason"] == "deadline_exceeded"
    assert 2.9 < sync["left"] <= 3.0
    parameters = schema["paths"]["/items/{item_id}"]["get"]["parameters"]
    assert [p["name"] for p in parameters] == ["item_id"]  # the request is no field


def test_the_hidden_request_parameter_comes_before_var_keyword() -> None:
    import inspect

    @shed_load(Throttler(max_concurrency=1))
    async def endpoint(item_id: int, *args: Any, **extra: Any) -> None: ...

    kinds = [(p.name, p.kind.name) for p in inspect.signature(endpoint).parameters.values()]
    assert kinds == [
        ("item_id", "POSITIONAL_OR_KEYWORD"),
        ("args", "VAR_POSITIONAL"),
        ("shedder_request__", "KEYWORD_ONLY"),
        ("extra", "VAR_KEYWORD"),
    ]
