"""Typed usage of priority classes and flows: mypy checks it, pytest never runs it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from shedder import (
    DEFAULT_PRIORITIES,
    Classification,
    Overloaded,
    Permit,
    Request,
    Throttler,
    ThrottlerListener,
    Waiting,
)
from shedder.asgi import LoadSheddingMiddleware as ASGIMiddleware
from shedder.wsgi import LoadSheddingMiddleware as WSGIMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse

throttler = Throttler(
    8,
    16,
    priorities=DEFAULT_PRIORITIES,
    default_priority="default",
    shed_thresholds={"sheddable": 0.5},
    flow_queue_limit=4,
    name="typing-priorities",
)
classes: tuple[str, ...] = throttler.priorities
point: float = throttler.shed_threshold_of("sheddable")


def classify(request: Request) -> Classification | None:
    if request.path.startswith("/checkout"):
        return Classification("critical", flow=request.headers.get("x-api-key"))
    if request.client is None:
        return None
    return Classification(flow=(request.method, request.client))


def use() -> tuple[str, str | None, Mapping[str, int], Mapping[str, int], int]:
    permit: Permit = throttler.acquire(priority="critical", flow="tenant")
    granted_in: str = permit.priority
    permit.release()
    decision = throttler.admit(priority="sheddable", flow=("tenant", 1))
    refused_in: str | None = None
    if isinstance(decision, Waiting):
        decision.cancel()
    elif isinstance(decision, Overloaded):
        refused_in = decision.priority
    stats = throttler.stats()
    return (
        granted_in,
        refused_in,
        stats.queued_by_priority,
        stats.admitted_by_priority,
        stats.shed_by_priority["sheddable"]["overloaded"],
    )


async def use_async() -> None:
    async_permit = await throttler.acquire_async(priority="default", flow=None, timeout=0.5)
    async_permit.release("ignore")


class ByClass(ThrottlerListener):
    def on_admit(self, throttler: Throttler, waited: float, priority: str) -> None:
        pass


async def app(scope: object, receive: object, send: object) -> None:
    pass


def wsgi_app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    return [b""]


wsgi = WSGIMiddleware(wsgi_app, throttler, classify=classify, priority_header="x-priority")
asgi = ASGIMiddleware(
    app,
    throttler,
    classify=classify,
    priority_header="x-priority",
    trusted_peers=("10.0.0.0/8",),
)
