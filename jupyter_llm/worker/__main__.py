"""The worker process: the only place llama.cpp runs (one model, one context, one process).

llama.cpp ends the whole process on some inputs (docs/notes.md §2: SIGSEGV in the repacking
path on AMX CPUs, SIGABRT on absurd headers, the OOM killer on huge KV caches), so the kernel
never calls it directly: :mod:`jupyter_llm.runtime` starts ``python -m jupyter_llm.worker FD`` and talks to it
over a private socket (``FD``), never over stdout, which llama.cpp may print to. The worker's
stdout and stderr go to a file the kernel reads back when the worker dies.

Two threads. The **control** thread (main) reads requests from the socket; it renders chat
templates, tokenizes and builds sampler chains (so bad input fails at once), answers small
calls, and sets cancel flags — also while the engine sits inside ``llama_decode``. The
**engine** thread (:mod:`jupyter_llm.engine`) owns the context and does all decoding.

Messages are pickled tuples (:class:`jupyter_llm.wire.Pipe`, whose tags name the first
element); ``rid`` is the kernel's request id.

=========================================================  ======================================
kernel → worker                                            worker → kernel
=========================================================  ======================================
``("load", path, options, internal)`` (first, once)        ``("loaded", report)`` or
                                                           ``("load_error", message, stage)``
``("gen", rid, "prompt"|"chat", payload, sampling, gbnf,   ``("fit", rid, dropped, n_prompt)``
fit)`` (fit: ``{"reserve": N}`` or None)                    (chat with fit), ``("tok", rid, text,
                                                           n_tokens)`` …, ``("done", rid, stats)``
``("cancel", rid)``                                        (the generation ends "cancelled")
``("embed", rid, texts, normalize)``                       ``("reply", rid, vectors)``
``("call", rid, name, args)`` (tokenize, detokenize,       ``("reply", rid, value)``
render, count, stats)
any request that fails                                     ``("error", rid, kind, message, extra)``
``("close",)``                                             ``("closed",)``, then exit
(anything, any time)                                       ``("log", level, text)``
=========================================================  ======================================

``internal`` holds switches only tests and benchmarks change: ``extra_bufts`` (llama.cpp's CPU
extra buffer types: weight repacking, which segfaults quantized models on Intel AMX CPUs and
works on others), ``prompt_cache`` (reuse a slot's KV for the next prompt's common prefix; off
evaluates every prompt afresh) and ``fault`` (``{"at": "load"|"warm_up"|"decode", "signal":
"SIGSEGV"|"SIGABRT"|"SIGKILL"|…}``: die there, the way llama.cpp's faults end the process, so
that every path of crash detection is tested on any CPU).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .. import wire
from . import RequestError, params
from .engine import Engine
from .llama import llama_said, model_meta


class _LoadFailed(Exception):
    """llama.cpp refused the model or the context cleanly (it returned NULL)."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


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


class Worker:
    """Loads the model, then serves requests until ``close`` or the kernel goes away."""

    def __init__(self, conn: Any) -> None:
        import llama_cpp as L  # deferred: the worker's first heavy step

        self.L = L
        self.conn = conn
        self.channel = _Channel(conn)
        self.errors: deque[str] = deque(maxlen=20)
        # llama-cpp-python installed a callback printing to stderr at import; ours forwards every
        # message to the kernel. Kept on self: a collected callback segfaults (docs/notes.md §2).
        self._log_cb = L.llama_log_callback(self._on_log)
        L.llama_log_set(self._log_cb, None)
        self.engine: Engine | None = None

    def _on_log(self, level: int, text: bytes, _user: Any) -> None:
        try:
            line = text.decode("utf-8", "replace")
            if level == wire.LOG_ERROR and line.strip():
                self.errors.append(line.strip())  # to explain a failure in llama.cpp's words
            self.channel.send((wire.LOG, level, line))
        except BaseException:
            pass  # an exception must never unwind into C

    def load(self, path: str, opts: dict[str, Any], internal: dict[str, Any]) -> dict[str, Any]:
        """Load model and context and warm up; returns the load report. Raises _LoadFailed."""
        L = self.L
        t0 = time.perf_counter()
        fault = _fault_injector(internal.get("fault"))
        if fault is not None:
            fault("load")
        L.llama_backend_init()
        mp, self._keep = params.model_params(L, opts, extra_bufts=bool(internal.get("extra_bufts", False)))
        self.errors.clear()
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise _LoadFailed("model", llama_said(self.errors, "llama.cpp could not load the model"))
        n_threads = params.threads(opts)
        cp = params.context_params(L, opts, n_threads=n_threads)
        self.errors.clear()
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise _LoadFailed("context", llama_said(self.errors, "llama.cpp could not create the context"))
        self.engine = Engine(L, self.model, self.ctx, parallel=int(opts["parallel"]), n_threads=n_threads,
                             send=self.channel.send, errors=self.errors,
                             prompt_cache=bool(internal.get("prompt_cache", True)),
                             batch_invariant=not opts.get("flash_attn"))
        self.engine.fault = fault
        rc = self.engine.warm_up()
        if rc != 0:
            raise _LoadFailed("context", llama_said(self.errors, f"the first decode failed ({rc})"))
        return self._report(path, opts, time.perf_counter() - t0)

    def _report(self, path: str, opts: dict[str, Any], load_s: float) -> dict[str, Any]:
        L, model, engine = self.L, self.model, self.engine
        assert engine is not None
        arch = model_meta(L, model, "general.architecture") or ""
        desc = ctypes.create_string_buffer(256)
        L.llama_model_desc(model, desc, len(desc))
        template = L.llama_model_chat_template(model, None)
        return {
            "path": path, "pid": os.getpid(), "load_s": load_s, "rss_bytes": wire.rss(os.getpid()),
            "n_ctx": L.llama_n_ctx(self.ctx), "n_ctx_per_slot": engine.n_ctx_seq,
            "n_ctx_train": L.llama_model_n_ctx_train(model), "n_layer": L.llama_model_n_layer(model),
            "n_embd": L.llama_model_n_embd(model), "n_vocab": L.llama_vocab_n_tokens(engine.text.vocab),
            "n_gpu_layers": int(opts["gpu_layers"]), "parallel": engine.parallel, "n_batch": engine.n_batch,
            "n_threads": engine.n_threads, "system_info": L.llama_print_system_info().decode(),
            "metadata": {
                "architecture": arch, "name": model_meta(L, model, "general.name"),
                "description": desc.value.decode("utf-8", "replace"),
                "n_params": L.llama_model_n_params(model), "size": L.llama_model_size(model),
                "chat_template": template.decode("utf-8", "replace") if template else None,
                "pooling_type": model_meta(L, model, f"{arch}.pooling_type"),
                "add_bos": engine.text.add_bos,
            },
        }

    def serve(self) -> None:
        """Read requests until ``close`` or EOF (the kernel went away)."""
        engine = self.engine
        assert engine is not None
        thread = threading.Thread(target=engine.run, name="engine", daemon=True)
        thread.start()
        calls: dict[str, Callable[..., Any]] = {
            "tokenize": engine.text.tokenize, "detokenize": engine.text.detokenize, "render": engine.text.render,
            "count": lambda kind, payload: len(engine.text.prompt_tokens(kind, payload)),
            "stats": lambda: {**engine.stats(), "rss_bytes": wire.rss(os.getpid())},
        }
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the kernel is gone: nobody to answer; the OS frees everything
            op, rid = msg[0], (msg[1] if len(msg) > 1 else 0)
            try:
                if op == wire.GEN:
                    engine.submit(*msg[1:])
                elif op == wire.CANCEL:
                    engine.cancel(rid)
                elif op == wire.EMBED:
                    engine.inbox.put(msg[1:])
                elif op == wire.CALL:
                    self.channel.send((wire.REPLY, rid, calls[msg[2]](*msg[3])))
                elif op == wire.CLOSE:
                    for pending in list(engine.requests):  # also aborts a long decode in flight
                        engine.cancel(pending)
                    engine.inbox.put("close")
                    thread.join()
                    engine.free()
                    self.L.llama_free(self.ctx)
                    self.L.llama_model_free(self.model)
                    self.channel.send((wire.CLOSED,))
                    os._exit(0)
            except RequestError as exc:
                self.channel.send((wire.ERROR, rid, exc.kind, str(exc), exc.extra))
            except Exception as exc:  # e.g. a chat template that does not compile
                self.channel.send((wire.ERROR, rid, "RuntimeError", f"{type(exc).__name__}: {exc}", {}))


def _fault_injector(spec: dict[str, str] | None) -> Callable[[str], None] | None:
    """Tests only: a hook that ends this process at the point ``spec["at"]`` names, with
    ``spec["signal"]``. SIGSEGV is a real invalid memory read in native code, as llama.cpp's
    crashes are; other signals are sent to the process itself."""
    if not spec:
        return None
    at, sig = spec["at"], signal.Signals[spec["signal"]]

    def fault(point: str) -> None:
        if point != at:
            return
        sys.stdout.flush()
        if sig == signal.SIGSEGV:
            ctypes.string_at(0)  # reads address 0: the kernel delivers a real SIGSEGV
        os.kill(os.getpid(), sig)
        time.sleep(5)  # a signal the process cannot ignore arrives before this ends

    return fault


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m jupyter_llm.worker FD``."""
    args = sys.argv[1:] if argv is None else argv
    # The kernel answers Ctrl-C / the stop button by cancelling; a SIGINT sent to the kernel's
    # whole process group must not kill the model.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = wire.Pipe(int(args[0]))
    worker = Worker(conn)
    op, path, opts, internal = conn.recv()
    if op != wire.LOAD:
        raise SystemExit(f"expected a load request first, got {op!r}")
    try:
        report = worker.load(path, opts, internal)
    except _LoadFailed as exc:
        worker.channel.send((wire.LOAD_ERROR, str(exc), exc.stage))
        os._exit(0)
    worker.channel.send((wire.LOADED, report))
    worker.serve()


if __name__ == "__main__":
    main()
