"""The HTTP API's side of the model manager: find or load a model, admit a request, run it.

The server owns no models: it asks the kernel's :class:`~jupyter_llm.manager.ModelManager`.
A model that is not loaded is loaded on demand with the server's ``parallel`` slots and the
default keep_alive. Every model is served with ``parallel`` slots however it was loaded: one
the notebook loaded with fewer is reloaded with them while no request uses it (its other
options and its context per request kept; the user's remembered options untouched), and the
model's notices say so; of one with more, the API uses ``parallel`` (its requests beyond them
wait for a slot in the server, not in the worker).

Each generation is a :class:`Job`. Its worker stream is read in a pump thread (iterating a
stream blocks) which hands chunks to the event loop (:class:`~.handoff.Handoff`, one wake-up
per batch of chunks); while it runs, the model is marked busy (so keep_alive never unloads it
mid-answer) and it holds a place in the model's bounded queue: ``slots + max_queue`` requests
per model are admitted, the next gets 503 with Retry-After. :meth:`Job.cancel` (a client that
went away) stops the generation in the worker, which frees its slot at the next decode step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ModelLoadError, ModelNotFoundError
from ..options import DEFAULT_CTX_PER_SLOT, LoadOptions
from .handoff import Handoff
from .metrics import Metrics
from .params import HTTPProblem, bad, check_max_tokens
from .responses import Raw

RETRY_AFTER_S = 2
UNCHANGED: Any = object()
"""keep_alive not given: leave the model's own keep_alive as it is."""


@dataclass
class Loaded:
    """A loaded model, marked busy for one request until :meth:`release` (so neither keep_alive
    nor eviction can unload it mid-request), and the seconds this request spent loading it."""

    model: Any
    load_s: float
    _using: Any = None

    @property
    def name(self) -> str:
        return str(self.model.name)

    @property
    def n_ctx_per_slot(self) -> int:
        return _ctx_per_slot(self.model)

    def release(self) -> None:
        """The request is over: keep_alive starts counting (0 unloads now). Idempotent."""
        using, self._using = self._using, None
        if using is not None:
            using.__exit__(None, None, None)


class Backend:
    """Model lookup, on-demand loading, admission and jobs for one server."""

    def __init__(self, manager: Any, *, parallel: int, max_queue: int, metrics: Metrics) -> None:
        self.manager = manager
        self.parallel = parallel
        self.max_queue = max_queue
        self.metrics = metrics
        self._lock = threading.Lock()
        self._slot_free = threading.Condition(self._lock)
        self._admitted: dict[str, int] = {}
        self._running: dict[str, int] = {}
        self._jobs: set[Job] = set()
        self._preparing: dict[str, threading.Lock] = {}
        """One lock per requested name: while one request loads or reloads a model, the others
        wait for it rather than see it missing (and load it again with the API's defaults)."""
        self._kept: dict[str, float] = {}
        """Models (name → loaded_at) that could not get more slots: not tried again until reloaded."""

    # -- models ------------------------------------------------------------------------------

    def ensure(self, name: str, *, keep_alive: Any = UNCHANGED, num_ctx: int | None = None) -> Loaded:
        """The model ``name``, loaded now if needed and marked busy: call ``.release()`` when done.

        Blocking: run it in a thread. ``keep_alive`` (seconds, None = forever, 0 = unload after
        this request) applies from this request on, as in Ollama.
        """
        remote = self.manager.remotes.model(name)
        if remote is not None:  # NAME/MODEL: the remote engine loads and queues it itself
            return Loaded(remote, 0.0)
        t0, wall = time.perf_counter(), time.time()
        for _attempt in range(3):  # the model may be reaped between finding it and marking it busy
            with self._lock:
                preparing = self._preparing.setdefault(name, threading.Lock())
            with preparing:
                model = self._find(name, num_ctx)
                if model is None:
                    model = self._load(name, keep_alive, num_ctx)
                elif self._too_few_slots(model):
                    model = self._add_slots(model)
            try:
                using = self.manager.using(model.name)
                using.__enter__()
            except ModelNotFoundError:
                continue
            if keep_alive is not UNCHANGED:
                self.manager.set_keep_alive(model.name, keep_alive)
            return Loaded(model, time.perf_counter() - t0 if model.loaded_at >= wall else 0.0, using)
        raise HTTPProblem(503, f"{name} was unloaded while this request started; retry",
                          headers={"Retry-After": str(RETRY_AFTER_S)})

    def _find(self, name: str, num_ctx: int | None) -> Any:
        model = self._loaded(name)
        if model is not None and not model.runtime.alive:  # its worker died: load it afresh
            self.manager.ps()  # drops dead workers now (the keep_alive reaper would, a moment later)
            return None
        if model is not None and num_ctx is not None and _ctx_per_slot(model) != num_ctx:
            if model.active:
                raise HTTPProblem(409, f"{model.name} is busy with a context of {_ctx_per_slot(model)} "
                                  f"tokens per request; retry without num_ctx, or later to reload it with {num_ctx}",
                                  code="model_busy")
            return None  # reloaded with the new context
        return model

    def _load(self, name: str, keep_alive: Any, num_ctx: int | None) -> Any:
        record = self.manager.record(name)  # ModelNotFoundError (404) for unknown names
        trained = int((record.summary or {}).get("context_length") or DEFAULT_CTX_PER_SLOT)
        # keep_alive 0 is applied once the request holds the model, or the reaper would unload it first
        from .. import config
        from ..store.derive import num_ctx as model_ctx  # a derived model's PARAMETER num_ctx

        per_slot = num_ctx or model_ctx(record) or min(config.context_length() or DEFAULT_CTX_PER_SLOT, trained)
        # n_ctx, kv_type, flash_attn and keep_alive not given follow the environment (OLLAMA_*)
        keep = {} if keep_alive is UNCHANGED or keep_alive == 0 else {"keep_alive": keep_alive}
        options = LoadOptions(n_ctx=max(per_slot * self.parallel, 16), parallel=self.parallel, **keep)
        # an API client's load on demand: not the user's choice of options (they stay remembered)
        return self.manager.load(record.name, options, pull=False, remember=False)

    def _too_few_slots(self, model: Any) -> bool:
        """Whether ``model`` has fewer slots than the server decodes at once and may be reloaded now."""
        return (int(model.options.parallel) < self.parallel and not model.active
                and self._kept.get(model.name) != model.loaded_at)

    def _add_slots(self, model: Any) -> Any:
        """``model`` reloaded with the server's slots, its other options and context per request
        kept; as it was, with a notice saying why, if that does not fit or fails to load.

        Called only while no request uses the model: the manager's reload does not wait for
        requests, so one that starts in the instant between the check and the reload is cut off.
        """
        name, had, per_slot = model.name, int(model.options.parallel), _ctx_per_slot(model)
        base = self.manager.remembered_options(name) or model.requested or model.options
        options = base.with_(parallel=self.parallel, n_ctx=per_slot * self.parallel,
                             keep_alive=model.options.keep_alive)
        # remember=False: the API's need, not the user's choice; their options stay remembered
        try:
            new = self.manager.load(name, options, pull=False, remember=False)
        except ModelLoadError as exc:
            new = self.manager.load(name, model.options, pull=False, remember=False)
            new.notices.append(f"the API could not reload {name} with {self.parallel} slots ({exc}); it serves it "
                               f"with its {_slots(had)}: requests beyond them queue")
            self._kept[name] = new.loaded_at
            return new
        new.notices.append(f"reloaded {name} with {_slots(self.parallel)} (it had {_slots(had)}) so that the API "
                           f"decodes {self.parallel} requests at once; other options kept, {per_slot} tokens per "
                           f"request (n_ctx {per_slot * self.parallel})")
        return new

    def slots(self, model: Any) -> int:
        """How many of ``model``'s requests the API decodes at once: its slots, at most ``parallel``."""
        return min(self.parallel, int(model.options.parallel))

    def _take_slot(self, name: str, slots: int, cancelled: threading.Event) -> bool:
        """Wait for one of the server's ``slots`` for ``name`` (False if cancelled meanwhile)."""
        with self._slot_free:
            while self._running.get(name, 0) >= slots:
                if cancelled.is_set():
                    return False
                self._slot_free.wait(0.2)
            self._running[name] = self._running.get(name, 0) + 1
            return True

    def _give_slot(self, name: str) -> None:
        with self._slot_free:
            self._running[name] -= 1
            if not self._running[name]:
                del self._running[name]
            self._slot_free.notify_all()

    def _loaded(self, name: str) -> Any:
        try:
            return self.manager.get(name)
        except ModelNotFoundError:
            return None

    def unload(self, name: str) -> bool:
        """keep_alive 0 with no prompt: unload ``name`` now, or when its running requests end
        (never cutting them off). False if it was not loaded."""
        model = self._loaded(name)
        if model is None:
            self.manager.record(name)  # 404 for a name that does not exist at all
            return False
        self.manager.unload_when_idle(model.name)
        return True

    # -- admission and jobs --------------------------------------------------------------------

    def admit(self, loaded: Loaded) -> Callable[[], None]:
        """Take a place in the model's queue or raise 503; returns the function that gives it back."""
        name = loaded.name
        slots = self.slots(loaded.model)
        with self._lock:
            n = self._admitted.get(name, 0)
            if n >= slots + self.max_queue:
                self.metrics.rejected_busy(name)
                why = (f" ({name} was loaded with {_slots(slots)}; the API reloads it with {self.parallel} once no "
                       "request uses it)" if slots < self.parallel else "")
                queued = f"{self.max_queue} queued request{'s' if self.max_queue != 1 else ''}"
                raise HTTPProblem(
                    503, f"{name} is busy: {_slots(slots)} and {queued} are taken{why}; retry in a moment (or "
                    f"start the server with a larger --parallel or --max-queue)", code="model_busy",
                    headers={"Retry-After": str(RETRY_AFTER_S)})
            self._admitted[name] = n + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released = True
                    self._admitted[name] -= 1
                    if not self._admitted[name]:
                        del self._admitted[name]

        return release

    def waiting(self) -> dict[str, int]:
        """Admitted requests beyond each model's slots (they wait in the worker's queue)."""
        with self._lock:
            admitted = dict(self._admitted)
        out = {}
        for name, n in admitted.items():
            model = self._loaded(name)
            slots = self.slots(model) if model is not None else 0
            out[name] = max(0, n - slots)
        return out

    def in_flight(self) -> dict[str, int]:
        with self._lock:
            return dict(self._admitted)

    def start(self, loaded: Loaded, kind: str, payload: Any, sampling: Any, grammar: str | None,
              max_tokens_param: str = "max_tokens", *, tools: list[dict[str, Any]] | None = None,
              tool_choice: Any = None, extras: Any = None, think: Any = None) -> Job:
        """Admit (or 503) and start a generation; ``await job.prime()`` before answering, so
        that a request the worker refuses still gets its 4xx. The job releases ``loaded``.
        ``tools`` and ``tool_choice`` (chats only) go to the chat turn as :func:`~jupyter_llm.chat.start`
        takes them; the calls are in ``job.tool_calls`` when the Completion arrives. ``extras``
        (choices, logprobs) and ``think`` (chats) as the turn takes them (``server/choice_shapes.py``);
        ``kind`` "fim" fills the gap between ``payload``'s (prefix, suffix)."""
        try:
            check_max_tokens(sampling.max_tokens, loaded.n_ctx_per_slot, max_tokens_param)
            release = self.admit(loaded)
        except BaseException:
            loaded.release()
            raise
        job = Job(self, loaded, kind, payload, sampling, grammar, release)
        job.tools, job.tool_choice = tools, tool_choice
        job.extras, job.think = extras, think
        with self._lock:
            self._jobs.add(job)
        job.start()
        return job

    def embed(self, loaded: Loaded, texts: list[str], normalize: bool) -> tuple[list[list[float]], int]:
        """Pooled embeddings of ``texts`` and how many tokens they took; blocking; releases ``loaded``.

        Takes a place in the model's queue like a generation (503 when it is full), and refuses
        (400) a request holding more than ``config.embed_max_tokens()`` tokens before embedding
        anything: the worker's engine thread embeds, and chats to the model wait behind it.
        """
        try:
            release = self.admit(loaded)
            try:
                runtime = loaded.model.runtime
                n_tokens = _embed_tokens(runtime, texts)
                vectors = runtime.embed(texts, normalize=normalize) if texts else []
            finally:
                release()
        finally:
            loaded.release()
        self.metrics.generation(loaded.name, n_tokens, 0, None)
        return vectors, n_tokens

    def cancel_all(self) -> None:
        """Stop every running generation (the server is stopping)."""
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel()

    def _finished(self, job: Job) -> None:
        with self._lock:
            self._jobs.discard(job)


MAX_BYTES_PER_TOKEN = 16
"""No tokenizer averages more bytes per token over real text; a request with more bytes than
this times the token limit is refused without tokenizing it (an attacker's 8 MB are not read)."""


def _embed_tokens(runtime: Any, texts: list[str]) -> int:
    """The tokens ``texts`` take as the worker embeds them, or a 400 beyond the request limit."""
    from .. import config

    limit = config.embed_max_tokens()
    advice = (f"one request may embed at most {limit:,} tokens (JUPYTER_LLM_EMBED_MAX_TOKENS); send the texts in "
              "several requests")
    size = sum(len(t.encode("utf-8", "replace")) for t in texts)
    if size > limit * MAX_BYTES_PER_TOKEN:
        raise bad(f"'input' holds {size:,} bytes of text, far more than that: {advice}", "input")
    total = 0
    for text in texts:  # tokenized as the worker's embedder does: special tokens added, not parsed
        total += len(runtime.tokenize(text, add_special=True, parse_special=False)) or 1
        if total > limit:
            raise bad(f"'input' has more than {limit:,} tokens: {advice}", "input")
    return total


def _slots(n: int) -> str:
    return f"{n} slot" if n == 1 else f"{n} slots"


def _ctx_per_slot(model: Any) -> int:
    report = model.report
    n = getattr(report, "n_ctx_per_slot", None)
    return int(n) if n else int(model.options.n_ctx) // max(1, int(model.options.parallel))


_END = object()


class Job:
    """One generation: a pump thread reads the worker's stream; the event loop reads :meth:`events`."""

    def __init__(self, backend: Backend, loaded: Loaded, kind: str, payload: Any, sampling: Any,
                 grammar: str | None, release: Callable[[], None]) -> None:
        self.backend = backend
        self.loaded = loaded
        self.kind = kind
        self.payload = payload
        self.sampling = sampling
        self.grammar = grammar
        self._release = release
        self._handoff = Handoff(asyncio.get_running_loop())
        self._stream: Any = None
        self._cancelled = threading.Event()
        self._first: Any = None
        self.started = time.perf_counter()
        self.result: Any = None
        """The :class:`~jupyter_llm.runtime.Completion`, once the stream ended."""
        self.tools: list[dict[str, Any]] | None = None
        self.tool_choice: Any = None
        self.tool_calls: list[Any] = []
        self.extras: Any = None
        self.think: Any = None
        self.results: list[Any] = []
        """One Completion per choice (``extras.n``), once the stream ended."""
        """The chat turn's :class:`~jupyter_llm.tools.ToolCall` s, set before the Completion is handed on."""

    def start(self) -> None:
        threading.Thread(target=self._pump, name="jupyter_llm-http-job", daemon=True).start()

    def _put(self, item: Any) -> None:
        try:
            self._handoff.put(item)
        except RuntimeError:  # the event loop is gone (server stopped): nobody listens any more
            self.cancel()

    def _pump(self) -> None:
        try:
            model = self.loaded.model
            # a model with more slots than the server's: the server keeps its requests to `parallel`
            gated = int(model.options.parallel) > self.backend.parallel
            if gated and not self.backend._take_slot(self.loaded.name, self.backend.parallel, self._cancelled):
                raise bad("the generation was cancelled")
            try:
                self._run(model)
            finally:
                if gated:
                    self.backend._give_slot(self.loaded.name)
        except BaseException as exc:
            self._put(exc)
        finally:
            self._release()
            self.loaded.release()
            self.backend._finished(self)
            self._put(_END)

    def _run(self, model: Any) -> None:
        from .. import chat

        turn = None
        if self.kind == "chat":
            with_tools = {"tools": self.tools, "tool_choice": self.tool_choice} if self.tools else {}
            asks = {k: v for k, v in (("extras", self.extras), ("think", self.think)) if v is not None}
            turn = chat.start(model, self.payload, self.sampling, grammar=self.grammar, **with_tools, **asks)
            stream = turn.stream
        elif self.kind == "fim":
            stream = model.runtime.infill(*self.payload, self.sampling, grammar=self.grammar, extras=self.extras)
        else:
            asks = {"extras": self.extras} if self.extras is not None else {}
            stream = model.runtime.generate(self.payload, self.sampling, grammar=self.grammar, **asks)
        self._stream = stream
        if self._cancelled.is_set():
            stream.cancel()
        if turn is None or not turn.filters_calls:
            # A local stream's chunks go from the runtime's reader thread straight to the event
            # loop: no thread of ours wakes per token (each wake-up costs CPU the decode needs).
            stream.relay(self._put)
            if turn is not None:
                turn.finish()
        else:
            for chunk in turn if turn is not None else stream:  # a turn holds back tool-call markup
                self._put(chunk)
        result = stream.result
        if turn is not None:
            self.tool_calls = list(turn.tool_calls)
        self.result = result
        self.results = list(getattr(stream, "results", None) or [result])
        self.backend.metrics.generation(self.loaded.name, result.prompt_tokens, result.completion_tokens,
                                        result.ttft_s)
        self._put(result)

    def hand_over(self, handover: Any) -> bool:
        """After each piece of a Streamed answer: once the first chunk went (nothing received is
        unwritten then), the worker gets the client's socket to write the rest into (worker/direct.py),
        or (``handover.socket_fd()`` None) is told to send it all here. True once done."""
        stream = self._stream
        if self._first is not None or stream is None:
            return False
        try:
            stream.attach(handover.socket_fd(), lambda raw: self._put(Raw(raw)))
        except Exception:  # the worker is gone: the stream ends with its error
            pass
        return True

    async def prime(self) -> bool:
        """Wait for the first chunk (or the end); raise at once if the request failed."""
        first = await self._handoff.get()
        if isinstance(first, BaseException):
            raise first
        self._first = first
        return True

    async def events(self) -> AsyncIterator[Any]:
        """Chunks (``.text``, ``.n_tokens``) and finally the Completion; raises the worker's error."""
        try:
            if self._first is not None:
                item, self._first = self._first, None
                yield item
                if not hasattr(item, "n_tokens"):
                    return
            while True:
                item = await self._handoff.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                if not hasattr(item, "n_tokens") and not isinstance(item, Raw):  # the Completion is the last item
                    return
        finally:
            if self.result is None:
                self.cancel()

    async def texts(self) -> AsyncIterator[str]:
        """The first answer's text as it comes (non-empty pieces; the further choices' texts are
        in ``results``); once it ends ``result`` holds the Completion (None: cancelled)."""
        async for item in self.events():
            if hasattr(item, "n_tokens") and item.text and not getattr(item, "index", 0):
                yield item.text

    async def collect(self) -> tuple[str, Any]:
        """The whole text and the Completion."""
        parts = [text async for text in self.texts()]
        if self.result is None:
            raise bad("the generation was cancelled")
        return "".join(parts), self.result

    def cancel(self) -> None:
        """Stop the generation (the client went away); the worker frees the slot right after."""
        self._cancelled.set()
        stream = self._stream
        if stream is not None:
            stream.cancel()
