"""Answers of the HTTP API: JSON, errors in each API's shape, streams that notice a client leaving.

:func:`endpoint` wraps every route: whatever a route raises becomes an answer with a status
that says whose fault it was (:func:`problem_from`), in Ollama's ``{"error": "..."}`` shape or,
under ``/v1``, OpenAI's ``{"error": {"message", "type", "param", "code"}}``. Nothing a request
does can stop the server or reach the kernel as an exception.

:class:`Streamed` sends NDJSON or server-sent events and listens for the client's disconnect
at the same time (not only when the next token is written), so a client that leaves during
a long prompt stops its generation at once.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ..errors import (
    AmbiguousModelError,
    ContextOverflowError,
    GGUFError,
    JupyterLLMError,
    ModelLoadError,
    ModelNotFoundError,
    PullError,
    RemoteEngineError,
    StoreError,
    TruncatedGGUFError,
    WontFitError,
    WorkerCrashedError,
)
from .auth import BodyTooLarge, error_body
from .params import MAX_BODY_BYTES, HTTPProblem, parse_json

log = logging.getLogger("jupyter_llm.server")

Handler = Callable[[Any], Awaitable[Any]]
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


_PATH = re.compile(r"(?<![\w.:/~-])~?(?:/[^\s'\"`()<>,;/]+){2,}/?")
"""An absolute path (two parts or more) in a message, as the store and the worker write them."""


def problem_from(exc: BaseException) -> HTTPProblem:
    """The HTTP answer for an exception: 4xx for the caller's mistakes, 5xx for ours, with its message.

    The messages of the core's errors are meant for the notebook's user: an API client gets
    them with every file path cut to its last part (``…/model.gguf``), and for a file that is
    not a usable GGUF, without the bytes it starts with (issue 11 read a file's first bytes so).
    """
    if isinstance(exc, HTTPProblem):
        return exc  # written by this server from the request: no paths of its own
    problem = _problem(exc)
    problem.message = _PATH.sub(lambda m: "…/" + m.group(0).rstrip("/").rpartition("/")[2], problem.message)
    return problem


def _problem(exc: BaseException) -> HTTPProblem:
    from starlette.requests import ClientDisconnect

    if isinstance(exc, ClientDisconnect):  # nobody reads the answer; not worth a log line each
        return HTTPProblem(499, "the client closed the connection", code="client_closed")
    if isinstance(exc, BodyTooLarge):
        return HTTPProblem(413, f"the request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB")
    if isinstance(exc, ModelNotFoundError):
        return HTTPProblem(404, str(exc), code="model_not_found", param="model")
    if isinstance(exc, AmbiguousModelError):
        return HTTPProblem(400, str(exc), code="ambiguous_model", param="model")
    if isinstance(exc, ContextOverflowError):
        return HTTPProblem(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, WontFitError):
        return HTTPProblem(507, str(exc), code="insufficient_memory")
    if isinstance(exc, StoreError):
        return HTTPProblem(409, str(exc), code="store_conflict")
    if isinstance(exc, GGUFError):
        what = "is truncated" if isinstance(exc, TruncatedGGUFError) else "is not a usable GGUF model file"
        return HTTPProblem(422, f"the model's file {what}; `%llm show NAME` in the notebook says what is wrong "
                           "with it, `%llm pull NAME --update` fetches it again", code="invalid_model_file")
    if isinstance(exc, PullError):
        return HTTPProblem(502, str(exc), code="pull_failed")
    if isinstance(exc, RemoteEngineError):  # the remote's 401 is not this server's: a bad gateway
        return HTTPProblem(502, str(exc), code="remote_failed")
    if isinstance(exc, ModelLoadError | WorkerCrashedError):
        return HTTPProblem(500, str(exc), code="model_failed")
    if isinstance(exc, ValueError):  # options and the worker's refusals (templates, grammars)
        return HTTPProblem(400, str(exc), code="invalid_request")
    if isinstance(exc, JupyterLLMError):
        return HTTPProblem(500, str(exc), code="server_error")
    log.exception("unexpected error in the HTTP API", exc_info=exc)
    return HTTPProblem(500, f"internal error ({type(exc).__name__}: {exc}); the server keeps running",
                       code="server_error")


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import Response

    body = json.dumps(data, default=_jsonable, ensure_ascii=False).encode()
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


def error_response(path: str, problem: HTTPProblem) -> Any:
    from starlette.responses import Response

    body = error_body(path, problem.status, problem.message, problem.code, problem.param)
    return Response(body, status_code=problem.status, headers=problem.headers, media_type="application/json")


def endpoint(fn: Handler) -> Handler:
    """Wrap a route so that any exception becomes an error answer in the caller's API shape."""

    async def handler(request: Any) -> Any:
        try:
            return await fn(request)
        except Exception as exc:
            return error_response(request.url.path, problem_from(exc))

    handler.__name__ = fn.__name__
    handler.__doc__ = fn.__doc__
    return handler


async def read_json(request: Any) -> dict[str, Any]:
    """The request's JSON object (400 for anything else, 413 when too large)."""
    return parse_json(await request.body())


def ctx(request: Any) -> Any:
    """The server's :class:`~jupyter_llm.server.app.Context`."""
    return request.app.state.ctx


async def run_blocking(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking manager call in a worker thread of the event loop's pool."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args, **kwargs)


WORKER_CALLS = 256
"""Blocking calls into workers that may run at once (each model's queue bounds its own share)."""


async def run_worker_call(request: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking call that waits on a worker, outside the thread pool the other routes share.

    A worker that stops answering holds the threads of its own calls only (as many as its model's
    queue admits), so listings, /metrics and other models keep their threads.
    """
    import functools

    import anyio

    state = request.app.state
    limiter = getattr(state, "worker_calls", None)
    if limiter is None:  # made on the server's own event loop, on first use
        limiter = state.worker_calls = anyio.CapacityLimiter(WORKER_CALLS)
    return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=limiter)


async def until_disconnect(request: Any, work: Callable[[], Awaitable[Any]], on_disconnect: Callable[[], None]) -> Any:
    """Await ``work()`` while watching for the client to leave; then call ``on_disconnect`` and
    return None (nobody will read the answer)."""
    import anyio

    outcome: list[tuple[bool, Any]] = []
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    on_disconnect()
                    group.cancel_scope.cancel()
                    return

        group.start_soon(watch)
        try:  # caught here: a task group would wrap it into an ExceptionGroup
            outcome.append((True, await work()))
        except Exception as exc:
            outcome.append((False, exc))
        group.cancel_scope.cancel()
    if not outcome:  # cancelled by the disconnect
        return None
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


class Raw(bytes):
    """A piece of a streamed answer already framed for the connection (the rest of an HTTP chunk
    a worker began writing, worker/direct.py): written as it is, past h11."""


def direct_framing(shape: Callable[[str, str], bytes]) -> tuple[bytes, ...]:
    """The bytes around a piece's JSON string in ``shape(text, time)`` (a chunk as the route writes
    it), for a worker that writes the pieces itself (``Extras.direct``): (before, after), or
    (before the time, between it and the text, after) when the shape holds the time as a string
    (Ollama's ``created_at``: the worker writes its clock's, as ``wire.OLLAMA_TIME`` says)."""
    text, stamp = "\x00piece\x00", "\x00time\x00"
    prefix, found, suffix = shape(text, stamp).partition(json.dumps(text, ensure_ascii=False).encode())
    assert found, "the shape must hold the text as one JSON string"
    before, timed, between = prefix.partition(json.dumps(stamp).encode())
    return (before + b'"', b'"' + between, suffix) if timed else (prefix, suffix)


class Streamed:
    """A streaming answer (NDJSON or SSE) that also listens for the client's disconnect.

    ``hand_over(handover)``, if given, is called after each piece went out until it returns
    True: it may let the worker write the next pieces into the connection itself
    (:class:`~.connection.Handover`, worker/direct.py); a :class:`Raw` piece is then written as it is.
    """

    def __init__(self, body: AsyncIterator[bytes], media_type: str, on_disconnect: Callable[[], None],
                 hand_over: Callable[[Any], bool] | None = None) -> None:
        self.body = body
        self.media_type = media_type
        self.on_disconnect = on_disconnect
        self.hand_over = hand_over

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        import anyio

        from .connection import HANDOVER

        handover = scope.get(HANDOVER)
        offer = self.hand_over if handover is not None else None
        headers = [(b"content-type", self.media_type.encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in STREAM_HEADERS.items()]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        self.on_disconnect()
                        group.cancel_scope.cancel()
                        return

            group.start_soon(watch)
            try:
                async for piece in self.body:
                    if isinstance(piece, Raw):
                        handover.write_raw(piece)
                        continue
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                    if offer is not None and offer(handover):
                        offer = None
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # the connection broke while writing
                self.on_disconnect()
            except Exception:  # the body generators report their own errors; this is a bug
                log.exception("streaming an answer failed")
                self.on_disconnect()
            finally:
                group.cancel_scope.cancel()
                aclose = getattr(self.body, "aclose", None)
                if aclose is not None:
                    with anyio.CancelScope(shield=True):
                        await aclose()


def ndjson(item: Any) -> bytes:
    return json.dumps(item, default=_jsonable, ensure_ascii=False).encode() + b"\n"


def sse(item: Any) -> bytes:
    data = item if isinstance(item, str) else json.dumps(item, default=_jsonable, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
