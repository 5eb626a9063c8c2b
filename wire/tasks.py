"""The one task owner: every background task has an owner that cancels and awaits it (stdlib only).

See docs/design.md, "Invariants" (every task has an owner). Contract of :class:`TaskOwner`:

- :meth:`~TaskOwner.spawn` starts a coroutine as a task on the running loop and keeps a strong
  reference to it until it ends (the event loop keeps only weak ones).
- A task that ends with an exception (not a cancellation) is reported once, through the
  ``on_error`` callback given to the owner (by default a line on the ``wire.tasks`` logger),
  so no failure goes unseen and asyncio never warns "exception was never retrieved".
- :meth:`~TaskOwner.cancel` cancels every task it holds; :meth:`~TaskOwner.close` cancels them
  and returns once all have ended, including tasks spawned while they were ending. Both are
  idempotent.

Stdlib only: the broker and the node agent both use it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

OnError = Callable[[BaseException], None]


def _log_error(exc: BaseException) -> None:
    logging.getLogger("wire.tasks").error("background task failed: %r", exc)


class TaskOwner:
    """Holds the tasks it started until they end; cancels and awaits them on :meth:`close`."""

    def __init__(self, on_error: OnError | None = None):
        self._on_error = on_error or _log_error
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Start *coro* as a task owned by this object."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._on_error(exc)

    def cancel(self) -> None:
        """Cancel every task held (they end at their next await)."""
        for task in list(self._tasks):
            task.cancel()

    async def close(self) -> None:
        """Cancel every task held and wait until all have ended."""
        while self._tasks:
            pending = list(self._tasks)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def __len__(self) -> int:
        return len(self._tasks)
