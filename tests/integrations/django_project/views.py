"""Views that hold their slot until /release opens a gate: one gate per serving mode."""

from __future__ import annotations

import asyncio
import threading

from django.http import HttpRequest, HttpResponse

from shedder import Throttler
from shedder.django import shed_load

_gate = threading.Event()
_async_gate: asyncio.Event | None = None  # made on the ASGI server's loop, at first use
reports = Throttler(max_concurrency=1, max_queue=0, name="reports")


def _async_event() -> asyncio.Event:
    global _async_gate
    if _async_gate is None:
        _async_gate = asyncio.Event()
    return _async_gate


def hold(request: HttpRequest) -> HttpResponse:
    _gate.wait(timeout=30)
    return HttpResponse("done")


async def ahold(request: HttpRequest) -> HttpResponse:
    await _async_event().wait()
    return HttpResponse("done")


def release(request: HttpRequest) -> HttpResponse:
    _gate.set()
    return HttpResponse("released")


async def arelease(request: HttpRequest) -> HttpResponse:
    _async_event().set()
    return HttpResponse("released")


@shed_load(reports)
def report(request: HttpRequest) -> HttpResponse:
    return HttpResponse("report")
