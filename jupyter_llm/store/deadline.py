"""When a pull must end, and how to stop it from another thread.

A pull may take hours on a slow link, but never forever: a thread whose caller went away (an
HTTP client that disconnected, a sidebar that was closed) must not stay alive for good. So one
:class:`Deadline` governs a whole pull — every file, retry, backoff and lock wait of it:

- it expires ``JUPYTER_LLM_PULL_DEADLINE`` seconds after it was created (24 h by default);
- :meth:`Deadline.cancel`, from any thread, stops the pull: a backoff or a lock wait wakes at
  once, and a read blocked on a trickling body is woken by shutting its socket down
  (:meth:`Deadline.on_cancel`); a server that has not sent its headers yet is noticed within
  ``JUPYTER_LLM_READ_TIMEOUT``.

Either way the pull raises :class:`~jupyter_llm.errors.PullError` and keeps what it downloaded
for the next pull. The minimum transfer rate, the third limit, is per attempt and lives with the
retries (:class:`jupyter_llm.store.http.RateGuard`).

The deadline is found through the calling thread's context rather than passed down every call,
so that the manager and the sources need not know about it::

    deadline = Deadline()                    # the configured limit; Deadline(600) for ten minutes
    with deadline.applied():                 # in the thread that runs the pull
        manager.pull("smollm2")
    deadline.cancel("the client closed the connection")   # from any other thread

:func:`~jupyter_llm.store.pull.pull` and :func:`~jupyter_llm.store.download.fetch` use the
deadline in force (:func:`scope`), or start one of their own when there is none.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator

from .. import config
from ..errors import PullError

log = logging.getLogger("jupyter_llm")

_current: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("jupyter_llm_deadline", default=None)


class Deadline:
    """The end of one pull: a time limit, and a cancel switch any thread may flip.

    ``seconds`` None means the configured ``JUPYTER_LLM_PULL_DEADLINE``; 0 (as in the
    variable) or ``math.inf`` means no time limit at all — cancel still works.
    """

    def __init__(self, seconds: float | None = None) -> None:
        limit = config.pull_deadline() if seconds is None else seconds
        self.seconds = None if limit is None or limit <= 0 or math.isinf(limit) else float(limit)
        self._end = None if self.seconds is None else time.monotonic() + self.seconds
        self._cancelled = threading.Event()
        self._reason = ""
        self._lock = threading.Lock()
        self._aborts: dict[int, Callable[[], None]] = {}
        self._next_id = 0

    # -- the switch ------------------------------------------------------------------------------

    def cancel(self, reason: str = "cancelled by the caller") -> None:
        """Stop the pull this deadline governs, from any thread; idempotent, returns at once."""
        with self._lock:
            if self._cancelled.is_set():
                return
            self._reason = reason
            self._cancelled.set()
            aborts = list(self._aborts.values())
        for abort in aborts:
            _run_abort(abort)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @contextlib.contextmanager
    def on_cancel(self, abort: Callable[[], None]) -> Iterator[None]:
        """Run ``abort`` (e.g. shut a socket down) if the pull is cancelled inside the block."""
        with self._lock:
            key = self._next_id
            self._next_id += 1
            self._aborts[key] = abort
            already = self._cancelled.is_set()
        if already:
            _run_abort(abort)
        try:
            yield
        finally:
            with self._lock:
                self._aborts.pop(key, None)

    # -- time --------------------------------------------------------------------------------

    def remaining(self) -> float | None:
        """Seconds left (never negative), or None without a time limit."""
        return None if self._end is None else max(self._end - time.monotonic(), 0.0)

    def check(self, what: str) -> None:
        """Raise :class:`PullError` if the pull was cancelled or is past its deadline."""
        if self._cancelled.is_set():
            raise PullError(
                f"{what}: the pull was cancelled ({self._reason}); what was downloaded is kept, and "
                "pulling again resumes from there"
            )
        if self._end is not None and time.monotonic() >= self._end:
            raise PullError(
                f"{what}: the pull did not finish within its deadline of {_seconds(self.seconds)} "
                "(JUPYTER_LLM_PULL_DEADLINE); what was downloaded is kept — pull again to resume, and "
                "raise JUPYTER_LLM_PULL_DEADLINE (seconds, 0 for none) for a slow link"
            )

    def sleep(self, seconds: float, what: str) -> None:
        """Wait ``seconds`` (a backoff, a lock poll); cancel and the deadline cut it short and raise."""
        remaining = self.remaining()
        wait = seconds if remaining is None else min(seconds, remaining)
        self._cancelled.wait(max(wait, 0.0))
        self.check(what)

    # -- the calling thread ----------------------------------------------------------------------

    @contextlib.contextmanager
    def applied(self) -> Iterator[Deadline]:
        """Make this the deadline of every pull and download the calling thread starts inside."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)


def current() -> Deadline | None:
    """The deadline applied in the calling thread, if any."""
    return _current.get()


@contextlib.contextmanager
def scope() -> Iterator[Deadline]:
    """The deadline in force, or a new one from the configuration applied for the block."""
    existing = _current.get()
    if existing is not None:
        yield existing
        return
    with Deadline().applied() as fresh:
        yield fresh


def _run_abort(abort: Callable[[], None]) -> None:
    try:
        abort()
    except Exception:  # an abort only hurries the end; the pull still sees the cancel
        log.debug("a jupyter_llm pull abort hook failed", exc_info=True)


def _seconds(seconds: float | None) -> str:
    if seconds is None:
        return "none"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    return f"{seconds:g} s"
