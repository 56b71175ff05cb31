"""Items from a thread to the event loop, waking the loop once per batch rather than per item.

A generation's pump thread (:class:`~jupyter_llm.server.backend.Job`) produces a chunk per token.
``loop.call_soon_threadsafe`` per chunk writes to the loop's self-pipe every time, a system call
and a wake-up on cores the worker's decode threads need. Here the thread appends to a deque and
schedules a wake-up only when none is pending: when the loop is busy (several streams), the
chunks that piled up meanwhile are taken in one go. Order is kept.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any


class Handoff:
    """``put`` from any thread, ``await get()`` on the loop (one consumer)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[Any] = deque()
        self._ready = asyncio.Event()
        self._signalled = False
        """A wake-up is on its way to the loop (set by the thread, cleared by the loop)."""

    def put(self, item: Any) -> None:
        """Hand ``item`` on; RuntimeError if the loop is closed."""
        self._items.append(item)
        if not self._signalled:  # (under the GIL: the append is seen by the wake-up that follows)
            self._signalled = True
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._signalled = False  # before the consumer runs: a later put signals again
        self._ready.set()

    async def get(self) -> Any:
        while not self._items:
            self._ready.clear()
            if self._items:
                break
            await self._ready.wait()
        return self._items.popleft()


__all__ = ["Handoff"]
