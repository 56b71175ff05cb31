"""The model manager: the single owner of jupyter_llm's state in a kernel.

It owns the store, the loaded models (one worker process each), pulls in progress, chat
sessions and the event stream. Magics, widgets, the sidebar comm and the HTTP API are its
views and clients: they call its methods and subscribe to its events; none of them keeps state
of its own. All public methods are thread-safe (the HTTP API calls from its own thread).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from . import config
from .chat import ChatSession
from .errors import ModelLoadError, ModelNotFoundError, WorkerCrashedError
from .loaded import LoadedModel, Use, describe, same_load
from .loading import GpuCheck, RememberedOptions, record_or_path
from .memory.rpc import loaded_rpc_devices as _rpc_devices
from .options import LoadOptions, SamplingOptions
from .progress import Listener, PullProgress
from .remote import Remotes
from .store.records import ModelRecord, Store

if TYPE_CHECKING:
    from .eviction import Eviction
    from .memory.devices import Device
    from .memory.estimate import MemoryEstimate
    from .runtime import Completion
    from .runtime.stream import Chunk
    from .server.runner import Server

log = logging.getLogger("jupyter_llm")

Event = dict[str, Any]
EventListener = Callable[[Event], None]

_DEVICE_TTL = 1.0
"""Seconds a device reading is reused for estimates (see ModelManager._devices_for_estimate)."""


class ModelManager:
    """Owns models, workers, pulls, sessions and events for one kernel."""

    def __init__(self, store: Store | None = None, *, max_loaded: int | None = None) -> None:
        self.store = store or Store()
        self.max_loaded = max_loaded
        """Models kept loaded at most; None: ``config.max_loaded()`` (unset: memory alone decides)."""
        self._remembered = RememberedOptions()
        self._gpu_check = GpuCheck()
        self._lock = threading.RLock()
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, threading.Event] = {}
        self._pulls: dict[str, PullProgress] = {}
        self._sessions: dict[str, ChatSession] = {}
        self._listeners: list[EventListener] = []
        self._broken: set[int] = set()
        self._reaper: threading.Thread | None = None
        self._closed = threading.Event()
        self._models_cache: list[dict[str, Any]] | None = None
        self._devices_cache: tuple[float, list[Device]] = (0.0, [])
        self.remotes = Remotes(lambda: self.store.root.parent, self._emit)
        self.server: Server | None = None
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
            if kind != "pull":  # state changed: what the views read is read again
                self._models_cache = None
                self._devices_cache = (0.0, [])
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # a broken view must never break the model; it is said once
                if id(listener) not in self._broken:
                    self._broken.add(id(listener))
                    log.exception("a jupyter_llm view failed on a %r event (further failures not logged)", kind)

    def snapshot(self) -> dict[str, Any]:
        """All state the views show, as plain JSON-able data (the sidebar's and widgets' model)."""
        with self._lock:  # with the rpc-servers' devices of loaded models (memory as reported at load)
            reports = [m.report for m in self._loaded.values() if m.options.rpc]
        try:
            found = self.devices() + _rpc_devices(reports)
            devices: list[dict[str, Any]] = [d.to_dict() for d in found]
        except Exception as exc:  # a device query must never break the views
            found, devices = [], [{"error": str(exc)}]
        with self._lock:
            loaded = [m.to_dict(found) for m in sorted(self._loaded.values(), key=lambda m: -m.last_used)]
            pulls = [vars(p) for p in self._pulls.values()]
            models = self._models_cache
        if models is None:  # the store is read again only after an event
            models = [r.to_dict() for r in self.models()]
            with self._lock:
                self._models_cache = models
        return {
            "models": list(models),
            "loaded": loaded,
            "pulls": pulls,
            "devices": devices,
            "server": self.server.status() if self.server is not None else None,
            "remotes": self.remotes.snapshot(),
        }

    # -- the store ---------------------------------------------------------------------------

    def pull(self, reference: str, *, listeners: list[Listener] | tuple[Listener, ...] = (),
             update: bool = False) -> ModelRecord:
        """Fetch ``reference`` into the store (resumable, verified) and return its record."""
        from .store import pull as pulling

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

    def pulls(self) -> list[PullProgress]:
        with self._lock:
            return list(self._pulls.values())

    def models(self) -> list[ModelRecord]:
        """Every model in the store (and in a local Ollama store)."""
        return self.store.records()

    def record(self, name: str) -> ModelRecord:
        """The store record for ``name``; a loaded model's own name works too."""
        with self._lock:
            if name in self._loaded:
                return self._loaded[name].record
        return self.store.require(name)

    def show(self, name: str) -> dict[str, Any]:
        """Everything known about a stored model (or a GGUF path): record, header facts, bytes per layer."""
        from .store.gguf import scan_cached

        record = record_or_path(name, self.record)
        return {"record": record, "info": scan_cached(record.path)}

    def remove(self, name: str) -> list[str]:
        """Remove ``name`` from the store (unloading it first); returns deleted paths."""
        record = self.store.require(name)
        if record.name in self._loaded:
            self.unload(record.name)
        deleted = self.store.remove(record.name)
        self._remembered.forget(record.name)
        self._emit("models")
        return deleted

    def copy(self, source: str, destination: str, *, force: bool = False) -> ModelRecord:
        """A second name for the same files; ``force`` lets the name shadow an alias on purpose."""
        record = self.store.copy(source, destination, force=force)
        self._emit("models")
        return record

    # -- devices and estimates ---------------------------------------------------------------

    def devices(self, *, include_llama: bool = False) -> list[Device]:
        """GPUs (NVML) and host RAM; ``include_llama`` also asks llama.cpp (in a subprocess, ~1 s)
        which backend serves each device."""
        from .memory.devices import list_devices

        return list_devices(include_llama=include_llama)

    def remembered_options(self, name: str) -> LoadOptions | None:
        """The options of ``name``'s last explicit load, which a load by name alone uses; or None."""
        record = self.store.get(name)
        return self._remembered.get(name) or (self._remembered.get(record.name) if record else None)

    def _gpus_checked(self, devices: list[Device], options: LoadOptions) -> list[Device]:
        return self._gpu_check.devices(devices, options, lambda: self.devices(include_llama=True))

    def _devices_for_estimate(self) -> list[Device]:
        """Free memory as the estimate should see it: what our own loaded workers use is
        already gone from MemAvailable, which is right — they stay loaded. A reading is reused
        for a second (NVML and /proc cost milliseconds: the picker re-prices on every slider
        step), and read again after any load or unload."""
        with self._lock:
            at, devices = self._devices_cache
        if devices and time.monotonic() - at < _DEVICE_TTL:
            return devices
        devices = self.devices()
        with self._lock:
            self._devices_cache = (time.monotonic(), devices)
        return devices

    def estimate(self, name: str, options: LoadOptions | None = None, *, remote: bool | str = True,
                 **overrides: Any) -> MemoryEstimate:
        """What loading ``name`` (or a GGUF path) with ``options`` would take on each device; without options,
        what loading it by name would use (see :meth:`load`); not pulled: its remote header's (:mod:`.store.peek`)."""
        from .memory.estimate import estimate
        from .store.peek import headers

        name, infos, notes = headers(name, lambda n: record_or_path(n, self.record), self.store, remote=remote)
        requested, _ = self._remembered.choose(name, options, overrides)
        return estimate(infos, requested, self._gpus_checked(self._devices_for_estimate(), requested), notes=notes)

    # -- loading -----------------------------------------------------------------------------

    def load(self, name: str, options: LoadOptions | None = None, *, force: bool = False,
             pull: bool = True, listeners: list[Listener] | tuple[Listener, ...] = (),
             remember: bool = True, **overrides: Any) -> LoadedModel:
        """Load ``name`` into its own worker process (pulling it first if needed).

        Without ``options``: those of ``name``'s last explicit load (a reload after keep_alive,
        an unload or by ``%%chat`` keeps what the user chose); given ones replace them, unless
        ``remember=False`` (an API client's on-demand load). Idle models in the way are evicted
        (:mod:`jupyter_llm.eviction`); WontFitError if it still will not fit, unless ``force``.
        Already loaded alike: returned. ``model.notices`` say what else it did, for the caller.
        """
        from .eviction import plan, refusal
        from .loading import resolve
        from .memory.estimate import estimate as estimate_memory
        from .runtime.repack import start_worker
        from .store.gguf import scan_cached

        if pull and self.store.get(name) is None and not self._is_loaded(name):
            name = self.pull(name, listeners=listeners).name
        record = self.record(name)
        name = record.name
        requested, reused = self._remembered.choose(name, options, overrides, record)
        # remembered once loaded: a refused or failed load must not spoil the next reload
        remembered = self._remembered if remember and not reused else None
        info = scan_cached(record.path)
        devices = self._devices_for_estimate()
        resolved, notes = resolve(info, requested, devices, self._gpus_checked(devices, requested))
        while True:
            with self._lock:
                current = self._loaded.get(name)
                if current is not None and current.runtime.alive and (
                        same_load(current.options, resolved)
                        or (current.requested is not None and same_load(current.requested, requested))):
                    current.last_used = time.time()
                    if remember:
                        current.chosen_at = current.last_used
                    current.options = current.options.with_(keep_alive=requested.keep_alive)
                    if remembered is not None:
                        remembered.remember(name, requested)
                    return current
                pending = self._loading.get(name)
                if pending is None:
                    done = threading.Event()
                    self._loading[name] = done
                    break
            pending.wait()  # another thread is loading this model: use its result
        try:
            if current is not None:
                self.unload(name, reason="reloaded with other options")
            with self._lock:
                others = [m for n, m in self._loaded.items() if n != name]
            cap = self.max_loaded if self.max_loaded is not None else config.max_loaded()
            evictions, estimate = plan(lambda devices: estimate_memory(info, resolved, devices),
                                       self._devices_for_estimate(), others, cap)
            if not estimate.fits and not force:
                raise refusal(name, estimate, others)
            evicted = [e for e in evictions if self._evict(e, name)]
            notes += [e.notice for e in evicted]
            if reused:
                notes.insert(0, f"reloaded {name} with the options of its last load: {describe(resolved)}")
            self._emit("loading", name=name, options=resolved.to_dict())
            try:
                runtime, repack = start_worker(info, record, resolved, name=name, notes=notes, on_probe=lambda text:
                                               self._emit("loading", name=name, status=text))
            except (ModelLoadError, WorkerCrashedError) as exc:
                self._emit("load_failed", name=name, error=str(exc))
                raise
            model = LoadedModel(name=name, record=record, options=resolved, estimate=estimate, runtime=runtime,
                                requested=requested, notices=notes, repack=repack)
            if not remember:  # loaded for an API client, not chosen by the user
                model.chosen_at = 0.0
            with self._lock:
                self._loaded[name] = model
            if remembered is not None:
                remembered.remember(name, requested)
            self._ensure_reaper()
            self._emit("loaded", model=model.to_dict(), reload=reused, notices=list(notes),
                       evicted=[{"name": e.model.name, "freed": e.freed} for e in evicted])
            return model
        finally:
            with self._lock:
                self._loading.pop(name, None)
            done.set()

    def is_loaded(self, name: str) -> bool:
        """Whether ``name`` (or the model a store name points to) is loaded now."""
        try:
            self.get(name)
            return True
        except ModelNotFoundError:
            return False

    def _is_loaded(self, name: str) -> bool:
        with self._lock:
            return name in self._loaded

    def _evict(self, eviction: Eviction, name: str) -> bool:
        """Unload an eviction's model unless a request started using it meanwhile."""
        model = eviction.model
        with self._lock:
            if self._loaded.get(model.name) is not model or model.active:
                return False
            del self._loaded[model.name]
        model.runtime.close()
        self._emit("unloaded", name=model.name, reason=eviction.reason(name), freed=eviction.freed,
                   evicted_for=name)
        return True

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

    def ps(self) -> list[LoadedModel]:
        """Loaded models, most recently used first; dead workers are dropped."""
        self._reap_dead()
        with self._lock:
            return sorted(self._loaded.values(), key=lambda m: -m.last_used)

    def unload(self, name: str | None = None, *, all: bool = False, reason: str = "unloaded") -> list[str]:
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

    def using(self, name: str | None) -> Use:
        """Context manager marking a model busy (keep_alive starts counting after it exits)."""
        return Use(self._lock, self.get(name), self._used)

    def _used(self, model: LoadedModel) -> None:
        self._emit("used", name=model.name)
        if model.options.keep_alive == 0:
            self.reap()

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

    # -- chat --------------------------------------------------------------------------------

    def session(self, name: str = "default") -> ChatSession:
        with self._lock:
            if name not in self._sessions:
                self._sessions[name] = ChatSession(name)
            return self._sessions[name]

    def sessions(self) -> dict[str, ChatSession]:
        with self._lock:
            return dict(self._sessions)

    def stream_chat(self, name: str | None, messages: list[dict[str, str]],
                    sampling: SamplingOptions | None = None, **kwargs: Any) -> Generator[Chunk, None, Completion]:
        """Yield chunks of a chat completion (one :func:`jupyter_llm.chat.start` turn); returns
        the Completion with the statistics."""
        from . import chat

        with self.using(name) as model:
            turn = chat.start(model, messages, sampling or SamplingOptions(), **kwargs)
            yield from turn
            return turn.stream.result

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

    def reap(self, now: float | None = None) -> list[str]:
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

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called: a closed manager loads nothing more."""
        return self._closed.is_set()

    def close(self) -> None:
        """Unload everything (the extension is being unloaded or the kernel shuts down)."""
        self._closed.set()
        if self.server is not None:  # the HTTP API is a client of this manager: it goes first
            self.server.stop()
            self.server = None
        self.unload(all=True, reason="shutdown")


_manager: ModelManager | None = None
_manager_lock = threading.Lock()


def get_manager() -> ModelManager:
    """The kernel's one manager (created on first use, and anew after :func:`close_manager`)."""
    global _manager
    with _manager_lock:
        if _manager is None or _manager.closed:
            _manager = ModelManager()
        return _manager


def close_manager() -> None:
    """Close the kernel's manager (``%unload_ext``): its workers stop and its keep_alive
    thread ends. The next :func:`get_manager` (``%load_ext`` again) makes a working one."""
    global _manager
    with _manager_lock:
        current, _manager = _manager, None
    if current is not None:
        current.close()

