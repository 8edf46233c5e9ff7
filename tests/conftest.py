"""The ``server`` fixture: real servers on 127.0.0.1 for any test that needs one."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any, cast

import pytest

from shedder._demo.servers import Command, ServerProcess
from tests.support.servers import StartServer, server_process

_STARTED = pytest.StashKey[list[ServerProcess]]()


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[StartServer]:
    """A factory: each call starts a server subprocess on a free 127.0.0.1 port (in its own
    process group, the repository root on ``PYTHONPATH``) and returns the :class:`ServerProcess`
    once ``ready`` holds (an HTTP path answering 200, a predicate, or None: a TCP connect).

    A server that exits or never gets ready fails the test with its output. Every server is
    stopped after the test (SIGTERM, then SIGKILL), and a failed test's report shows the output
    of each one.
    """
    started: list[ServerProcess] = []
    request.node.stash[_STARTED] = started

    def start(command: Command, **options: Any) -> ServerProcess:
        # The keywords are server_process's (typed by StartServer): one list, not a copy.
        process = server_process(command, **options)
        started.append(process)
        return process.start()

    try:
        yield cast(StartServer, start)
    finally:
        for process in reversed(started):
            process.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        # Still running (teardown comes later): their output so far explains the failure.
        for process in item.stash.get(_STARTED, []):
            report.sections.append(
                (f"server output: {process.name} on port {process.port}", process.output())
            )
    return report
