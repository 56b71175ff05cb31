"""The worker process: the only place llama.cpp runs (one model, one context, one process).

llama.cpp ends the whole process on some inputs (docs/notes.md §2: SIGSEGV in the repacking
path on AMX CPUs, SIGABRT on absurd headers, the OOM killer on huge KV caches), so the kernel
never calls it directly: :mod:`jupyter_llm.runtime` starts ``python -m jupyter_llm.worker FD`` and talks to it
over a private socket (``FD``), never over stdout, which llama.cpp may print to. The worker's
stdout and stderr go to a file the kernel reads back when the worker dies. ``SLICE_US``, when
given, is the CPU time slice the worker asks for its threads (:mod:`jupyter_llm.worker.sched`).

Threads. The **control** thread (main) reads the socket from the first message to the last: it
answers pings at once (also while the model loads and while the engine decodes: that is how the
kernel tells a busy worker from a hung one), sets cancel flags, answers ``stats`` and hands
everything else on. The **loader** loads the model. Each request is **prepared** in a thread of
its own (:mod:`jupyter_llm.worker.prep`: templates, tokenizing, fitting, samplers), so no slow
request holds up another. The **engine** thread (:mod:`jupyter_llm.worker.engine`) owns the
context and does all decoding.

Messages are pickled tuples (:class:`jupyter_llm.wire.Pipe`, whose tags name the first
element); ``rid`` is the kernel's request id.

=========================================================  ======================================
kernel → worker                                            worker → kernel
=========================================================  ======================================
``("load", path, options, internal)`` (first, once)        ``("loaded", report)`` or
                                                           ``("load_error", message, stage)``
``("gen", rid, "prompt"|"chat"|"fim", payload, sampling,   ``("fit", rid, dropped, n_prompt)``
gbnf, fit, extra)`` (fit: ``{"reserve": N}`` or None;      (chat with fit), ``("tok", rid, text,
extra: None or ``n``, ``logprobs``, ``variables``,         n_tokens[, {index, logprobs}])`` …,
``think_open``, ``every``, see worker/prep.py)             ``("done", rid, stats)`` (per answer)
``("cancel", rid)``                                        (the generation ends "cancelled")
``("attach", rid, has_socket)`` (+ the HTTP client's       the answer's text into that socket;
socket, SCM_RIGHTS; after the first ``tok`` of a ``gen``   ``("spill", rid, raw)`` if the client
whose extra has ``direct``: worker/direct.py)              stops taking it; ``done`` has
                                                           ``direct_text``
``("embed", rid, texts, normalize)``                       ``("reply", rid, vectors)``
``("call", rid, name, args)`` (tokenize, detokenize,       ``("reply", rid, value)``
render, count, fim, stats)
any request that fails                                     ``("error", rid, kind, message, extra)``
``("ping",)`` (any time, from the first message on)        ``("pong",)``
``("close",)``                                             ``("closed",)``, then exit
(anything, any time)                                       ``("log", level, text)``
(several generating at once)                               ``("step", [message, …])``: one step's
                                                           ``tok``/``done``/``error`` messages
=========================================================  ======================================

``internal`` holds what is not a load option: ``ollama_template`` (the chat template of an
Ollama manifest, Go syntax, see :mod:`jupyter_llm.worker.gotemplate`), ``extra_bufts`` (llama.cpp's
CPU extra buffer types: weight repacking, which segfaults quantized models on Intel AMX CPUs; on
where the kernel's repack probe found it safe and faster), and switches only tests and benchmarks
change: ``prompt_ram`` (bytes for host-memory copies of slots taken over, 0: none,
:mod:`jupyter_llm.worker.prompt_store`), ``prompt_cache`` (reuse a slot's KV for the next prompt's common prefix; off
evaluates every prompt afresh), ``template_seconds`` (the chat template's time limit) and
``fault`` (``{"at": "load"|"warm_up"|"decode", "signal": "SIGSEGV"|"SIGABRT"|"SIGKILL"|"SIGSTOP"|…}``:
die, or stop, there, the way llama.cpp's faults end the process, so that every path of crash
and hang detection is tested on any CPU; ``{"at": …, "stall": seconds}`` sleeps there once
instead, as a long decode would).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from .. import wire
from . import RequestError, lora, params, sched
from .engine import Engine
from .llama import llama_said, model_meta
from .prep import Prep
from .prompt_store import PromptStore

_CLOSE_PREP_S = 2.0
"""How long closing waits for the requests being prepared to stop (each stops within a chunk)."""


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
    """Serves the kernel from its first message (the load) until ``close`` or EOF."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.channel = _Channel(conn)
        self.errors: deque[str] = deque(maxlen=20)
        self.engine: Engine | None = None
        self.prep: Prep | None = None
        self._engine_thread: threading.Thread | None = None
        self._rpc: tuple[Any, list[dict[str, Any]]] | None = None  # device array, rpc devices

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
        t0 = time.perf_counter()
        fault = _fault_injector(internal.get("fault"))
        if fault is not None:
            fault("load")
        import llama_cpp as L  # deferred: the worker's first heavy step

        self.L = L
        # llama-cpp-python installed a callback printing to stderr at import; ours forwards every
        # message to the kernel. Kept on self: a collected callback segfaults (docs/notes.md §2).
        self._log_cb = L.llama_log_callback(self._on_log)
        L.llama_log_set(self._log_cb, None)
        L.llama_backend_init()
        rpc_array = self._rpc_devices(opts.get("rpc") or ())
        mp, self._keep = params.model_params(L, opts, extra_bufts=bool(internal.get("extra_bufts", False)),
                                             devices=rpc_array)
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
        self.errors.clear()
        self._adapters, failed = lora.attach(L, self.model, self.ctx, opts.get("lora") or ())  # before warm-up
        if failed:
            said = llama_said(self.errors, "")
            raise _LoadFailed("model", f"{failed}: {said}" if said else failed)  # the file is at fault
        exact, tile = params.prompt_exactness(opts, mp.n_gpu_layers)
        ram = int(internal.get("prompt_ram") or 0)  # bytes for copies of slots taken over (prompt_store)
        engine = Engine(L, self.model, self.ctx, parallel=int(opts["parallel"]), n_threads=n_threads,
                        send=self.channel.send, errors=self.errors,
                        prompt_cache=bool(internal.get("prompt_cache", True)),
                        settle_idle=bool(internal.get("idle_settle", False)),
                        batch_invariant=exact, tile=tile, store=PromptStore(L, self.ctx, ram) if ram else None)
        if internal.get("template_seconds"):
            engine.text.template_seconds = float(internal["template_seconds"])
        engine.text.ollama_template = internal.get("ollama_template")
        engine.fault = fault
        rc = engine.warm_up()
        if rc != 0:
            raise _LoadFailed("context", llama_said(self.errors, f"the first decode failed ({rc})"))
        self.engine = engine
        return self._report(path, opts, time.perf_counter() - t0)

    def _rpc_devices(self, endpoints: Sequence[str]) -> Any:
        """With ``rpc`` endpoints: their devices registered (:mod:`jupyter_llm.worker.rpc`), the
        device array for the model; None without."""
        if not endpoints:
            return None
        from . import rpc

        rpc.install_abort_message(endpoints)  # ggml aborts when a server is gone: name it
        try:
            self._rpc = rpc.devices(endpoints)
        except rpc.RpcUnavailable as exc:
            raise _LoadFailed("model", str(exc)) from None
        return self._rpc[0]

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
                # {endpoint, index, name, free, total} per rpc device, as its server reports it now
                "rpc_devices": self._rpc_memory(),
            },
        }

    def _rpc_memory(self) -> list[dict[str, Any]]:
        if not self._rpc:
            return []
        from . import rpc

        return rpc.memory(self._rpc[1], self._rpc[0])

    def _load_and_start(self, path: str, opts: dict[str, Any], internal: dict[str, Any]) -> None:
        """The loader thread: load, start the engine, say so (or why not, and exit)."""
        try:
            report = self.load(path, opts, internal)
        except _LoadFailed as exc:
            self.channel.send((wire.LOAD_ERROR, str(exc), exc.stage))
            os._exit(0)
        except BaseException:
            traceback.print_exc()  # to the captured stderr: the kernel reports its last line
            sys.stderr.flush()
            os._exit(1)
        engine = self.engine
        assert engine is not None
        self._engine_thread = threading.Thread(target=engine.run, name="engine", daemon=True)
        self._engine_thread.start()
        self.prep = Prep(engine, self.channel.send)  # before "loaded": requests may follow at once
        self.channel.send((wire.LOADED, report))

    def serve(self) -> None:
        """The control loop: read requests until ``close`` or EOF (the kernel went away)."""
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the kernel is gone: nobody to answer; the OS frees everything
            op = msg[0]
            if op == wire.PING:
                self.channel.send((wire.PONG,))
            elif op == wire.LOAD:
                threading.Thread(target=self._load_and_start, args=msg[1:], name="loader", daemon=True).start()
            elif op == wire.CLOSE:
                self._close()
            elif op == wire.ATTACH:
                self._attach(msg[1], self.conn.fds.popleft() if msg[2] else None)
            else:
                self._dispatch(op, msg)

    def _attach(self, rid: int, fd: int | None) -> None:
        """The client's socket of a streamed answer (worker/direct.py), for the engine thread."""
        import socket

        sock = socket.socket(fileno=fd) if fd is not None else None
        if self.engine is None:
            if sock is not None:
                sock.close()
            return
        self.engine.attach(rid, sock)

    def _dispatch(self, op: str, msg: tuple[Any, ...]) -> None:
        rid, engine, prep = msg[1], self.engine, self.prep
        try:
            if engine is None or prep is None:
                raise RequestError("RuntimeError", "the model is not loaded yet")
            if op == wire.GEN:
                prep.generate(*msg[1:])
            elif op == wire.CANCEL:
                prep.cancel(rid)
                engine.cancel(rid)
            elif op == wire.EMBED:
                prep.embed(*msg[1:])
            elif op == wire.CALL and msg[2] == "stats":
                stats = engine.stats()
                stats["queued"] += len(prep)
                self.channel.send((wire.REPLY, rid, {**stats, "rss_bytes": wire.rss(os.getpid())}))
            elif op == wire.CALL:
                prep.call(rid, msg[2], msg[3])
        except RequestError as exc:
            self.channel.send((wire.ERROR, rid, exc.kind, str(exc), exc.extra))
        except Exception as exc:  # a malformed message
            self.channel.send((wire.ERROR, rid, "RuntimeError", f"{type(exc).__name__}: {exc}", {}))

    def _close(self) -> None:
        engine, prep, thread = self.engine, self.prep, self._engine_thread
        if engine is not None and prep is not None and thread is not None:
            prepared = prep.close(_CLOSE_PREP_S)
            for pending in list(engine.requests):  # also aborts a long decode in flight
                engine.cancel(pending)
            engine.inbox.put("close")
            thread.join()
            if prepared:  # else a preparing thread may still be in the tokenizer: the OS frees it all
                engine.free()
                self.L.llama_free(self.ctx)
                self.L.llama_model_free(self.model)
        self.channel.send((wire.CLOSED,))
        os._exit(0)


def _fault_injector(spec: dict[str, str] | None) -> Callable[[str], None] | None:
    """Tests only: a hook that ends (or stops, or stalls) this process at the point ``spec["at"]``
    names. SIGSEGV is a real invalid memory read in native code, as llama.cpp's crashes are;
    other signals are sent to the process itself; ``spec["stall"]`` seconds are slept once."""
    if not spec:
        return None
    at = spec["at"]
    stall = [float(spec["stall"])] if "stall" in spec else None
    sig = signal.Signals[spec.get("signal", "SIGKILL")]

    def fault(point: str) -> None:
        if point != at:
            return
        if stall is not None:
            if stall:
                time.sleep(stall.pop())
            return
        sys.stdout.flush()
        if sig == signal.SIGSEGV:
            ctypes.string_at(0)  # reads address 0: the kernel delivers a real SIGSEGV
        os.kill(os.getpid(), sig)
        time.sleep(5)  # a signal the process cannot ignore arrives before this ends

    return fault


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m jupyter_llm.worker FD [SLICE_US]``."""
    args = sys.argv[1:] if argv is None else argv
    # before any thread starts, so that all inherit it (llama.cpp's included): worker/sched.py
    sched.shorten_slice(int(args[1]) if len(args) > 1 else 0)
    # The kernel answers Ctrl-C / the stop button by cancelling; a SIGINT sent to the kernel's
    # whole process group must not kill the model.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    Worker(wire.Pipe(int(args[0]), takes_fds=True)).serve()


if __name__ == "__main__":
    main()
