"""The background HTTP API: Ollama- and OpenAI-compatible, parallel decoding, safe by default.

It runs in a thread inside the kernel and is a client of the kernel's
:class:`~jupyter_llm.manager.ModelManager` (``manager.server`` holds it): it serves the models
the notebook loaded and loads others on demand. Modules:

- :mod:`.runner`      bind, run uvicorn in a thread, status, stop
- :mod:`.app`         the route table, ``/health``, ``/metrics``
- :mod:`.auth`        the Guard: Host check, Origin/CORS, bearer token
- :mod:`.ollama_api`  Ollama's routes (NDJSON streams)
- :mod:`.openai_api`  OpenAI's routes (server-sent events)
- :mod:`.backend`     model lookup and loading, the bounded queue, generation jobs
- :mod:`.params`      request validation and option mapping
- :mod:`.responses`   answers, errors in each API's shape, disconnect-aware streams
- :mod:`.metrics`     Prometheus text format

Nothing here imports starlette or uvicorn until a server starts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import ServerError
from ..options import DEFAULT_HOST, DEFAULT_MAX_QUEUE, DEFAULT_PARALLEL, DEFAULT_PORT
from .runner import Server


def _manager(manager: Any) -> Any:
    if manager is not None:
        return manager
    from ..manager import get_manager

    return get_manager()


def serve(manager: Any = None, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None,
          auth: bool = True, parallel: int = DEFAULT_PARALLEL, max_queue: int = DEFAULT_MAX_QUEUE,
          origins: Iterable[str] = (), allowed_hosts: Iterable[str] = ()) -> Server:
    """Start the API for ``manager`` (default: the kernel's) and return the running server.

    Calling it again with the same settings returns the running server; different settings
    while one runs raise ServerError (stop it first).
    """
    import warnings

    manager = _manager(manager)
    current = manager.server
    if current is not None and current.running:
        settings = dict(host=host, port=port, token=token, auth=auth, parallel=parallel, max_queue=max_queue,
                        origins=tuple(origins))
        if current.same_settings(**settings):
            return current
        raise ServerError(f"the API already runs at {current.url} with other settings; stop it first "
                          "(`%llm serve --stop` or jupyter_llm.server.stop())")
    server = Server(manager, host=host, port=port, token=token, auth=auth, parallel=parallel,
                    max_queue=max_queue, origins=origins, allowed_hosts=allowed_hosts)
    if not auth:
        warnings.warn(f"the API on {host} runs without a token: every program and user on this machine can use "
                      "your models. Drop --no-auth to require one.", UserWarning, stacklevel=2)
    server.start()
    manager.server = server
    return server


def stop(manager: Any = None) -> bool:
    """Stop the kernel's API; returns whether one was running."""
    manager = _manager(manager)
    server = manager.server
    if server is None:
        return False
    was_running = server.running
    server.stop()
    manager.server = None
    return was_running


def status(manager: Any = None) -> dict[str, Any] | None:
    """The running API's address, token, settings and counters; None when it is not running."""
    server = _manager(manager).server
    return server.status() if server is not None else None


__all__ = ["Server", "ServerError", "serve", "status", "stop"]
