"""Preparing requests in the worker: render, tokenize, fit, build the sampler; then the engine.

Each request (a generation, an embedding, a call such as ``count``) is prepared in a short-lived
thread of its own. llama.cpp's tokenizer releases the GIL and a template render is Python that
Jinja runs without yielding, so with a thread each a slow request (a long prompt, a hostile
template) only takes its share of the CPU: it never holds up another request's preparation, the
control thread (which answers pings and cancels at once) or the engine's decoding.

A cancel sets the job's flag. The template meter checks it at every step of a render and the
tokenizer between two chunks (:mod:`jupyter_llm.worker.text`), so the request ends "cancelled"
within a chunk. The kernel cancels a stream when its caller stops or disconnects.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import wire
from . import Cancelled, PromptTooLong, RequestError
from .fim import fim_tokens

if TYPE_CHECKING:
    from .engine import Engine

Send = Callable[[tuple[Any, ...]], None]

_CANCELLED = {"finish_reason": "cancelled", "prompt_tokens": 0, "prompt_tokens_cached": 0, "completion_tokens": 0,
              "prompt_tok_per_s": 0.0, "gen_tok_per_s": 0.0, "seed": 0, "worker_ttft_s": None}
"""The ``done`` statistics of a generation cancelled before it reached the engine."""


class Job:
    """One request being prepared."""

    def __init__(self, rid: int) -> None:
        self.rid = rid
        self.cancelled = False

    def check(self) -> None:
        """Raise Cancelled once the kernel cancelled this request (between two steps)."""
        if self.cancelled:
            raise Cancelled


class Prep:
    """The requests being prepared, each in its own thread (see the module docstring)."""

    def __init__(self, engine: Engine, send: Send) -> None:
        self.engine, self.vocab, self.send = engine, engine.text, send
        self._jobs: dict[int, Job] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._jobs)

    # -- control thread ------------------------------------------------------------------------

    def generate(self, rid: int, kind: str, payload: Any, sampling: dict[str, Any], grammar: str | None,
                 fit: dict[str, int] | None = None, extra: dict[str, Any] | None = None) -> None:
        """Prepare a generation, then queue it for the engine (``fit``, ``extra``: see :meth:`_generate`)."""
        self._start(rid, self._generate, kind, payload, sampling, grammar, fit, extra)

    def call(self, rid: int, name: str, args: tuple[Any, ...]) -> None:
        """Answer ``tokenize``, ``detokenize``, ``render``, ``count`` or ``fim``."""
        self._start(rid, self._call, name, *args)

    def embed(self, rid: int, texts: list[str], normalize: bool) -> None:
        """Tokenize the inputs, then queue the embedding for the engine."""
        self._start(rid, self._embed, texts, normalize)

    def cancel(self, rid: int) -> None:
        job = self._jobs.get(rid)
        if job is not None:
            job.cancelled = True

    def close(self, timeout: float) -> bool:
        """Cancel everything being prepared and wait (at most ``timeout``) for the threads to
        end; whether they all did (only then may the model be freed under them)."""
        with self._lock:
            for job in self._jobs.values():
                job.cancelled = True
            threads = list(self._threads.values())
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0))
        return not any(t.is_alive() for t in threads)

    def _start(self, rid: int, work: Callable[..., None], *args: Any) -> None:
        job = Job(rid)
        thread = threading.Thread(target=self._run, args=(job, work, args), name=f"prep-{rid}", daemon=True)
        with self._lock:
            self._jobs[rid], self._threads[rid] = job, thread
        thread.start()

    # -- preparing threads ---------------------------------------------------------------------

    def _run(self, job: Job, work: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            work(job, *args)
        except Cancelled:
            self.send((wire.DONE, job.rid, dict(_CANCELLED)))
        except RequestError as exc:
            self.send((wire.ERROR, job.rid, exc.kind, str(exc), exc.extra))
        except UnicodeEncodeError as exc:  # e.g. a lone surrogate from a JSON "\ud800"
            self.send((wire.ERROR, job.rid, "ValueError", f"the text is not valid Unicode: {exc}", {}))
        except Exception as exc:  # e.g. arguments of the wrong type
            self.send((wire.ERROR, job.rid, "RuntimeError", f"{type(exc).__name__}: {exc}", {}))
        finally:
            with self._lock:
                self._jobs.pop(job.rid, None)
                self._threads.pop(job.rid, None)

    def _generate(self, job: Job, kind: str, payload: Any, sampling: dict[str, Any], grammar: str | None,
                  fit: dict[str, int] | None, extra: dict[str, Any] | None) -> None:
        """``fit`` (chat only): ``{"reserve": N}`` drops the conversation's oldest turns until the
        prompt leaves N tokens for the answer in a slot; the kernel is told what was dropped (a
        ``fit`` message) before any token. ``kind`` "fim": ``payload`` is (prefix, suffix)
        (:mod:`.fim`). ``extra``: ``variables`` for the chat template, ``think_open`` (a reasoning
        marker: when the rendered prompt ends with it, the answer's text starts with it, so the
        kernel reads the answer as the model's whole turn), and what the engine takes
        (:meth:`~.engine.Engine.enqueue`)."""
        engine, vocab, n_ctx = self.engine, self.vocab, self.engine.n_ctx_seq
        extra = dict(extra or {})
        variables, opener = extra.pop("variables", None), extra.pop("think_open", None)
        meter = vocab.meter(n_ctx, lambda: job.cancelled)
        if kind == "chat" and fit is not None:
            tokens, dropped = vocab.fit(payload, meter, reserve=int(fit["reserve"]), n_ctx=n_ctx, check=job.check,
                                        variables=variables)
            self.send((wire.FITTED, job.rid, dropped, len(tokens)))
        else:
            try:
                if kind == "fim":
                    tokens = fim_tokens(vocab, str(payload[0]), str(payload[1]), limit=n_ctx, check=job.check)
                else:
                    tokens = vocab.prompt_tokens(kind, payload, meter, limit=n_ctx, check=job.check,
                                                 variables=variables)
            except PromptTooLong as exc:
                raise engine.overflow(exc.n_tokens, str(exc)) from None
        if opener and kind == "chat" and _ends_with(vocab, tokens, str(opener)):
            extra["prefix"] = str(opener)
        job.check()
        engine.enqueue(job.rid, tokens, sampling, grammar, extra)
        if job.cancelled:  # a cancel that came while it was being queued
            engine.cancel(job.rid)

    def _call(self, job: Job, name: str, *args: Any) -> None:
        try:
            value = self._answer(job, name, *args)
        except PromptTooLong as exc:
            raise self.engine.overflow(exc.n_tokens, str(exc)) from None
        self.send((wire.REPLY, job.rid, value))

    def _answer(self, job: Job, name: str, *args: Any) -> Any:
        vocab = self.vocab
        if name == "tokenize":
            text, add_special, parse_special = args
            value: Any = vocab.tokenize(text, add_special, parse_special, check=job.check)
        elif name == "detokenize":
            value = vocab.detokenize(args[0])
        elif name == "render":
            value = vocab.render(args[0], vocab.meter(self.engine.n_ctx_seq, lambda: job.cancelled))
        elif name == "fim":  # the infill prompt's tokens, as a generation with a suffix uses them
            value = fim_tokens(vocab, args[0], args[1], limit=self.engine.n_ctx_seq, check=job.check)
        elif name == "count":
            kind, payload = args
            meter = vocab.meter(self.engine.n_ctx_seq, lambda: job.cancelled)
            value = len(vocab.prompt_tokens(kind, payload, meter, check=job.check))
        else:
            raise RequestError("ValueError", f"the worker has no call named {name!r}")
        return value

    def _embed(self, job: Job, texts: list[str], normalize: bool) -> None:
        vocab, limit = self.vocab, self.engine.n_ctx_train
        inputs = []
        try:
            for text in texts:
                if not isinstance(text, str):
                    raise RequestError("ValueError", f"cannot embed these inputs: {type(text).__name__} is not text")
                vocab.check_bytes(text, limit)
                inputs.append(vocab.tokenize(text, add_special=True, parse_special=False, limit=limit,
                                             check=job.check) or [max(vocab.bos, 0)])
        except PromptTooLong as exc:
            raise RequestError("ContextOverflowError", f"an input has more than {limit} tokens ({exc}); this model "
                               f"embeds at most {limit}; split the text", n_tokens=exc.n_tokens, n_ctx=limit) from None
        job.check()
        self.engine.inbox.put((job.rid, inputs, normalize))


def _ends_with(vocab: Any, tokens: list[int], text: str) -> bool:
    """Whether the prompt ``tokens`` end with ``text`` (whitespace aside), special tokens spelled out."""
    import ctypes

    L, buf, tail = vocab.L, ctypes.create_string_buffer(256), b""
    for token in tokens[-16:]:
        n = L.llama_token_to_piece(vocab.vocab, token, buf, len(buf), 0, True)
        tail += buf.raw[:max(n, 0)]
    return tail.decode("utf-8", "replace").rstrip().endswith(text.strip())


__all__ = ["Job", "Prep"]
