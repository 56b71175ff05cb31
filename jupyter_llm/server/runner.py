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
from pathlib import Path
from typing import Any

from ..errors import ServerError
from ..options import DEFAULT_HOST, DEFAULT_MAX_QUEUE, DEFAULT_PARALLEL, DEFAULT_PORT
from .auth import MIN_REMOTE_TOKEN, Token, is_loopback, network_addresses, new_token


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
        elif token is not None and not is_loopback(host) and len(token) < MIN_REMOTE_TOKEN:
            raise ServerError(f"on {host} the API is reachable from other machines, so a token needs at least "
                              f"{MIN_REMOTE_TOKEN} characters, not {len(token)}: leave out --token for a random "
                              "32-character one")
        self.manager = manager
        self.host = host
        self.address = network_addresses(host)[0]
        """Where other programs reach the server: the bound address, or for a wildcard the machine's."""
        self.requested_port = port
        self.port = port
        self.token: Token | None = (Token(token) if token else new_token()) if auth else None
        self.token_file: Path | None = None
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
        from .connection import Limits, uvicorn_server, uvicorn_settings
        from .metrics import Metrics

        metrics = Metrics()
        limits = Limits(on_drop=metrics.drop)  # the environment is read before binding: a bad value binds nothing
        sock = self._bind()
        backend = Backend(self.manager, parallel=self.parallel, max_queue=self.max_queue, metrics=metrics)
        self.context = Context(self.manager, backend, metrics, {"parallel": self.parallel})
        app = build_app(self.context, token=self.token, host=self.host, origins=self.origins,
                        allowed_hosts=self.allowed_hosts)
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                loop="asyncio", ws="none", timeout_graceful_shutdown=3, timeout_keep_alive=5,
                                **uvicorn_settings(limits))
        self._uvicorn = uvicorn_server(config, limits)
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
        if self.token is not None:
            self.token_file = _write_token_file(self.port, self.url, self.token)
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
        if self.token_file is not None:
            _remove_token_file(self.token_file, self.token)
            self.token_file = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and bool(self._uvicorn and self._uvicorn.started)

    # -- reporting -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The server's URL as other programs use it (for a wildcard bind, the machine's address)."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"

    def status(self) -> dict[str, Any]:
        """Address, token, settings and counters, as plain data (the sidebar and ``--status`` show it).

        ``token`` is a :class:`~.auth.Token`: the sidebar's comm sends it as a string, a cell
        that shows the dict shows only its fingerprint.
        """
        in_flight = self.context.backend.in_flight() if self.context is not None else {}
        return {
            "running": self.running, "url": self.url, "openai_base_url": f"{self.url}/v1", "host": self.host,
            "port": self.port, "auth": self.token is not None, "token": self.token,
            "token_fingerprint": self.token.fingerprint if self.token is not None else None,
            "token_file": str(self.token_file) if self.token_file is not None else None, "parallel": self.parallel,
            "max_queue": self.max_queue, "origins": list(self.origins), "started_at": self.started_at,
            "requests": self.context.metrics.total_requests() if self.context is not None else 0,
            "in_flight": in_flight, "error": str(self._error) if self._error else None,
            "models": self._models(),
        }

    def _models(self) -> dict[str, dict[str, Any]]:
        """Each loaded model's slots, the slots the API decodes it with, and its notices."""
        out = {}
        for model in self.manager.ps():
            slots = int(model.options.parallel)
            out[model.name] = {"slots": slots, "api_slots": min(slots, self.parallel), "notices": list(model.notices)}
        return out

    def _slot_lines(self) -> list[str]:
        """What the banner says about loaded models whose slots differ from the server's."""
        lines = []
        for name, info in self._models().items():
            slots = info["slots"]
            if slots < self.parallel:
                lines.append(f"{name} is loaded with {slots} slot{'s' if slots != 1 else ''}: it is reloaded with "
                             f"{self.parallel} (other options and context per request kept) when the API first "
                             "uses it while idle.")
            elif slots > self.parallel:
                lines.append(f"{name} has {slots} slots; the API decodes {self.parallel} of its requests at once.")
            lines += [f"{name}: {n}" for n in info["notices"] if "the API" in n]
        return lines

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
        """How to reach this server: URL, where the token is, the settings the official clients read.

        Never the token itself: this text is a cell's output, and a saved notebook keeps it.
        """
        if not self.running:
            return f"The API at {self.url} is stopped."
        lines = [f"API running at {self.url} (Ollama API) and {self.url}/v1 (OpenAI API), "
                 f"{self.parallel} parallel slots per model."]
        lines += self._slot_lines()
        if not is_loopback(self.host):
            lines.append(f"WARNING: listening on {self.host}, so other machines reach it at {self.url}; anyone "
                         "with the token can use these models. `%llm serve --host 127.0.0.1` keeps it on this one.")
        if self.token:
            lines += [f"Token {self.token.fingerprint} (a fingerprint: the token is never shown in a cell); "
                      "the sidebar's Copy token button copies it.",
                      "  python: jupyter_llm.server.token()",
                      f"  openai: OpenAI(base_url=\"{self.url}/v1\", api_key=jupyter_llm.server.token())"]
            if self.token_file is not None:
                lines += [f"  shell:  `jupyter-llm run|ps|stop` read it from {self.token_file} (mode 0600); other "
                          "clients: OLLAMA_HOST=" + self.url + " OLLAMA_API_KEY=$(python -c \"import json; "
                          f"print(json.load(open('{self.token_file}'))['token'])\")"]
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


def _write_token_file(port: int, url: str, token: str) -> Path | None:
    """The server's address and token in ``jupyter-llm-PORT.json`` in Jupyter's runtime directory,
    readable by this user alone (as Jupyter's own server files), for clients outside the
    notebook — the ``jupyter-llm`` commands read it; None (and a warning) if it cannot be written."""
    import json
    import logging
    import os

    from jupyter_core.paths import jupyter_runtime_dir

    path = Path(jupyter_runtime_dir()) / f"jupyter-llm-{port}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp.unlink(missing_ok=True)
        # O_EXCL: never write into a file someone else created (it would keep their permissions).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"url": url, "pid": os.getpid(), "token": str(token)}, f)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        logging.getLogger("jupyter_llm.server").warning("the API's server file %s could not be written (%s); "
                                                        "jupyter_llm.server.token() still gives the token", path, exc)
        return None
    return path


def _remove_token_file(path: Path, token: str | None) -> None:
    import json

    try:
        if json.loads(path.read_text()).get("token") == token:  # not a newer server's on the same port
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


class Instructions:
    """URL and client settings, shown as a block of text (line breaks kept in notebooks)."""

    def __init__(self, text: str, data: dict[str, Any]) -> None:
        self.text = text
        self.data = data

    def __repr__(self) -> str:
        return self.text

    def _repr_markdown_(self) -> str:
        return "```text\n" + self.text + "\n```"
