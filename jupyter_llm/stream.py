"""What a generation gives back: streamed :class:`Chunk` s, then one :class:`Completion`.

A :class:`Stream` is the caller's handle on one generation in a worker (made by
:meth:`jupyter_llm.runtime.Runtime.generate` / ``chat``): it turns the worker's ``tok`` and
``done`` messages into chunks and the completion, and cancels the generation when the caller
stops early (the stop button, leaving a ``with`` block, dropping the stream). On the worker's
side :class:`TextOut` makes the chunks' text from token bytes.
"""

from __future__ import annotations

import codecs
import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runtime import Runtime


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


class TextOut:
    """Token bytes → text to emit: never half a UTF-8 character, never part of a stop string."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stop = tuple(s for s in stop if s)
        self._held = ""

    def feed(self, piece: bytes) -> tuple[str, bool]:
        """Add one token's bytes; returns (text ready to emit, whether a stop string matched)."""
        self._held += self._decoder.decode(piece)
        if not self._stop:
            out, self._held = self._held, ""
            return out, False
        hits = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
        if hits:
            out, self._held = self._held[: min(hits)], ""
            return out, True
        keep = 0  # the longest tail that could still grow into a stop string is held back
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._held)), keep, -1):
                if self._held.endswith(s[:n]):
                    keep = n
                    break
        cut = len(self._held) - keep
        out, self._held = self._held[:cut], self._held[cut:]
        return out, False

    def flush(self) -> str:
        """What is held back, at the end of a generation that did not hit a stop string."""
        out, self._held = self._held + self._decoder.decode(b"", final=True), ""
        return out


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

    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
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

    def _take(self, msg: tuple[Any, ...]) -> Chunk | None:
        kind = msg[0]
        if kind == "tok":
            if self._ttft is None:
                self._ttft = time.perf_counter() - self._t0
            self._parts.append(msg[2])
            return Chunk(msg[2], msg[3])
        self._rt._forget(self._rid)
        if kind == "done":
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
            self._rt._send_quietly(("cancel", self._rid))

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


__all__ = ["Chunk", "Completion", "Stream", "TextOut"]
