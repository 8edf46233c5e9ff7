"""examples/starlette_app serves what its docstring promises (in process)."""

from __future__ import annotations

import httpx
from examples.starlette_app.app import app, report_throttler


async def test_example_routes() -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
        index = await client.get("/")
        thumbnail = await client.get("/thumbnail")
        events = await client.get("/events", params={"n": 2})
        health = await client.get("/health/load")
        metrics = await client.get("/metrics")
        report = await client.get("/report")
        with report_throttler.acquire(), report_throttler.acquire():
            # The heavy route's own throttler is full: its request waits 0.5 s, then is shed.
            refused = await client.get("/report")
    assert index.json() == {"hello": "world"}
    assert thumbnail.json() == {"thumbnail": "rendered"}
    assert events.text == "data: event 0\n\ndata: event 1\n\n"
    assert events.headers["content-type"].startswith("text/event-stream")
    assert [t["name"] for t in health.json()["throttlers"]] == ["app", "report", "thumbnail"]
    assert metrics.status_code == 200
    assert report.json() == {"report": "ready"}
    assert refused.status_code == 503
    assert refused.json()["reason"] == "queue_timeout"
