"""shedder.agent: the load -> agent-check line mapping, and the TCP agent itself."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import shedder
from shedder import Throttler, ThrottlerStats
from shedder._web.instance import _MAGIC, _RECORD, _VERSION
from shedder.agent import agent_reply, start_agent


def stats(in_flight: int, queued: int = 0, *, threshold: float = 1.0) -> ThrottlerStats:
    return ThrottlerStats("api", in_flight, queued, 8, 2, threshold, 0, 0)


def ask(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        data = b""
        while chunk := sock.recv(64):
            data += chunk
    return data.decode("ascii")


@pytest.mark.parametrize(
    ("in_flight", "queued", "line"),
    [
        (0, 0, "up 100%\n"),
        (5, 0, "up 50%\n"),
        (8, 1, "up 10%\n"),
        (8, 2, "up 1%\n"),  # shedding: the minimum weight, never 0
    ],
)
def test_weight_falls_as_load_rises(in_flight: int, queued: int, line: str) -> None:
    assert agent_reply([stats(in_flight, queued)]) == line


def test_weight_is_relative_to_the_shed_threshold() -> None:
    assert agent_reply([stats(4, threshold=0.8)]) == "up 50%\n"
    assert agent_reply([stats(8, threshold=0.8)]) == "up 1%\n"  # 0.8 >= 0.8: shedding
    # Just below the threshold the weight would round to 0: it stays at the minimum.
    assert agent_reply([ThrottlerStats("a", 999, 0, 1000, 0, 1.0, 0, 0)]) == "up 1%\n"


def test_drain_mode_drains_while_shedding_and_is_ready_otherwise() -> None:
    assert agent_reply([stats(8, 2)], drain=True) == "drain\n"
    assert agent_reply([stats(5)], drain=True) == "up ready 50%\n"


def test_the_busiest_throttler_decides() -> None:
    idle, busy = stats(0), stats(5)
    assert agent_reply([idle, busy]) == "up 50%\n"
    assert agent_reply([busy, stats(8, 2)]) == "up 1%\n"
    with pytest.raises(ValueError, match="at least one"):
        agent_reply([])


def test_agent_answers_each_connection_with_the_current_line() -> None:
    throttler = Throttler(max_concurrency=4, max_queue=4, name="agent-live")
    with start_agent(throttler, port=0) as agent:
        assert agent.port > 0
        assert ask(agent.port) == "up 100%\n"
        permits = [throttler.acquire() for _ in range(4)]
        assert ask(agent.port) == "up 50%\n"
        for permit in permits:
            permit.release()
        assert ask(agent.port) == "up 100%\n"
    assert agent.closed
    # Closed: the port is free again, nobody answers.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", agent.port), timeout=2).close()
    agent.close()  # idempotent


def test_agent_sums_the_instance_table(tmp_path: Path) -> None:
    throttler = Throttler(max_concurrency=4, max_queue=0, name="agent-table")
    sibling = Throttler(max_concurrency=4, max_queue=0, name="agent-table")
    with start_agent(throttler, port=0, instance_dir=tmp_path) as agent:
        assert list(tmp_path.glob("agent-table.*.shedder")), "published at start"
        with throttler:
            assert ask(agent.port) == "up 75%\n"
        # A second throttler of the same name in the same process gets a record of its own:
        # the figures are not blurred, and nothing fails (issue 19).
        with start_agent(sibling, port=0, instance_dir=tmp_path) as second, sibling:
            assert len(list(tmp_path.glob("agent-table*.shedder"))) == 2
            assert ask(agent.port) == "up 100%\n"
            assert ask(second.port) == "up 75%\n"


def test_agent_reads_the_instance_dir_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHEDDER_INSTANCE_DIR", str(tmp_path))
    throttler = Throttler(max_concurrency=2, name="agent-env")
    with start_agent(throttler, port=0):
        assert list(tmp_path.glob("agent-env.*.shedder"))
    monkeypatch.setenv("SHEDDER_INSTANCE_DIR", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="existing directory"):
        start_agent(throttler, port=0)


def test_two_agents_share_a_port_with_reuse_port() -> None:
    throttler = Throttler(max_concurrency=2, name="agent-reuse")
    with start_agent(throttler, port=0, reuse_port=True) as first:
        with start_agent(throttler, port=first.port, reuse_port=True) as second:
            assert second.port == first.port
            assert ask(first.port) == "up 100%\n"
        with pytest.raises(OSError, match="in use"):
            start_agent(throttler, port=first.port)  # without it, the port is taken


def test_bad_arguments() -> None:
    throttler = Throttler(max_concurrency=2)
    with pytest.raises(ValueError, match="port must be between 0 and 65535, got 70000"):
        start_agent(throttler, port=70000)
    with pytest.raises(TypeError, match="port must be an int"):
        start_agent(throttler, port="80")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one throttler"):
        start_agent([], port=0)
    with pytest.raises(TypeError, match=r"shedder\.Throttler"):
        start_agent([object()], port=0)  # type: ignore[list-item]


def test_importing_the_agent_needs_no_framework() -> None:
    src = str(Path(shedder.__file__).resolve().parent.parent)
    code = (
        "import sys, shedder.agent; "
        "print(sorted(m for m in ('flask', 'starlette', 'httpx', 'prometheus_client') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": src},
    )
    assert result.stdout.strip() == "[]"


def test_a_worker_shedding_forces_the_shedding_reply() -> None:
    idle = stats(0)
    assert agent_reply([idle], shedding=True) == "up 1%\n"
    assert agent_reply([idle], shedding=True, drain=True) == "drain\n"


def test_closing_with_a_check_in_flight_logs_nothing(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Agent.close() while a check was being answered logged CancelledError tracebacks."""
    throttler = Throttler(max_concurrency=4, name="agent-close")

    async def never_drains(writer: asyncio.StreamWriter) -> None:
        # What a checker that stops reading does to a full send buffer: drain() waits.
        await asyncio.Event().wait()

    monkeypatch.setattr(asyncio.StreamWriter, "drain", never_drains)
    agent = start_agent(throttler, port=0)
    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        checks = [socket.create_connection(("127.0.0.1", agent.port), timeout=5) for _ in range(3)]
        lines = [check.recv(64) for check in checks]
        # Each check got its line; the old agent was still awaiting drain() in each.
        agent.close()
    for check in checks:
        check.close()
    assert lines == [b"up 100%\n"] * 3
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_untrusted_records_never_break_the_reply(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    throttler = Throttler(max_concurrency=4, max_queue=0, name="agent-bad")
    planted = tmp_path / "agent-bad.1099511627776.shedder"
    planted.write_bytes(
        _RECORD.pack(2, _MAGIC, _VERSION, 2**40, 0, 50, 0, 4, 0, 1.0, 0, 0, 0, 0, 0, 0, 0)
    )
    unrelated = tmp_path / f"agent-bad.{os.getppid()}.shedder"  # live pid, not its start
    unrelated.write_bytes(
        _RECORD.pack(2, _MAGIC, _VERSION, os.getppid(), 0, -30, 0, 4, 0, 1.0, 0, 0, 0, 0, 0, 0, 0)
    )
    with (
        caplog.at_level(logging.ERROR),
        start_agent(throttler, port=0, instance_dir=tmp_path) as agent,
        throttler,
    ):
        assert ask(agent.port) == "up 75%\n"  # used: a bare "up" and a traceback
    assert not caplog.records, caplog.text
    assert not planted.exists()
    assert not unrelated.exists()
