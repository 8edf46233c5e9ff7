"""Typed usage of shedder.asgi and shedder.starlette: mypy checks it, pytest never runs it."""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from shedder import Deadlines, Throttler
from shedder.asgi import LoadSheddingMiddleware
from shedder.starlette import health_route, shed_load

throttler = Throttler(max_concurrency=4, name="typing")


@shed_load(throttler)
async def async_endpoint(request: Request) -> Response:
    return Response("ok")


@shed_load(throttler, status_code=429, priority="critical", deadlines=Deadlines(margin=0.01))
def sync_endpoint(request: Request, times: int = 1) -> dict[str, int]:
    return {"times": times}


async def use() -> None:
    response: Response = await async_endpoint(Request({"type": "http"}))
    result: dict[str, int] | Response = await sync_endpoint(Request({"type": "http"}), times=2)
    print(response, result)


app = Starlette(routes=[Route("/a", async_endpoint), health_route(throttler, path="/health")])
app.add_middleware(LoadSheddingMiddleware, max_concurrency=8, exempt=["/static/"])
wrapped: Any = LoadSheddingMiddleware(app, throttler, limit_websockets=True)
same: Throttler = LoadSheddingMiddleware(app, throttler).throttler
