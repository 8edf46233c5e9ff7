"""Two instances of the example app behind a real HAProxy: overload one, watch the balancer.

Checks on /health/load take a shedding instance out of rotation and bring it back; the agent
lowers its weight instead. Either way no request is lost: every answer is a 2xx, or a 503 with
Retry-After, never a connection error or a hang.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.haproxy import App, gunicorn_app, haproxy
from tests.support.net import wait_for

pytestmark = [
    pytest.mark.haproxy,
    pytest.mark.server,
    pytest.mark.skipif(
        shutil.which("haproxy") is None,
        reason="the haproxy binary is not installed (apt-get install haproxy)",
    ),
]

# The example app admits 16 requests and queues 8: 24 streams keep it full.
STREAMS = 24
# Extra clients that keep the queue topped up as queued requests time out.
SPINNERS = 6


@dataclass
class Answer:
    at: float  # when the request was sent
    status: int | None  # None: connection error or timeout
    retry_after: str | None
    served_by: str | None
    error: str | None = None


class Traffic:
    """Steady client traffic through HAProxy on a thread, every answer recorded."""

    def __init__(self, url: str) -> None:
        self.answers: list[Answer] = []
        self._url = url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # A generous timeout: a request that takes this long has hung.
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    response = client.get(f"{self._url}/")
                except httpx.HTTPError as error:
                    self.answers.append(Answer(sent, None, None, None, repr(error)))
                else:
                    self.answers.append(
                        Answer(
                            sent,
                            response.status_code,
                            response.headers.get("retry-after"),
                            response.headers.get("x-served-by"),
                        )
                    )
                self._stop.wait(0.01)  # ~100 requests per second: a steady trickle

    def since(self, start: float) -> list[Answer]:
        return [a for a in list(self.answers) if a.at >= start]

    def served_since(self, server: str, start: float) -> bool:
        return any(a.served_by == server and a.status == 200 for a in self.since(start))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(15)


class Overload:
    """Clients hitting one instance directly, enough to keep every slot and queue place full.

    Streams hold the slots; spinners retry at once when refused, so the queue stays full even
    as queued requests time out. ``close()`` hangs up, which frees the slots.
    """

    def __init__(self, url: str) -> None:
        self.refusals: list[tuple[int, str | None]] = []
        self._url = url
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, daemon=True) for _ in range(STREAMS + SPINNERS)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                try:
                    with client.stream("GET", f"{self._url}/stream?lines=100") as response:
                        if response.status_code != 200:
                            response.read()
                            self.refusals.append(
                                (response.status_code, response.headers.get("retry-after"))
                            )
                            self._stop.wait(0.005)  # a client's token pause, then retry
                            continue
                        for _ in response.iter_raw():
                            if self._stop.is_set():
                                break
                except httpx.HTTPError:
                    self._stop.wait(0.005)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


@pytest.fixture(scope="module")
def apps() -> Iterator[tuple[App, App]]:
    with gunicorn_app() as first, gunicorn_app() as second:
        yield first, second


def _assert_nothing_lost(answers: list[Answer]) -> None:
    assert answers
    errors = [a for a in answers if a.status is None]
    assert not errors, f"{len(errors)} requests failed outright: {errors[:3]}"
    for answer in answers:
        assert answer.status == 200 or (answer.status == 503 and answer.retry_after), answer


def test_health_checks_take_the_shedding_instance_out_and_bring_it_back(
    apps: tuple[App, App], tmp_path: Path
) -> None:
    first, second = apps
    ports = {"APP1_PORT": str(first.port), "APP2_PORT": str(second.port)}
    with haproxy("haproxy.cfg", tmp_path, ports) as proxy:
        traffic = Traffic(proxy.url)
        try:
            start = time.monotonic()
            assert wait_for(lambda: traffic.served_since("app1", start)), "app1 never served"
            assert wait_for(lambda: traffic.served_since("app2", start)), "app2 never served"

            overload = Overload(first.url)
            try:
                assert wait_for(lambda: proxy.status("app1").startswith("DOWN")), (
                    "HAProxy never saw app1 shed"
                )
                assert proxy.status("app2") == "UP"
                down = time.monotonic()
                # The overloaded instance still sheds what reaches it directly...
                response = httpx.get(f"{first.url}/", timeout=10)
                assert response.status_code == 503
                assert int(response.headers["retry-after"]) >= 1
                # ...while HAProxy sends every new request to the other one.
                assert wait_for(lambda: len(traffic.since(down)) >= 40)
                while_down = traffic.since(down)
                assert proxy.status("app1").startswith("DOWN"), "app1 came back under load"
                assert {a.served_by for a in while_down} == {"app2"}, while_down
                assert all(a.status == 200 for a in while_down)
            finally:
                overload.close()
            assert any(status == 503 and retry_after for status, retry_after in overload.refusals)

            # Load gone: the checks pass again and app1 is back in rotation.
            assert wait_for(lambda: proxy.status("app1") == "UP"), "app1 never came back"
            back = time.monotonic()
            assert wait_for(lambda: traffic.served_since("app1", back)), "app1 got no traffic"
        finally:
            traffic.close()
    _assert_nothing_lost(traffic.answers)


def test_agent_lowers_the_weight_of_the_busy_instance_and_restores_it(
    apps: tuple[App, App], tmp_path: Path
) -> None:
    first, second = apps
    ports = {
        "APP1_PORT": str(first.port),
        "APP2_PORT": str(second.port),
        "AGENT1_PORT": str(first.agent_port),
        "AGENT2_PORT": str(second.agent_port),
    }
    with haproxy("haproxy-agent.cfg", tmp_path, ports) as proxy:
        assert wait_for(lambda: proxy.weight("app1") == proxy.weight("app2") == 100)
        traffic = Traffic(proxy.url)
        try:
            overload = Overload(first.url)
            try:
                # The agent says "up 1%" while app1 sheds: weight 1 of the configured 100.
                assert wait_for(lambda: proxy.weight("app1") <= 5), proxy.servers()["app1"]
                low = time.monotonic()
                assert wait_for(lambda: len(traffic.since(low)) >= 60)
                while_low = traffic.since(low)
                # Still in rotation (never drained), but it gets a trickle, not half.
                assert proxy.status("app1") == "UP"
                # app2 carries the traffic now, and its agent honestly reports that load:
                # (nearly) full weight, the same bound app1 is held to once it recovers.
                assert proxy.weight("app2") >= 90
                to_first = [a for a in while_low if a.served_by == "app1"]
                assert len(to_first) <= len(while_low) // 5, (len(to_first), len(while_low))
            finally:
                overload.close()

            # Back to (nearly) full weight: the trickle of traffic itself is a little load.
            assert wait_for(lambda: proxy.weight("app1") >= 90), proxy.servers()["app1"]
            back = time.monotonic()
            assert wait_for(lambda: traffic.served_since("app1", back)), "app1 got no traffic"
        finally:
            traffic.close()
    _assert_nothing_lost(traffic.answers)
