"""A real API server on a free loopback port, serving the real default model, for test modules.

Each module that needs one makes a module-scoped fixture with :func:`running_server`: the
server and its manager outlive the per-test state isolation of conftest.py, so the manager gets
its own store directory (records are read through it, not through JUPYTER_LLM_HOME).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jupyter_llm import server as api
from jupyter_llm.manager import ModelManager
from jupyter_llm.store.records import Store
from jupyter_llm.store.sources import Pulled

MODEL = "smollm2"


@contextmanager
def running_server(model_path: Path, root: Path, **settings: Any) -> Iterator[tuple[ModelManager, api.Server]]:
    """A manager with the default model stored as ``smollm2`` and the API serving it on port 0."""
    manager = ModelManager(Store(root=root / "records"))
    manager.store.put(MODEL, Pulled("pip", [model_path], owned=[]))
    server = api.serve(manager, port=0, **settings)
    try:
        yield manager, server
    finally:
        api.stop(manager)
        manager.close()


@contextmanager
def openai_client(server: api.Server) -> Iterator[Any]:
    """The official openai client on the server's ``/v1``, with its token and no retries."""
    import openai

    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0) as client:
        yield client


def auth(server: api.Server) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token}"}


def wait_until(predicate: Any, timeout: float = 20.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until true; a generous fail-fast bound, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def worker_stats(manager: ModelManager) -> dict[str, Any]:
    """The loaded default model's slot and queue counters, straight from its worker."""
    return manager.get(MODEL).runtime.stats()


def raw_request(server: api.Server, path: str, body: dict[str, Any], *, version: str = "1.1",
                rcvbuf: int | None = None, close: bool = False) -> socket.socket:
    """Send a request on a bare socket and return it unread (closing it is the disconnect);
    ``rcvbuf``: the socket's receive buffer, set before connecting (a client slow to take data)."""
    data = json.dumps(body).encode()
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", server.port))
    head = (f"POST {path} HTTP/{version}\r\nHost: 127.0.0.1:{server.port}\r\nAuthorization: Bearer {server.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n")
    sock.sendall(head.encode() + data)
    return sock
