"""Ollama's store routes: ``POST /api/pull`` (progress as NDJSON), ``/api/copy``, ``DELETE /api/delete``.

They go through the same manager calls as ``%llm pull`` / ``cp`` / ``rm``; what an API client may
pull is limited by :func:`.sources.check_pull`.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from .params import Body, model_name
from .responses import Streamed, ctx, endpoint, json_response, ndjson, problem_from, read_json, run_blocking
from .sources import check_pull


def _progress_item(event: Any) -> dict[str, Any] | None:
    status = event.status
    if status in ("success", "error"):
        return None  # sent once the record is stored, or as {"error": ...}
    if status == "downloading":
        digest = event.digest or ""
        short = digest.removeprefix("sha256:")[:12] or (event.filename or event.name)
        item: dict[str, Any] = {"status": f"pulling {short}", "total": event.total, "completed": event.completed}
        if digest:
            item["digest"] = digest if digest.startswith("sha256:") else f"sha256:{digest}"
        return item
    if status == "fallback":
        return {"status": event.message or status}
    return {"status": status}


@endpoint
async def pull(request: Any) -> Any:
    """Pull through the same code as ``%llm pull``; progress events become Ollama's NDJSON stream.

    Only what :func:`.sources.check_pull` allows an API client. A pull is not cancelled when
    the client leaves (as in Ollama): it finishes into the store.
    """
    body = Body(await read_json(request))
    name = model_name(body)
    body.flag("insecure")
    stream = body.flag("stream", True)
    manager = ctx(request).manager
    if await run_blocking(check_pull, manager, name) is not None:  # in the store already
        return json_response({"status": "success"}) if not stream else Streamed(
            _one(ndjson({"status": "success"})), "application/x-ndjson", lambda: None)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:
            pass  # the server stopped; the pull still completes

    def listener(event: Any) -> None:
        item = _progress_item(event)
        if item is not None:
            put(item)

    def work() -> None:
        try:
            manager.pull(name, listeners=[listener])
            put({"status": "success"})
        except BaseException as exc:
            put(exc)

    threading.Thread(target=work, name="jupyter_llm-http-pull", daemon=True).start()

    async def events() -> Any:
        while True:
            item = await queue.get()
            yield item
            if isinstance(item, BaseException) or item.get("status") == "success":
                return

    if not stream:
        async for item in events():
            if isinstance(item, BaseException):
                raise item
        return json_response({"status": "success"})

    first = await queue.get()  # a bad name fails before any progress: answer it with its status
    if isinstance(first, BaseException):
        raise first

    async def lines() -> Any:
        yield ndjson(first)
        if first.get("status") == "success":
            return
        async for item in events():
            yield ndjson({"error": problem_from(item).message} if isinstance(item, BaseException) else item)

    return Streamed(lines(), "application/x-ndjson", lambda: None)


async def _one(line: bytes) -> Any:
    yield line


@endpoint
async def copy(request: Any) -> Any:
    body = Body(await read_json(request))
    source = body.text("source", required=True, nonempty=True, max_len=512)
    destination = body.text("destination", required=True, nonempty=True, max_len=512)
    await run_blocking(ctx(request).manager.copy, source, destination)
    return _empty()


@endpoint
async def delete(request: Any) -> Any:
    body = Body(await read_json(request))
    name = model_name(body)
    await run_blocking(ctx(request).manager.remove, name)
    return _empty()


def _empty() -> Any:
    from starlette.responses import Response

    return Response(b"", status_code=200)


def routes() -> list[Any]:
    """Starlette routes of the Ollama store API."""
    from starlette.routing import Route

    return [
        Route("/api/pull", pull, methods=["POST"]),
        Route("/api/copy", copy, methods=["POST"]),
        Route("/api/delete", delete, methods=["DELETE"]),
    ]
