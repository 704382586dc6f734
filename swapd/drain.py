"""The requests in flight at shutdown, and the end of the time they are given.

aiohttp's drain waits ``shutdown_timeout``, then only fails the body reads of the
handlers still running and waits as long again; a handler waiting on its backend
reads no body. swapd cuts them itself when the time is up.
"""

from __future__ import annotations

import asyncio
from typing import Any

CLIENT_GONE = 499  # nginx's code for a client that hung up first
CUT = 503  # the drain's time ran out on the request


class Drain:
    """The handler tasks of requests in flight; :meth:`cut` ends them all."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self.cut_at_shutdown = False

    def enter(self) -> asyncio.Task[Any] | None:
        """Note the running handler's task; give it to :meth:`leave` when it ends."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        return task

    def leave(self, task: asyncio.Task[Any] | None) -> None:
        """The handler ended."""
        if task is not None:
            self._tasks.discard(task)

    def cut(self) -> None:
        """Time is up: cancel every handler still running."""
        self.cut_at_shutdown = True
        for task in list(self._tasks):
            task.cancel()

    def status_when_cancelled(self) -> int:
        """The status to log for a cancelled handler: cut by the drain, or its client gone."""
        return CUT if self.cut_at_shutdown else CLIENT_GONE
