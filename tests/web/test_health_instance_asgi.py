"""The liveness path and the instance-wide health answer on the ASGI middleware."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from shedder.asgi import LoadSheddingMiddleware


async def app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


async def call(
    middleware: LoadSheddingMiddleware, path: str, method: str = "GET"
) -> tuple[int, bytes]:
    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b""}
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await middleware(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return messages[0]["status"], body


async def test_live_path_answers_200_even_while_shedding() -> None:
    middleware = LoadSheddingMiddleware(app, max_concurrency=1, max_queue=0)
    async with middleware.throttler:
        assert (await call(middleware, "/"))[0] == 503
        assert (await call(middleware, "/health/load"))[0] == 503
        assert await call(middleware, "/health/live") == (200, b'{"status":"alive"}')
        assert await call(middleware, "/health/live", "HEAD") == (200, b"")
        assert (await call(middleware, "/health/live", "POST"))[0] == 405
    gone = LoadSheddingMiddleware(app, max_concurrency=1, live_path=None)
    assert await call(gone, "/health/live") == (200, b"hello")
    with pytest.raises(ValueError, match="live_path must be None or a path"):
        LoadSheddingMiddleware(app, max_concurrency=1, live_path="livez")


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_health_reports_the_instance_with_a_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHEDDER_INSTANCE_DIR", str(tmp_path))
    middleware = LoadSheddingMiddleware(app, max_concurrency=3, name="asgi-table")
    assert not names(tmp_path)  # nothing published before serving
    assert (await call(middleware, "/"))[1] == b"hello"
    assert names(tmp_path) == [f"asgi-table.{os.getpid()}.shedder"]
    body = json.loads((await call(middleware, "/health/load"))[1])
    assert body["workers"] == 1
    assert body["max_concurrency"] == 3
    assert body["admitted_total"] == 1
