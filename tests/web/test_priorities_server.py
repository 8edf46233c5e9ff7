"""Priority classes under real servers: a saturated uvicorn or gunicorn still admits critical
requests while it refuses sheddable ones, with classes from ``classify=`` or from a header that
only a trusted peer may set (the apps: tests/web/priorities_server_app.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from shedder import SHED_REASONS
from tests.support.net import wait_for
from tests.support.servers import python_server, server_process

pytestmark = pytest.mark.server

APPS = {
    "uvicorn": "tests.web.priorities_server_app:asgi_app",
    "gunicorn": "tests.web.priorities_server_app:wsgi_app",
}
PATHS = {"critical": "/checkout", "default": "/search", "sheddable": "/prefetch"}


@dataclass
class Server:
    url: str
    mode: str  # "classify" or "header"

    def get(self, client: httpx.Client, priority: str, **params: str) -> httpx.Response:
        """A request in class ``priority``, the way this mode classifies it."""
        if self.mode == "header":
            return client.get("/work", params=params, headers={"x-priority": priority})
        # The header names a class too, but 127.0.0.1 is not trusted in this mode: ignored.
        # One tenant per request: a tenant may hold only one of the two queue places.
        headers = {"x-priority": "critical", "x-api-key": params.get("id", "anonymous")}
        return client.get(PATHS[priority], params=params, headers=headers)


@pytest.fixture(
    scope="module",
    params=[
        ("uvicorn", "classify"),
        ("uvicorn", "header"),
        ("gunicorn", "classify"),
        ("gunicorn", "header"),
    ],
    ids=lambda p: "-".join(p),
)
def served(request: pytest.FixtureRequest) -> Iterator[Server]:
    name, mode = request.param
    command = python_server(name, APPS[name])
    env = {"PRIO_MODE": mode}
    # A module-scoped server: the shared function the ``server`` fixture uses, not the fixture.
    with server_process(command, env=env, ready="/control/started") as process:
        yield Server(process.url, mode)


@pytest.fixture
def client(served: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=15) as client:
        client.get("/control/reset").raise_for_status()
        yield client
        client.get("/control/open")  # never leave a request waiting for the next test


def health(client: httpx.Client) -> dict[str, Any]:
    body: dict[str, Any] = client.get("/health/load").json()
    return body


def test_each_request_runs_in_its_class(served: Server, client: httpx.Client) -> None:
    for priority in ("critical", "default", "sheddable"):
        response = served.get(client, priority)
        assert (response.status_code, response.text) == (200, priority)
    by_class = health(client)["priorities"]
    assert {p: by_class[p]["admitted_total"] > 0 for p in PATHS} == dict.fromkeys(PATHS, True)


def test_a_saturated_server_admits_critical_and_refuses_sheddable(
    served: Server, client: httpx.Client
) -> None:
    results: dict[str, httpx.Response] = {}

    def send(label: str, priority: str) -> threading.Thread:
        def run() -> None:
            with httpx.Client(base_url=served.url, timeout=15) as own:
                results[label] = served.get(own, priority, wait="1", id=label)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    # Two default requests take both slots, two sheddable ones fill their class's room.
    threads = [send("run1", "default"), send("run2", "default")]
    assert wait_for(lambda: health(client)["in_flight"] == 2)
    threads += [send("wait1", "sheddable")]
    assert wait_for(lambda: health(client)["queued"] == 1)
    threads += [send("wait2", "sheddable")]
    assert wait_for(lambda: health(client)["queued"] == 2)

    # Another sheddable request is refused at once; a critical one waits in a room of its own.
    refused = served.get(client, "sheddable", wait="1", id="prefetch")
    assert refused.status_code == 503
    assert refused.json()["reason"] == "queue_full"
    assert int(refused.headers["retry-after"]) >= 1
    threads += [send("checkout", "critical")]
    assert wait_for(lambda: health(client)["queued"] == 3)
    load = health(client)
    assert load["status"] == "overloaded"
    by_class = load["priorities"]
    assert {p: by_class[p]["queued"] for p in PATHS} == {
        "critical": 1,
        "default": 0,
        "sheddable": 2,
    }
    assert by_class["sheddable"]["shed_total"]["queue_full"] == 1
    for priority in ("critical", "default"):
        assert by_class[priority]["shed_total"] == dict.fromkeys(SHED_REASONS, 0)

    # One slot frees: the critical request, the last to arrive, runs before the sheddable ones
    # that waited longer (the app serves the highest class first at once: see the app).
    client.get("/control/open", params={"id": "run1"}).raise_for_status()
    assert wait_for(lambda: "checkout" in client.get("/control/started").json())
    assert not {"wait1", "wait2"} & set(client.get("/control/started").json())
    client.get("/control/open").raise_for_status()
    for thread in threads:
        thread.join(30)
    assert {label: r.status_code for label, r in results.items()} == dict.fromkeys(
        ("run1", "run2", "wait1", "wait2", "checkout"), 200
    )
    assert results["checkout"].text == "critical"
    assert wait_for(lambda: health(client)["in_flight"] == 0)
