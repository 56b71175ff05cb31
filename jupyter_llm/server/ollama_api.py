"""Ollama's HTTP API, with its JSON shapes: streams are NDJSON, durations are nanoseconds.

Routes: ``GET /`` and ``/api/version``, ``/api/tags``, ``/api/ps``; ``POST /api/show``,
``/api/generate``, ``/api/chat``, ``/api/embed``, ``/api/embeddings``; the store's routes
(pull, copy, delete) are in :mod:`.ollama_store`. Errors are ``{"error": "..."}`` with a 4xx/5xx status.

Ollama's semantics kept: a generate/chat with an empty prompt (or no messages) only loads the
model, and with ``keep_alive: 0`` unloads it; ``keep_alive`` on any request sets how long the
model stays loaded after it; ``options.num_ctx`` is the context per request (the model is
reloaded if it differs and the model is idle). Tools: see :mod:`.tool_shapes`; ``think``,
``logprobs`` and ``suffix`` (fill in the middle): :mod:`.choice_shapes`. Not supported, with
a 400 saying so: images, custom ``template`` and the deprecated ``context``.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timezone
from typing import Any

from ..capabilities import capabilities
from ..wire import OLLAMA_TIME
from . import ollama_create, ollama_store
from .backend import UNCHANGED, Job, Loaded
from .choice_shapes import ollama_asks, ollama_piece, wants
from .params import (
    MAX_INPUTS,
    Body,
    bad,
    grammar_for,
    json_format,
    keep_alive,
    model_name,
    ollama_options,
    sampling,
)
from .responses import (
    Raw,
    Streamed,
    ctx,
    direct_framing,
    endpoint,
    json_response,
    ndjson,
    problem_from,
    read_json,
    run_blocking,
    run_worker_call,
    until_disconnect,
)
from .tool_shapes import forced_grammar, message_calls, ollama_calls, read_tools

COMPATIBLE_VERSION = "0.9.0"
"""The Ollama API version whose shapes this server follows (clients check it for features)."""
FOREVER = "2318-11-25T00:00:00Z"
"""What Ollama reports as expires_at for a model kept loaded forever."""
_ROLES = ("system", "user", "assistant", "tool")


def now() -> str:
    return datetime.now(timezone.utc).strftime(OLLAMA_TIME)


def _iso(timestamp: float | None) -> str:
    if not timestamp:
        return datetime.fromtimestamp(0, timezone.utc).isoformat()
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat()


def _ns(seconds: float | None) -> int:
    return int(max(seconds or 0.0, 0.0) * 1e9)


def parameter_size(n: Any) -> str:
    if not isinstance(n, int) or n <= 0:
        return ""
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def details(record: Any) -> dict[str, Any]:
    """Ollama's ``details`` object of a stored model."""
    s = record.summary or {}
    arch = s.get("architecture") or ""
    return {"parent_model": (record.ollama or {}).get("parent") or "", "format": "gguf", "family": arch,
            "families": [arch] if arch else None,
            "parameter_size": parameter_size(s.get("parameters")), "quantization_level": s.get("quantization") or ""}


# -- listing ---------------------------------------------------------------------------------

@endpoint
async def root(request: Any) -> Any:
    from starlette.responses import PlainTextResponse

    return PlainTextResponse("Ollama is running")


@endpoint
async def version(request: Any) -> Any:
    return json_response({"version": COMPATIBLE_VERSION})


@endpoint
async def tags(request: Any) -> Any:
    records = await run_blocking(ctx(request).manager.models)
    remote = [{"name": m["name"], "model": m["name"], "modified_at": _iso(None), "size": m["size"] or 0, "digest": "",
               "details": {}} for m in await run_blocking(ctx(request).manager.remotes.served, request.headers)]
    return json_response({"models": [{
        "name": r.name, "model": r.name, "modified_at": _iso(r.created), "size": r.size,
        "digest": r.sha256 or "", "details": details(r),
    } for r in records] + remote})


@endpoint
async def ps(request: Any) -> Any:
    models = await run_blocking(ctx(request).manager.ps)
    out = []
    for m in models:
        described = m.to_dict()
        measured = described.get("measured") or {}
        totals = {dev: sizes.get("total", 0) for dev, sizes in measured.items() if isinstance(sizes, dict)}
        size = sum(totals.values()) or (described.get("estimate") or {}).get("total") or m.record.size
        expires = m.expires_at
        out.append({
            "name": m.name, "model": m.name, "size": size, "digest": m.record.sha256 or "",
            "details": details(m.record), "expires_at": _iso(expires) if expires is not None else FOREVER,
            "size_vram": sum(v for dev, v in totals.items() if not dev.upper().startswith("CPU")),
            "context_length": getattr(m.report, "n_ctx_per_slot", None),
        })
    return json_response({"models": out})


@endpoint
async def show(request: Any) -> Any:
    body = Body(await read_json(request))
    name = model_name(body)
    verbose = body.flag("verbose", False)
    shown = await run_blocking(ctx(request).manager.show, name)
    record, info = shown["record"], shown["info"]
    template = info.chat_template or ""
    model_info = {k: _info_value(v, verbose) for k, v in info.metadata.items()}
    # modelfile (FROM the name, never a path of the store), parameters, template, system: a
    # derived model's own (ollama_create.show_fields)
    shown_fields = ollama_create.show_fields(record, template)
    return json_response({
        "license": _license(record) or info.license or (record.details or {}).get("license") or "",
        **shown_fields, "details": details(record), "model_info": model_info,
        "capabilities": capabilities(info, ollama_template=record.ollama.get("template") or None),
        "modified_at": _iso(record.created),
    })


def _license(record: Any) -> str:
    found = (record.ollama or {}).get("license") or ""
    return "\n".join(found) if isinstance(found, list) else str(found)


def _info_value(value: Any, verbose: bool) -> Any:
    """Metadata as Ollama shows it: arrays (the vocabulary…) only when ``verbose``."""
    if isinstance(value, list):
        return value if verbose else None
    return value if value is None or isinstance(value, str | int | float | bool) else None


# -- generation ------------------------------------------------------------------------------

def _keep_alive(body: Body) -> Any:
    return keep_alive(body.data["keep_alive"]) if body.has("keep_alive") else UNCHANGED


def _refuse_unsupported(body: Body) -> None:
    if body.array("images"):
        raise bad("images are not supported: this server runs text models only", "images")


async def _prepare(request: Any, body: Body, name: str) -> tuple[Any, Any, Any, int | None]:
    """keep_alive, sampling options, format and num_ctx, checked against the stored model (404 if
    there is none) before anything is loaded."""
    c = ctx(request)
    body.flag("stream")  # checked now, so that a load-only request refuses a bad value too
    keep = _keep_alive(body)
    schema = json_format(body.raw("format"))
    remote = c.manager.remotes.model(name)  # NAME/MODEL: no record here; the remote knows its context
    record = remote.record if remote is not None else await run_blocking(c.manager.record, name)
    trained = int((record.summary or {}).get("context_length") or 0) or 1 << 20
    fields, num_ctx = ollama_options(body.obj("options"), n_ctx_max=trained)
    predict = (record.ollama.get("params") or {}).get("num_predict")  # the model's PARAMETER, unless asked
    if isinstance(predict, int) and predict > 0 and (body.raw("options") or {}).get("num_predict") is None:
        fields["max_tokens"] = predict  # (no num_predict here is "no limit", which the model's value replaces)
    options = sampling(fields)
    return keep, options, schema, num_ctx


async def _load_or_unload(request: Any, name: str, keep: Any, num_ctx: int | None, what: str) -> Any:
    c = ctx(request)
    if keep == 0:
        await run_blocking(c.backend.unload, name)
        reason = "unload"
    else:
        loaded = await run_blocking(c.backend.ensure, name, keep_alive=keep, num_ctx=num_ctx)
        loaded.release()
        reason = "load"
    item: dict[str, Any] = {"model": name, "created_at": now(), "done": True, "done_reason": reason}
    item.update({"response": ""} if what == "generate" else {"message": {"role": "assistant", "content": ""}})
    return json_response(item)


async def _run(request: Any, name: str, body: Body, keep: Any, num_ctx: int | None, options: Any,
               schema: Any, kind: str, payload: Any, what: str) -> Any:
    c = ctx(request)
    stream = body.flag("stream", True)
    grammar = await run_blocking(grammar_for, schema) if schema is not None else None
    specs, pick = read_tools(body, options=body.obj("options")) if what == "chat" else ([], None)
    grammar = (await run_blocking(forced_grammar, specs, pick) if specs else None) or grammar  # (tool_shapes)
    extras, think = ollama_asks(body)  # logprobs, top_logprobs, think (choice_shapes)
    shaped, chat = wants(extras, think), what == "chat"

    def piece(text: str, stamp: str | None = None) -> dict[str, Any]:
        item: dict[str, Any] = {"model": name, "created_at": stamp or now()}
        item.update({"response": text} if what == "generate" else {"message": {"role": "assistant", "content": text}})
        item["done"] = False  # the last item overrides it with the statistics
        return item

    direct = stream and not shaped and not specs  # plain lines: the worker may write them (worker/direct.py)
    if direct:
        extras = dataclasses.replace(extras, direct=direct_framing(lambda text, stamp: ndjson(piece(text, stamp))))
    loaded = await run_blocking(c.backend.ensure, name, keep_alive=keep, num_ctx=num_ctx)
    job = c.backend.start(loaded, kind, payload, options, grammar, "options.num_predict", tools=specs or None,
                          tool_choice=pick, extras=extras, think=think)
    if not await until_disconnect(request, job.prime, job.cancel):
        return _gone()

    if not stream:
        collected = await until_disconnect(request, job.collect, job.cancel)
        if collected is None:
            return _gone()
        text, result = collected
        whole = ollama_piece(piece(text), result, chat=chat) if shaped else piece(text)
        if job.tool_calls:
            whole["message"]["tool_calls"] = ollama_calls(job.tool_calls)
        return json_response({**whole, **_final(result, job, loaded)})

    async def lines() -> Any:
        try:
            async for item in job.events():
                if isinstance(item, Raw):  # bytes a slow client left of the worker's line
                    yield item
                elif hasattr(item, "n_tokens"):
                    yield ndjson(ollama_piece(piece(item.text), item, chat=chat) if shaped else piece(item.text))
                else:
                    if job.tool_calls:  # parsed once the answer ended, sent before the last line
                        calls = piece("")
                        calls["message"]["tool_calls"] = ollama_calls(job.tool_calls)
                        yield ndjson(calls)
                    yield ndjson({**piece(""), **_final(item, job, loaded)})
        except Exception as exc:  # a worker that died mid-answer: Ollama reports it in the stream
            yield ndjson({"error": problem_from(exc).message})

    return Streamed(lines(), "application/x-ndjson", job.cancel, job.hand_over if direct else None)


def _final(result: Any, job: Job, loaded: Loaded) -> dict[str, Any]:
    total = time.perf_counter() - job.started + loaded.load_s
    prompt_s = (result.prompt_tokens / result.prompt_tok_per_s if result.prompt_tok_per_s > 0
                else result.ttft_s or 0.0)
    eval_s = (result.completion_tokens / result.gen_tok_per_s if result.gen_tok_per_s > 0
              else max(result.total_s - (result.ttft_s or 0.0), 0.0))
    return {"done": True, "done_reason": result.finish_reason, "total_duration": _ns(total),
            "load_duration": _ns(loaded.load_s), "prompt_eval_count": result.prompt_tokens,
            "prompt_eval_duration": _ns(prompt_s), "eval_count": result.completion_tokens,
            "eval_duration": _ns(eval_s)}


@endpoint
async def generate(request: Any) -> Any:
    body = Body(await read_json(request))
    name = model_name(body)
    prompt = body.text("prompt", "")
    system = body.text("system")
    raw = body.flag("raw", False)
    suffix = body.text("suffix")
    if body.text("template"):
        raise bad("'template' is not supported by this server", "template")
    if body.array("context"):
        raise bad("'context' (deprecated in Ollama) is not supported; send the conversation to /api/chat", "context")
    _refuse_unsupported(body)
    keep, options, schema, num_ctx = await _prepare(request, body, name)
    if not prompt:
        return await _load_or_unload(request, name, keep, num_ctx, "generate")
    payload: Any
    if suffix:  # fill in the middle with the model's FIM tokens (400 without them: 'insert')
        kind, payload = "fim", (prompt, suffix)
    elif raw:
        kind, payload = "prompt", prompt
    else:
        kind = "chat"
        payload = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return await _run(request, name, body, keep, num_ctx, options, schema, kind, payload, "generate")


def messages_of(items: list[Any]) -> list[dict[str, str]]:
    """Ollama chat messages → ``{"role", "content"}`` dicts (400 on anything malformed)."""
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise bad(f"'messages[{i}]' must be an object with 'role' and 'content'", f"messages[{i}]")
        m = Body(item, prefix=f"messages[{i}].")
        role = m.text("role", required=True)
        if role not in _ROLES:
            raise bad(f"'messages[{i}].role' must be one of {', '.join(_ROLES)}, not {role!r}", f"messages[{i}].role")
        if m.array("images"):
            raise bad("images are not supported: this server runs text models only", f"messages[{i}].images")
        m.array("tool_calls")  # (type-checked; read by tool_shapes)
        out.append({"role": role, "content": m.text("content", ""), **message_calls(item, i)})
    return out


@endpoint
async def chat(request: Any) -> Any:
    body = Body(await read_json(request))
    name = model_name(body)
    messages = messages_of(body.array("messages") or [])
    _refuse_unsupported(body)
    keep, options, schema, num_ctx = await _prepare(request, body, name)
    if not messages:
        return await _load_or_unload(request, name, keep, num_ctx, "chat")
    return await _run(request, name, body, keep, num_ctx, options, schema, "chat", messages, "chat")


# -- embeddings ------------------------------------------------------------------------------

async def _embed(request: Any, body: Body, texts: list[str], normalize: bool) -> tuple[list[list[float]], int, Any]:
    c = ctx(request)
    name = model_name(body)
    keep = _keep_alive(body)
    record = await run_blocking(c.manager.record, name)
    trained = int((record.summary or {}).get("context_length") or 0) or 1 << 20
    _, num_ctx = ollama_options(body.obj("options"), n_ctx_max=trained)
    loaded = await run_blocking(c.backend.ensure, name, keep_alive=keep, num_ctx=num_ctx)
    vectors, n_tokens = await run_worker_call(request, c.backend.embed, loaded, texts, normalize)
    return vectors, n_tokens, loaded


@endpoint
async def embed(request: Any) -> Any:
    t0 = time.perf_counter()
    body = Body(await read_json(request))
    raw = body.raw("input", [])  # no input: only load the model, as Ollama does
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise bad("'input' must be a string or a list of strings", "input")
    if len(texts) > MAX_INPUTS:
        raise bad(f"'input' has {len(texts)} texts; at most {MAX_INPUTS} per request", "input")
    if body.raw("dimensions") is not None:
        raise bad("'dimensions' is not supported: embeddings have the model's own size", "dimensions")
    body.flag("truncate")
    vectors, n_tokens, loaded = await _embed(request, body, texts, True)
    return json_response({"model": loaded.name, "embeddings": vectors, "total_duration": _ns(time.perf_counter() - t0),
                          "load_duration": _ns(loaded.load_s), "prompt_eval_count": n_tokens})


@endpoint
async def embeddings(request: Any) -> Any:
    body = Body(await read_json(request))
    prompt = body.text("prompt", "")
    vectors, _, _ = await _embed(request, body, [prompt] if prompt else [], False)
    return json_response({"embedding": vectors[0] if vectors else []})


def _gone() -> Any:
    """The answer to a client that left: nobody reads it; the status is for the metrics."""
    return json_response({"error": "the client closed the connection"}, 499)


def routes() -> list[Any]:
    """Starlette routes of the Ollama API."""
    from starlette.routing import Route

    return [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/api/version", version, methods=["GET"]),
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/embed", embed, methods=["POST"]),
        Route("/api/embeddings", embeddings, methods=["POST"]),
        *ollama_store.routes(),
        *ollama_create.routes(),
    ]
