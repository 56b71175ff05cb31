"""The server's lifecycle: bind, run uvicorn in a daemon thread of the kernel, report, stop.

We bind the socket ourselves before starting uvicorn, so a port in use is a
:class:`~jupyter_llm.errors.ServerError` raised in the caller's cell (not a log line in a
thread), and port 0 gives a free port whose number we know. uvicorn runs its own event loop
in its thread; it installs no signal handlers there (only the main thread may), so the
kernel's interrupt keeps working, and it is told not to configure logging.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

from ..errors import ServerError
from ..options import DEFAULT_HOST, DEFAULT_MAX_QUEUE, DEFAULT_PARALLEL, DEFAULT_PORT
from .auth import is_loopback, new_token


class Server:
    """One running API: its address, token, settings, and the thread serving it."""

    def __init__(self, manager: Any, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 token: str | None = None, auth: bool = True, parallel: int = DEFAULT_PARALLEL,
                 max_queue: int = DEFAULT_MAX_QUEUE, origins: Iterable[str] = (),
                 allowed_hosts: Iterable[str] = ()) -> None:
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ServerError(f"port must be between 0 and 65535 (0: any free port), not {port!r}")
        if not isinstance(parallel, int) or not 1 <= parallel <= 64:
            raise ServerError(f"parallel must be between 1 and 64 slots per model, not {parallel!r}")
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ServerError(f"max_queue must be a whole number ≥ 0, not {max_queue!r}")
        origins = [str(o).rstrip("/") for o in origins]
        if "*" in origins or "null" in origins:
            raise ServerError("origins must be exact (e.g. http://localhost:8888): a wildcard or 'null' origin would "
                              "let any web page use your models")
        if not auth:
            if token is not None:
                raise ServerError("give either a token or no-auth, not both")
            if not is_loopback(host):
                raise ServerError(f"--no-auth is only allowed on a loopback address (127.0.0.1, localhost, ::1), "
                                  f"not {host!r}: anyone on the network could use your models. Keep the token "
                                  "(the default).")
        elif token is not None and (not token.strip() or any(c.isspace() for c in token)):
            raise ServerError("the token must be non-empty and contain no spaces")
        self.manager = manager
        self.host = host
        self.requested_port = port
        self.port = port
        self.token = (token or new_token()) if auth else None
        self.parallel = parallel
        self.max_queue = max_queue
        self.origins = origins
        self.allowed_hosts = list(allowed_hosts)
        self.started_at: float | None = None
        self._uvicorn: Any = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._error: BaseException | None = None
        self.context: Any = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> Server:
        """Bind and serve in a daemon thread; returns once requests are accepted."""
        import uvicorn  # deferred: %load_ext stays instant

        from .app import Context, build_app
        from .backend import Backend
        from .metrics import Metrics

        sock = self._bind()
        metrics = Metrics()
        backend = Backend(self.manager, parallel=self.parallel, max_queue=self.max_queue, metrics=metrics)
        self.context = Context(self.manager, backend, metrics, {"parallel": self.parallel})
        app = build_app(self.context, token=self.token, host=self.host, origins=self.origins,
                        allowed_hosts=self.allowed_hosts)
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                loop="asyncio", http="h11", ws="none", timeout_graceful_shutdown=3,
                                timeout_keep_alive=5)
        self._uvicorn = uvicorn.Server(config)
        self._socket = sock
        self._thread = threading.Thread(target=self._run, name=f"jupyter_llm-http-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"the API server did not start on {self.url}: {self._error or 'timed out'}")
            time.sleep(0.01)
        self.started_at = time.time()
        return self

    def _bind(self) -> socket.socket:
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise ServerError(f"cannot bind to {self.host!r}: {exc.strerror}; use an address like 127.0.0.1") from None
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a quick restart; a live listener still wins
        try:
            sock.bind(address)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            import errno

            if exc.errno == errno.EADDRINUSE:
                raise ServerError(
                    f"port {self.port} on {self.host} is already in use (Ollama or another server?): choose another "
                    f"with `%llm serve --port N` (or port 0 for any free port), or stop the other server") from None
            raise ServerError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        sock.set_inheritable(False)
        self.port = sock.getsockname()[1]
        return sock

    def _run(self) -> None:
        try:
            self._uvicorn.run(sockets=[self._socket])
        except BaseException as exc:  # kept for start()/status(); a thread must not raise into nothing
            self._error = exc

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel running generations, stop accepting, and end the thread. Idempotent."""
        if self.context is not None:
            self.context.backend.cancel_all()
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive() and self._uvicorn is not None:
                self._uvicorn.force_exit = True
                self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and bool(self._uvicorn and self._uvicorn.started)

    # -- reporting -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
        return f"http://{host}:{self.port}"

    def status(self) -> dict[str, Any]:
        """Address, token, settings and counters, as plain data (the sidebar and ``--status`` show it)."""
        in_flight = self.context.backend.in_flight() if self.context is not None else {}
        return {
            "running": self.running, "url": self.url, "openai_base_url": f"{self.url}/v1", "host": self.host,
            "port": self.port, "auth": self.token is not None, "token": self.token, "parallel": self.parallel,
            "max_queue": self.max_queue, "origins": list(self.origins), "started_at": self.started_at,
            "requests": self.context.metrics.total_requests() if self.context is not None else 0,
            "in_flight": in_flight, "error": str(self._error) if self._error else None,
        }

    def same_settings(self, **settings: Any) -> bool:
        """Whether ``serve(**settings)`` asks for exactly this server (re-running a cell is harmless)."""
        token = settings.get("token")
        return (settings.get("host", DEFAULT_HOST) == self.host
                and settings.get("port", DEFAULT_PORT) in (self.requested_port, self.port)
                and settings.get("auth", True) == (self.token is not None)
                and (token is None or token == self.token)
                and settings.get("parallel", DEFAULT_PARALLEL) == self.parallel
                and settings.get("max_queue", DEFAULT_MAX_QUEUE) == self.max_queue
                and [str(o).rstrip("/") for o in settings.get("origins", ())] == self.origins)

    def instructions(self) -> str:
        """How to reach this server: URL, token and the settings the official clients read."""
        if not self.running:
            return f"The API at {self.url} is stopped."
        lines = [f"API running at {self.url} (Ollama API) and {self.url}/v1 (OpenAI API), "
                 f"{self.parallel} parallel slots per model."]
        if self.token:
            lines += [f"Token: {self.token}",
                      f"  ollama: OLLAMA_HOST={self.url} OLLAMA_API_KEY={self.token}",
                      f"  openai: OpenAI(base_url=\"{self.url}/v1\", api_key=\"{self.token}\")"]
        else:
            lines += ["WARNING: no token — any program on this machine can use these models.",
                      f"  ollama: OLLAMA_HOST={self.url}"]
        return "\n".join(lines)

    def display(self) -> Instructions:
        """What ``%llm serve`` shows: :meth:`instructions` as text, with :meth:`status` as data."""
        return Instructions(self.instructions(), self.status())

    def _repr_markdown_(self) -> str:
        return self.display()._repr_markdown_()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<jupyter_llm API {state} at {self.url}, auth={'on' if self.token else 'off'}>"


class Instructions:
    """URL, token and client settings, shown as a block of text (line breaks kept in notebooks)."""

    def __init__(self, text: str, data: dict[str, Any]) -> None:
        self.text = text
        self.data = data

    def __repr__(self) -> str:
        return self.text

    def _repr_markdown_(self) -> str:
        return "```text\n" + self.text + "\n```"
