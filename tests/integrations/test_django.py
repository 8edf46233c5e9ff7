"""shedder.django: the settings-configured middleware and shed_load, in process and for real
under gunicorn (WSGI Django) and uvicorn (ASGI Django)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

pytest.importorskip("django")  # the django extra; dev installs it

import django
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.test import Client, RequestFactory, override_settings

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.integrations.django_project.settings")
django.setup()

from asgiref.sync import iscoroutinefunction  # noqa: E402

from shedder import Throttler  # noqa: E402
from shedder.django import LoadSheddingMiddleware, shed_load  # noqa: E402
from tests.support.servers import (  # noqa: E402
    StartServer,
    check_saturation,
    python_server,
)

from .django_project import views  # noqa: E402

REFUSAL = {"error": "overloaded", "reason": "queue_full", "retry_after": 1}


def ok(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


def test_settings_configure_the_middleware() -> None:
    client = Client()
    health = client.get("/health/load")
    assert health.status_code == 200
    assert health.json()["max_concurrency"] == 1
    assert health.json()["status"] == "ok"
    assert client.post("/health/load").status_code == 405
    assert client.get("/health/live").json() == {"status": "alive"}


def test_a_misspelt_setting_is_named() -> None:
    with pytest.raises(ImproperlyConfigured, match="max_concurency"):
        LoadSheddingMiddleware(ok, {"max_concurency": 4})


def test_missing_settings_say_what_to_add() -> None:
    with override_settings(SHEDDER=None), pytest.raises(ImproperlyConfigured, match="SHEDDER"):
        LoadSheddingMiddleware(ok)


def test_a_dotted_path_throttler() -> None:
    middleware = LoadSheddingMiddleware(
        ok, {"throttler": "tests.integrations.django_project.views.reports"}
    )
    assert middleware.throttler is views.reports


def test_slot_held_until_the_response_is_closed() -> None:
    def stream(request: HttpRequest) -> StreamingHttpResponse:
        return StreamingHttpResponse(iter([b"a", b"b"]))

    middleware = LoadSheddingMiddleware(stream, {"max_concurrency": 1, "max_queue": 0})
    response = middleware(RequestFactory().get("/stream"))
    assert middleware.throttler.in_flight == 1
    refused = middleware(RequestFactory().get("/stream"))
    assert refused.status_code == 503
    assert refused["Retry-After"] == "1"
    response.close()
    assert middleware.throttler.in_flight == 0


def test_async_mode_under_asgi_django() -> None:
    async def get_response(request: HttpRequest) -> HttpResponse:
        return HttpResponse("ok")

    middleware = LoadSheddingMiddleware(get_response, {"max_concurrency": 1, "max_queue": 0})
    assert iscoroutinefunction(middleware)  # Django then runs the chain on the event loop

    async def scenario() -> tuple[int, int]:
        with middleware.throttler:
            refused = await middleware(RequestFactory().get("/"))
        response = await middleware(RequestFactory().get("/"))
        response.close()
        return refused.status_code, response.status_code

    assert asyncio.run(scenario()) == (503, 200)
    assert middleware.throttler.in_flight == 0


def test_shed_load_on_a_sync_view() -> None:
    client = Client()
    with views.reports:  # the view's only slot is taken
        refused = client.get("/report")
    assert refused.status_code == 503
    assert refused.json() == REFUSAL
    assert client.get("/report").content == b"report"
    assert views.reports.in_flight == 0


def test_shed_load_on_an_async_view() -> None:
    throttler = Throttler(max_concurrency=1, max_queue=0)

    @shed_load(throttler, status_code=429)
    async def view(request: HttpRequest) -> HttpResponse:
        return HttpResponse("ok")

    async def scenario() -> list[Any]:
        with throttler:
            refused = await view(RequestFactory().get("/"))
        admitted = await view(RequestFactory().get("/"))
        admitted.close()
        return [refused.status_code, admitted.status_code]

    assert asyncio.run(scenario()) == [429, 200]
    assert throttler.in_flight == 0


def test_shed_load_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match="throttler"):
        shed_load("reports")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="status_code"):
        shed_load(Throttler(max_concurrency=1), status_code=500)


@pytest.mark.server
def test_wsgi_django_under_gunicorn(server: StartServer) -> None:
    app = python_server("gunicorn", "tests.integrations.django_project.wsgi:application")
    check_saturation(server(app, ready="/health/live").url, hold="/hold", release="/release")


@pytest.mark.server
def test_asgi_django_under_uvicorn(server: StartServer) -> None:
    app = python_server("uvicorn", "tests.integrations.django_project.asgi:application")
    check_saturation(server(app, ready="/health/live").url, hold="/ahold", release="/arelease")


def test_health_throttlers_by_dotted_path() -> None:
    middleware = LoadSheddingMiddleware(
        ok,
        {
            "max_concurrency": 2,
            "health_throttlers": ["tests.integrations.django_project.views.reports"],
        },
    )
    health = middleware(RequestFactory().get("/health/load"))
    assert "reports" in health.content.decode()
    with pytest.raises(ImproperlyConfigured, match="health_throttlers"):
        LoadSheddingMiddleware(ok, {"max_concurrency": 2, "health_throttlers": ["no.such.thing"]})


# -- priority and deadlines ----------------------------------------------------------------------


def test_an_unknown_priority_is_named_at_decoration() -> None:
    with pytest.raises(ValueError, match=r"priority must be one of .*'vip'"):
        shed_load(Throttler(max_concurrency=1), priority="vip")


def test_priority_and_deadlines_on_django_views() -> None:
    import time

    from shedder import Deadlines, current_deadline

    throttler = Throttler(max_concurrency=2, name="django-deadlines")
    seen: list[tuple[float, float | None]] = []

    @shed_load(throttler, priority="critical")
    def view(request: HttpRequest) -> HttpResponse:
        seen.append((request.META["shedder.deadline"], current_deadline()))
        return HttpResponse("ok")

    @shed_load(throttler, deadlines=Deadlines(max_budget=1.0))
    async def async_view(request: HttpRequest) -> HttpResponse:
        seen.append((request.META["shedder.deadline"], current_deadline()))
        return HttpResponse("ok")

    factory = RequestFactory()
    before = time.monotonic()
    assert view(factory.get("/", HTTP_GRPC_TIMEOUT="2S")).status_code == 200
    # An untrusted peer's hour is cut to max_budget.
    request = factory.get("/", HTTP_X_ENVOY_EXPECTED_RQ_TIMEOUT_MS="3600000")
    assert asyncio.run(async_view(request)).status_code == 200
    expired = view(factory.head("/", HTTP_GRPC_TIMEOUT="0n"))
    (fast_deadline, fast_current), (capped_deadline, capped_current) = seen
    assert before + 1.9 < fast_deadline <= time.monotonic() + 2.0
    assert fast_current == fast_deadline
    assert before + 0.9 < capped_deadline <= time.monotonic() + 1.0
    assert capped_current == capped_deadline
    assert expired.status_code == 503
    assert expired.headers["x-shedder-refused"] == "1"
    assert expired.content == b""  # HEAD
    stats = throttler.stats()
    assert stats.admitted_by_priority["critical"] == 1
    assert stats.shed_by_priority["critical"]["deadline_exceeded"] == 1
    assert throttler.in_flight == 0
