"""The WSGI target: ``gunicorn -k gthread shedder._demo.wsgi_app:app`` (settings from the env).

A Flask app: ``GET /ready`` answers at once; ``GET /`` runs one query on a
:class:`~shedder._demo.database.SimulatedDatabase` of ``pool`` connections x ``hold_ms``.
"""

from __future__ import annotations

import importlib
from typing import Any

from flask import Flask, request

from .database import SimulatedDatabase
from .recorder import Recorder
from .settings import AppSettings, throttler_options

__all__ = ["app", "make_app"]


def make_app(settings: AppSettings) -> Any:
    """The Flask app, wrapped in shedder's WSGI middleware when ``settings.shedder`` is set."""
    slowdown = settings.factor_at if settings.slowdown else None
    database = SimulatedDatabase(settings.pool, settings.hold_ms / 1000.0, slowdown)
    flask_app = Flask("shedder_demo")
    recorder = Recorder(settings.record) if settings.record else None

    @flask_app.get("/ready")
    def ready() -> str:
        return "ok"

    @flask_app.get("/")
    def work() -> str:
        if recorder is not None:
            recorder.arrived_wsgi(request.environ)
        database.query()
        return "ok"

    if recorder is not None:

        @flask_app.get("/bench/stats")
        def stats() -> dict[str, Any]:
            return recorder.report()

    if not settings.shedder:
        return flask_app
    # Imported here, so the bare variant never loads it; by name, because the options come
    # from JSON and cannot be checked against ThrottlerOptions before run time.
    middleware = importlib.import_module("shedder.wsgi").LoadSheddingMiddleware

    options = throttler_options(settings.shedder)
    options.setdefault("exempt", ["/ready", "/bench/"])
    shedded = middleware(flask_app, **options)
    if recorder is not None:
        recorder.watch(shedded.throttler)
    return shedded


app = make_app(AppSettings.from_env())
