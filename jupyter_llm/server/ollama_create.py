"""Ollama's create routes: ``POST /api/create`` and ``HEAD`` / ``POST /api/blobs/sha256:<hex>``.

``ollama create`` (and ollama-python's ``create_blob`` + ``create``) first uploads the files a
Modelfile names (a GGUF, LoRA adapters) as blobs, then sends ``/api/create`` with ``from`` (a
model name) or ``files`` / ``adapters`` ({file name: digest}) and the layers (``system``,
``template``, ``parameters``, ``messages``, ``license``); the deprecated ``modelfile`` text is
read too. The model is made by :func:`jupyter_llm.derived.create`, as ``%llm create`` makes it:
a record over its base's files. Progress is Ollama's NDJSON statuses, ending ``success``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import IntegrityError
from .params import MAX_BLOB_BYTES, Body, HTTPProblem, bad, model_name
from .responses import Streamed, ctx, endpoint, json_response, ndjson, problem_from, read_json, run_blocking

if TYPE_CHECKING:
    from ..store.derive import CreateSpec
    from ..store.records import ModelRecord


def _digest(request: Any) -> str:
    from ..store.upload import hex_of

    digest = str(request.path_params.get("digest", ""))
    try:
        hex_of(digest)
    except ValueError as exc:
        raise bad(f"{exc}; the path is /api/blobs/sha256:<hex>", "digest") from None
    return digest


@endpoint
async def blob_exists(request: Any) -> Any:
    """200 when the blob is here (identical bytes from another source are linked in), else 404."""
    from starlette.responses import Response

    from ..store.upload import find

    found = await run_blocking(find, _digest(request))
    return Response(b"", status_code=200 if found is not None else 404)


@endpoint
async def blob_upload(request: Any) -> Any:
    """Stream the body into the store, verified against the digest (400 if it is not that blob)."""
    from starlette.responses import Response

    from ..store.upload import Upload, find

    digest = _digest(request)
    declared = request.headers.get("content-length", "")
    if await run_blocking(find, digest) is not None:
        return Response(b"", status_code=200)  # already here; the body is not needed
    upload = await run_blocking(Upload, digest, max_bytes=MAX_BLOB_BYTES,
                                declared=int(declared) if declared.isdigit() else None)
    try:
        async for chunk in request.stream():
            if chunk:
                await run_blocking(upload.write, chunk)
        await run_blocking(upload.finish)
    except IntegrityError as exc:
        raise HTTPProblem(400, str(exc), code="digest_mismatch") from None
    finally:
        upload.abort()
    return Response(b"", status_code=201)


def _blobs(body: Body, key: str) -> tuple[list[Path], list[str]]:
    """``files`` / ``adapters`` ({name: digest}) → the blobs' paths (400 for one never uploaded)."""
    from ..store.upload import blob_path, hex_of

    given = body.raw(key)
    if given is None:
        return [], []
    if not isinstance(given, dict) or not all(isinstance(v, str) for v in given.values()):
        raise bad(f"'{key}' must be an object of file names and their digests (sha256:<hex>)", key)
    paths, names = [], []
    for name, digest in given.items():
        try:
            hex_of(digest)
        except ValueError as exc:
            raise bad(f"'{key}.{name}': {exc}", key) from None
        path = blob_path(digest)
        if not path.is_file():
            raise bad(f"'{key}.{name}': blob {digest} was not uploaded; POST it to /api/blobs/{digest} first", key)
        paths.append(path)
        names.append(str(name))
    return paths, names


def _spec(body: Body) -> CreateSpec:
    from ..derived import spec_of

    license_ = body.raw("license")
    if license_ is not None and not (isinstance(license_, str) or (
            isinstance(license_, list) and all(isinstance(x, str) for x in license_))):
        raise bad("'license' must be a string or a list of strings", "license")
    params = body.obj("parameters")
    if body.text("quantize"):
        raise bad("'quantize' is not supported: create from a GGUF of the quantization you want", "quantize")
    messages = body.array("messages")
    if messages and not all(isinstance(m, dict) for m in messages):
        raise bad("'messages' must be a list of objects with 'role' and 'content'", "messages")
    spec = spec_of(body.text("modelfile"), from_=body.text("from", max_len=512) or body.text("from_", max_len=512),
                   system=body.text("system"), template=body.text("template"),
                   parameters=dict(params.data) if params is not None else None,
                   messages=[{"role": m.get("role"), "content": m.get("content")} for m in messages or ()],
                   license=license_, local=False)
    files, _ = _blobs(body, "files")
    adapters, _ = _blobs(body, "adapters")
    if files:
        spec.files, spec.from_ = files, ""
        spec.owned += files
    if adapters:
        spec.adapters = adapters
        spec.owned += adapters
    return spec


@endpoint
async def create(request: Any) -> Any:
    """Make a derived model; progress as Ollama's NDJSON statuses (one object without ``stream``)."""
    from ..derived import create as create_model

    body = Body(await read_json(request))
    name = model_name(body)
    stream = body.flag("stream", True)
    spec = await run_blocking(_spec, body)
    statuses: list[str] = []
    manager = ctx(request).manager
    try:
        await run_blocking(create_model, manager, name, spec, status=statuses.append)
    except Exception as exc:
        if not stream or not statuses:
            raise
        error = problem_from(exc).message
        return _lines([*({"status": s} for s in statuses), {"error": error}])
    if not stream:
        return json_response({"status": "success"})
    return _lines([*({"status": s} for s in statuses), {"status": "success"}])


def _lines(items: list[dict[str, Any]]) -> Any:
    async def lines() -> Any:
        for item in items:
            yield ndjson(item)

    return Streamed(lines(), "application/x-ndjson", lambda: None)


def show_fields(record: ModelRecord, template: str) -> dict[str, Any]:
    """``/api/show``'s ``modelfile``, ``parameters``, ``template`` and ``system`` of a stored model:
    a derived model's own Modelfile and layers, else its manifest's layers over the GGUF's template."""
    from ..store import modelfile as mf

    layers = record.ollama or {}
    params = layers.get("params") or (record.details or {}).get("params") or {}
    template = layers.get("template") or template
    system = layers.get("system") or ""
    modelfile = layers.get("modelfile") or mf.render(
        record.name, template=template, system=system, parameters=params, header="Modelfile generated by jupyter_llm")
    return {"modelfile": modelfile, "parameters": mf.parameters_text(params), "template": template,
            "system": system}


def routes() -> list[Any]:
    """Starlette routes of Ollama's create API."""
    from starlette.routing import Route

    return [
        Route("/api/create", create, methods=["POST"]),
        Route("/api/blobs/{digest}", blob_exists, methods=["HEAD"]),
        Route("/api/blobs/{digest}", blob_upload, methods=["POST"]),
    ]
