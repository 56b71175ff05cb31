"""The HTTP API's side of the model manager: find or load a model, admit a request, run it.

The server owns no models: it asks the kernel's :class:`~jupyter_llm.manager.ModelManager`.
A model that is not loaded is loaded on demand with the server's ``parallel`` slots and
Ollama's keep_alive; one that the notebook loaded is used as it is.

Each generation is a :class:`Job`. Its worker stream is read in a pump thread (iterating a
stream blocks) which hands chunks to the event loop through an asyncio queue; while it runs,
the model is marked busy (so keep_alive never unloads it mid-answer) and it holds a place in
the model's bounded queue: ``slots + max_queue`` requests per model are admitted, the next
gets 503 with Retry-After. :meth:`Job.cancel` (a client that went away) stops the generation
in the worker, which frees its slot at the next decode step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ModelNotFoundError
from ..options import DEFAULT_CTX_PER_SLOT, DEFAULT_KEEP_ALIVE, LoadOptions
from .metrics import Metrics
from .params import HTTPProblem, bad, check_max_tokens

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
        self._admitted: dict[str, int] = {}
        self._jobs: set[Job] = set()

    # -- models ------------------------------------------------------------------------------

    def ensure(self, name: str, *, keep_alive: Any = UNCHANGED, num_ctx: int | None = None) -> Loaded:
        """The model ``name``, loaded now if needed and marked busy: call ``.release()`` when done.

        Blocking: run it in a thread. ``keep_alive`` (seconds, None = forever, 0 = unload after
        this request) applies from this request on, as in Ollama.
        """
        t0, wall = time.perf_counter(), time.time()
        for _attempt in range(3):  # the model may be reaped between finding it and marking it busy
            model = self._find(name, num_ctx)
            if model is None:
                model = self._load(name, keep_alive, num_ctx)
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
        per_slot = num_ctx or min(DEFAULT_CTX_PER_SLOT, trained)
        # keep_alive 0 is applied once the request holds the model, or the reaper would unload it first
        keep = DEFAULT_KEEP_ALIVE if keep_alive is UNCHANGED or keep_alive == 0 else keep_alive
        options = LoadOptions(n_ctx=max(per_slot * self.parallel, 16), parallel=self.parallel, keep_alive=keep)
        return self.manager.load(record.name, options, pull=False)

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
        slots = int(loaded.model.options.parallel)
        with self._lock:
            n = self._admitted.get(name, 0)
            if n >= slots + self.max_queue:
                self.metrics.rejected_busy(name)
                raise HTTPProblem(
                    503, f"{name} is busy: {slots} slots and {self.max_queue} queued requests are taken; retry "
                    f"in a moment (or start the server with a larger --parallel)", code="model_busy",
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
            slots = int(model.options.parallel) if model is not None else 0
            out[name] = max(0, n - slots)
        return out

    def in_flight(self) -> dict[str, int]:
        with self._lock:
            return dict(self._admitted)

    def start(self, loaded: Loaded, kind: str, payload: Any, sampling: Any, grammar: str | None,
              max_tokens_param: str = "max_tokens") -> Job:
        """Admit (or 503) and start a generation; ``await job.prime()`` before answering, so
        that a request the worker refuses still gets its 4xx. The job releases ``loaded``."""
        try:
            check_max_tokens(sampling.max_tokens, loaded.n_ctx_per_slot, max_tokens_param)
            release = self.admit(loaded)
        except BaseException:
            loaded.release()
            raise
        job = Job(self, loaded, kind, payload, sampling, grammar, release)
        with self._lock:
            self._jobs.add(job)
        job.start()
        return job

    def embed(self, loaded: Loaded, texts: list[str], normalize: bool) -> tuple[list[list[float]], int]:
        """Pooled embeddings of ``texts`` and how many tokens they took; blocking; releases ``loaded``."""
        try:
            runtime = loaded.model.runtime
            vectors = runtime.embed(texts, normalize=normalize) if texts else []
            n_tokens = sum(runtime.count_tokens(t) for t in texts)
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
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._stream: Any = None
        self._cancelled = threading.Event()
        self._first: Any = None
        self.started = time.perf_counter()
        self.result: Any = None
        """The :class:`~jupyter_llm.runtime.Completion`, once the stream ended."""

    def start(self) -> None:
        threading.Thread(target=self._pump, name="jupyter_llm-http-job", daemon=True).start()

    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server stopped): nobody listens any more
            self.cancel()

    def _pump(self) -> None:
        try:
            from .. import chat

            model = self.loaded.model
            if self.kind == "chat":
                stream = chat.start(model, self.payload, self.sampling, grammar=self.grammar).stream
            else:
                stream = model.runtime.generate(self.payload, self.sampling, grammar=self.grammar)
            self._stream = stream
            if self._cancelled.is_set():
                stream.cancel()
            for chunk in stream:
                self._put(chunk)
            result = stream.result
            self.result = result
            self.backend.metrics.generation(self.loaded.name, result.prompt_tokens, result.completion_tokens,
                                            result.ttft_s)
            self._put(result)
        except BaseException as exc:
            self._put(exc)
        finally:
            self._release()
            self.loaded.release()
            self.backend._finished(self)
            self._put(_END)

    async def prime(self) -> bool:
        """Wait for the first chunk (or the end); raise at once if the request failed."""
        first = await self._queue.get()
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
                item = await self._queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                if not hasattr(item, "n_tokens"):  # the Completion is the last item
                    return
        finally:
            if self.result is None:
                self.cancel()

    async def collect(self) -> tuple[str, Any]:
        """The whole text and the Completion."""
        parts = []
        result = None
        async for item in self.events():
            if hasattr(item, "n_tokens"):
                parts.append(item.text)
            else:
                result = item
        if result is None:
            raise bad("the generation was cancelled")
        return "".join(parts), result

    def cancel(self) -> None:
        """Stop the generation (the client went away); the worker frees the slot right after."""
        self._cancelled.set()
        stream = self._stream
        if stream is not None:
            stream.cancel()
