"""The Flask example app, plus an HAProxy agent when ``SHEDDER_AGENT_PORT`` is set.

Run from the repository root (``PYTHONPATH=src`` if shedder is not installed)::

    SHEDDER_AGENT_PORT=9777 gunicorn -c examples/haproxy/gunicorn.conf.py \\
        -k gthread --threads 32 -w 4 -b 127.0.0.1:8001 examples.haproxy.app:app

gunicorn imports this module in each worker (without ``--preload``), so each worker starts
an agent; with several workers they share the port (``SO_REUSEPORT``, on by default when
an instance directory is set) and each answers for the whole instance.
"""

from __future__ import annotations

import os

from examples.flask_app.app import app, report_throttler

from shedder.agent import start_agent
from shedder.wsgi import LoadSheddingMiddleware

__all__ = ["app"]

_middleware = app.wsgi_app
if not isinstance(_middleware, LoadSheddingMiddleware):  # pragma: no cover - example wiring
    raise TypeError("examples.flask_app.app should wrap app.wsgi_app in the middleware")

if os.environ.get("SHEDDER_AGENT_PORT"):
    # The same throttlers /health/load reports: the app-wide one and the report route's.
    agent = start_agent(
        [_middleware.throttler, report_throttler],
        port=int(os.environ["SHEDDER_AGENT_PORT"]),
        host=os.environ.get("SHEDDER_AGENT_HOST", "127.0.0.1"),
    )
