"""The decode engine inside the worker process: slots, continuous batching, sampling, text out.

Runs only in :mod:`jupyter_llm.worker` (never imported by the kernel for llama.cpp work). One
engine thread owns the context: every ``llama_decode``, sampling and KV operation happens there,
because a context is not thread-safe (docs/notes.md §2). The worker's other threads (control,
and those preparing requests, :mod:`jupyter_llm.worker.prep`) may call the methods marked *other
threads*: they touch only the vocabulary (read-only), sampler chains not yet queued, and flags.

Each step decodes one chunk (at most ``n_ubatch`` tokens) of the prompt of the oldest request
still evaluating one, then the next token of every generating sequence in one batch (continuous
batching, as llama-server does; the prompt first, so an arrival's first token comes one step
sooner). Other arrivals whose next chunk is as long join a short chunk's decode (a decode
costs ~7 ms plus ~4 ms a token: four 2-token re-evaluations of cached prompts take 38 ms
together, 61 ms apart), bit-identically (per-slot KV: each sequence its own stream). Prompt
and generation are separate decodes, measured (docs/notes.md §14): on the CPU a decode's cost
grows with its tokens, so one mixed batch saves nothing (3 generating tokens + a 50-token chunk:
164-196 ms mixed, 160 ms apart), and with per-slot KV llama.cpp splits a mixed batch into
per-sequence ubatches anyway, evaluating the chunk's first token alone, which the prompt cache
cannot reuse (:mod:`jupyter_llm.worker.prompt_cache`). Slot ``i`` is sequence ``i`` of a context
made with ``kv_unified = False``: each slot owns ``n_ctx / parallel`` KV cells. Only batch rows
whose logits flag is set are sampled (anything else aborts the process). What one step samples
for several requests goes to the kernel as one ``step`` message (one write, one wake-up).

Prompt cache (:class:`~jupyter_llm.prompt_cache.SlotCache`): a slot keeps its KV when its request
ends; the next request takes the slot holding the longest prefix of its prompt and evaluates
only the rest. While the engine has nothing else to do it re-evaluates the tokens it generated
one at a time, as a prompt would be, so that reusing them changes no output.

Several answers to one prompt (``n`` > 1): the request takes ``n`` slots at once; the prompt is
evaluated in the first, its KV copied to the others (``llama_memory_seq_cp``) and each answer
sampled from the same last row with its own seed, then generated as any sequence. Log
probabilities (:mod:`~jupyter_llm.worker.logprobs`) are read from the sampled rows only for
requests that ask: a request without them costs nothing extra.

Cancellation: a flag per request, checked between steps, plus an abort callback installed for
steps that evaluate prompt tokens, so a long prompt stops within ~10 ms (``llama_decode``
returns 2; the chunk's partial KV is removed). Idle-time re-evaluation is aborted the same way
as soon as anything arrives in the inbox. Generation decodes run without the callback: it costs
a GIL round trip per graph node (~3 % of a token here).
"""

from __future__ import annotations

import os
import queue
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .. import wire
from . import RequestError
from .direct import DirectOut, Writer
from .generation import Generation, answers
from .llama import llama_said
from .prompt_cache import SlotCache
from .sampler import greedy_rows
from .text import Vocab

GROUP_TOKENS = 16
"""At most this many prompt tokens in a decode that several requests' chunks share: sharing saves
a decode's fixed cost, but each token delays every first token in it (docs/notes.md §14)."""


class Engine:
    """Generation and embeddings over one model and its context (see the module docstring)."""

    def __init__(self, L: Any, model: Any, ctx: Any, *, parallel: int, n_threads: int,
                 send: Callable[[tuple[Any, ...]], None], errors: deque[str], prompt_cache: bool = True,
                 settle_idle: bool = False, batch_invariant: bool = True, tile: int = 0, store: Any = None) -> None:
        """``batch_invariant``: whether the backend computes a token's KV the same in any prompt
        chunk of two or more tokens (``tile``: of two to tile-1, and of tile or more; measured on
        the CPU, docs/notes.md §14); then the prompt cache reuses only such KV, and cached
        outputs equal uncached ones. ``store``: a PromptStore for what slots taken over held."""
        self.L, self.model, self.ctx = L, model, ctx
        self.parallel, self.n_threads = parallel, n_threads
        self.send = send
        self.errors = errors
        """llama.cpp's recent ERROR log lines (the worker's log callback appends them)."""
        self.text = Vocab(L, model)
        """Tokenizing and the chat template (read-only: the preparing threads use it too)."""
        self.mem = L.llama_get_memory(ctx)
        self.n_batch = L.llama_n_batch(ctx)
        self.n_chunk = L.llama_n_ubatch(ctx)  # one ubatch per prompt decode: llama.cpp splits no further
        self.n_ctx_seq = L.llama_n_ctx_seq(ctx)
        self.n_ctx_train = L.llama_model_n_ctx_train(model)
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)  # owns the token arrays decode reads
        self.slots: list[Generation | None] = [None] * parallel
        # A recurrent state cannot be cut back to re-evaluate its tail: it is reused as it is.
        recurrent = L.llama_model_is_recurrent(model) or L.llama_model_is_hybrid(model)
        self.cache = SlotCache(L, self.mem, parallel, n_swa=L.llama_model_n_swa(model), enabled=prompt_cache,
                               exact=batch_invariant and self.n_chunk >= 4 and not recurrent,
                               settle_idle=settle_idle, room=self.n_chunk, tile=tile, store=store)
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.requests: dict[int, Generation] = {}
        self.pending: deque[Generation] = deque()
        self.counters = {"requests": 0, "tokens_in": 0, "prompt_decodes": 0, "tokens_out": 0,
                         "prompt_tokens_cached": 0, "tokens_settled": 0, "greedy_steps": 0}
        """tokens_in: prompt tokens evaluated, in prompt_decodes decodes; prompt_tokens_cached: those
        reused; tokens_settled: generated ones evaluated again while idle; greedy_steps: see greedy_rows."""
        self._abort = False
        self._settling = False
        self._abort_cb = L.ggml_abort_callback(self._should_abort)  # referenced while set
        self._no_abort = L.ggml_abort_callback()  # NULL
        self._abort_on = False
        self._embedder: Any = None  # an Embedder, made on the first embedding request
        self._logprobs: Any = None  # a Logprobs reader, made on the first request asking for them
        self._attaches_in = self._attaches_out = 0
        self._writer = Writer(send)
        self._out: list[tuple[Any, ...]] | None = None
        """While a step samples several requests: their messages, sent as one ``step`` message."""
        self.fault: Callable[[str], None] | None = None
        """Tests only: called at "warm_up" and before each "decode" of generated tokens, to crash
        the worker there (see the worker's ``internal["fault"]``)."""

    def warm_up(self) -> int:
        """A 2-token decode (returns llama_decode's code). It pages the weights in and turns the
        crashes llama.cpp keeps for the first multi-token decode (docs/notes.md §2) into a failed load."""
        token = self.text.bos if self.text.bos >= 0 else 0
        self._put(0, token, 0, 0, False)
        self._put(1, token, 1, 0, True)
        self.batch.n_tokens = 2
        if self.fault is not None:
            self.fault("warm_up")
        rc = self.L.llama_decode(self.ctx, self.batch)
        self.L.llama_memory_clear(self.mem, True)
        return int(rc)

    # -- requests (other threads) --------------------------------------------------------------

    def enqueue(self, rid: int, tokens: list[int], sampling: dict[str, Any], grammar: str | None,
                extra: dict[str, Any] | None = None) -> None:
        """Queue a prepared prompt for generation; raises RequestError on bad input. ``extra``: ``n``
        answers, ``logprobs`` (alternatives per token, or None), ``prefix`` (text first), ``every`` (Generation's)."""
        extra = extra or {}
        if not tokens:
            raise RequestError("ValueError", "the prompt is empty")
        if len(tokens) >= self.n_ctx_seq:
            raise self.overflow(len(tokens))
        n = int(extra.get("n") or 1)
        if not 1 <= n <= self.parallel:
            raise RequestError("ValueError", f"{n} answers to one prompt need {n} slots, and this model has "
                               f"{self.parallel}; load it with more (`%llm load MODEL --parallel {n}`, or serve "
                               f"the API with --parallel {n})")
        first = answers(self.L, self.text.vocab, rid, tokens, sampling, grammar, extra, self.errors)[0]
        self.requests[rid] = first
        self.inbox.put(first)

    def overflow(self, n_tokens: int, counted: str | None = None) -> RequestError:
        """The error for a prompt of ``n_tokens`` tokens that does not fit a slot (``counted``:
        how that was found out, when the prompt was not counted to its end)."""
        said = f"{counted}; " if counted else f"the prompt has {n_tokens} tokens but "
        return RequestError(
            "ContextOverflowError",
            f"{said}a slot holds {self.n_ctx_seq} (context {self.n_ctx_seq * self.parallel} / {self.parallel} "
            "slots); shorten it, or load the model with a larger --ctx or fewer --parallel slots",
            n_tokens=n_tokens, n_ctx=self.n_ctx_seq)

    def cancel(self, rid: int) -> None:
        """Flag a request and abort the decode in flight (a long prompt stops within ~10 ms)."""
        req = self.requests.get(rid)
        if req is not None:
            for member in req.group:
                member.cancelled = True
            self._abort = True  # a spurious abort only makes the engine redo one step

    def attach(self, rid: int, sock: Any) -> None:
        """The kernel's ``attach`` for request ``rid`` (a socket, or None): see :mod:`.direct`."""
        self.inbox.put(("attach", rid, sock))
        self._attaches_in += 1  # (one writer per counter: stats() leaves these out of the queue)

    def stats(self) -> dict[str, Any]:
        """Slots, busy slots, queued requests, the counters, and how many tokens each slot's KV holds."""
        busy = sum(1 for s in self.slots if s is not None)
        inbox = self.inbox.qsize() - (self._attaches_in - self._attaches_out)
        return {"slots": self.parallel, "busy": busy, "queued": len(self.pending) + max(inbox, 0),
                **self.counters, **self.cache.stats()}

    # -- engine thread -------------------------------------------------------------------------

    def run(self) -> None:
        """The engine loop until ``"close"`` arrives in the inbox."""
        try:
            while self._step():
                pass
        except BaseException:
            import traceback

            traceback.print_exc()  # to the captured stderr: the kernel reports its last line
            sys.stderr.flush()
            os._exit(70)

    def _should_abort(self, _data: Any) -> bool:
        # Called by llama.cpp between graph nodes (engine thread): a cancel, or new work while
        # the engine only settles.
        return self._abort or (self._settling and not self.inbox.empty())

    def _step(self) -> bool:
        self._abort = False  # reset *before* reading cancel flags: a later cancel still aborts
        idle = not self.pending and all(s is None for s in self.slots) and not self.cache.idle_work
        item = self.inbox.get() if idle else None  # block only when there is nothing to do
        while True:
            if item is None:
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    break
            if isinstance(item, Generation):
                self.pending.append(item)
                self.counters["requests"] += 1
            elif item == "close":
                self._shutdown()
                return False
            elif item[0] == "attach":  # (an answer ended already leaves the kernel to write it all)
                self._attaches_out += 1
                req = self.requests.get(item[1])
                self._emit(DirectOut.attach_to(req.direct if req else None, item[1], item[2], self._writer))
            else:
                self._run_embed(*item)
            item = None
        for req in [r for r in (*self.slots, *self.pending) if r is not None and r.cancelled]:
            if req.slot < 0:
                self.pending.remove(req)
                for member in req.group[1:]:
                    self._finish(member, "cancelled")
            self._finish(req, "cancelled")
        free = [i for i, s in enumerate(self.slots) if s is None]
        while self.pending and len(free) >= len(self.pending[0].group):  # a request's answers start together
            self._assign(self.pending.popleft(), free)
        if any(s is not None for s in self.slots):
            self._decode_step()
        elif self.inbox.empty() and self.cache.idle_work:
            self._settle_step()
        return True

    def _assign(self, req: Generation, free: list[int]) -> None:
        """Give ``req`` one of the ``free`` slots, reusing the KV of the prefix it already holds."""
        slot = self.cache.pick(req.tokens, free)
        free.remove(slot)
        n_cached = self.cache.reuse(slot, req.tokens)
        req.slot, req.t_start = slot, time.perf_counter()
        req.n_past = req.n_prompt_done = req.n_cached = n_cached
        self.slots[slot] = req
        self.cache.touch(slot)
        self.counters["prompt_tokens_cached"] += n_cached
        for other in req.group[1:]:  # they hold a slot each until the prompt's KV is copied there
            other.slot = min(free, key=self.cache.used.__getitem__)
            free.remove(other.slot)
            other.t_start, other.waiting = req.t_start, True
            self.slots[other.slot] = other
            self.cache.touch(other.slot)

    def _decode_step(self) -> None:
        active = [r for r in self.slots if r is not None and not r.waiting]
        generating = [r for r in active if r.n_prompt_done == len(r.tokens)]
        prompting = [r for r in active if r.n_prompt_done < len(r.tokens)]
        # The prompt chunk first: an arrival's first token then comes one generation step
        # sooner, and those generating wait for the same two decodes either way.
        if prompting:
            self._prompt_step(self._prompt_group(prompting))
        generating = [r for r in generating if r.slot >= 0]  # (a failed prompt decode may end a group)
        if generating:
            self._generate_step(generating)

    def _generate_step(self, reqs: list[Generation]) -> None:
        """The next token of every generating sequence, in one decode (not abortable)."""
        for n, req in enumerate(reqs):
            self._put(n, req.last_token, req.n_past, req.slot, True)
        if self.fault is not None:
            self.fault("decode")
        if not self._decode(len(reqs), abortable=False, what=reqs):
            return
        now = time.perf_counter()
        for req in reqs:
            self.cache.decoded(req.slot, [req.last_token])
            req.n_past += 1
        rows = greedy_rows(self.L, self.ctx, [req.chain for req in reqs])
        self.counters["greedy_steps"] += rows is not None
        with self._one_message(len(reqs) > 1):
            for n, req in enumerate(reqs):
                self._accept(req, rows[n] if rows else req.chain.sample(self.ctx, n), now, n)

    def _prompt_group(self, prompting: list[Generation]) -> list[tuple[Generation, int]]:
        """The oldest prompting request and its next chunk's length, with the others whose next
        chunk is as long, while the chunks together stay short (see the module docstring); in
        slot order, so that llama.cpp evaluates consecutive slots' chunks as one ubatch."""
        first, *rest = sorted(prompting, key=lambda r: r.t_start)
        take = self.cache.next_chunk(len(first.tokens), first.n_prompt_done)
        group = [first] + [r for r in rest if self.cache.next_chunk(len(r.tokens), r.n_prompt_done) == take]
        group = group[:max(1, min(GROUP_TOKENS, self.n_chunk) // take)]
        return [(r, take) for r in sorted(group, key=lambda r: r.slot)]

    def _prompt_step(self, chunks: list[tuple[Generation, int]]) -> None:
        """One chunk of each request's prompt in one decode; samples the first token of those
        whose prompt it ends (the answers of one request sample the same row)."""
        row = 0
        for req, take in chunks:
            left, start = len(req.tokens) - req.n_prompt_done, req.n_prompt_done
            for j in range(take):
                self._put(row + j, req.tokens[start + j], req.n_past + j, req.slot, j == left - 1)
            row += take
        if not self._decode(row, abortable=row > len(chunks), what=[req for req, _ in chunks]):
            return
        self.counters["prompt_decodes"] += 1
        now, row, ended = time.perf_counter(), 0, []
        for req, take in chunks:
            start, row = req.n_prompt_done, row + take
            self.counters["tokens_in"] += take
            self.cache.decoded(req.slot, req.tokens[start:start + take])
            req.n_past += take
            req.n_prompt_done += take
            if req.n_prompt_done == len(req.tokens):
                others = [r for r in req.group[1:] if r.waiting]
                for other in others:  # the prompt's KV, evaluated once, for each further answer
                    self.cache.copy(req.slot, other.slot)
                    other.n_past = other.n_prompt_done = req.n_past
                    other.waiting = False
                ended += [(r, row - 1) for r in (req, *others)]
        with self._one_message(len(ended) > 1):
            for r, last in ended:  # each samples its prompt's last row with its own chain
                self._accept(r, r.chain.sample(self.ctx, last), now, last)

    def _settle_step(self) -> None:
        """Evaluate one chunk of generated tokens again, the way a prompt is (engine idle)."""
        job = self.cache.next_settle(self.n_chunk)
        if job is None:
            return
        slot, tokens = job
        pos = len(self.cache.tokens[slot])
        for j, token in enumerate(tokens):
            self._put(j, token, pos + j, slot, False)
        self._settling = True
        try:
            rc = self._run_decode(len(tokens), abortable=True)
        finally:
            self._settling = False
        if rc == 0:
            self.cache.decoded(slot, tokens)
            self.counters["tokens_settled"] += len(tokens)
        elif rc == 2:  # new work arrived: it goes first; the slot keeps what is settled
            self.L.llama_memory_seq_rm(self.mem, slot, pos, -1)
            self.cache.interrupted(slot)
        else:
            self.cache.clear(slot)

    def _decode(self, n: int, *, abortable: bool, what: list[Generation]) -> bool:
        """Decode the first ``n`` batch rows for the requests ``what``. On failure their slots
        drop what the decode left behind (an abort removes only the ubatch in flight), so each
        holds exactly its cached tokens again; a real error also ends them."""
        rc = self._run_decode(n, abortable=abortable)
        if rc == 0:
            return True
        for req in what:
            self.L.llama_memory_seq_rm(self.mem, req.slot, req.n_past, -1)
        if rc != 2:  # 2 = aborted by a cancel: the next step redoes the others' tokens
            message = f"llama_decode failed ({rc}): " + llama_said(self.errors, "see the worker log")
            for req in what:  # (with the answers waiting for this prompt's KV)
                for member in [req, *(m for m in req.group[1:] if m.waiting)]:
                    self._finish(member, "error", message)
        return False

    def _run_decode(self, n: int, *, abortable: bool) -> int:
        if abortable != self._abort_on:
            self._abort_on = abortable
            self.L.llama_set_abort_callback(self.ctx, self._abort_cb if abortable else self._no_abort, None)
        self.batch.n_tokens = n
        return int(self.L.llama_decode(self.ctx, self.batch))

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self.batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits

    def _accept(self, req: Generation, token: int, now: float, row: int) -> None:
        if req.n_gen == 0:
            req.t_first = now
        req.t_last = now
        if self.text.is_eog(token):
            self._finish(req, "stop")
            return
        req.n_gen += 1
        req.n_unsent += 1
        self.counters["tokens_out"] += 1
        if req.top is not None:
            req.lp.append(self._entry(row, token, req.top))
        text, stopped = req.out.feed(self.text.piece(token))
        text = req.due(text, now)
        if text:
            self._send_text(req, text)
        if stopped:
            self._finish(req, "stop")
        elif (req.max_tokens is not None and req.n_gen >= req.max_tokens) or req.n_past >= self.n_ctx_seq:
            self._finish(req, "length")
        else:
            req.last_token = token

    def _finish(self, req: Generation, reason: str, error: str | None = None) -> None:
        if req.slot >= 0:
            # The slot keeps its KV for the next request (also when cancelled: what was
            # evaluated stays valid); after a failed decode nothing is trusted.
            self.cache.released(req.slot, failed=error is not None)
            self.slots[req.slot] = None
            req.slot = -1
        req.chain.free()
        head = req.head or req
        head.left -= 1
        if head.left <= 0:
            self.requests.pop(req.rid, None)
        # what `every` held back (sent also on a cancel or failure), a stop string's prefix that was text
        rest = req.held + ("" if reason == "cancelled" or error is not None else req.out.flush())
        if rest:
            self._send_text(req, rest)
        if error is not None:
            self._emit(*DirectOut.last(req.direct, req.rid, (wire.ERROR, req.rid, "RuntimeError", error, {})))
            return
        prompt_s, gen_s = req.t_first - req.t_start, req.t_last - req.t_first
        extra = {} if req.plain else req.extra()
        self._emit(*DirectOut.last(req.direct, req.rid, (wire.DONE, req.rid, {**extra,
            "finish_reason": reason, "prompt_tokens": len(req.tokens), "prompt_tokens_cached": req.n_cached,
            "completion_tokens": req.n_gen,
            "prompt_tok_per_s": len(req.tokens) / prompt_s if req.t_first and prompt_s > 0 else 0.0,
            "gen_tok_per_s": (req.n_gen - 1) / gen_s if req.n_gen > 1 and gen_s > 0 else 0.0,
            "seed": req.seed, "worker_ttft_s": req.t_first - req.t_recv if req.t_first else None,
            "stop_sequence": req.out.matched,
        })))

    def _send_text(self, req: Generation, text: str) -> None:
        """A TOKEN message; with the answer's index and log probabilities when they were asked for."""
        if req.direct is not None:
            self._emit(req.direct.piece(req.rid, text, req.n_unsent))
        elif req.plain:
            self._emit((wire.TOKEN, req.rid, text, req.n_unsent))
        else:
            self._emit((wire.TOKEN, req.rid, text, req.n_unsent, req.extra()))
        req.n_unsent = 0

    @contextmanager
    def _one_message(self, several: bool) -> Iterator[None]:
        """What the requests sampled inside send, as one ``step`` message when ``several``: one
        write per step, as each write wakes the kernel's reader on cores the decode needs."""
        self._out = [] if several else None
        try:
            yield
        finally:
            out, self._out = self._out, None
            if out:
                self.send(out[0] if len(out) == 1 else (wire.STEP, out))

    def _emit(self, *messages: tuple[Any, ...] | None) -> None:
        for message in messages:
            if message is None:
                pass
            elif self._out is None:
                self.send(message)
            else:
                self._out.append(message)

    def _entry(self, row: int, token: int, top: int) -> Any:
        if self._logprobs is None:
            from .logprobs import Logprobs

            n_vocab = self.L.llama_vocab_n_tokens(self.text.vocab)
            self._logprobs = Logprobs(self.L, self.ctx, n_vocab, self.text.piece)
        return self._logprobs.entry(row, token, top)

    def _shutdown(self) -> None:
        for req in [*self.pending, *(s for s in self.slots if s is not None)]:
            if req.slot < 0:
                for member in req.group[1:]:
                    self._finish(member, "cancelled")
            self._finish(req, "cancelled")
        self.pending.clear()
        self._writer.drain()  # the answers' last bytes and messages, before the worker closes

    def free(self) -> None:
        """Free the native objects this engine made (the worker frees context and model)."""
        if self._embedder is not None:
            self._embedder.free()
        self.L.llama_batch_free(self.batch)

    def _run_embed(self, rid: int, inputs: list[list[int]], normalize: bool) -> None:
        # Embeddings use a context of their own, on this thread: it runs llama.cpp's compute.
        # The inputs come tokenized (worker/prep.py).
        try:
            if self._embedder is None:
                from .embedding import Embedder  # made on first use: most models never embed

                self._embedder = Embedder(self.L, self.model, n_threads=self.n_threads, errors=self.errors)
            self.send((wire.REPLY, rid, self._embedder.embed(inputs, normalize)))
        except RequestError as exc:
            self.send((wire.ERROR, rid, exc.kind, str(exc), exc.extra))


__all__ = ["Engine"]
