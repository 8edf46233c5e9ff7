"""Checked by mypy (``mypy --strict tests/typing`` with ``MYPYPATH=src``), never run by pytest."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import flask

from shedder import Throttler
from shedder.flask import HealthEndpoint, shed_load
from shedder.wsgi import LoadSheddingMiddleware

throttler = Throttler(max_concurrency=2)
app = flask.Flask(__name__)


@shed_load(
    throttler, status_code=429, timeout=0.5, priority="default", trusted_peers=["10.0.0.0/8"]
)
def view(item_id: int, *, verbose: bool = False) -> str:
    return str(item_id)


@shed_load(throttler)
async def async_view(item_id: int) -> str:
    return str(item_id)


# The decorator keeps the parameters and says that a response comes back.
sync_view: Callable[[int], flask.Response] = view
coroutine_view: Callable[[int], Awaitable[flask.Response]] = async_view

app.wsgi_app = LoadSheddingMiddleware(app.wsgi_app, throttler)  # type: ignore[method-assign]
other = LoadSheddingMiddleware(app.wsgi_app, max_concurrency=4, exempt=["/static/"])
HealthEndpoint(app, throttlers=[throttler])
