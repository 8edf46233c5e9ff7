"""Every common server, for real: saturate, get 503 + Retry-After + JSON, health 503 then 200."""

from __future__ import annotations

import pytest

from .servers import check_saturation, serve

pytestmark = pytest.mark.server


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn", "granian", "daphne"])
def test_asgi_server(server: str) -> None:
    with serve(server, "tests.matrix_app:asgi_app") as base_url:
        check_saturation(base_url)


@pytest.mark.parametrize("server", ["gunicorn", "waitress"])
def test_wsgi_server(server: str) -> None:
    with serve(server, "tests.matrix_app:wsgi_app") as base_url:
        check_saturation(base_url)
