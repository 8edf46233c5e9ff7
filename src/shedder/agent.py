"""HAProxy agent-check: a tiny TCP server telling the load balancer how much traffic to send.

``agent = start_agent(throttler, port=9777)`` in the app (WSGI or ASGI: the agent runs its own
event loop on a daemon thread), and in HAProxy::

    server app1 10.0.0.1:8000 weight 100 check agent-check agent-port 9777 agent-inter 1s

Each connection gets one line and is closed (standard library only):

- ``up 100%`` .. ``up 1%``: the weight, as a percentage of the configured one, falls as the
  load rises: ``100 * (1 - load / shed_threshold)``, at least 1%.
- while shedding: ``up 1%`` (default) so the instance keeps a trickle of traffic that it
  refuses cheaply with 503 + Retry-After; or ``drain`` with ``drain=True`` (the other replies
  then carry ``ready`` to leave the drain state). ``drain`` takes the instance out of rotation
  entirely: if every instance sheds at once, HAProxy has no server left and answers its own
  503s, without ``Retry-After``, while the idle fleet waits for the next check.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Sequence

from ._core.checks import check_bool, check_instance, check_int, check_sequence, check_str, shown
from ._core.throttler import Throttler, ThrottlerStats
from ._web.http import instance_stats
from ._web.instance import InstanceTable, instance_table

__all__ = ["Agent", "agent_reply", "start_agent"]

logger = logging.getLogger("shedder")

MIN_WEIGHT = 1
"""The weight (percent) reported while shedding: never 0, which HAProxy treats like drain."""

_CLOSE_TIMEOUT = 2.0  # seconds close() lets the connections accepted last be answered


def agent_reply(
    snapshots: Sequence[ThrottlerStats], *, drain: bool = False, shedding: bool = False
) -> str:
    """The agent-check line (with its ``\\n``) for these throttlers' figures.

    The busiest throttler decides: its ``load / shed_threshold`` sets the weight, and any
    throttler shedding means the instance is shedding. ``shedding=True`` says so whatever the
    figures (one worker process of the instance is shedding though the sums are below the
    threshold).
    """
    if not snapshots:
        raise ValueError("agent_reply needs at least one throttler's stats")
    if shedding or any(s.overloaded for s in snapshots):
        return "drain\n" if drain else f"up {MIN_WEIGHT}%\n"
    pressure = max(s.load / s.shed_threshold for s in snapshots)
    weight = max(MIN_WEIGHT, round(100 * (1.0 - pressure)))
    return f"up ready {weight}%\n" if drain else f"up {weight}%\n"


class Agent:
    """A running agent: ``host`` and ``port`` (the bound port, if 0 was asked); :meth:`close`
    stops it. Also a context manager."""

    def __init__(
        self,
        sock: socket.socket,
        throttlers: tuple[Throttler, ...],
        table: InstanceTable | None,
        drain: bool,
    ) -> None:
        self.host, self.port = sock.getsockname()[:2]
        self._sock = sock
        self._throttlers = throttlers
        self._table = table
        self._drain = drain
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._startup_error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"shedder-agent-{self.port}", daemon=True
        )
        self._thread.start()
        self._started.wait()
        if self._startup_error is not None:
            self._thread.join()
            raise self._startup_error

    def reply(self) -> str:
        """The line a check gets now."""
        reports = instance_stats(self._throttlers, self._table)
        return agent_reply(
            [report.stats for report in reports],
            drain=self._drain,
            shedding=any(report.shedding_workers for report in reports),
        )

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop answering and free the port; idempotent. Waits for the agent's thread."""
        if self._closed:
            return
        self._closed = True
        if threading.current_thread() is self._thread:  # pragma: no cover - misuse guard
            raise RuntimeError("Agent.close() called from the agent's own thread")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "serving"
        return f"<Agent {state} on {self.host}:{self.port}>"

    # -- the agent's thread -----------------------------------------------------------------------

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            try:
                server = loop.run_until_complete(
                    asyncio.start_server(self._answer, sock=self._sock)
                )
            except BaseException as error:
                self._startup_error = error
                self._sock.close()
                return
            finally:
                self._started.set()
            loop.run_forever()
            server.close()
            loop.run_until_complete(server.wait_closed())
            # Checks answer in full as they connect (see _answer), so what is left is asyncio's
            # own accepting of the last connections: let it finish (each answers its check)
            # rather than cancel it, which logged CancelledError tracebacks and leaked sockets.
            pending = asyncio.all_tasks(loop)
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=_CLOSE_TIMEOUT))
            for task in pending:
                task.cancel()  # only if something hung; never in practice
        finally:
            loop.close()

    def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, not a coroutine: the line is a few bytes that the transport buffers
        # at once, so there is nothing to await and no task to cancel when the agent closes.
        # HAProxy sends nothing unless configured with agent-send, and reads one line.
        try:
            line = self.reply()
        except Exception:
            logger.exception("shedder agent: could not compute the reply")
            line = "up\n"  # say nothing about weight rather than nothing at all
        try:
            writer.write(line.encode("ascii"))
        except OSError:
            pass  # the checker went away; it will ask again
        finally:
            writer.close()


def start_agent(
    throttlers: Throttler | Sequence[Throttler],
    *,
    port: int,
    host: str = "127.0.0.1",
    drain: bool = False,
    instance_dir: str | os.PathLike[str] | None = None,
    reuse_port: bool | None = None,
) -> Agent:
    """Serve HAProxy's agent-check protocol for ``throttlers`` on ``host:port``.

    Args:
        throttlers: a throttler, or several (the busiest one decides): typically the
            middleware's ``.throttler`` and any per-route throttlers.
        port: TCP port to listen on (0: any free port; read it from ``Agent.port``).
        host: address to bind; ``"0.0.0.0"`` to let a load balancer on another host ask.
        drain: answer ``drain`` while shedding instead of the minimum weight (see the module
            documentation for why that is not the default).
        instance_dir: as for the middlewares: a directory shared by the worker processes, to
            report the whole instance; default ``$SHEDDER_INSTANCE_DIR`` if set.
        reuse_port: bind with ``SO_REUSEPORT`` so every worker process of the instance can
            run an agent on the same port (the kernel spreads the checks; each worker
            answers for the whole instance). Default: on when an instance directory is used.

    Start it in each worker process (not in a master that forks: threads do not survive a
    fork). Raises ``OSError`` if the port cannot be bound, ``ValueError``/``TypeError`` for
    bad arguments.
    """
    if isinstance(throttlers, Throttler):
        throttlers = (throttlers,)
    reported = check_sequence("throttlers", throttlers)
    if not reported:
        raise ValueError("throttlers must hold at least one throttler")
    for throttler in reported:
        check_instance(
            "throttlers", throttler, Throttler, "a shedder.Throttler or a sequence of them"
        )
    if not 0 <= check_int("port", port, 0) <= 65535:
        raise ValueError(f"port must be between 0 and 65535, got {shown(port)}")
    check_str("host", host)
    check_bool("drain", drain)
    if reuse_port is not None:
        check_bool("reuse_port", reuse_port)
    table = instance_table(instance_dir)
    if table is not None:
        # The agent runs in the serving process: make its capacity count at once, not only
        # after its first request (the middlewares wait for that, see publish_all).
        table.publish_all(reported)
    if reuse_port is None:
        reuse_port = table is not None and hasattr(socket, "SO_REUSEPORT")
    elif reuse_port and not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("reuse_port=True needs SO_REUSEPORT, which this platform lacks")

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except socket.gaierror as error:  # an OSError, but a configuration mistake: say which
            raise ValueError(
                f"host must be an address or a resolvable name, got {host!r}: {error}"
            ) from None
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return Agent(sock, reported, table, drain)
