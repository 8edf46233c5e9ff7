"""Bounded async pipelines: stages joined by bounded buffers, run under structured concurrency.

Every stage runs in its own task, reading from the bounded buffer before it and writing to the
one after it, so a slow stage makes the stages before it wait instead of piling up items. All
the tasks belong to one task group: the first error anywhere cancels every task and is raised to
whoever consumes the output; cancelling the consumer cancels them all; nothing outlives the run.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar, overload

from shedder._core.checks import check_bool, check_int, typed

from .queues import BlockingQueue

__all__ = ["Pipeline", "PipelineRun"]

T = TypeVar("T")
U = TypeVar("U")
R = TypeVar("R")


class _End:
    """Marks the end of a stream in a buffer."""


_END = _End()


class _TaskGroup:
    """A small ``asyncio.TaskGroup`` for Python 3.10: when a child fails, cancel the other
    children and the task running the ``async with`` body, wait for them all, and raise the
    first error (a plain exception, not an ExceptionGroup). Leaving the body with an exception
    (or by cancellation) cancels the children too; ``__aexit__`` returns only once all are done.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._errors: list[BaseException] = []
        self._parent: asyncio.Task[Any] | None = None
        self._parent_cancelled = False  # we cancelled the parent to report a child's error
        self._exiting = False
        self._all_done: asyncio.Future[None] | None = None

    async def __aenter__(self) -> _TaskGroup:
        self._parent = asyncio.current_task()
        return self

    def create_task(self, coroutine: Coroutine[Any, Any, R]) -> asyncio.Task[R]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._on_task_done)
        return task

    def cancel_all(self) -> None:
        for task in self._tasks:
            task.cancel()

    def _on_task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            self._errors.append(error)
            self.cancel_all()
            if not self._exiting and not self._parent_cancelled and self._parent is not None:
                # The body may be waiting on something only the failed task would have
                # provided: cancel it, and turn that cancellation into the error in __aexit__.
                self._parent_cancelled = True
                self._parent.cancel()
        if not self._tasks and self._all_done is not None and not self._all_done.done():
            self._all_done.set_result(None)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exiting = True
        ours = self._parent_cancelled and isinstance(exc, asyncio.CancelledError)
        if exc is not None and not ours:
            self.cancel_all()
        cancelled_while_waiting: asyncio.CancelledError | None = None
        while self._tasks:
            self._all_done = asyncio.get_running_loop().create_future()
            try:
                await self._all_done
            except asyncio.CancelledError as error:
                # Cancelled from outside while the children wind down: finish winding down,
                # then let the cancellation through.
                cancelled_while_waiting = error
                self.cancel_all()
        if self._parent_cancelled and self._parent is not None and sys.version_info >= (3, 11):
            self._parent.uncancel()
        if cancelled_while_waiting is not None:
            raise cancelled_while_waiting
        if self._errors and (exc is None or ours):
            raise self._errors[0]


@dataclass(frozen=True)
class _Stage:
    function: Callable[[Any], Any]
    concurrency: int
    ordered: bool
    buffer: int


async def _apply(function: Callable[[Any], Any], item: Any, out: BlockingQueue[Any] | None) -> Any:
    """Run a stage on one item; send the results to ``out``, or return them (ordered mode)."""
    result = function(item)
    results: list[Any] = []
    if isinstance(result, AsyncIterator):
        async with aclosing(result) as produced:  # type: ignore[type-var]
            async for value in produced:
                if out is None:
                    results.append(value)
                else:
                    await out.put_async(value)
        return results
    if not isinstance(result, Awaitable):
        raise TypeError(
            f"pipeline stage {function!r} must be an async function or an async generator "
            f"function, it returned {type(result).__name__}"
        )
    value = await result
    if out is None:
        return [value]
    await out.put_async(value)
    return results


async def _emit_in_order(
    window: BlockingQueue[Any], out: BlockingQueue[Any], slots: asyncio.Semaphore
) -> None:
    while not isinstance(task := await window.get_async(), _End):
        for value in await task:
            await out.put_async(value)
        slots.release()


async def _run_stage(stage: _Stage, inbox: BlockingQueue[Any], out: BlockingQueue[Any]) -> None:
    # ``slots`` bounds the items a stage holds: being processed, or done and awaiting their turn.
    slots = asyncio.Semaphore(stage.concurrency)
    async with _TaskGroup() as group:
        window = BlockingQueue[Any](stage.concurrency + 1)  # tasks in input order
        if stage.ordered:
            group.create_task(_emit_in_order(window, out, slots))
        while not isinstance(item := await inbox.get_async(), _End):
            await slots.acquire()
            if stage.ordered:
                await window.put_async(group.create_task(_apply(stage.function, item, None)))
            else:
                task = group.create_task(_apply(stage.function, item, out))
                task.add_done_callback(lambda _: slots.release())
        await window.put_async(_END)
    await out.put_async(_END)  # after every task of the stage has finished


async def _feed(source: Iterable[Any] | AsyncIterable[Any], out: BlockingQueue[Any]) -> None:
    if isinstance(source, AsyncIterable):
        iterator = aiter(source)
        try:
            async for item in iterator:
                await out.put_async(item)
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()
    else:
        for item in source:
            await out.put_async(item)
    await out.put_async(_END)


class Pipeline(Generic[T]):
    """A chain of async stages over a source, with a bounded buffer after each step.

    ``Pipeline(source)`` starts from an iterable or async iterable; :meth:`then` adds a stage and
    returns a new pipeline (pipelines are immutable, so reusable). Run it with
    ``async with pipeline.open() as items: async for item in items`` or ``await
    pipeline.collect()``. The first error raised by any stage (or the source) cancels every
    stage and is raised from the consumer's loop; cancelling the consumer cancels every stage.

    Args:
        buffer: capacity of the buffer after the source, and the default after each stage.
    """

    def __init__(
        self,
        source: Iterable[T] | AsyncIterable[T],
        *,
        buffer: int = 8,
        _stages: tuple[_Stage, ...] = (),
    ) -> None:
        if not isinstance(source, (Iterable, AsyncIterable)):
            raise TypeError(f"source must be an iterable or an async iterable, got {typed(source)}")
        self._source: Iterable[Any] | AsyncIterable[Any] = source
        self._buffer = check_int("buffer", buffer, 1)
        self._stages = _stages

    @overload
    def then(
        self,
        stage: Callable[[T], AsyncIterator[U]],
        *,
        concurrency: int = 1,
        ordered: bool = True,
        buffer: int | None = None,
    ) -> Pipeline[U]: ...

    @overload
    def then(
        self,
        stage: Callable[[T], Awaitable[U]],
        *,
        concurrency: int = 1,
        ordered: bool = True,
        buffer: int | None = None,
    ) -> Pipeline[U]: ...

    def then(
        self,
        stage: Callable[[T], Any],
        *,
        concurrency: int = 1,
        ordered: bool = True,
        buffer: int | None = None,
    ) -> Pipeline[Any]:
        """Add a stage: an async function (one result per item) or an async generator function
        (any number of results per item).

        Args:
            concurrency: items processed at once by this stage (>= 1).
            ordered: keep results in input order (with concurrency > 1, an async generator
                stage's results for one item are gathered before they are passed on); False
                passes each result on as soon as it is ready.
            buffer: capacity of the buffer after this stage (>= 1; default: the pipeline's).
        """
        if not callable(stage):
            raise TypeError(f"stage must be an async function, got {type(stage).__name__}")
        spec = _Stage(
            stage,
            check_int("concurrency", concurrency, 1),
            check_bool("ordered", ordered),
            self._buffer if buffer is None else check_int("buffer", buffer, 1),
        )
        return Pipeline(self._source, buffer=self._buffer, _stages=(*self._stages, spec))

    def open(self) -> PipelineRun[T]:
        """Start the pipeline on entering the returned ``async with`` block; iterate it there."""
        return PipelineRun(self._source, self._buffer, self._stages)

    async def collect(self) -> list[T]:
        """Run the pipeline to the end and return every output item."""
        async with self.open() as items:
            return [item async for item in items]


class PipelineRun(Generic[T]):
    """One run of a :class:`Pipeline`: an async context manager yielding an async iterator.

    Leaving the block early (``break``, an exception) cancels the stages still running;
    ``__aexit__`` returns once every task of the run has finished.
    """

    def __init__(
        self, source: Iterable[Any] | AsyncIterable[Any], buffer: int, stages: tuple[_Stage, ...]
    ) -> None:
        self._source = source
        self._buffer = buffer
        self._stages = stages
        self._group: _TaskGroup | None = None
        self._out: BlockingQueue[Any] | None = None
        self._exhausted = False

    async def __aenter__(self) -> PipelineRun[T]:
        if self._group is not None:
            raise RuntimeError("a PipelineRun can be entered once; call pipeline.open() again")
        group = self._group = await _TaskGroup().__aenter__()
        inbox = BlockingQueue[Any](self._buffer)
        group.create_task(_feed(self._source, inbox))
        for stage in self._stages:
            out = BlockingQueue[Any](stage.buffer)
            group.create_task(_run_stage(stage, inbox, out))
            inbox = out
        self._out = inbox
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._group is None:
            return
        if not self._exhausted:
            self._group.cancel_all()  # the consumer left early: nobody will read the rest
        await self._group.__aexit__(exc_type, exc, tb)

    def __aiter__(self) -> PipelineRun[T]:
        return self

    async def __anext__(self) -> T:
        if self._out is None:
            raise RuntimeError("iterate a pipeline inside `async with pipeline.open() as items`")
        if self._exhausted:
            raise StopAsyncIteration
        item = await self._out.get_async()
        if isinstance(item, _End):
            self._exhausted = True
            raise StopAsyncIteration
        return item  # type: ignore[no-any-return]
