"""The model manager: the single owner of jupyter_llm's state in a kernel.

It owns the store, the loaded models (one worker process each), pulls in progress, chat
sessions and the event stream. Magics, widgets, the sidebar comm and the HTTP API are its
views and clients: they call its methods and subscribe to its events; none of them keeps state
of its own. All public methods are thread-safe (the HTTP API calls from its own thread).
"""

from __future__ import annotations

import builtins
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .chat import ChatSession
from .errors import ModelLoadError, ModelNotFoundError, WontFitError, WorkerCrashedError
from .options import AUTO, LoadOptions, SamplingOptions
from .progress import Listener, PullProgress
from .store import ModelRecord, Store

Event = dict[str, Any]
EventListener = Callable[[Event], None]

DEFAULT_MAX_LOADED = 3


@dataclass
class LoadedModel:
    """A model running in its own worker process."""

    name: str
    record: ModelRecord
    options: LoadOptions
    """The options actually used ("auto" resolved)."""
    estimate: Any
    runtime: Any
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    active: int = 0
    """Requests in flight; a model is never unloaded by keep_alive while one runs."""

    @property
    def report(self) -> Any:
        return self.runtime.report

    @property
    def expires_at(self) -> float | None:
        keep = self.options.keep_alive
        if keep is None or keep < 0:
            return None
        return self.last_used + keep

    def to_dict(self) -> dict[str, Any]:
        report = self.report
        return {
            "name": self.name,
            "size": self.record.size,
            "sha256": self.record.sha256,
            "options": self.options.to_dict(),
            "n_ctx": getattr(report, "n_ctx", None),
            "pid": self.runtime.pid,
            "loaded_at": self.loaded_at,
            "expires_at": self.expires_at,
            "active": self.active,
            "estimate": self.estimate.to_dict() if self.estimate is not None else None,
            "measured": _measured(report),
        }


def _measured(report: Any) -> dict[str, Any]:
    breakdown = getattr(report, "breakdown", None) or {}
    out = {}
    for device, sizes in breakdown.items():
        out[device] = sizes.to_dict() if hasattr(sizes, "to_dict") else dict(vars(sizes))
    return out


class ModelManager:
    """Owns models, workers, pulls, sessions and events for one kernel."""

    def __init__(self, store: Store | None = None, *, max_loaded: int = DEFAULT_MAX_LOADED) -> None:
        self.store = store or Store()
        self.max_loaded = max_loaded
        self._lock = threading.RLock()
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, threading.Event] = {}
        self._pulls: dict[str, PullProgress] = {}
        self._sessions: dict[str, ChatSession] = {}
        self._listeners: builtins.list[EventListener] = []
        self._reaper: threading.Thread | None = None
        self._closed = threading.Event()
        self.server: Any = None
        """The background HTTP API (jupyter_llm.server), when started; it is a client of this manager."""

    # -- events ------------------------------------------------------------------------------

    def subscribe(self, listener: EventListener) -> Callable[[], None]:
        """Call ``listener(event)`` for every state change; returns an unsubscribe function."""
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def _emit(self, kind: str, **data: Any) -> None:
        event = {"type": kind, "time": time.time(), **data}
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # a broken view must never break the model
                pass

    def snapshot(self) -> dict[str, Any]:
        """All state the views show, as plain JSON-able data (the sidebar's and widgets' model)."""
        from dataclasses import asdict

        with self._lock:
            loaded = [m.to_dict() for m in sorted(self._loaded.values(), key=lambda m: -m.last_used)]
            pulls = [vars(p) for p in self._pulls.values()]
        try:
            devices = [asdict(d) for d in self.devices()]
        except Exception as exc:  # a device query must never break the views
            devices = [{"error": str(exc)}]
        return {
            "models": [r.to_dict() for r in self.list()],
            "loaded": loaded,
            "pulls": pulls,
            "devices": devices,
            "server": self.server.status() if self.server is not None else None,
        }

    # -- the store ---------------------------------------------------------------------------

    def pull(self, reference: str, *, listeners: builtins.list[Listener] | tuple[Listener, ...] = (),
             update: bool = False) -> ModelRecord:
        """Fetch ``reference`` into the store (resumable, verified) and return its record."""
        from . import pulling

        def track(event: PullProgress) -> None:
            with self._lock:
                if event.status in ("success", "error"):
                    self._pulls.pop(event.name, None)
                else:
                    self._pulls[event.name] = event
            self._emit("pull", progress=vars(event))

        record = pulling.pull(reference, store=self.store, listeners=[track, *listeners], update=update)
        self._emit("models")
        return record

    def pulls(self) -> builtins.list[PullProgress]:
        with self._lock:
            return list(self._pulls.values())

    def list(self) -> builtins.list[ModelRecord]:
        """Every model in the store (and in a local Ollama store)."""
        return self.store.list()

    def record(self, name: str) -> ModelRecord:
        """The store record for ``name``; a loaded model's own name works too."""
        with self._lock:
            if name in self._loaded:
                return self._loaded[name].record
        return self.store.require(name)

    def show(self, name: str) -> dict[str, Any]:
        """Everything known about a stored model: record, header facts, bytes per layer."""
        from .gguf_scan import scan_cached

        record = self.record(name)
        return {"record": record, "info": scan_cached(record.path)}

    def remove(self, name: str) -> builtins.list[str]:
        """Remove ``name`` from the store (unloading it first); returns deleted paths."""
        record = self.store.require(name)
        if record.name in self._loaded:
            self.unload(record.name)
        deleted = self.store.remove(record.name)
        self._emit("models")
        return deleted

    def copy(self, source: str, destination: str) -> ModelRecord:
        record = self.store.copy(source, destination)
        self._emit("models")
        return record

    # -- devices and estimates ---------------------------------------------------------------

    def devices(self, *, include_llama: bool = False) -> builtins.list[Any]:
        """GPUs (NVML) and host RAM; ``include_llama`` also asks llama.cpp (in a subprocess, ~1 s)
        which backend serves each device."""
        from .devices import list_devices

        return list_devices(include_llama=include_llama)

    def resolve_options(self, name: str, options: LoadOptions | None = None, **overrides: Any
                        ) -> tuple[ModelRecord, Any, LoadOptions]:
        """Record, header info and the options with "auto" resolved against free memory now."""
        from .estimate import fit
        from .gguf_scan import scan_cached

        record = self.record(name)
        options = (options or LoadOptions()).with_(**overrides) if overrides else (options or LoadOptions())
        info = scan_cached(record.path)
        if options.gpu_layers == AUTO or options.n_ctx == AUTO:
            options = fit(info, options, self._devices_for_estimate())
        return record, info, options

    def _devices_for_estimate(self) -> builtins.list[Any]:
        """Free memory as the estimate should see it: what our own loaded workers use is
        already gone from MemAvailable, which is right — they stay loaded."""
        return self.devices()

    def estimate(self, name: str, options: LoadOptions | None = None, **overrides: Any) -> Any:
        """What loading ``name`` with ``options`` would take on each device."""
        from .estimate import estimate

        _, info, options = self.resolve_options(name, options, **overrides)
        return estimate(info, options, self._devices_for_estimate())

    # -- loading -----------------------------------------------------------------------------

    def load(self, name: str, options: LoadOptions | None = None, *, force: bool = False,
             pull: bool = True, listeners: builtins.list[Listener] | tuple[Listener, ...] = (),
             **overrides: Any) -> LoadedModel:
        """Load ``name`` into its own worker process (pulling it first if needed).

        Refuses with WontFitError when the estimate says it will not fit, unless ``force``.
        Loading a model that is already loaded with the same options returns it.
        """
        from .estimate import estimate as estimate_memory
        from .runtime import Runtime

        if pull and self.store.get(name) is None and not self._is_loaded(name):
            record = self.pull(name, listeners=listeners)
            name = record.name
        record, info, resolved = self.resolve_options(name, options, **overrides)
        name = record.name
        while True:
            with self._lock:
                current = self._loaded.get(name)
                if current is not None and current.runtime.alive and _same_load(current.options, resolved):
                    current.last_used = time.time()
                    current.options = current.options.with_(keep_alive=resolved.keep_alive)
                    return current
                pending = self._loading.get(name)
                if pending is None:
                    done = threading.Event()
                    self._loading[name] = done
                    break
            pending.wait()  # another thread is loading this model: use its result
        try:
            if current is not None:
                self.unload(name)
            estimate = estimate_memory(info, resolved, self._devices_for_estimate())
            if not estimate.fits and not force:
                raise WontFitError(
                    f"{name} will not fit: {estimate.suggestion()} — or pass --force to try anyway",
                    estimate,
                )
            self._make_room(exclude=name)
            self._emit("loading", name=name, options=resolved.to_dict())
            try:
                runtime = Runtime.start(record.path, resolved, name=name)
            except (ModelLoadError, WorkerCrashedError) as exc:
                self._emit("load_failed", name=name, error=str(exc))
                raise
            model = LoadedModel(name=name, record=record, options=resolved, estimate=estimate, runtime=runtime)
            with self._lock:
                self._loaded[name] = model
            self._ensure_reaper()
            self._emit("loaded", model=model.to_dict())
            return model
        finally:
            with self._lock:
                self._loading.pop(name, None)
            done.set()

    def _is_loaded(self, name: str) -> bool:
        with self._lock:
            return name in self._loaded

    def _make_room(self, *, exclude: str) -> None:
        """Evict the least recently used idle models beyond ``max_loaded``."""
        while True:
            with self._lock:
                others = [m for n, m in self._loaded.items() if n != exclude]
                if len(others) < self.max_loaded:
                    return
                idle = sorted((m for m in others if m.active == 0), key=lambda m: m.last_used)
                if not idle:
                    return  # everything is busy: allow one more rather than kill a generation
                victim = idle[0].name
            self.unload(victim, reason="evicted (least recently used)")

    def get(self, name: str | None = None) -> LoadedModel:
        """A loaded model by name (None: the only/most recently used one)."""
        with self._lock:
            if name is None:
                if not self._loaded:
                    raise ModelNotFoundError("no model is loaded; `%llm load smollm2` loads the default model")
                return max(self._loaded.values(), key=lambda m: m.last_used)
            model = self._loaded.get(name)
            if model is None:
                record = self.store.get(name)
                if record is not None:
                    model = self._loaded.get(record.name)
            if model is None:
                raise ModelNotFoundError(
                    f"{name!r} is not loaded; `%llm load {name}` loads it, `%llm ps` lists loaded models")
            return model

    def ps(self) -> builtins.list[LoadedModel]:
        """Loaded models, most recently used first; dead workers are dropped."""
        self._reap_dead()
        with self._lock:
            return sorted(self._loaded.values(), key=lambda m: -m.last_used)

    def unload(self, name: str | None = None, *, all: bool = False, reason: str = "unloaded") -> builtins.list[str]:
        """Stop the worker(s); their memory is returned to the system. Returns names unloaded."""
        with self._lock:
            victims = list(self._loaded.values()) if all else [self.get(name)]
            for model in victims:
                self._loaded.pop(model.name, None)
        for model in victims:
            model.runtime.close()
            self._emit("unloaded", name=model.name, reason=reason)
        return [m.name for m in victims]

    # -- using a model -----------------------------------------------------------------------

    def using(self, name: str | None) -> _Using:
        """Context manager marking a model busy (keep_alive starts counting after it exits)."""
        return _Using(self, self.get(name))

    # -- added for the HTTP API (jupyter_llm.server) -----------------------------------------
    def set_keep_alive(self, name: str, keep_alive: float | None) -> LoadedModel:
        """Change how long a loaded model stays after its last use (Ollama's per-request
        keep_alive): seconds, None = forever, 0 = unload as soon as it is idle (call it while
        the model is marked busy with :meth:`using`, or the keep_alive reaper may be first)."""
        with self._lock:
            model = self.get(name)
            model.options = model.options.with_(keep_alive=keep_alive)
            model.last_used = time.time()
        self._emit("keep_alive", name=model.name, keep_alive=keep_alive)
        return model

    def unload_when_idle(self, name: str) -> None:
        """Unload ``name`` now if no request uses it, else as soon as the last one ends
        (Ollama's keep_alive 0: running generations are never cut off)."""
        with self._lock:
            model = self.get(name)
            busy = model.active > 0
            if busy:
                self.set_keep_alive(model.name, 0)
        if not busy:
            self.unload(model.name, reason="keep_alive 0")
    # -- end of the HTTP API's additions ------------------------------------------------------

    def session(self, name: str = "default") -> ChatSession:
        with self._lock:
            if name not in self._sessions:
                self._sessions[name] = ChatSession(name)
            return self._sessions[name]

    def sessions(self) -> dict[str, ChatSession]:
        with self._lock:
            return dict(self._sessions)

    def stream_chat(self, name: str | None, messages: builtins.list[dict[str, str]],
                    sampling: SamplingOptions | None = None, **kwargs: Any) -> Iterator[Any]:
        """Yield chunks of a chat completion; the stream's ``.result`` has the statistics."""
        with self.using(name) as model:
            stream = model.runtime.chat(messages, sampling or SamplingOptions(), **kwargs)
            yield from stream
            return stream.result

    # -- keep_alive --------------------------------------------------------------------------

    def _ensure_reaper(self) -> None:
        with self._lock:
            if self._reaper is not None and self._reaper.is_alive():
                return
            self._reaper = threading.Thread(target=self._reap_loop, name="jupyter_llm-keepalive", daemon=True)
            self._reaper.start()

    def _reap_loop(self) -> None:
        while not self._closed.wait(0.25):
            self.reap()
            with self._lock:
                if not self._loaded:
                    self._reaper = None
                    return

    def reap(self, now: float | None = None) -> builtins.list[str]:
        """Unload models whose keep_alive has expired and drop dead workers."""
        now = time.time() if now is None else now
        self._reap_dead()
        with self._lock:
            expired = [m.name for m in self._loaded.values()
                       if m.active == 0 and m.expires_at is not None and m.expires_at <= now]
        for name in expired:
            try:
                self.unload(name, reason="keep_alive expired")
            except ModelNotFoundError:
                pass
        return expired

    def _reap_dead(self) -> None:
        with self._lock:
            dead = [m for m in self._loaded.values() if not m.runtime.alive]
            for model in dead:
                self._loaded.pop(model.name, None)
        for model in dead:
            model.runtime.close()
            self._emit("unloaded", name=model.name, reason="worker died")

    def close(self) -> None:
        """Unload everything (the extension is being unloaded or the kernel shuts down)."""
        self._closed.set()
        if self.server is not None:  # the HTTP API is a client of this manager: it goes first
            self.server.stop()
            self.server = None
        self.unload(all=True, reason="shutdown")


class _Using:
    def __init__(self, manager: ModelManager, model: LoadedModel) -> None:
        self.manager = manager
        self.model = model

    def __enter__(self) -> LoadedModel:
        with self.manager._lock:
            self.model.active += 1
            self.model.last_used = time.time()
        return self.model

    def __exit__(self, *exc: object) -> None:
        with self.manager._lock:
            self.model.active -= 1
            self.model.last_used = time.time()
        self.manager._emit("used", name=self.model.name)
        if self.model.options.keep_alive == 0:
            self.manager.reap()


def _same_load(a: LoadOptions, b: LoadOptions) -> bool:
    """Same worker configuration; keep_alive is not part of it (it only changes expiry)."""
    return a.with_(keep_alive=None) == b.with_(keep_alive=None)


_manager: ModelManager | None = None
_manager_lock = threading.Lock()


def get_manager() -> ModelManager:
    """The kernel's one manager (created on first use)."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = ModelManager()
        return _manager

