"""What a generation gives back: streamed :class:`Chunk` s, then one :class:`Completion`.

A :class:`Stream` is the caller's handle on one generation in a worker (made by
:meth:`jupyter_llm.runtime.Runtime.generate` / ``chat``): it turns the worker's ``tok`` and
``done`` messages into chunks and the completion, and cancels the generation when the caller
stops early (the stop button, leaving a ``with`` block, dropping the stream).

:class:`Extras` asks for more than text: ``n`` answers to the prompt (chunks carry their
``index``; :attr:`Stream.results` has one completion each), log probabilities of each token
(:class:`TokenLogprob`, from the model's raw distribution) and thinking, whose reasoning the
stream splits off the answer (:class:`~jupyter_llm.thinking.ThinkingSplitter`): chunks and
completions then have it in ``thinking``, their ``text`` is the answer alone.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import wire

if TYPE_CHECKING:
    from ..thinking import ThinkingSplitter
    from .process import Runtime

_WATCH_S = 0.2
"""How often a relaying stream checks that its worker is alive (as iterating does)."""


@dataclass(frozen=True)
class Extras:
    """What a generation asks for beyond sampled text."""

    n: int = 1
    """Answers to the prompt, sampled independently (seeds seed, seed+1…) after one evaluation
    of it; each takes a slot, so at most the model's ``parallel``."""
    logprobs: int | None = None
    """Log probabilities of each token with that many alternatives (0-20); None: none."""
    template: dict[str, Any] = field(default_factory=dict)
    """More variables for the chat template (``enable_thinking``…)."""
    markers: tuple[str, str] | None = None
    """Reasoning markers: split the answer's reasoning off its text at them."""
    direct: tuple[bytes, ...] | None = None
    """The API server's fast path (``jupyter_llm/worker/direct.py``): the bytes around a piece's
    JSON string (and its time: ``server.responses.direct_framing``), for a worker that writes the
    answer into the client's socket once :meth:`Stream.attach` hands it over. Only for one plain
    answer (no logprobs, no markers)."""
    every: float = 0.0
    """Seconds the worker may hold text back after the first piece, sending what it has at most
    that often (0: each piece as it comes). For a consumer that shows it at intervals (``%%chat``'s
    cell): each message wakes the kernel on the cores the decode needs (docs/notes.md §14)."""

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n, "logprobs": self.logprobs, "variables": self.template or None}
        if self.markers is not None:
            out["think_open"] = self.markers[0]
        if self.direct is not None:
            out["direct"] = self.direct
        if self.every:
            out["every"] = self.every
        return out


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log probability under the model's raw distribution (the logits row
    it was sampled from, before temperature, top-k/p or a grammar), and the most likely
    alternatives there, most likely first."""

    token: str
    logprob: float
    bytes: bytes
    top: tuple[TokenLogprob, ...] = ()


def _logprobs(entries: list[Any]) -> list[TokenLogprob]:
    return [TokenLogprob(t, lp, b, tuple(TokenLogprob(*alt) for alt in top)) for t, lp, b, top in entries]


@dataclass(frozen=True)
class Chunk:
    """A piece of streamed text and how many tokens it took (whole UTF-8 characters only)."""

    text: str
    n_tokens: int
    index: int = 0
    """Which answer it belongs to (``Extras.n`` > 1)."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """Of the tokens since the last chunk, when asked for (text and tokens need not align)."""
    thinking: str = ""
    """Reasoning (when thinking was asked for); ``text`` is then the answer's part only."""


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
    logprobs: tuple[TokenLogprob, ...] | None = None
    """Every generated token's log probability, when asked for."""
    thinking: str | None = None
    """The reasoning, when thinking was asked for (``text`` is the answer without it)."""
    index: int = 0
    stop_sequence: str | None = None
    """The stop string that ended the answer (``finish_reason`` is then ``"stop"``), else None."""


class Answering:
    """What a local :class:`Stream` and a remote engine's stream share: iterating chunks, the
    completion once it ends, the text so far, and a ``with`` block that cancels an unfinished
    answer. Subclasses set ``_parts``, ``_result`` and ``_error`` and define ``__next__`` and
    ``cancel``."""

    _parts: list[str]
    _result: Completion | None
    _error: BaseException | None

    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError

    def arrived(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for the first chunk (kept for iteration) or the end;
        whether one came. Here: False at once (a stream that cannot tell)."""
        return self.done

    def relay(self, deliver: Callable[[Chunk], None]) -> None:
        """Hand every chunk to ``deliver``; returns once the stream ended (``result`` then has the
        completion or raises its error). Here by iterating; a local stream does it without a
        thread of the caller's woken per chunk."""
        for chunk in self:
            deliver(chunk)

    def attach(self, fd: int | None, on_spill: Callable[[bytes], None]) -> bool:
        """Let the worker write the rest of the answer into the socket ``fd`` (asked for with
        ``Extras.direct``); whether it will. Here: never (a stream without a worker)."""
        return False

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

    def __enter__(self) -> Answering:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.done:
            self.cancel()


class Stream(Answering):
    """Chunks of one generation as they come; ``.result`` is the :class:`Completion`.

    Iterating blocks on the worker, never polls. A KeyboardInterrupt while iterating (the
    notebook's stop button) cancels the generation in the worker, waits briefly for it to
    stop, and is raised again. Dropping an unfinished stream cancels it too.
    """

    def __init__(self, runtime: Runtime, rid: int, inbox: queue.SimpleQueue[Any], extras: Extras | None = None) -> None:
        self._rt, self._rid, self._inbox = runtime, rid, inbox
        self._t0 = time.perf_counter()
        self._ttft: float | None = None
        self.extras = extras or Extras()
        self._texts: dict[int, list[str]] = {i: [] for i in range(self.extras.n)}
        self._parts: list[str] = self._texts[0]
        self._lps: dict[int, list[TokenLogprob]] = {i: [] for i in range(self.extras.n)}
        self._split: dict[int, ThinkingSplitter] = {}
        self._results: dict[int, Completion] = {}
        self._unshown = 0  # tokens of pieces the splitter held back, counted with the next chunk
        self._result: Completion | None = None
        self._error: BaseException | None = None
        self._stats: dict[str, Any] = {}
        self.dropped: int | None = None
        """Chat with fitting: how many of the oldest messages the worker dropped to make the
        conversation fit (known once the first message arrived, see :meth:`fitted`)."""
        self._early: list[Chunk] = []
        self._on_spill: Callable[[bytes], None] | None = None

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

    def arrived(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        try:
            while not (self._early or self.done):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                try:
                    msg = self._inbox.get(timeout=left)
                except queue.Empty:
                    return False
                chunk = self._take(msg)
                if chunk is not None:
                    self._early.append(chunk)
        except KeyboardInterrupt:
            self._interrupted()
            raise
        return True

    def relay(self, deliver: Callable[[Chunk], None]) -> None:
        """Hand the chunks to ``deliver`` as they come, called in the runtime's reader thread,
        instead of iterating; returns once the stream ended (``result`` then has the completion
        or raises the worker's error). For a consumer in another thread (the API server's event
        loop): iterating would wake a thread per token on the cores the worker's decode needs.
        The worker's liveness is checked meanwhile, as iterating does."""
        ended = threading.Event()

        def take(msg: tuple[Any, ...]) -> None:
            chunk = self._take(msg)
            if chunk is not None:
                deliver(chunk)
            if self.done:
                ended.set()

        early, self._early = self._early, []
        for chunk in early:
            deliver(chunk)
        if not self.done:
            self._rt._relay(self._rid, self._inbox, take)
        while not self.done and not ended.wait(_WATCH_S):
            self._rt._watch()

    def attach(self, fd: int | None, on_spill: Callable[[bytes], None]) -> bool:
        """Hand the worker the HTTP client's socket ``fd`` (a copy goes over the private socket)
        to write the rest of the answer into, framed as ``extras.direct`` says
        (``jupyter_llm/worker/direct.py``); call it once, after writing every chunk received so far,
        then write nothing until the stream ends. Chunks may still come (when the answer ended
        before the worker got the socket); ``on_spill(raw)`` gets, in order with them, bytes the
        client did not take from the worker, to be written as they are. ``fd`` None: the worker
        sends everything here instead. Whether the worker may write (False: it ended already)."""
        if self.extras.direct is None or self.done:
            return False
        self._on_spill = on_spill
        self._rt._send((wire.ATTACH, self._rid, fd is not None), fd=fd)
        return fd is not None

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
            if len(msg) == 4:  # one answer, nothing but text: the common case stays cheap
                if not self.extras.markers:
                    self._parts.append(msg[2])
                    return Chunk(msg[2], msg[3])
                return self._piece(0, msg[2], msg[3], [])
            return self._piece(int(msg[4]["index"]), msg[2], msg[3], msg[4].get("logprobs") or [])
        if kind == wire.SPILL:
            if self._on_spill is not None:
                self._on_spill(msg[2])
            return None
        if kind == wire.DONE:
            s = msg[2]
            index = int(s.get("index", 0))
            if s.get("direct_text"):  # what the worker wrote into the client's socket
                self._texts[index].append(s["direct_text"])
            last = self._piece(index, "", 0, s.get("logprobs") or [], end=True)
            ttft = self._ttft if self._ttft is not None else s.get("worker_ttft_s")
            split = self._split.get(index)
            self._results[index] = Completion(
                "".join(self._texts[index]), s["finish_reason"], s["prompt_tokens"], s["completion_tokens"],
                ttft, s["gen_tok_per_s"], s["prompt_tok_per_s"], time.perf_counter() - self._t0, s["seed"],
                s.get("prompt_tokens_cached", 0), tuple(self._lps[index]) if "logprobs" in s else None,
                split.thinking if split is not None else None, index, s.get("stop_sequence"))
            if "index" not in s:  # cancelled before the worker made the answers: they all end here
                for i in range(1, self.extras.n):
                    self._results.setdefault(i, dataclasses.replace(self._results[index], index=i))
            if len(self._results) < self.extras.n:
                return last
            self._rt._forget(self._rid)
            self._stats, self._result = s, self._results[0]
            return last
        self._rt._forget(self._rid)
        self._error = self._rt._error(msg)
        return None

    def _piece(self, index: int, text: str, n_tokens: int, entries: list[Any], *, end: bool = False) -> Chunk | None:
        """A chunk of answer ``index``: its reasoning split off when asked, its logprobs decoded."""
        lps = _logprobs(entries) if entries else []
        self._lps[index] += lps
        thinking = ""
        if self.extras.markers:
            split = self._split.get(index)
            if split is None:
                from ..thinking import ThinkingSplitter

                split = self._split[index] = ThinkingSplitter(self.extras.markers)
            thinking, text = split.feed(text)
            if end:
                more_thinking, more_text = split.finish()
                thinking, text = thinking + more_thinking, text + more_text
        self._texts[index].append(text)
        if not (text or thinking or lps):
            self._unshown += n_tokens
            return None
        n_tokens, self._unshown = n_tokens + self._unshown, 0
        return Chunk(text, n_tokens, index, tuple(lps), thinking)

    @property
    def results(self) -> list[Completion]:
        """One completion per answer (``Extras.n``), in order; reads the rest of the stream first."""
        self.result  # noqa: B018 (reads the stream to its end)
        return [self._results[i] for i in sorted(self._results)]

    def _interrupted(self) -> None:
        self.cancel()
        deadline = time.monotonic() + 2.0
        while self._result is None and self._error is None and time.monotonic() < deadline:
            try:
                self._take(self._inbox.get(timeout=0.1))
            except queue.Empty:
                if not self._rt.alive:
                    return

    def cancel(self) -> None:
        """Ask the worker to stop this generation (returns at once; the stream ends "cancelled")."""
        if not self.done:
            self._rt._send_quietly((wire.CANCEL, self._rid))

    def __del__(self) -> None:
        # May run inside the garbage collector, even in a thread that is halfway through a
        # send: so never wait for the send lock here; the next send delivers the cancel instead.
        try:
            if not self.done:
                self._rt._cancel_soon(self._rid)
        except Exception:
            pass


__all__ = ["Answering", "Chunk", "Completion", "Stream"]
