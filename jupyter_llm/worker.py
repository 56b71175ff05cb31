"""The worker process: the only place llama.cpp runs (one model, one context, one process).

llama.cpp ends the whole process on some inputs (NOTES §2: SIGSEGV in the AMX repacking path,
SIGABRT on absurd headers, the OOM killer on huge KV caches), so the kernel never calls it
directly: :mod:`jupyter_llm.runtime` starts ``python -m jupyter_llm.worker FD`` and talks to it
over a private socket (``FD``), never over stdout, which llama.cpp may print to.

Two threads, one owner of native state:

- the **control** thread (main) reads requests from the socket. It renders chat templates,
  tokenizes (the vocabulary is read-only) and builds sampler chains, so bad input fails at
  once, and it sets cancel flags — also while the engine sits inside ``llama_decode``.
- the **engine** thread owns the context: every ``llama_decode``, sampling and KV operation
  happens there (one context is not thread-safe). Each step decodes one batch over all busy
  slots: the next token of every generating sequence plus as many prompt tokens of newer
  requests as ``n_batch`` leaves room for (continuous batching, as llama-server does).

Slots and context: the context has ``n_ctx`` cells shared out as ``parallel`` separate
sequences (``kv_unified = False``), so each slot holds ``n_ctx / parallel`` tokens of prompt
plus answer — llama-server's rule. The per-slot size is reported as ``n_ctx_per_slot``.

Messages are pickled tuples (``multiprocessing.connection``). Kernel → worker: ``("load", path,
options, extra_bufts)`` once, then ``("gen", rid, kind, payload, sampling, grammar)``,
``("cancel", rid)``, ``("embed", rid, texts, normalize)``, ``("call", rid, name, args)``,
``("close",)``. Worker → kernel: ``("log", level, text)``, ``("loaded", report)`` or
``("load_error", message)``, ``("tok", rid, text, n_tokens)``, ``("done", rid, stats)``,
``("reply", rid, value)``, ``("error", rid, kind, message, extra)``, ``("closed",)``.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import queue
import random
import re
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

_POOLING_MEAN = 1


class _LoadFailed(Exception):
    """llama.cpp refused the model or the context cleanly (it returned NULL)."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


class RequestError(Exception):
    """A request the worker refuses; ``kind`` names the error class the kernel raises."""

    def __init__(self, kind: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.kind = kind
        self.extra = extra


class _Channel:
    """Sends to the kernel from any thread: control, engine, llama.cpp's log callback."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._lock = threading.RLock()  # re-entrant: a log line may arrive while we send

    def send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            try:
                self.conn.send(message)
            except OSError:
                pass  # the kernel is gone; the control loop sees EOF and exits


class _TextOut:
    """Bytes of tokens → text to emit: never half a UTF-8 character, never part of a stop string."""

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
        # hold back the longest tail that could still become a stop string
        keep = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._held)), keep, -1):
                if self._held.endswith(s[:n]):
                    keep = n
                    break
        cut = len(self._held) - keep
        out, self._held = self._held[:cut], self._held[cut:]
        return out, False

    def flush(self) -> str:
        """Whatever is held back, at the end of a generation that did not hit a stop string."""
        out, self._held = self._held + self._decoder.decode(b"", final=True), ""
        return out


@dataclass(eq=False)
class _Request:
    rid: int
    tokens: list[int]
    chain: Any
    max_tokens: int | None
    out: _TextOut
    seed: int
    t_recv: float = field(default_factory=time.perf_counter)
    t_start: float = 0.0
    cancelled: bool = False
    slot: int = -1
    n_past: int = 0
    n_prompt_done: int = 0
    last_token: int = -1
    n_gen: int = 0
    n_unsent: int = 0
    t_first: float = 0.0
    t_last: float = 0.0


class Worker:
    """Loads the model and serves requests; see the module docstring for the threads."""

    def __init__(self, conn: Any) -> None:
        import llama_cpp as L  # deferred: importing it is the worker's first heavy step

        self.L = L
        self.channel = _Channel(conn)
        self.conn = conn
        self.recent_errors: deque[str] = deque(maxlen=20)
        self._log_cb = L.llama_log_callback(self._on_log)  # kept on self: a collected callback segfaults
        L.llama_log_set(self._log_cb, None)
        self._abort = False
        self._abort_cb = L.ggml_abort_callback(lambda _data: self._abort)
        self._no_abort = L.ggml_abort_callback()  # NULL: no callback
        self._abort_on = False
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.requests: dict[int, _Request] = {}
        self.pending: deque[_Request] = deque()
        self.counters = {"requests": 0, "tokens_in": 0, "tokens_out": 0}
        self._pieces: dict[int, bytes] = {}
        self._template: Any = None
        self._embed_ctx: Any = None
        self._embed_size = 0

    # -- logging -------------------------------------------------------------------------------

    def _on_log(self, level: int, text: bytes, _user: Any) -> None:
        try:
            line = text.decode("utf-8", "replace")
            if level == 4 and line.strip():  # ERROR: kept to explain failures
                self.recent_errors.append(line.strip())
            self.channel.send(("log", level, line))
        except BaseException:
            pass  # an exception must never unwind into C

    def _llama_said(self, default: str) -> str:
        """llama.cpp's own explanation: its first and last error lines since the errors were cleared."""
        lines = [re.sub(r"^[\w:]+: ", "", line) for line in self.recent_errors]
        if not lines:
            return default
        return lines[0] if len(lines) == 1 or lines[0] == lines[-1] else f"{lines[0]}; {lines[-1]}"

    # -- loading -------------------------------------------------------------------------------

    def load(self, path: str, opts: dict[str, Any], extra_bufts: bool) -> dict[str, Any]:
        """Load model and context, warm up with a 2-token decode; returns the load report."""
        L = self.L
        t0 = time.perf_counter()
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = int(opts["gpu_layers"])
        # NOTES §2: the CPU extra buffer types (AMX repacking) segfault quantized models on this
        # CPU in the first multi-token decode; off unless a test forces it to prove we survive.
        mp.use_extra_bufts = bool(extra_bufts)
        split = tuple(opts.get("tensor_split") or ())
        if split:
            self._split = (ctypes.c_float * L.llama_max_devices())(*split)  # referenced while loading
            mp.tensor_split = self._split
        self.recent_errors.clear()
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise _LoadFailed("model", self._llama_said("llama.cpp could not load the model"))
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_threads = int(opts.get("threads") or os.cpu_count() or 1)
        self.parallel = int(opts["parallel"])
        cp = self._context_params(int(opts["n_ctx"]), max(int(opts["n_batch"]), self.parallel),
                                  int(opts["n_ubatch"]), self.parallel)
        cp.flash_attn_type = 1 if opts.get("flash_attn") else 0
        cp.type_k = cp.type_v = {"f16": 1, "q8_0": 8, "q4_0": 2}[opts.get("kv_type", "f16")]
        cp.kv_unified = False  # one KV stream per slot: n_ctx / parallel cells each
        self.recent_errors.clear()
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise _LoadFailed("context", self._llama_said("llama.cpp could not create the context"))
        self.mem = L.llama_get_memory(self.ctx)
        self.n_batch = L.llama_n_batch(self.ctx)
        self.n_ctx_seq = L.llama_n_ctx_seq(self.ctx)
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)
        self.slots: list[_Request | None] = [None] * self.parallel
        self.bos = L.llama_vocab_bos(self.vocab)
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self._warm_up()
        return self._report(path, opts, time.perf_counter() - t0)

    def _context_params(self, n_ctx: int, n_batch: int, n_ubatch: int, n_seq: int) -> Any:
        cp = self.L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, min(n_ubatch, n_batch), n_seq
        cp.n_threads = cp.n_threads_batch = self.n_threads
        cp.no_perf = True
        return cp

    def _warm_up(self) -> None:
        # A 2-token decode: loads weights into the page cache and turns the crashes llama.cpp
        # saves for the first multi-token decode (NOTES §2) into a failed load, not a failed chat.
        token = self.bos if self.bos >= 0 else 0
        self._put(0, token, 0, 0, False)
        self._put(1, token, 1, 0, True)
        rc = self.L.llama_decode(self.ctx, self._batch_of(2))
        self.L.llama_memory_clear(self.mem, True)
        if rc != 0:
            raise _LoadFailed("context", self._llama_said(f"the first decode failed (llama_decode returned {rc})"))

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = self.L.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def _report(self, path: str, opts: dict[str, Any], load_s: float) -> dict[str, Any]:
        L, model = self.L, self.model
        arch = self._meta("general.architecture") or ""
        desc = ctypes.create_string_buffer(256)
        L.llama_model_desc(model, desc, len(desc))
        template = L.llama_model_chat_template(model, None)
        return {
            "path": path, "pid": os.getpid(), "load_s": load_s, "rss_bytes": _rss(os.getpid()),
            "n_ctx": L.llama_n_ctx(self.ctx), "n_ctx_per_slot": self.n_ctx_seq,
            "n_ctx_train": L.llama_model_n_ctx_train(model), "n_layer": L.llama_model_n_layer(model),
            "n_embd": L.llama_model_n_embd(model), "n_vocab": L.llama_vocab_n_tokens(self.vocab),
            "n_gpu_layers": int(opts["gpu_layers"]), "parallel": self.parallel, "n_batch": self.n_batch,
            "n_threads": self.n_threads, "system_info": L.llama_print_system_info().decode(),
            "metadata": {
                "architecture": arch, "name": self._meta("general.name"),
                "description": desc.value.decode("utf-8", "replace"),
                "n_params": L.llama_model_n_params(model), "size": L.llama_model_size(model),
                "chat_template": template.decode("utf-8", "replace") if template else None,
                "pooling_type": self._meta(f"{arch}.pooling_type"),
                "add_bos": self.add_bos,
            },
        }

    # -- text ----------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of ``text`` with the model's vocabulary (special tokens parsed by default)."""
        data = text.encode("utf-8")
        size = len(data) + 8
        while True:
            buf = (self.L.llama_token * size)()
            n = self.L.llama_tokenize(self.vocab, data, len(data), buf, size, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            size = -n

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self._piece(t) for t in tokens).decode("utf-8", "replace")

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = self.L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self.L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The chat prompt: the GGUF's Jinja chat template, rendered in a sandbox."""
        if self._template is None:
            source = self.L.llama_model_chat_template(self.model, None)
            if not source:
                raise RequestError("ValueError", "this model has no chat template; use generate() "
                                   "with a prompt you format yourself")
            self._template = _compile_template(source.decode("utf-8"))
        bos_eos = [self._special_text(self.L.llama_vocab_bos(self.vocab)),
                   self._special_text(self.L.llama_vocab_eos(self.vocab))]
        try:
            return str(self._template.render(messages=messages, add_generation_prompt=True,
                                             bos_token=bos_eos[0], eos_token=bos_eos[1]))
        except Exception as exc:  # a template's raise_exception(), or a malformed message
            raise RequestError("ValueError", f"the chat template refused these messages: {exc}") from exc

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        text = self.L.llama_vocab_get_text(self.vocab, token)
        return text.decode("utf-8", "replace") if text else ""

    def prompt_tokens(self, kind: str, payload: Any) -> list[int]:
        """Tokens of a raw prompt or of rendered chat messages, with BOS once if the model wants it."""
        tokens = self.tokenize(self.render(payload) if kind == "chat" else str(payload))
        if self.add_bos and self.bos >= 0 and (not tokens or tokens[0] != self.bos):
            tokens.insert(0, self.bos)
        return tokens

    # -- requests (control thread) -------------------------------------------------------------

    def submit(self, rid: int, kind: str, payload: Any, sampling: dict[str, Any], grammar: str | None) -> None:
        """Prepare a generation and hand it to the engine; raises RequestError on bad input."""
        tokens = self.prompt_tokens(kind, payload)
        if not tokens:
            raise RequestError("ValueError", "the prompt is empty")
        if len(tokens) >= self.n_ctx_seq:
            raise RequestError(
                "ContextOverflowError",
                f"the prompt has {len(tokens)} tokens but a slot holds {self.n_ctx_seq} "
                f"(context {self.n_ctx_seq * self.parallel} / {self.parallel} slots); shorten it, or "
                "load the model with a larger --ctx or fewer --parallel slots",
                n_tokens=len(tokens), n_ctx=self.n_ctx_seq)
        seed = sampling.get("seed")
        seed = random.getrandbits(32) if seed is None else int(seed) & 0xFFFFFFFF
        chain = self._chain(sampling, grammar, seed)
        stop = _TextOut(tuple(sampling.get("stop") or ()))
        req = _Request(rid, tokens, chain, sampling.get("max_tokens"), stop, seed)
        self.requests[rid] = req
        self.inbox.put(req)

    def _chain(self, s: dict[str, Any], grammar: str | None, seed: int) -> Any:
        L = self.L
        params = L.llama_sampler_chain_default_params()
        params.no_perf = True
        chain = L.llama_sampler_chain_init(params)
        if grammar:
            self.recent_errors.clear()  # (a log line of another thread may slip in: harmless)
            g = L.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
            if not g:
                L.llama_sampler_free(chain)
                raise RequestError("ValueError", "the grammar does not parse: " + self._llama_said("?"))
            L.llama_sampler_chain_add(chain, g)
        if s.get("repeat_penalty", 1.0) != 1.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(64, s["repeat_penalty"], 0.0, 0.0))
        if s.get("temperature", 0.0) <= 0.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
            return chain
        if s.get("top_k", 0) > 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(s["top_k"]))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(s.get("top_p", 1.0), 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(s.get("min_p", 0.0), 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(s["temperature"]))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
        return chain

    def cancel(self, rid: int) -> None:
        """Flag a request; aborts the decode in flight, so a long prompt stops within ~10 ms."""
        req = self.requests.get(rid)
        if req is not None:
            req.cancelled = True
            self._abort = True  # a spurious abort only makes the engine redo one step

    def stats(self) -> dict[str, Any]:
        busy = sum(1 for s in self.slots if s is not None)
        return {"slots": self.parallel, "busy": busy, "queued": len(self.pending) + self.inbox.qsize(),
                "rss_bytes": _rss(os.getpid()), **self.counters}

    # -- engine thread -------------------------------------------------------------------------

    def run_engine(self) -> None:
        """The engine loop; the only code that touches the context after loading."""
        try:
            while self._engine_step():
                pass
        except BaseException:
            import traceback

            traceback.print_exc()  # to the captured stderr: the kernel reports its last line
            sys.stderr.flush()
            os._exit(70)

    def _engine_step(self) -> bool:
        self._abort = False  # reset before looking at cancel flags: see cancel()
        busy = any(s is not None for s in self.slots)
        item = None if busy or self.pending else self.inbox.get()
        while True:
            if item is None:
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    break
            if item == "close":
                self._shutdown()
                return False
            if isinstance(item, _Request):
                self.pending.append(item)
                self.counters["requests"] += 1
            else:
                self._run_embed(*item)
            item = None
        for req in self.slots:
            if req is not None and req.cancelled:
                self._finish(req, "cancelled")
        for req in [r for r in self.pending if r.cancelled]:
            self.pending.remove(req)
            self._finish(req, "cancelled")
        for i, slot in enumerate(self.slots):
            if slot is None and self.pending:
                req = self.pending.popleft()
                req.slot, req.t_start = i, time.perf_counter()
                self.slots[i] = req
        if any(s is not None for s in self.slots):
            self._decode_step()
        return True

    def _decode_step(self) -> None:
        L = self.L
        n, samples, step, prompt_tokens = 0, [], [], 0
        active = [r for r in self.slots if r is not None]
        for req in active:
            if req.n_prompt_done == len(req.tokens):
                self._put(n, req.last_token, req.n_past, req.slot, True)
                samples.append((req, n))
                step.append((req, req.n_past, 1, 0))
                n += 1
        for req in active:
            left = len(req.tokens) - req.n_prompt_done
            take = min(left, self.n_batch - n)
            if left == 0 or take <= 0:
                continue
            for j in range(take):
                self._put(n + j, req.tokens[req.n_prompt_done + j], req.n_past + j, req.slot, j == left - 1)
            n += take
            prompt_tokens += take
            if take == left:
                samples.append((req, n - 1))
            step.append((req, req.n_past, take, take))
        # the abort callback costs a GIL round trip per graph node; only prompt steps need it
        # (a generation step takes tens of ms, and cancel flags are checked between steps)
        if (prompt_tokens > 1) != self._abort_on:
            self._abort_on = prompt_tokens > 1
            L.llama_set_abort_callback(self.ctx, self._abort_cb if self._abort_on else self._no_abort, None)
        rc = L.llama_decode(self.ctx, self._batch_of(n))
        if rc != 0:
            for req, pos, _, _ in step:  # drop what the interrupted step left in the KV cache
                L.llama_memory_seq_rm(self.mem, req.slot, pos, -1)
            if rc != 2:  # 2 = aborted by a cancel: the next step redoes the others' tokens
                for req, _, _, _ in step:
                    self._finish(req, "error", f"llama_decode failed ({rc}): "
                                 + self._llama_said("see the worker log"))
            return
        self.counters["tokens_in"] += prompt_tokens
        for req, _, count, prompt in step:
            req.n_past += count
            req.n_prompt_done += prompt
        now = time.perf_counter()
        for req, idx in samples:
            self._accept(req, L.llama_sampler_sample(req.chain, self.ctx, idx), now)

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b = self.batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits

    def _batch_of(self, n: int) -> Any:
        self.batch.n_tokens = n
        return self.batch

    def _accept(self, req: _Request, token: int, now: float) -> None:
        if req.n_gen == 0:
            req.t_first = now
        req.t_last = now
        if self.L.llama_vocab_is_eog(self.vocab, token):
            self._finish(req, "stop")
            return
        req.n_gen += 1
        req.n_unsent += 1
        self.counters["tokens_out"] += 1
        text, stopped = req.out.feed(self._piece(token))
        if text:
            self.channel.send(("tok", req.rid, text, req.n_unsent))
            req.n_unsent = 0
        if stopped:
            self._finish(req, "stop")
        elif (req.max_tokens is not None and req.n_gen >= req.max_tokens) or req.n_past >= self.n_ctx_seq:
            self._finish(req, "length")
        else:
            req.last_token = token

    def _finish(self, req: _Request, reason: str, error: str | None = None) -> None:
        L = self.L
        if req.slot >= 0:
            L.llama_memory_seq_rm(self.mem, req.slot, -1, -1)
            self.slots[req.slot] = None
            req.slot = -1
        L.llama_sampler_free(req.chain)
        self.requests.pop(req.rid, None)
        if error is not None:
            self.channel.send(("error", req.rid, "RuntimeError", error, {}))
            return
        if reason != "cancelled":
            rest = req.out.flush()  # a stop-string prefix held back is real text after all
            if rest:
                self.channel.send(("tok", req.rid, rest, req.n_unsent))
        prompt_s = req.t_first - req.t_start
        gen_s = req.t_last - req.t_first
        self.channel.send(("done", req.rid, {
            "finish_reason": reason, "prompt_tokens": len(req.tokens), "completion_tokens": req.n_gen,
            "prompt_tok_per_s": len(req.tokens) / prompt_s if req.t_first and prompt_s > 0 else 0.0,
            "gen_tok_per_s": (req.n_gen - 1) / gen_s if req.n_gen > 1 and gen_s > 0 else 0.0,
            "seed": req.seed, "worker_ttft_s": req.t_first - req.t_recv if req.t_first else None,
        }))

    def _shutdown(self) -> None:
        for req in [*self.pending, *(s for s in self.slots if s is not None)]:
            self._finish(req, "cancelled")
        self.pending.clear()

    # -- embeddings (engine thread) -------------------------------------------------------------

    def _run_embed(self, rid: int, texts: list[str], normalize: bool) -> None:
        try:
            self.channel.send(("reply", rid, self._embed(texts, normalize)))
        except RequestError as exc:
            self.channel.send(("error", rid, exc.kind, str(exc), exc.extra))

    def _embed(self, texts: list[str], normalize: bool) -> list[list[float]]:
        L = self.L
        inputs = [self.tokenize(t, add_special=True, parse_special=False) or [self.bos] for t in texts]
        longest = max((len(t) for t in inputs), default=1)
        limit = L.llama_model_n_ctx_train(self.model)
        if longest > limit:
            raise RequestError("ContextOverflowError", f"an input has {longest} tokens; this model embeds "
                               f"at most {limit}", n_tokens=longest, n_ctx=limit)
        ctx = self._embedding_context(longest)
        n_embd = L.llama_model_n_embd(self.model)
        batch = L.llama_batch_init(self._embed_size, 0, 1)
        out: list[list[float]] = []
        try:
            i = 0
            while i < len(inputs):
                n, seqs = 0, []
                while i < len(inputs) and len(seqs) < _EMBED_SEQS and n + len(inputs[i]) <= self._embed_size:
                    for pos, token in enumerate(inputs[i]):  # one input per sequence, positions from 0
                        batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
                        batch.seq_id[n][0], batch.logits[n] = len(seqs), True
                        n += 1
                    seqs.append(i)
                    i += 1
                batch.n_tokens = n
                rc = L.llama_decode(ctx, batch)
                if rc != 0:
                    raise RequestError("RuntimeError", f"embedding decode failed ({rc}): "
                                       + self._llama_said("see the worker log"))
                for s in range(len(seqs)):
                    vec = L.llama_get_embeddings_seq(ctx, s)[:n_embd]
                    if normalize:
                        norm = sum(v * v for v in vec) ** 0.5 or 1.0
                        vec = [v / norm for v in vec]
                    out.append(vec)
                L.llama_memory_clear(L.llama_get_memory(ctx), True)
        finally:
            L.llama_batch_free(batch)
        return out

    def _embedding_context(self, longest: int) -> Any:
        # A second, small context with pooled embeddings, made on first use (and again, larger,
        # for a longer input): the generation context keeps its per-slot KV and its speed.
        L = self.L
        if self._embed_ctx is not None and longest <= self._embed_size:
            return self._embed_ctx
        if self._embed_ctx is not None:
            L.llama_free(self._embed_ctx)
            self._embed_ctx = None
        size = max(512, -(-longest // 256) * 256)
        cp = self._context_params(size, size, size, _EMBED_SEQS)
        cp.embeddings = True
        cp.kv_unified = True  # any one input may use the whole context
        pooling = self._meta(f"{self._meta('general.architecture')}.pooling_type")
        cp.pooling_type = int(pooling) if pooling and pooling.isdigit() and int(pooling) > 0 else _POOLING_MEAN
        ctx = L.llama_init_from_model(self.model, cp)
        if not ctx:
            raise RequestError("RuntimeError", "could not create the embedding context: "
                               + self._llama_said("see the worker log"))
        self._embed_ctx, self._embed_size = ctx, size
        return ctx

    # -- control thread ------------------------------------------------------------------------

    def serve(self) -> None:
        """Read requests until ``close`` or EOF (the kernel went away)."""
        engine = threading.Thread(target=self.run_engine, name="engine", daemon=True)
        engine.start()
        calls = {"tokenize": self.tokenize, "detokenize": self.detokenize, "render": self.render,
                 "count": lambda kind, payload: len(self.prompt_tokens(kind, payload)),
                 "stats": self.stats}
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the kernel is gone: nobody to answer, the OS frees everything
            op = msg[0]
            if op == "gen":
                try:
                    self.submit(*msg[1:])
                except RequestError as exc:
                    self.channel.send(("error", msg[1], exc.kind, str(exc), exc.extra))
                except Exception as exc:  # e.g. a template that does not compile
                    self.channel.send(("error", msg[1], "RuntimeError", f"{type(exc).__name__}: {exc}", {}))
            elif op == "cancel":
                self.cancel(msg[1])
            elif op == "embed":
                self.inbox.put(msg[1:])
            elif op == "call":
                rid, name, args = msg[1:]
                try:
                    self.channel.send(("reply", rid, calls[name](*args)))
                except RequestError as exc:
                    self.channel.send(("error", rid, exc.kind, str(exc), exc.extra))
                except Exception as exc:
                    self.channel.send(("error", rid, "RuntimeError", f"{type(exc).__name__}: {exc}", {}))
            elif op == "close":
                self.inbox.put("close")
                engine.join()
                self._free()
                self.channel.send(("closed",))
                os._exit(0)

    def _free(self) -> None:
        L = self.L
        if self._embed_ctx is not None:
            L.llama_free(self._embed_ctx)
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)


_EMBED_SEQS = 16


def _compile_template(source: str) -> Any:
    """A chat template compiled in an immutable Jinja sandbox (templates come from downloads)."""
    import json
    from datetime import datetime

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, ensure_ascii=False, indent=indent)
    return env.from_string(source)


def _rss(pid: int) -> int:
    """Resident memory of a process in bytes (VmRSS), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m jupyter_llm.worker FD``."""
    from multiprocessing.connection import Connection

    args = sys.argv[1:] if argv is None else argv
    # The kernel handles Ctrl-C / the stop button by cancelling; a SIGINT sent to the whole
    # process group must not kill the model.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(int(args[0]))
    worker = Worker(conn)
    op, path, opts, extra_bufts = conn.recv()
    assert op == "load"
    try:
        report = worker.load(path, opts, extra_bufts)
    except _LoadFailed as exc:
        worker.channel.send(("load_error", str(exc), exc.stage))
        os._exit(0)
    worker.channel.send(("loaded", report))
    worker.serve()


if __name__ == "__main__":
    main()
