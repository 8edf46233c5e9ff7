"""Checked by mypy (``mypy --strict tests/typing`` with ``MYPYPATH=src``), never run by pytest."""

from __future__ import annotations

from pathlib import Path

from shedder import Throttler
from shedder.agent import Agent, agent_reply, start_agent
from shedder.wsgi import LoadSheddingMiddleware

throttler = Throttler(max_concurrency=2)
agent: Agent = start_agent(throttler, port=0)
port: int = agent.port
several = start_agent([throttler, Throttler(1)], port=9777, host="0.0.0.0", drain=True)
with start_agent(throttler, port=0, instance_dir=Path("/tmp"), reuse_port=True) as shared:
    line: str = shared.reply()
agent.close()
reply: str = agent_reply([throttler.stats()], drain=False)


def app(environ: object, start_response: object) -> list[bytes]:
    return []


middleware = LoadSheddingMiddleware(
    app,
    max_concurrency=2,
    live_path="/livez",
    instance_dir="/tmp/shedder",
)
