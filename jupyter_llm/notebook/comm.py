"""The kernel side of the sidebar's comm (target ``jupyter_llm``): a view and client of the manager.

One :class:`CommHub` per kernel subscribes to the manager's events and pushes the manager's
``snapshot()`` to every open comm, coalesced: at most one push per ``interval`` (a pull emits
hundreds of progress events a second; the panel gets a few), plus a periodic push every
``refresh`` seconds so device memory stays current while nothing else happens. The panel's
requests (pull, load, unload, estimate, serve, stop) run in background threads, so the shell
stays free, and each gets exactly one reply with the result or the error.

Messages (labextension/src/protocol.ts is the other half):

- kernel → panel: ``hello`` (state, aliases, version), ``state``, ``reply``, ``event``;
- panel → kernel: the comm_open data ``{"kind": "hello", "refresh": s}``, then ``request``.

The kernel opens a comm itself when the extension loads (:func:`open_from_kernel`), because a
panel that retried its own open on every kernel "idle" would loop forever (docs/notes.md §7); the panel
still opens one after a page reload, a notebook switch or a kernel restart.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..options import LoadOptions

TARGET = "jupyter_llm"
PROTOCOL = 1
DEFAULT_INTERVAL = 0.25
"""Seconds between two pushes at most: a few per second, however many events arrive."""
DEFAULT_REFRESH = 0.0
"""Seconds between pushes while nothing happens (device memory moves on its own); 0: events only.
Panels ask for their own rate (the setting "refreshRate", 2 s by default) when they attach, so a
kernel nobody watches (a headless run) does no periodic work at all."""
MAX_VIEWS = 16
"""Comms kept per kernel: a reloaded page never closes its old comm, so the oldest are dropped."""

_NOTICES = ("load_failed", "unloaded", "loading", "loaded")
_LOAD_KEYS = {f.name for f in dataclasses.fields(LoadOptions)}


class CommHub:
    """Fans the manager's state out to open comms, batched, and answers their requests."""

    def __init__(self, manager: Any, *, interval: float = DEFAULT_INTERVAL,
                 refresh: float = DEFAULT_REFRESH) -> None:
        self.manager = manager
        self.interval = interval
        self.refresh = refresh
        self._views: list[CommView] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._aliases: list[dict[str, str]] | None = None
        self.pushes = 0
        """State messages sent so far (each to every view); for tests and diagnostics."""

    # -- views -----------------------------------------------------------------------------

    def attach(self, comm: Any, hello: dict[str, Any] | None = None) -> CommView:
        """Serve ``comm``: answer its requests and push state to it, starting with a hello."""
        view = CommView(self, comm)
        dropped: list[CommView] = []
        with self._lock:
            self._views.append(view)
            while len(self._views) > MAX_VIEWS:
                dropped.append(self._views.pop(0))
            if self._unsubscribe is None:
                self._unsubscribe = self.manager.subscribe(self._on_event)
        for old in dropped:
            old.close()
        if hello and isinstance(hello.get("refresh"), (int, float)):
            self.refresh = max(0.0, float(hello["refresh"]))
        view.send(self._hello())
        self._ensure_thread()
        return view

    def detach(self, view: CommView) -> None:
        with self._lock:
            if view in self._views:
                self._views.remove(view)
            last = not self._views
            unsubscribe = self._unsubscribe if last else None
            if last:
                self._unsubscribe = None
        if unsubscribe is not None:
            unsubscribe()  # nobody is watching: stop listening and let the thread end
            self._wake.set()

    @property
    def views(self) -> list[CommView]:
        with self._lock:
            return list(self._views)

    def close(self) -> None:
        """Close every comm and stop the pushing thread (the extension is unloaded)."""
        self._stop.set()
        self._wake.set()
        for view in self.views:
            view.close()

    # -- pushing state ---------------------------------------------------------------------

    def _hello(self) -> dict[str, Any]:
        from .._version import __version__

        return {"kind": "hello", "protocol": PROTOCOL, "version": __version__, "aliases": self.aliases(),
                "refresh": self.refresh, "state": self.state()}

    def aliases(self) -> list[dict[str, str]]:
        """Names that can be pulled (read once: the table changes only with the package)."""
        if self._aliases is None:
            from ..store.names import aliases

            try:
                self._aliases = [{"name": a.name, "description": a.description} for a in aliases().values()]
            except Exception:  # a broken user alias file must not break the panel
                self._aliases = []
        return self._aliases

    def state(self) -> dict[str, Any]:
        """The manager's snapshot, as plain JSON data."""
        return jsonable(self.manager.snapshot())

    def poke(self) -> None:
        """Push the state soon (coalesced with whatever else happens meanwhile)."""
        self._wake.set()

    def _on_event(self, event: dict[str, Any]) -> None:
        # called in whatever thread changed the state: only note it, the pusher does the work
        if event.get("type") in _NOTICES:
            notice = jsonable({k: v for k, v in event.items() if k != "model"})
            for view in self.views:
                view.send({"kind": "event", "event": notice})
        self._wake.set()

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._push_loop, name="jupyter_llm-comm", daemon=True)
            self._thread.start()

    def _push_loop(self) -> None:
        while True:
            self._wake.wait(self.refresh if self.refresh > 0 else None)
            self._wake.clear()
            with self._lock:
                # decided under the lock that attach() takes: a view added now finds no thread
                # and starts one, instead of relying on this one that is about to end
                if self._stop.is_set() or not self._views:
                    self._thread = None
                    return
                views = list(self._views)
            self.push(views)
            # events arriving during this pause are coalesced into the next push
            self._stop.wait(self.interval)

    def push(self, views: list[CommView] | None = None) -> None:
        """Send the current state to every view now."""
        try:
            message = {"kind": "state", "state": self.state()}
        except Exception:  # the snapshot failed this time (a record mid-write): next push
            return
        self.pushes += 1
        for view in views if views is not None else self.views:
            view.send(message)


class CommView:
    """One comm: routes its requests to the manager and its closing to the hub."""

    def __init__(self, hub: CommHub, comm: Any) -> None:
        self.hub = hub
        self.comm = comm
        self.closed = False
        comm.on_msg(self._on_msg)
        comm.on_close(self._on_close)

    def send(self, data: dict[str, Any], *, reply: bool = False) -> None:
        """Send on the comm. Only a ``reply`` goes out under the request it answers; anything
        else is sent with no parent request (see :func:`_without_parent`)."""
        if self.closed:
            return
        try:
            if reply:
                self.comm.send(data)
            else:
                _without_parent().run(self.comm.send, data)
        except Exception:  # a closed socket (kernel shutting down): this view is gone
            self._on_close(None)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.hub.detach(self)
            try:
                self.comm.close()
            except Exception:
                pass

    def _on_close(self, msg: Any) -> None:
        if not self.closed:
            self.closed = True
            self.hub.detach(self)

    def _on_msg(self, msg: dict[str, Any]) -> None:
        data = (msg.get("content") or {}).get("data") or {}
        if data.get("kind") != "request":
            return
        request_id = str(data.get("id", ""))
        action = str(data.get("action", ""))
        args = data.get("args") or {}
        # in a thread: a load takes seconds, and the shell must stay free for the user's cells.
        # The thread keeps this request as its parent, so the reply goes back the way it came.
        request_context = contextvars.copy_context()
        threading.Thread(target=request_context.run, args=(self._answer, request_id, action, args),
                         name=f"jupyter_llm-comm-{action}", daemon=True).start()

    def _answer(self, request_id: str, action: str, args: dict[str, Any]) -> None:
        try:
            result = run_action(self.hub, action, args)
        except BaseException as exc:  # every request gets a reply, whatever went wrong
            error: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc) or repr(exc)}
            estimate = getattr(exc, "estimate", None)
            if estimate is not None and hasattr(estimate, "to_dict"):
                error["estimate"] = jsonable(estimate.to_dict())
            self.send({"kind": "reply", "id": request_id, "ok": False, "error": error}, reply=True)
            if not isinstance(exc, Exception):
                raise
            return
        self.send({"kind": "reply", "id": request_id, "ok": True, "result": jsonable(result)}, reply=True)
        self.hub.poke()  # e.g. a started server changes the state without a manager event


def _without_parent() -> contextvars.Context:
    """A context in which ipykernel sees no parent request.

    ipykernel 7 routes a front end's next message on a comm to the subshell of the parent of the
    kernel's last message on that comm. A thread of ours has no parent of its own, so ipykernel
    would use whatever request it handled last — possibly in a subshell JupyterLab deletes a
    moment later (its widget manager's), and the panel's next request would then be dropped
    ("Unknown subshell_id"). Pushes sent with no parent leave the routing as JupyterLab chose it.
    """
    context = contextvars.Context()
    kernelbase = sys.modules.get("ipykernel.kernelbase")  # only inside a kernel; never imported here
    kernel = kernelbase.Kernel.instance() if kernelbase and kernelbase.Kernel.initialized() else None
    parent = getattr(kernel, "_shell_parent", None)
    if isinstance(parent, contextvars.ContextVar):
        context.run(parent.set, {})
    return context


def run_action(hub: CommHub, action: str, args: dict[str, Any]) -> Any:
    """Do what the panel asked, through the manager; the return value is the reply's result."""
    manager = hub.manager
    if action == "state":
        return hub.state()
    if action == "configure":
        refresh = float(args.get("refresh", hub.refresh))
        if refresh < 0:
            raise ValueError("refresh must be ≥ 0 seconds (0 pushes on events only)")
        hub.refresh = refresh
        hub.poke()
        return {"refresh": hub.refresh}
    if action == "pull":
        return manager.pull(_name(args), update=bool(args.get("update", False))).to_dict()
    if action == "estimate":
        options = load_options(args.get("options"))
        return _warned(manager.estimate(_name(args), options).to_dict(), options)
    if action == "load":
        options = load_options(args.get("options"))
        model = manager.load(_name(args), options, force=bool(args.get("force")))
        return _warned(model.to_dict(), options)
    if action == "unload":
        if args.get("all"):
            return manager.unload(all=True)
        return manager.unload(_name(args))
    if action in ("serve", "stop"):
        return _server(manager, action, args)
    raise ValueError(f"unknown request {action!r}: the panel and the kernel's jupyter_llm disagree; "
                     "reload the page after upgrading jupyter-llm")


def _name(args: dict[str, Any]) -> str:
    name = args.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError("a model name is needed, e.g. smollm2")
    return name.strip()


def load_options(raw: Any) -> LoadOptions:
    """Load options sent as JSON (``"auto"`` allowed) → a validated LoadOptions."""
    raw = dict(raw or {})
    unknown = sorted(set(raw) - _LOAD_KEYS)
    if unknown:
        raise ValueError(f"unknown load option(s): {', '.join(unknown)}; known: {', '.join(sorted(_LOAD_KEYS))}")
    if "tensor_split" in raw:
        raw["tensor_split"] = tuple(raw["tensor_split"] or ())
    if "rpc" in raw:  # LoadOptions parses the endpoints; only the JSON shape is checked here
        rpc = raw["rpc"]
        if not (rpc is None or isinstance(rpc, str)
                or (isinstance(rpc, list) and all(isinstance(e, str) for e in rpc))):
            raise ValueError(f"rpc {rpc!r}: give a list of \"host:port\" strings, e.g. [\"192.168.1.20:50052\"]")
        raw["rpc"] = tuple(rpc.split(",")) if isinstance(rpc, str) else tuple(rpc or ())
    return LoadOptions(**raw)


def _warned(result: dict[str, Any], options: LoadOptions) -> dict[str, Any]:
    """``result`` with ``warnings``: the exposure warning of the options' rpc-servers, if any. The
    Python warning the manager raises goes to the kernel's stderr, which the panel never shows."""
    from ..memory.rpc_endpoints import exposure_warning

    message = exposure_warning(options.rpc)
    return {**result, "warnings": [message]} if message else result


def _server(manager: Any, action: str, args: dict[str, Any]) -> Any:
    """Start or stop the kernel's HTTP API (jupyter_llm.server owns it; the manager holds it)."""
    from .. import server

    if action == "stop":
        return {"stopped": server.stop(manager)}
    kwargs: dict[str, Any] = {}
    if args.get("port") not in (None, ""):
        port = args["port"]
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise ValueError(f"port {port!r}: give a whole number from 1 to 65535 (0 picks a free one)")
        kwargs["port"] = port
    return server.serve(manager, **kwargs).status()


def jsonable(value: Any) -> Any:
    """Plain JSON data from what the manager returns (dataclasses, paths, tuples, sets)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no inf/nan (e.g. "never expires")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return jsonable(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    return str(value)


# -- wiring into a kernel ----------------------------------------------------------------------

_hub: CommHub | None = None
_hub_lock = threading.Lock()


def get_hub() -> CommHub:
    """The kernel's one hub, for the kernel's one manager."""
    global _hub
    with _hub_lock:
        if _hub is None:
            from ..manager import get_manager

            _hub = CommHub(get_manager())
        return _hub


def _on_open(comm: Any, msg: dict[str, Any]) -> None:
    """The panel opened a comm (page reload, notebook switch, kernel restart)."""
    hello = (msg.get("content") or {}).get("data") or {}
    get_hub().attach(comm, hello if isinstance(hello, dict) else None)


def register_target(shell: Any) -> bool:
    """Let panels open comms to this kernel; False outside a kernel with comms."""
    if getattr(shell, "kernel", None) is None:
        return False  # a terminal IPython: no front end to talk to
    try:
        import comm
    except ImportError:
        return False
    comm.get_comm_manager().register_target(TARGET, _on_open)
    return True


def open_from_kernel(shell: Any) -> Any:
    """Register the target and open a comm to the front end; call from ``load_ipython_extension``.

    Returns the comm, or None outside a kernel. The comm opens at once with a small hello; the
    state follows from a thread, so ``%load_ext`` stays instant. A front end without the panel
    ignores the comm.
    """
    if not register_target(shell):
        return None
    import comm as comm_module

    comm = comm_module.create_comm(target_name=TARGET, data={"kind": "opening", "protocol": PROTOCOL})

    def attach() -> None:
        try:
            get_hub().attach(comm)
        except Exception as exc:  # never break the user's %load_ext
            try:
                comm.send({"kind": "event", "event": {"type": "error", "error": str(exc)}})
            except Exception:
                pass

    threading.Thread(target=attach, name="jupyter_llm-comm-open", daemon=True).start()
    return comm


def close_all() -> None:
    """Close every comm (``%unload_ext``): panels then offer to load the extension again."""
    global _hub
    with _hub_lock:
        hub, _hub = _hub, None
    if hub is not None:
        hub.close()
    try:
        import comm

        comm.get_comm_manager().unregister_target(TARGET, _on_open)
    except Exception:
        pass
