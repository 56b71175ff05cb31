"""The kernel side of a worker process: start it, send requests, stream answers, survive crashes.

A :class:`Runtime` owns one worker (``python -m jupyter_llm.worker``, see its docstring for the
protocol) and one reader thread that receives everything the worker sends and routes it to the
request waiting for it. Every public method is thread-safe, so the HTTP server may call from
several threads while a notebook cell streams.

If the worker dies (SIGSEGV, SIGABRT, the OOM killer's SIGKILL) every pending and later call
raises :class:`~jupyter_llm.errors.WorkerCrashedError` naming the signal and llama.cpp's last
words. If it hangs (stopped, deadlocked) the same happens, "the worker running NAME stopped
responding": a caller that has heard nothing for ``_PING_AFTER_S`` pings it (the worker's control
thread answers at once, also while the engine decodes or the model loads), and a ping left
unanswered for ``HUNG_AFTER_S`` gets the worker killed. Sends have that deadline too (a stopped
worker stops reading; a large request would block in ``send`` for good), so no call ever waits
on a dead or hung process. llama.cpp's log arrives as messages (not on the kernel's stderr), is
kept in a ring buffer (:meth:`Runtime.logs`) and gives the load's measured memory breakdown
(:class:`~jupyter_llm.runtime.report.LoadReport`); generations: :mod:`jupyter_llm.runtime.stream`.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import config, wire
from ..errors import JupyterLLMError, ModelLoadError, WorkerCrashedError
from ..options import AUTO, LoadOptions, SamplingOptions
from .failure import crash_error, last_words
from .failure import error_from as _error_from
from .failure import fresh as _fresh
from .grammar import MAX_GRAMMAR_BYTES, schema_grammar
from .report import LoadReport, load_report
from .stream import Extras, Stream

LogCallback = Callable[[int, str], None]
log = logging.getLogger("jupyter_llm")

_ROUTED = frozenset({wire.TOKEN, wire.FITTED, wire.DONE, wire.REPLY, wire.ERROR, wire.SPILL})
"""Worker messages that answer one request (their second element is its id)."""
_LIVENESS_S = 0.2
"""How often a waiting caller checks that the worker still lives (a crash is also pushed to it)."""
_PING_AFTER_S = 1.0
"""Silence after which a waiting caller pings the worker (while tokens flow, nobody pings)."""
HUNG_AFTER_S = 10.0
"""How long a ping may go unanswered before the worker is killed as hung: the control thread
answers in milliseconds even on a loaded machine; this leaves room for one that thrashes."""
_CLOSE_GRACE_S = 1.0
"""On close, a worker silent this long is killed (a working one answers the ping sent first)."""


class _Relay:
    """A request's inbox that hands each message on at once (see :meth:`Runtime._relay`)."""

    def __init__(self, take: Callable[[tuple[Any, ...]], None]) -> None:
        self.put = take


class Runtime:
    """One model in one worker process. Create with :meth:`start`; always :meth:`close`."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], conn: Any, errfile: Any,
                 on_log: LogCallback | None) -> None:
        self.name = name
        self._proc = proc
        self._conn = conn
        self._errfile = errfile
        self._on_log = on_log
        self._log_failed = False
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._route_lock = threading.Lock()
        """Held while the reader hands a message to a request's inbox, and while a stream turns
        its inbox into a relay (:meth:`_relay`), so that no message is lost or reordered."""
        self._ids = itertools.count(1)
        self._pending: dict[int, queue.SimpleQueue[Any]] = {}
        self._orphans: deque[int] = deque()
        self._logs: deque[tuple[int, str]] = deque(maxlen=2000)
        self._load_log: list[tuple[int, str]] | None = []
        self._dead: JupyterLLMError | None = None
        self._closing = False
        self._hung = False
        self._heard_at = self._ping_at = time.monotonic()
        """When the reader last received anything, and when a caller last pinged."""
        self._start_inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.report: LoadReport | None = None
        self._reader = threading.Thread(target=self._read_loop, name=f"jupyter_llm-{name}", daemon=True)
        self._reader.start()

    # -- lifecycle -----------------------------------------------------------------------------

    @classmethod
    def start(cls, path: str | os.PathLike[str], options: LoadOptions | None = None, *,
              name: str | None = None, on_log: LogCallback | None = None, ollama_template: str | None = None,
              _extra_bufts: bool = False, _prompt_cache: bool | None = None,
              _fault: dict[str, str] | None = None, _template_seconds: float | None = None) -> Runtime:
        """Start a worker, load ``path`` there and return once it is ready to generate.

        ``options`` must be resolved (no ``"auto"``: the estimate chooses). ``on_log(level, text)``
        receives llama.cpp's log messages (ggml levels 1 DEBUG … 4 ERROR, 5 continuation);
        ``ollama_template`` is the chat template of the model's Ollama manifest (Go syntax).
        ``_extra_bufts`` turns weight repacking on (the manager asks :mod:`jupyter_llm.runtime.repack`
        first: it crashes on Intel AMX CPUs). For tests: ``_prompt_cache=False`` evaluates every prompt
        afresh, ``_fault`` makes the worker die, stop or stall at a chosen point (see the worker's
        docstring), ``_template_seconds`` sets the chat template's time limit. Raises
        ModelLoadError when llama.cpp refuses the file or context, WorkerCrashedError when the
        worker dies or hangs."""
        options = options or LoadOptions(gpu_layers=0)
        if options.gpu_layers == AUTO or options.n_ctx == AUTO:
            raise ValueError("Runtime.start needs concrete gpu_layers and n_ctx; resolve 'auto' with the "
                             "memory estimate first (ModelManager.load does)")
        path = Path(path)
        name = name or path.stem
        slice_us = config.worker_slice_us()  # a bad value fails here, not in the worker
        parent, child = socket.socketpair()
        # the worker's stdout and stderr (asserts, tracebacks): read back to explain a crash
        errfile = tempfile.TemporaryFile(prefix="jupyter_llm-worker-")  # noqa: SIM115 (owned by the Runtime)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", wire.WORKER_MODULE, str(child.fileno()), str(slice_us)],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=errfile, stderr=errfile,
                env=wire.worker_env(), start_new_session=True,  # the kernel's SIGINT is not the worker's
            )
        except BaseException:
            parent.close()
            errfile.close()
            raise
        finally:
            child.close()
        rt = cls(name, proc, wire.Pipe(parent.detach()), errfile, on_log)
        try:
            if _prompt_cache is None:
                _prompt_cache = config.prompt_cache()
            internal = {"extra_bufts": bool(_extra_bufts), "prompt_cache": bool(_prompt_cache),
                        "idle_settle": config.idle_settle(), "prompt_ram": config.prompt_ram(),
                        "fault": dict(_fault) if _fault else None, "template_seconds": _template_seconds,
                        "ollama_template": ollama_template}
            rt._send((wire.LOAD, str(path), options.to_dict(), internal))
            msg = rt._wait(rt._start_inbox)
            if msg[0] == wire.CRASH:
                raise _error_from(msg, rt.name)
            if msg[0] == wire.LOAD_ERROR:
                if msg[2] == "model":
                    advice = ("Check that the file is a complete GGUF model (`%llm show` verifies it; pull "
                              "it again if not).")
                else:
                    advice = (f"The context did not fit (n_ctx {options.n_ctx}, {options.parallel} slot(s)): "
                              "try a smaller --ctx, a smaller KV type (--kv-type q8_0) or fewer slots.")
                raise ModelLoadError(f"llama.cpp could not load {name} ({path}): {msg[1].strip()}. {advice}")
            lines = rt._load_log or []
            rt._load_log = None  # later lines (e.g. the embedding context) are not the load's
            rt.report = load_report(name, path, msg[1], lines)
            return rt
        except BaseException:
            rt._kill()
            raise

    def close(self, timeout: float = 10.0) -> None:
        """Ask the worker to free everything and exit; kill it if it does not within ``timeout``,
        or at once if it does not answer (a hung worker). Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        asked = time.monotonic()
        for message in ((wire.PING,), (wire.CLOSE,)):
            self._send_quietly(message, _CLOSE_GRACE_S)
        while self._proc.poll() is None:
            waited = time.monotonic() - asked
            if waited > timeout or (waited > _CLOSE_GRACE_S and self._heard_at < asked):
                self._proc.kill()
            try:
                self._proc.wait(0.05)
            except subprocess.TimeoutExpired:
                pass
        self._reader.join(timeout)
        self._conn.close()
        self._errfile.close()

    def _kill(self) -> None:
        with self._lock:
            self._closing = True
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._reader.join(5)
        self._conn.close()
        self._errfile.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        """Whether the worker process runs and has not been closed."""
        return self._dead is None and not self._closing and self._proc.poll() is None

    def rss_bytes(self) -> int:
        """The worker's resident memory (VmRSS) in bytes; 0 once it is gone."""
        return wire.rss(self.pid) if self._proc.poll() is None else 0

    def logs(self, n: int | None = None) -> list[tuple[int, str]]:
        """The last ``n`` (default: all kept) llama.cpp log messages as (level, text)."""
        items = list(self._logs)
        return items if n is None else items[-n:]

    # -- requests ------------------------------------------------------------------------------

    def generate(self, prompt: str, sampling: SamplingOptions | None = None, *, grammar: str | None = None,
                 json_schema: dict[str, Any] | None = None, extras: Extras | None = None) -> Stream:
        """Complete a raw prompt (special tokens in it are parsed). Starts at once; iterate to stream.
        ``extras``: several answers, log probabilities (:class:`~jupyter_llm.runtime.stream.Extras`)."""
        return self._generate("prompt", prompt, sampling, grammar, json_schema, None, extras)

    def infill(self, prefix: str, suffix: str, sampling: SamplingOptions | None = None, *,
               grammar: str | None = None, extras: Extras | None = None) -> Stream:
        """Fill the gap between ``prefix`` and ``suffix`` with the model's FIM tokens; a model
        without them raises CapabilityError (``insert``)."""
        return self._generate("fim", (prefix, suffix), sampling, grammar, None, None, extras)

    def chat(self, messages: list[dict[str, Any]], sampling: SamplingOptions | None = None, *,
             grammar: str | None = None, json_schema: dict[str, Any] | None = None,
             reserve: int | None = None, tools: list[dict[str, Any]] | None = None,
             extras: Extras | None = None) -> Stream:
        """Answer a conversation, formatted with the model's own chat template.

        ``json_schema`` constrains the answer to JSON matching the schema (``{}``: any JSON
        object); ``grammar`` is a GBNF grammar with a ``root`` rule. Give at most one. ``reserve``:
        drop the oldest turns until the prompt leaves that many tokens of the slot for the answer
        (:meth:`Stream.fitted` says how many went), else one that does not fit is refused.
        ``tools``: OpenAI function tools for the template. ``extras``: as for :meth:`generate`, and thinking."""
        payload = {"messages": messages, "tools": tools} if tools else messages
        return self._generate("chat", payload, sampling, grammar, json_schema,
                              {"reserve": int(reserve)} if reserve is not None else None, extras)

    def _generate(self, kind: str, payload: Any, sampling: SamplingOptions | None,
                  grammar: str | None, json_schema: dict[str, Any] | None, fit: dict[str, int] | None,
                  extras: Extras | None = None) -> Stream:
        if grammar is not None and json_schema is not None:
            raise ValueError("give either grammar or json_schema, not both")
        if json_schema is not None:
            grammar = schema_grammar(json_schema)
        elif grammar is not None and len(grammar) > MAX_GRAMMAR_BYTES:  # llama.cpp parses it at ~45x its size
            raise ValueError(f"the grammar is {len(grammar) / 2**20:.1f} MiB; at most {MAX_GRAMMAR_BYTES >> 20} MiB")
        sampling = sampling or SamplingOptions()
        rid, inbox = self._register()
        try:
            self._send((wire.GEN, rid, kind, payload, sampling.to_dict(), grammar, fit,
                        extras.to_wire() if extras else None))
        except BaseException:
            self._forget(rid)
            raise
        return Stream(self, rid, inbox, extras)

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt the chat template makes of ``messages`` (with the generation prompt)."""
        return self._call("render", {"messages": messages, "tools": tools} if tools else messages)

    def count_tokens(self, messages_or_prompt: str | list[dict[str, Any]]) -> int:
        """Tokens a prompt (a string) or a conversation (after its template) takes."""
        kind = "prompt" if isinstance(messages_or_prompt, str) else "chat"
        return self._call("count", kind, messages_or_prompt)

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of ``text`` in the model's vocabulary."""
        return self._call("tokenize", text, add_special, parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        return self._call("detokenize", list(tokens))

    def embed(self, texts: list[str], *, normalize: bool = True) -> list[list[float]]:
        """One pooled embedding per text (the model's pooling, MEAN if it has none)."""
        rid, inbox = self._register()
        self._send((wire.EMBED, rid, list(texts), normalize))
        return self._reply(rid, inbox)

    def stats(self) -> dict[str, Any]:
        """Slots, busy slots, queued requests (being prepared included), token counters, RSS.

        Counters since the load: ``requests``, ``tokens_in`` (prompt tokens evaluated, in
        ``prompt_decodes`` decodes: arrivals' short chunks share one), ``prompt_tokens_cached``
        (reused from a slot's cache instead), ``tokens_out``, ``tokens_settled`` (generated tokens
        evaluated again while idle, see :mod:`jupyter_llm.worker.prompt_cache`), ``greedy_steps``
        (generation steps of several greedy answers sampled by one argmax), ``prompt_tokens_restored``
        (reused from host-memory copies of slots taken over). Now:
        ``slot_tokens`` (tokens in each slot's KV), ``unsettled_tokens`` (still to be evaluated
        again), ``ram_prompts``/``ram_bytes`` (those copies)."""
        return self._call("stats")

    # -- plumbing ------------------------------------------------------------------------------

    def _call(self, name: str, *args: Any) -> Any:
        rid, inbox = self._register()
        self._send((wire.CALL, rid, name, args))
        return self._reply(rid, inbox)

    def _reply(self, rid: int, inbox: queue.SimpleQueue[Any]) -> Any:
        try:
            msg = self._wait(inbox)
        finally:
            self._forget(rid)
        if msg[0] == wire.REPLY:
            return msg[2]
        raise _error_from(msg, self.name)

    def _register(self) -> tuple[int, queue.SimpleQueue[Any]]:
        inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        with self._lock:
            if self._dead is not None:
                raise _fresh(self._dead)
            if self._closing:
                raise JupyterLLMError(f"{self.name} was unloaded; load it again with `%llm load {self.name}`")
            rid = next(self._ids)
            self._pending[rid] = inbox
        return rid, inbox

    def _relay(self, rid: int, inbox: queue.SimpleQueue[Any], take: Callable[[tuple[Any, ...]], None]) -> None:
        """From now on the reader calls ``take(message)`` for request ``rid`` (in its own thread)
        instead of queueing it; what is queued already is taken first, in order."""
        with self._route_lock:
            while True:
                try:
                    take(inbox.get_nowait())
                except queue.Empty:
                    break
            with self._lock:
                if rid in self._pending:
                    self._pending[rid] = _Relay(take)  # type: ignore[assignment]

    def _watch(self) -> None:
        """A liveness check for a caller that waits on a relay instead of an inbox (as _wait's)."""
        if self._reader.is_alive():
            self._probe()

    def _forget(self, rid: int) -> None:
        with self._lock:
            self._pending.pop(rid, None)

    def _send(self, message: tuple[Any, ...], timeout: float = HUNG_AFTER_S, *, fd: int | None = None) -> None:
        """Send a message (with a copy of the descriptor ``fd``, see wire.Pipe.send_fd)."""
        try:
            with self._send_lock:
                if fd is None:
                    self._conn.send(message, timeout)
                else:
                    self._conn.send_fd(message, fd, timeout)
                while self._orphans:
                    self._conn.send((wire.CANCEL, self._orphans.popleft()), timeout)
        except TimeoutError:
            self._declare_hung()  # (unless closing: then close() kills it)
            self._reader.join(0 if self._closing else 5)
            raise self._gone() from None
        except OSError:
            self._reader.join(5)  # the reader sees the EOF and works out why the worker died
            raise self._gone() from None

    def _send_quietly(self, message: tuple[Any, ...], timeout: float = HUNG_AFTER_S) -> None:
        try:
            self._send(message, timeout)
        except (JupyterLLMError, ValueError):
            pass

    def _cancel_soon(self, rid: int) -> None:
        """Cancel without waiting for the send lock (for ``Stream.__del__``)."""
        if self._send_lock.acquire(blocking=False):
            try:
                self._conn.send((wire.CANCEL, rid), _LIVENESS_S)
            except TimeoutError:  # the worker is not reading: the next send delivers it, or finds it hung
                if self._conn.broken:
                    self._declare_hung()
                else:
                    self._orphans.append(rid)
            except (OSError, ValueError):
                pass
            finally:
                self._send_lock.release()
        else:
            self._orphans.append(rid)

    def _wait(self, inbox: queue.SimpleQueue[Any]) -> tuple[Any, ...]:
        # Blocks on the queue (woken at once by the reader); the timeout only re-checks liveness.
        while True:
            try:
                return inbox.get(timeout=_LIVENESS_S)
            except queue.Empty:
                if not self._reader.is_alive() and inbox.empty():
                    raise self._gone() from None
                self._probe()

    def _probe(self) -> None:
        """Ping a worker that has been silent for a while; kill one that leaves a ping unanswered."""
        now = time.monotonic()
        if self._ping_at <= self._heard_at:  # no ping outstanding
            if now - self._heard_at >= _PING_AFTER_S and self._send_lock.acquire(blocking=False):
                try:  # (if another caller is sending, its send has the same deadline)
                    self._ping_at = now
                    self._conn.send((wire.PING,), HUNG_AFTER_S)
                except TimeoutError:
                    self._declare_hung()
                except (OSError, ValueError):
                    pass  # it died: the reader reports it
                finally:
                    self._send_lock.release()
        elif now - self._ping_at >= HUNG_AFTER_S and not self._conn.pending():
            # (an answer waiting in the socket means the kernel's reader is late, not the worker)
            self._declare_hung()

    def _declare_hung(self) -> None:
        with self._lock:
            if self._dead is not None or self._closing:
                return
            self._hung = True
        log.warning("the worker running %s did not answer for %.0f s: killing it", self.name, HUNG_AFTER_S)
        self._proc.kill()  # a stopped process dies of SIGKILL too; the reader then reports it

    def _error(self, msg: tuple[Any, ...]) -> BaseException:  # (for Stream)
        return _error_from(msg, self.name)

    def _gone(self) -> JupyterLLMError:
        return _fresh(self._dead) if self._dead else WorkerCrashedError(f"the worker running {self.name} is gone")

    def _read_loop(self) -> None:
        conn = self._conn
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError, ValueError):
                break
            self._heard_at = time.monotonic()
            kind = msg[0]
            if kind in _ROUTED or kind == wire.STEP:  # a step: one decode's messages for several requests
                with self._route_lock:
                    for part in msg[1] if kind == wire.STEP else (msg,):
                        inbox = self._pending.get(part[1])
                        if inbox is not None:
                            inbox.put(part)
            elif kind == wire.LOG:
                self._log(msg[1], msg[2])
            elif kind in (wire.LOADED, wire.LOAD_ERROR):
                self._start_inbox.put(msg)
        self._died()

    def _log(self, level: int, text: str) -> None:
        if level == wire.LOG_CONT and self._logs:  # ggml's continuation of the previous message
            prev_level, prev = self._logs[-1]
            self._logs[-1] = (prev_level, prev + text)
        else:
            self._logs.append((level, text))
        if self._load_log is not None:
            self._load_log.append((level, text))
        if self._on_log is not None:
            try:
                self._on_log(level, text)
            except Exception:  # a broken log view must not stop the model; said once
                if not self._log_failed:
                    self._log_failed = True
                    log.exception("the log listener of %s failed (further failures not logged)", self.name)

    def _died(self) -> None:
        try:
            code = self._proc.wait(10)
        except subprocess.TimeoutExpired:  # it closed the socket but lives on: end it
            self._proc.kill()
            code = self._proc.wait()
        with self._lock:
            if self._closing:
                error: JupyterLLMError = JupyterLLMError(
                    f"{self.name} was unloaded; load it again with `%llm load {self.name}`")
            else:
                error = self._crash_error(code)
            self._dead = error
            inboxes = [self._start_inbox, *self._pending.values()]
        for inbox in inboxes:
            inbox.put((wire.CRASH, 0, error))

    def _crash_error(self, code: int) -> WorkerCrashedError:
        last, said = last_words(self._errfile, self._logs)
        return crash_error(self.name, code, hung=self._hung, loading=self.report is None, last=last, said=said,
                           hung_after_s=HUNG_AFTER_S)


__all__ = ["LoadReport", "Runtime", "schema_grammar"]
