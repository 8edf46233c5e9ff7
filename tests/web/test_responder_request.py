"""A custom responder that takes ``request=`` sees the refused request (ASGI and WSGI)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from shedder import HTTPResponse, Overloaded, Request, Throttler
from shedder.asgi import LoadSheddingMiddleware as ASGIMiddleware
from shedder.wsgi import LoadSheddingMiddleware as WSGIMiddleware


def full() -> Throttler:
    throttler = Throttler(max_concurrency=1, max_queue=0)
    throttler.acquire()  # the only slot, held: every request is refused
    return throttler


def respond(refusal: Overloaded, request: Request | None = None) -> HTTPResponse:
    assert request is not None
    body = json.dumps(
        {"reason": refusal.reason, "path": request.path, "tenant": request.headers.get("x-tenant")}
    ).encode()
    return HTTPResponse(503, (("content-length", str(len(body))),), body)


def plain(refusal: Overloaded) -> HTTPResponse:
    return HTTPResponse(429, (("content-length", "0"),), b"")


async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("a refused request never reaches the app")


def wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
    raise AssertionError("a refused request never reaches the app")


async def test_asgi_responder_sees_the_request() -> None:
    app = ASGIMiddleware(asgi_app, throttler=full(), responder=respond)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        answer = await client.get("/orders/7", headers={"x-tenant": "acme"})
    assert answer.status_code == 503
    assert answer.json() == {"reason": "queue_full", "path": "/orders/7", "tenant": "acme"}


def test_wsgi_responder_sees_the_request() -> None:
    app = WSGIMiddleware(wsgi_app, throttler=full(), responder=respond)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://test") as client:
        answer = client.get("/orders/7", headers={"x-tenant": "acme"})
    assert answer.status_code == 503
    assert answer.json() == {"reason": "queue_full", "path": "/orders/7", "tenant": "acme"}


@pytest.mark.parametrize("middleware", [ASGIMiddleware, WSGIMiddleware])
def test_a_one_argument_responder_is_called_as_before(middleware: Any) -> None:
    gate = middleware(asgi_app, throttler=full(), responder=plain)._gate
    assert not gate.responder_wants_request
    assert gate.refusal(Overloaded("queue_full", 1))[2] == b""
