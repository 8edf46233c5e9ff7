"""Every common server, for real: saturate, get 503 + Retry-After + JSON, health 503 then 200."""

from __future__ import annotations

import pytest

from tests.support.servers import StartServer, check_saturation, python_server

pytestmark = pytest.mark.server


@pytest.mark.parametrize("name", ["uvicorn", "hypercorn", "granian", "daphne"])
def test_asgi_server(server: StartServer, name: str) -> None:
    app = server(python_server(name, "tests.web.matrix_app:asgi_app"), ready="/health/live")
    check_saturation(app.url)


@pytest.mark.parametrize("name", ["gunicorn", "waitress"])
def test_wsgi_server(server: StartServer, name: str) -> None:
    app = server(python_server(name, "tests.web.matrix_app:wsgi_app"), ready="/health/live")
    check_saturation(app.url)
