"""Items from threads to the event loop, waking the loop once per burst rather than per item.

A generation's chunks come from the runtime's reader thread (or a job's pump thread, see
:class:`~jupyter_llm.server.backend.Job`), one per token and request. ``loop.call_soon_threadsafe``
per chunk writes to the loop's self-pipe every time: a system call and a wake-up on cores the
worker's decode threads need. Here a put appends to the request's deque, and a wake-up of the
loop is scheduled only when none is pending for any request of that loop: the chunks one decode
step made for several requests (one message from the worker) wake the loop once, and chunks that
piled up while it was busy are taken in one go. Order is kept per request.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from typing import Any


class _Waker:
    """One per event loop: the handoffs with news, and whether a wake-up is on its way."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._ready: list[Handoff] = []
        self._signalled = False

    def wake(self, handoff: Handoff) -> None:
        """(any thread) Have ``handoff``'s consumer woken; RuntimeError if the loop is closed."""
        with self._lock:
            self._ready.append(handoff)
            if self._signalled:
                return
            self._signalled = True
        try:
            self._loop.call_soon_threadsafe(self._run)
        except RuntimeError:
            with self._lock:
                self._signalled = False
            raise

    def _run(self) -> None:
        with self._lock:
            ready, self._ready, self._signalled = self._ready, [], False
        for handoff in ready:
            handoff._wake()


_wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Waker] = weakref.WeakKeyDictionary()


class Handoff:
    """``put`` from any thread, ``await get()`` on the loop (one consumer)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        waker = _wakers.get(loop)
        if waker is None:  # (made on the loop's own thread: no race on the dictionary)
            waker = _wakers[loop] = _Waker(loop)
        self._waker = waker
        self._items: deque[Any] = deque()
        self._ready = asyncio.Event()
        self._signalled = False
        """This handoff is among the waker's ready ones (set by the putting thread, cleared by the loop)."""

    def put(self, item: Any) -> None:
        """Hand ``item`` on; RuntimeError if the loop is closed."""
        self._items.append(item)
        if not self._signalled:  # (under the GIL: the append is seen by the wake-up that follows)
            self._signalled = True
            self._waker.wake(self)

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
