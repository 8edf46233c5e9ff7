"""shedder.gunicorn.ThreadWorker under a real gunicorn (``-w 1`` and ``-w 2``) on 127.0.0.1.

The app is tests/web/gunicorn_worker_app.py. A refusal made by the worker, before gunicorn's
thread pool, is told apart from one made by the middleware in a thread by gunicorn's own
``Server`` header, which only responses written by gunicorn's thread carry.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from shedder import Throttler, ThrottlerStats
from shedder._demo.servers import ServerProcess
from shedder._web.instance import InstanceTable
from tests.support.net import wait_for
from tests.support.servers import python_server, server_process

pytestmark = pytest.mark.server

APP = "tests.web.gunicorn_worker_app:app"
_NAMED_DEFAULT = Throttler(1, name="default")  # names the records to sum; never published


@dataclass
class Server:
    """A running gunicorn, the directory its workers report to, and the requests held."""

    process: ServerProcess
    instance_dir: Path
    holders: list[threading.Thread] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def pid(self) -> int:
        """The gunicorn master's."""
        assert self.process.process is not None
        return self.process.process.pid

    def output(self) -> str:
        """All gunicorn said so far (also after it stopped)."""
        return self.process.output(limit=1_000_000)

    def figures(self) -> ThrottlerStats:
        """The throttlers' figures summed over the workers, read from the instance directory
        (no request: every thread of the server may be busy)."""
        return InstanceTable(self.instance_dir).stats(_NAMED_DEFAULT)

    def health(self) -> dict[str, object]:
        payload: dict[str, object] = httpx.get(f"{self.url}/health/load", timeout=5).json()
        return payload

    def hold(self, gate: str) -> list[int]:
        """Start a request on its own connection that blocks on ``gate``; its status lands in
        the list returned once it ends."""
        statuses: list[int] = []

        def run() -> None:
            try:
                statuses.append(httpx.get(f"{self.url}/hold/{gate}", timeout=30).status_code)
            except httpx.HTTPError:
                statuses.append(-1)  # the server went away: the test says if that is wrong

        holder = threading.Thread(target=run)
        holder.start()
        self.holders.append(holder)
        return statuses

    def saturate(self, gate: str, slots: int) -> None:
        """Hold requests on ``gate`` until ``slots`` of them run, over all the workers."""
        # A response reaches the client just before its slot is released: let it go first.
        assert wait_for(lambda: self.figures().in_flight == 0, timeout=5)

        deadline = time.monotonic() + 15
        while (in_flight := self.figures().in_flight) < slots:
            assert time.monotonic() < deadline, self.figures()
            self.hold(gate)  # lands on any worker: refused at once if that one is full
            holder = self.holders[-1]

            def settled(holder: threading.Thread = holder, before: int = in_flight) -> bool:
                return not holder.is_alive() or self.figures().in_flight > before

            assert wait_for(settled, timeout=5)

    def occupy(self, seconds: float) -> list[Response]:
        """Keep one slot and thread busy for ``seconds`` (no gate: with one thread, a request
        to open it would wait behind the ones under test)."""
        responses: list[Response] = []
        holder = threading.Thread(
            target=lambda: responses.append(request(self.port, get(f"/sleep/{seconds}")))
        )
        holder.start()
        self.holders.append(holder)
        assert wait_for(lambda: self.figures().in_flight == 1, timeout=5)
        return responses

    def release(self, gate: str) -> None:
        """Open ``gate`` in every worker (an exempt request each time, to any worker)."""

        def done() -> bool:
            httpx.get(f"{self.url}/open/{gate}", timeout=5)
            return not any(holder.is_alive() for holder in self.holders)

        assert wait_for(done, timeout=15)
        self.holders.clear()


@contextlib.contextmanager
def gunicorn(
    tmp_path: Path,
    *,
    workers: int = 1,
    threads: int = 8,
    env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> Iterator[Server]:
    """gunicorn with shedder's ThreadWorker, ready once its health reports every worker."""
    instance_dir = Path(tempfile.mkdtemp(prefix="instance-", dir=tmp_path))
    options = ["-k", "shedder.gunicorn.ThreadWorker", "--threads", str(threads)]
    options += ["--workers", str(workers), "--graceful-timeout", "3"]
    options += ["--control-socket", str(tmp_path / "{port}.ctl"), *args]

    def ready(process: ServerProcess) -> bool:
        try:
            health = httpx.get(f"{process.url}/health/load", timeout=5).json()
            return bool(health["workers"] == workers)
        except (httpx.TransportError, KeyError, ValueError):
            return False

    process = server_process(
        python_server("gunicorn", APP, *options),
        ready=ready,
        env={"SHEDDER_INSTANCE_DIR": str(instance_dir), **(env or {})},
        grace=15,
        log=instance_dir.with_suffix(".log"),
    )
    with process:
        server = Server(process, instance_dir)
        try:
            yield server
        finally:
            for _ in server.holders:  # a failed test may leave requests held
                with contextlib.suppress(httpx.HTTPError):
                    httpx.get(f"{server.url}/open/held", timeout=1)
    for holder in server.holders:
        holder.join(timeout=5)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection cleanly after the response


def exchange(sock: socket.socket, request: bytes) -> Response:
    """Send ``request`` and read one response (Content-Length framed) from ``sock``."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = 0 if request.startswith(b"HEAD") else int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    closed = False
    if headers.get("connection", "").lower() == "close":
        sock.settimeout(5)
        closed = sock.recv(1) == b""  # FIN, not a reset (which raises)
    return Response(int(lines[0].split()[1]), headers, body, closed)


def request(port: int, raw: bytes) -> Response:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        return exchange(sock, raw)


def get(path: str, *extra: str, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *extra, "", ""]
    return "\r\n".join(lines).encode()


def assert_refused_by_worker(response: Response, reason: str = "queue_full") -> None:
    assert response.status == 503
    assert "server" not in response.headers  # written by the worker, not a gunicorn thread
    assert response.headers["retry-after"] == "1"
    assert response.headers["x-shedder-refused"] == "1"
    assert response.headers["connection"] == "close"
    assert response.closed
    assert json.loads(response.body) == {
        "error": "overloaded",
        "reason": reason,
        "retry_after": 1,
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_full_house_is_refused_before_the_pool(tmp_path: Path, workers: int) -> None:
    env = {"MAX_CONCURRENCY": "1", "MAX_QUEUE": "0"}
    with gunicorn(tmp_path, workers=workers, env=env) as server:
        assert request(server.port, get("/echo")).status == 200
        server.saturate("held", slots=workers)

        assert_refused_by_worker(request(server.port, get("/echo")))
        head = request(server.port, get("/echo", method="HEAD"))
        assert head.status == 503
        assert head.body == b""
        assert head.closed
        assert head.headers["content-length"] != "0"
        # Deadlines are read from the peeked headers: one already spent is refused as such.
        late = request(server.port, get("/echo", "grpc-timeout: 0n"))
        assert_refused_by_worker(late, "deadline_exceeded")

        # Health, liveness and exempt paths are never refused: the middleware serves them.
        health = request(server.port, get("/health/load"))
        assert health.status == 503
        assert health.headers["server"] == "gunicorn"
        assert json.loads(health.body)["status"] == "overloaded"
        assert request(server.port, get("/health/live")).status == 200
        assert request(server.port, get("/open/other")).status == 200

        server.release("held")
        assert request(server.port, get("/echo")).status == 200
        assert wait_for(lambda: server.health()["status"] == "ok", timeout=5)
    assert "WARNING" not in server.output()  # 8 threads hold 1 + 0


@pytest.mark.parametrize("workers", [1, 2])
def test_keep_alive_connection_refused_mid_stream(tmp_path: Path, workers: int) -> None:
    env = {"MAX_CONCURRENCY": "1", "MAX_QUEUE": "0"}
    with gunicorn(tmp_path, workers=workers, env=env) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            first = exchange(sock, get("/echo"))
            assert first.status == 200
            assert first.headers["connection"] == "keep-alive"
            server.saturate("held", slots=workers)
            # A body the worker never reads: the connection must still close with a FIN
            # after the whole 503, not a reset that could destroy it.
            body = b"x" * 200_000
            upload = get("/upload", f"Content-Length: {len(body)}", method="POST") + body
            assert_refused_by_worker(exchange(sock, upload))
        server.release("held")


def test_a_burst_of_new_connections_is_refused_in_full(tmp_path: Path) -> None:
    # Taken off the listener in batches, decided at once and closed without lingering: each
    # client still gets the whole 503 and then a FIN.
    env = {"MAX_CONCURRENCY": "1", "MAX_QUEUE": "0"}
    with gunicorn(tmp_path, env=env) as server:
        server.saturate("held", slots=1)
        sockets = [
            socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(64)
        ]
        try:
            for sock in sockets:
                sock.sendall(get("/echo"))
            for sock in sockets:
                assert_refused_by_worker(exchange(sock, b""))
        finally:
            for sock in sockets:
                sock.close()
        server.release("held")
        assert request(server.port, get("/echo")).status == 200


def test_a_connection_that_speaks_late_is_refused_before_the_pool(tmp_path: Path) -> None:
    env = {"MAX_CONCURRENCY": "1", "MAX_QUEUE": "0"}
    with gunicorn(tmp_path, env=env) as server:
        server.saturate("held", slots=1)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            time.sleep(0.3)  # the behaviour under test: a client slow to send its request
            assert_refused_by_worker(exchange(sock, get("/echo")))
        server.release("held")


def test_a_client_slow_to_close_does_not_stall_the_worker(tmp_path: Path) -> None:
    # gthread waits in its main thread for the client to close after "Connection: close" (up
    # to 2 s); the worker drains such connections on its poller instead.
    with gunicorn(tmp_path) as server, socket.socket() as lazy:
        lazy.settimeout(10)
        lazy.connect(("127.0.0.1", server.port))
        answer = exchange(lazy, get("/echo", "Connection: close"))
        assert answer.status == 200
        assert answer.closed
        started = time.monotonic()
        assert request(server.port, get("/echo")).status == 200
        assert time.monotonic() - started < 1.0


def test_the_wait_for_a_thread_counts_against_queue_timeout(tmp_path: Path) -> None:
    # Two threads for one slot and two queue places: the second waiter waits in gunicorn.
    env = {"MAX_CONCURRENCY": "1", "MAX_QUEUE": "2", "QUEUE_TIMEOUT": "0.4"}
    with gunicorn(tmp_path, threads=2, env=env) as server:
        assert "gunicorn runs 2 threads" in server.output()
        assert "max_concurrency + max_queue = 1 + 2 = 3" in server.output()
        server.saturate("held", slots=1)
        waiting = server.hold("other")  # takes the second thread, waits in the throttler
        assert wait_for(lambda: server.figures().queued == 1, timeout=5)
        started = time.monotonic()
        late = request(server.port, get("/echo"))  # queued in gunicorn: no thread is free
        elapsed = time.monotonic() - started
        assert late.status == 503
        assert late.headers["server"] == "gunicorn"
        assert json.loads(late.body)["reason"] == "queue_timeout"
        # Its clock started when the worker queued it, not when a thread took it (~0.8 s).
        assert elapsed < 0.7
        server.release("held")
        assert waiting == [503]


def test_time_queued_in_gunicorn_is_exposed(tmp_path: Path) -> None:
    env = {"MAX_CONCURRENCY": "2", "MAX_QUEUE": "0"}
    with gunicorn(tmp_path, threads=1, env=env) as server:
        busy = server.occupy(0.8)  # the only thread
        started = time.monotonic()
        echo = request(server.port, get("/echo"))  # admitted, then waits for the thread
        assert echo.status == 200
        queued = json.loads(echo.body)["queued_in_server"]
        assert queued >= 0.8 - (time.monotonic() - started) - 0.05
        assert queued > 0.3
        assert json.loads(echo.body)["waited"] == 0.0  # waited for a thread, not a slot
        server.holders[-1].join(5)
        assert busy[0].status == 200


@pytest.mark.parametrize("queue", [0, 2], ids=["permits", "waiting"])
def test_a_connection_that_dies_in_the_pool_gives_its_place_back(
    tmp_path: Path, queue: int
) -> None:
    # Three places: one for the held request, two for requests stuck behind it in the pool.
    env = {"MAX_CONCURRENCY": str(3 - queue), "MAX_QUEUE": str(queue)}
    with gunicorn(tmp_path, threads=1, env=env) as server:
        busy = server.occupy(1.0)  # the only thread
        # Admitted (or queued) by the worker from its head, then rejected by gunicorn's parser.
        with contextlib.closing(
            socket.create_connection(("127.0.0.1", server.port), timeout=10)
        ) as dead:
            dead.sendall(get("/echo", "this line is not a header"))
            assert wait_for(lambda: _places(server) == 2, timeout=5)
            # Admitted (or queued), then its client resets the connection.
            reset = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            reset.sendall(get("/echo"))
            assert wait_for(lambda: _places(server) == 3, timeout=5)
            reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            reset.close()
            assert wait_for(lambda: _places(server) == 0, timeout=5), server.figures()
            # The slot is free once the response is sent; the client thread records it after.
            assert wait_for(lambda: bool(busy), timeout=5)
            assert busy[0].status == 200
        assert request(server.port, get("/echo")).status == 200
        assert wait_for(lambda: _places(server) == 0, timeout=5)


def _places(server: Server) -> int:
    """Slots held plus waiters queued, over the workers."""
    figures = server.figures()
    return figures.in_flight + figures.queued


def test_graceful_reload_keeps_requests_and_refusals(tmp_path: Path) -> None:
    env = {"MAX_CONCURRENCY": "1", "MAX_QUEUE": "0"}
    with gunicorn(tmp_path, env=env) as server:
        before = json.loads(request(server.port, get("/echo")).body)["pid"]
        # The worker frees the echo's slot only after the client has its answer: wait for it,
        # so that the in-flight request seen below is the slow one, not the echo.
        assert wait_for(lambda: server.figures().in_flight == 0, timeout=5)
        slow: list[Response] = []
        in_flight = threading.Thread(
            target=lambda: slow.append(request(server.port, get("/sleep/1")))
        )
        in_flight.start()
        assert wait_for(lambda: server.figures().in_flight == 1, timeout=5)
        os.kill(server.pid, signal.SIGHUP)

        def reloaded() -> bool:
            response = request(server.port, get("/echo"))
            return response.status == 200 and json.loads(response.body)["pid"] != before

        assert wait_for(reloaded, timeout=15)
        in_flight.join(10)
        assert slow[0].status == 200  # the old worker finished it before stopping
        server.saturate("held", slots=1)
        assert_refused_by_worker(request(server.port, get("/echo")))
        server.release("held")


def test_max_requests_restarts_the_worker_and_refusals_go_on(tmp_path: Path) -> None:
    env = {"MAX_CONCURRENCY": "1", "MAX_QUEUE": "0"}
    with gunicorn(tmp_path, env=env, args=("--max-requests", "3")) as server:
        pids = set()
        for _ in range(8):
            with httpx.Client(base_url=server.url, timeout=10) as client:
                try:
                    response = client.get("/echo")
                except httpx.TransportError:
                    continue  # the restarting worker's listener closed: retry
                assert response.status_code == 200
                pids.add(response.json()["pid"])
        assert len(pids) >= 2
        server.saturate("held", slots=1)
        assert_refused_by_worker(request(server.port, get("/echo")))
        server.release("held")


def test_waitress_with_too_few_threads_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    waitress = pytest.importorskip("waitress")
    from shedder.wsgi import LoadSheddingMiddleware

    from .gunicorn_worker_app import inner

    app = LoadSheddingMiddleware(inner, max_concurrency=4, max_queue=4)
    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.effective_port}"
        with caplog.at_level("WARNING", logger="shedder"):
            assert httpx.get(f"{url}/echo", timeout=5).status_code == 200
            assert httpx.get(f"{url}/echo", timeout=5).status_code == 200
    finally:
        server.close()
        thread.join(5)
    warnings = [r.getMessage() for r in caplog.records if r.name == "shedder"]
    assert len(warnings) == 1
    assert "waitress runs 4 threads" in warnings[0]
    assert "max_concurrency + max_queue = 4 + 4 = 8" in warnings[0]
    assert "threads=8 or more" in warnings[0]


def test_waitress_with_enough_threads_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    waitress = pytest.importorskip("waitress")
    from shedder.wsgi import LoadSheddingMiddleware

    from .gunicorn_worker_app import inner

    app = LoadSheddingMiddleware(inner, max_concurrency=4, max_queue=4)
    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=12)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with caplog.at_level("WARNING", logger="shedder"):
            url = f"http://127.0.0.1:{server.effective_port}"
            assert httpx.get(f"{url}/echo", timeout=5).status_code == 200
    finally:
        server.close()
        thread.join(5)
    # Only the thread-count warning: caplog also hears threads left over from other tests.
    assert not [r for r in caplog.records if r.name == "shedder" and "threads" in r.getMessage()]


def test_thread_sizing_counts_a_room_per_class_when_requests_are_classified() -> None:
    from shedder import Throttler
    from shedder.wsgi import _too_few_threads

    throttler = Throttler(max_concurrency=4, max_queue=4)
    assert _too_few_threads(throttler, 8, "gunicorn") is None  # unclassified: one room
    warning = _too_few_threads(throttler, 8, "gunicorn", classified=True)
    assert warning is not None
    assert "max_concurrency + max_queue x 3 classes = 4 + 4 x 3 = 16 requests" in warning
    assert "threads=16 or more" in warning
    assert _too_few_threads(throttler, 16, "gunicorn", classified=True) is None
