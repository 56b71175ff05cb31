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
- :mod:`.handoff`     chunks from a job's thread to the event loop, one wake-up per batch
- :mod:`.params`      request validation and option mapping
- :mod:`.responses`   answers, errors in each API's shape, disconnect-aware streams
- :mod:`.metrics`     Prometheus text format, the workers' stats cache
- :mod:`.connection`  deadlines for request heads, bodies and unread answers; the connection limit
- :mod:`.sources`     what an API client may make the kernel pull, and from where

Nothing here imports starlette or uvicorn until a server starts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import ServerError
from ..options import DEFAULT_HOST, DEFAULT_MAX_QUEUE, DEFAULT_PARALLEL, DEFAULT_PORT
from .auth import Token, is_loopback, is_wildcard
from .runner import Server


def _manager(manager: Any) -> Any:
    if manager is not None:
        return manager
    from ..manager import get_manager

    return get_manager()


def serve(manager: Any = None, *, host: str | None = None, port: int | None = None, token: str | None = None,
          auth: bool = True, parallel: int | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
          origins: Iterable[str] | None = None, allowed_hosts: Iterable[str] = ()) -> Server:
    """Start the API for ``manager`` (default: the kernel's) and return the running server.

    ``host``, ``port``, ``parallel`` and ``origins`` not given come from the environment
    (``JUPYTER_LLM_HOST`` / ``OLLAMA_HOST``, ``JUPYTER_LLM_PARALLEL`` / ``OLLAMA_NUM_PARALLEL``,
    ``JUPYTER_LLM_ORIGINS`` / ``OLLAMA_ORIGINS``), else the defaults: 127.0.0.1:11434, 4 slots,
    no origins. Calling it again with the same settings returns the running server; different
    settings while one runs raise ServerError (stop it first).
    """
    import warnings

    from .. import config

    try:
        env_host, env_port = config.serve_address() if host is None or port is None else (None, None)
        env_parallel = config.num_parallel() if parallel is None else None
    except ValueError as exc:
        raise ServerError(str(exc)) from None
    host = host if host is not None else env_host or DEFAULT_HOST
    port = port if port is not None else env_port if env_port is not None else DEFAULT_PORT
    parallel = parallel if parallel is not None else env_parallel or DEFAULT_PARALLEL
    if origins is None:
        found = config.origins()
        origins = found[1] if found is not None else ()
        if found is not None and ("*" in origins or "null" in origins or any("*" in o for o in origins)):
            raise ServerError(f"{found[0]}={','.join(origins)!r} has a wildcard, which would let any web page use "
                              "your models: list exact origins (e.g. http://localhost:8888) or unset it")
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
    if not is_loopback(host):
        where = "all interfaces" if is_wildcard(host) else host
        warnings.warn(f"the API listens on {where}: other machines reach it at {server.url}, and anyone with the "
                      "token can use your models. Serve on 127.0.0.1 (the default) to keep it on this machine.",
                      UserWarning, stacklevel=2)
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


def token(manager: Any = None) -> Token | None:
    """The running API's token (None without one): pass it to a client, ``print()`` it to read it.

    It is a string whose repr is its fingerprint, so a cell ending in ``token()`` does not
    write it into the notebook. Programs outside the notebook read ``status()["token_file"]``.
    """
    server = _manager(manager).server
    return server.token if server is not None and server.running else None


__all__ = ["Server", "ServerError", "Token", "serve", "status", "stop", "token"]
