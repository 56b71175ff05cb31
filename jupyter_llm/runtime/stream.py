"""What a generation gives back: streamed :class:`Chunk` s, then one :class:`Completion`.

A :class:`Stream` is the caller's handle on one generation in a worker (made by
:meth:`jupyter_llm.runtime.Runtime.generate` / ``chat``): it turns the worker's ``tok`` and
``done`` messages into chunks and the completion, and cancels the generation when the caller
stops early (the stop button, leaving a ``with`` block, dropping the stream).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import wire

if TYPE_CHECKING:
    from .process import Runtime


@dataclass(frozen=True)
class Chunk:
    """A piece of streamed text and how many tokens it took (whole UTF-8 characters only)."""

    text: str
    n_tokens: int


@dataclass(frozen=True)
class Completion:
    """A finished generation and its timings."""

    text: str
    finish_reason: str
    """``"stop"`` (end of turn or a stop string), ``"length"`` (max_tokens or a full slot) or
    ``"cancelled"``."""
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    """Seconds from the request to the first text, as the caller saw it."""
    gen_tok_per_s: float
    prompt_tok_per_s: float
    """Prompt tokens (cached ones included) per second, from taking a slot to the first token."""
    total_s: float
    seed: int
    prompt_tokens_cached: int = 0
    """Of ``prompt_tokens``, how many the worker's prompt cache reused instead of evaluating
    (the prefix a slot still held from an earlier request, e.g. the conversation so far)."""


class Stream:
    """Chunks of one generation as they come; ``.result`` is the :class:`Completion`.

    Iterating blocks on the worker, never polls. A KeyboardInterrupt while iterating (the
    notebook's stop button) cancels the generation in the worker, waits briefly for it to
    stop, and is raised again. Dropping an unfinished stream cancels it too.
    """

    def __init__(self, runtime: Runtime, rid: int, inbox: queue.SimpleQueue[Any]) -> None:
        self._rt, self._rid, self._inbox = runtime, rid, inbox
        self._t0 = time.perf_counter()
        self._ttft: float | None = None
        self._parts: list[str] = []
        self._result: Completion | None = None
        self._error: BaseException | None = None
        self._stats: dict[str, Any] = {}
        self.dropped: int | None = None
        """Chat with fitting: how many of the oldest messages the worker dropped to make the
        conversation fit (known once the first message arrived, see :meth:`fitted`)."""
        self._early: list[Chunk] = []

    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
        if self._early:
            return self._early.pop(0)
        try:
            while True:
                if self._result is not None:
                    raise StopIteration
                if self._error is not None:
                    raise self._error
                chunk = self._take(self._rt._wait(self._inbox))
                if chunk is not None:
                    return chunk
        except KeyboardInterrupt:
            self._interrupted()
            raise

    def fitted(self) -> int:
        """Wait until the worker has fitted the conversation and return how many messages it
        dropped (0 when nothing was, or the request was not fitted). Raises the worker's error
        (e.g. ContextOverflowError) if it refused the request."""
        while self.dropped is None and self._result is None:
            if self._error is not None:
                raise self._error
            chunk = self._take(self._rt._wait(self._inbox))
            if chunk is not None:
                self._early.append(chunk)
        if self._error is not None and not self._early:
            raise self._error
        return self.dropped or 0

    def _take(self, msg: tuple[Any, ...]) -> Chunk | None:
        kind = msg[0]
        if kind == wire.FITTED:
            self.dropped = int(msg[2])
            return None
        if self.dropped is None:
            self.dropped = 0  # any other message first: nothing was fitted
        if kind == wire.TOKEN:
            if self._ttft is None:
                self._ttft = time.perf_counter() - self._t0
            self._parts.append(msg[2])
            return Chunk(msg[2], msg[3])
        self._rt._forget(self._rid)
        if kind == wire.DONE:
            s = self._stats = msg[2]
            ttft = self._ttft if self._ttft is not None else s.get("worker_ttft_s")
            self._result = Completion(
                "".join(self._parts), s["finish_reason"], s["prompt_tokens"], s["completion_tokens"],
                ttft, s["gen_tok_per_s"], s["prompt_tok_per_s"], time.perf_counter() - self._t0, s["seed"],
                s.get("prompt_tokens_cached", 0))
        else:
            self._error = self._rt._error(msg)
        return None

    def _interrupted(self) -> None:
        self.cancel()
        deadline = time.monotonic() + 2.0
        while self._result is None and self._error is None and time.monotonic() < deadline:
            try:
                self._take(self._inbox.get(timeout=0.1))
            except queue.Empty:
                if not self._rt.alive:
                    return

    @property
    def done(self) -> bool:
        return self._result is not None or self._error is not None

    @property
    def result(self) -> Completion:
        """The completion; reads the rest of the stream first if needed."""
        for _ in self:
            pass
        assert self._result is not None
        return self._result

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._parts)

    def cancel(self) -> None:
        """Ask the worker to stop this generation (returns at once; the stream ends "cancelled")."""
        if not self.done:
            self._rt._send_quietly((wire.CANCEL, self._rid))

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.done:
            self.cancel()

    def __del__(self) -> None:
        # May run inside the garbage collector, even in a thread that is halfway through a
        # send: so never wait for the send lock here; the next send delivers the cancel instead.
        try:
            if not self.done:
                self._rt._cancel_soon(self._rid)
        except Exception:
            pass


__all__ = ["Chunk", "Completion", "Stream"]
