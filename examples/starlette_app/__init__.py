"""A small Starlette service protected by shedder, under uvicorn.

Run from the repository root, with one command::

    python -m examples.starlette_app            # or: uvicorn examples.starlette_app.app:app

Routes:
    GET /                  cheap: answers at once
    GET|POST /checkout     critical: served first, refused last
    GET /healthz           critical: a deep health check through the app
    GET /search?q=...      default class
    GET /prefetch          sheddable: refused first under load
    GET /export            sheddable: a 50 ms batch export
    GET /report            heavy: 200 ms of async work, at most 2 at a time (own throttler)
    GET /thumbnail         sync: 50 ms of blocking work in the thread pool (own throttler)
    GET /events?n=N        server-sent events, 100 ms apart; holds its slot until the last one
    GET /health/load       load report for load balancers (200 ok / 503 shedding)
    GET /metrics           Prometheus exposition

Requests carrying an ``X-API-Key`` header are queued per tenant: tenants are served in turn.
"""

from __future__ import annotations

import sys
from pathlib import Path

# A fresh clone need not install anything: prefer this checkout's ``src`` when it exists.
_SRC = Path(__file__).resolve().parents[2] / "src"
if (_SRC / "shedder").is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))
