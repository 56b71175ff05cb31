"""Connections: each gets a deadline for its request head, one for its body, one for reading
our answer, and only so many are kept open at once.

uvicorn closes an idle keep-alive connection, but arms that timer only after an answer: a
client that connects and sends nothing, or half a request head, or a body that never ends,
held its file descriptor for good — 500 such clients held 500 fds, and under a 400-fd limit
the API stopped answering (issue 11). So :func:`protocol_class` extends uvicorn's h11
protocol with three deadlines, each armed in the state it guards:

- **head** (``config.server_head_timeout()``): from connecting, or from the previous answer,
  until the request head is complete; then 408, or a silent close if nothing came at all;
- **body** (``config.server_body_timeout()``): from the head until the body is complete; 408;
- **send** (the same seconds): while the answer waits for a client that does not read it.

At most ``config.server_max_connections()`` connections stay open, so the API never holds
more descriptors than that, whatever clients do. A new connection beyond the limit closes the
one that has waited longest for a request head (an idle keep-alive, or a client trickling its
head), so clients that hold connections without asking cannot lock the others out; if every
connection is busy with a request, the new one is answered 503 and closed.

Each request's scope carries the connection's :class:`Handover` (``scope[HANDOVER]``): a
streamed answer uses it to let the worker write into the client's socket (worker/direct.py).

When accept() fails for want of descriptors anyway (something else in the process took
them), asyncio logs a traceback for every failed accept — 800,000 of them (325 MB) in 40 s
(issue 11). :func:`uvicorn_server` gives the server's event loop a handler that says it once,
and again only after the API could accept connections in between.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import config

log = logging.getLogger("jupyter_llm.server")

MAX_HEAD_BYTES = 16 * 1024
"""A request head larger than this is refused by h11 (400); nothing this API needs comes close."""

HANDOVER = "jupyter_llm.handover"
"""The scope key of the request's :class:`Handover`."""


class Handover:
    """What a streamed answer may do with its connection beyond ASGI (uvicorn's and h11's
    internals: the transport, h11's body writer)."""

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    def socket_fd(self) -> int | None:
        """The connection's socket, if another process may write the answer's next HTTP chunks
        into it now: the answer is chunked (HTTP/1.1), everything written so far has left the
        transport's buffer, and the connection is open. Else None."""
        p = self._protocol
        transport = p.transport
        if transport.is_closing() or transport.get_write_buffer_size() or p.flow.write_paused:
            return None
        if type(getattr(p.conn, "_writer", None)).__name__ != "ChunkedWriter":  # HTTP/1.0: no chunks
            return None
        sock = transport.get_extra_info("socket")
        return None if sock is None else int(sock.fileno())

    def write_raw(self, data: bytes) -> None:
        """Write bytes already framed for the connection (the rest of a chunk the worker began)."""
        self._protocol.transport.write(data)


@dataclass
class Limits:
    """The deadlines and the connection limit of one server, read when it starts."""

    head_s: float = field(default_factory=config.server_head_timeout)
    body_s: float = field(default_factory=config.server_body_timeout)
    max_connections: int = field(default_factory=config.server_max_connections)
    on_drop: Callable[[str], None] = lambda reason: None
    """Told why the server closed a connection (``connection_limit``, ``head_timeout``…)."""
    out_of_fds: bool = False
    """accept() failed for want of descriptors and nothing was accepted since (logged once)."""
    quiet_logger: logging.Logger = field(default_factory=lambda: _quiet_logger())


def _response(status: int, reason: str, message: str, path: str = "") -> bytes:
    """A whole HTTP answer that closes the connection (for states where h11 cannot send one)."""
    from .auth import error_body

    body = error_body(path, status, message, {408: "request_timeout", 503: "too_many_connections"}.get(status))
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n" + ("retry-after: 2\r\n" if status == 503 else "") + "\r\n")
    return head.encode() + body


def protocol_class(limits: Limits) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with the deadlines and the connection limit of ``limits``."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.logger = limits.quiet_logger  # h11's complaints about bad requests: once a minute
            self._phase: str | None = None
            self._since = 0.0
            self._deadline: asyncio.TimerHandle | None = None
            self._stalled: asyncio.TimerHandle | None = None
            self._received = False

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            limits.out_of_fds = False
            self._watch()
            if not self._make_room():
                limits.on_drop("connection_limit")
                self._arm(None)
                transport.write(_response(503, "Service Unavailable", (
                    f"the API keeps at most {limits.max_connections} connections open and all are busy with "
                    "requests; retry in a moment (or raise JUPYTER_LLM_SERVER_MAX_CONNECTIONS)")))
                transport.close()

        def _make_room(self) -> bool:
            """Whether this connection may stay: under the limit, or after closing the one idle longest."""
            others: list[Any] = [p for p in self.connections if p is not self and not p.transport.is_closing()]
            if len(others) < limits.max_connections:
                return True
            idle = [p for p in others if getattr(p, "_phase", None) == "head"]
            if not idle:
                return False
            oldest = min(idle, key=lambda p: p._since)
            limits.on_drop("connection_limit")
            oldest._arm(None)
            oldest.transport.close()
            return True

        def data_received(self, data: bytes) -> None:
            self._received = True
            super().data_received(data)
            if self.cycle is not None and HANDOVER not in self.cycle.scope:  # (its task has not run yet)
                self.cycle.scope[HANDOVER] = Handover(self)  # type: ignore[literal-required]
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._received = False
            self._watch()

        def connection_lost(self, exc: Exception | None) -> None:
            self._arm(None)
            if self._stalled is not None:
                self._stalled.cancel()
            super().connection_lost(exc)

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._stalled is None:
                self._stalled = self.loop.call_later(limits.body_s, self._send_timeout)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._stalled is not None:
                self._stalled.cancel()
                self._stalled = None

        def _watch(self) -> None:
            """Arm the deadline of the state the connection is in: waiting for a head, a body, or none."""
            if self.transport.is_closing():
                return self._arm(None)
            state = self.conn.their_state
            self._arm("head" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None)

        def _arm(self, phase: str | None) -> None:
            if phase == self._phase:
                return
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            self._phase, self._since = phase, time.monotonic()
            if phase is not None:
                seconds = limits.head_s if phase == "head" else limits.body_s
                self._deadline = self.loop.call_later(seconds, self._expired, phase, seconds)

        def _expired(self, phase: str, seconds: float) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            limits.on_drop(f"{phase}_timeout")
            cycle = self.cycle if phase == "body" else None
            if phase == "head" and not self._received:
                self.transport.close()  # nothing came: nobody to answer
                return
            if cycle is None or not cycle.response_started:
                self.transport.write(_response(408, "Request Timeout", (
                    f"the request {phase} did not arrive within {seconds:g} s; send the whole request at once "
                    f"(the server's JUPYTER_LLM_SERVER_{phase.upper()}_TIMEOUT sets the limit)"),
                    self.scope["path"] if cycle else ""))
            if cycle is not None:  # the route reading the body sees a disconnect, and answers nobody
                cycle.disconnected = True
                cycle.message_event.set()
            self.transport.close()

        def _send_timeout(self) -> None:
            self._stalled = None
            if not self.transport.is_closing():
                limits.on_drop("send_timeout")
                self.transport.abort()  # drop what it did not read: it is not reading

    return Protocol


def uvicorn_server(uvicorn_config: Any, limits: Limits) -> Any:
    """A ``uvicorn.Server`` whose event loop reports running out of descriptors once, not per accept."""
    import uvicorn

    class Server(uvicorn.Server):
        async def serve(self, sockets: Any = None) -> None:
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(lambda loop, context: _loop_error(loop, context, limits))
            await super().serve(sockets)

    return Server(uvicorn_config)


def _loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any], limits: Limits) -> None:
    if context.get("message") != "socket.accept() out of system resource":
        loop.default_exception_handler(context)
        return
    if limits.out_of_fds:
        return  # said already; asyncio retries every second (the next accepted connection resets it)
    limits.out_of_fds = True
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    log.error("the API cannot accept connections: %s (this process may open %s files, `ulimit -n`). It keeps "
              "trying every second and says nothing more until it accepts one again; close idle clients or raise "
              "the limit before starting Jupyter.", context.get("exception"), soft)


class _OncePerMinute(logging.Filter):
    """Lets each distinct message through once a minute: a client must not fill the log."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        key = str(record.msg)
        if now - self._seen.get(key, -60.0) < 60.0:
            return False
        if len(self._seen) > 100:  # messages are uvicorn's fixed strings; the bound is a safety net
            self._seen.clear()
        self._seen[key] = now
        return True


def _quiet_logger() -> logging.Logger:
    logger = logging.getLogger("jupyter_llm.server.http")
    if not any(isinstance(f, _OncePerMinute) for f in logger.filters):
        logger.addFilter(_OncePerMinute())
    return logger


def uvicorn_settings(limits: Limits) -> dict[str, Any]:
    """uvicorn.Config arguments for the protocol, the head size limit and the accept loop."""
    return {"http": protocol_class(limits), "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
            # asyncio tries `backlog` accepts per wake-up; our socket listens with 128 (runner.py)
            "backlog": 128}
