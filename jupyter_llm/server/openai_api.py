"""OpenAI's HTTP API under ``/v1``: models, chat completions, completions, embeddings.

Streams are server-sent events ending in ``data: [DONE]``; ``stream_options.include_usage``
adds a last chunk with the token counts. Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``, so the official client raises its usual
exceptions (``AuthenticationError``, ``NotFoundError``, ``BadRequestError``…).

Models not loaded are loaded on demand (keep_alive 5 minutes, as through the Ollama API).
Beyond OpenAI's parameters, ``top_k``, ``min_p`` and ``repeat_penalty`` are accepted as
llama.cpp's servers do. ``n``, ``logprobs``, ``reasoning_effort`` and ``suffix``: see
:mod:`.choice_shapes`. Refused with a 400 that says so: ``logit_bias``, non-zero
presence/frequency penalties, images, token-id prompts. Tools: see :mod:`jupyter_llm.server.tool_shapes`.
"""

from __future__ import annotations

import base64
import dataclasses
import struct
import time
import uuid
from typing import Any

from .._version import __version__
from .backend import UNCHANGED
from .choice_shapes import indexed, openai_asks, openai_choices, openai_delta, openai_usage, wants
from .params import MAX_INPUTS, Body, bad, common_sampling, grammar_for, sampling
from .responses import (
    Raw,
    Streamed,
    ctx,
    direct_framing,
    endpoint,
    json_response,
    problem_from,
    read_json,
    run_blocking,
    run_worker_call,
    sse,
    until_disconnect,
)
from .tool_shapes import finish_reason, forced_grammar, message_calls, openai_calls, read_tools

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_TOKENS_LIMIT = 2**31


def _model(record: Any) -> dict[str, Any]:
    from ..capabilities import of_record  # an extra field (Ollama's names); OpenAI's clients keep extras

    return {"id": record.name, "object": "model", "created": int(record.created or 0), "owned_by": record.source,
            "capabilities": of_record(record)}


@endpoint
async def list_models(request: Any) -> Any:
    records = await run_blocking(ctx(request).manager.models)
    remote = [{"id": m["name"], "object": "model", "created": 0, "owned_by": m["remote"]}
              for m in await run_blocking(ctx(request).manager.remotes.served, request.headers)]
    return json_response({"object": "list", "data": [_model(r) for r in records] + remote})


@endpoint
async def get_model(request: Any) -> Any:
    name = request.path_params["model_id"]
    if ctx(request).manager.remotes.model(name) is not None:  # NAME/MODEL of a remote engine
        return json_response({"id": name, "object": "model", "created": 0, "owned_by": name.partition("/")[0]})
    record = await run_blocking(ctx(request).manager.record, name)
    return json_response(_model(record))


def _text_content(value: Any, where: str) -> str:
    """A message's content: a string, null, or a list of text parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise bad(f"'{where}[{i}]' must be a content part object with a 'type'", where)
            if part["type"] != "text":
                raise bad(f"content parts of type {part['type']!r} are not supported: this server runs text "
                          "models only", where)
            text = part.get("text")
            if not isinstance(text, str):
                raise bad(f"'{where}[{i}].text' must be a string", where)
            parts.append(text)
        return "".join(parts)
    raise bad(f"'{where}' must be a string or a list of content parts", where)


def messages_of(items: Any) -> list[dict[str, str]]:
    """OpenAI messages → ``{"role", "content"}`` dicts (400 on anything malformed)."""
    if not isinstance(items, list) or not items:
        raise bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise bad(f"'messages[{i}]' must be an object with 'role' and 'content'", "messages")
        role = item.get("role")
        if role not in _ROLES:
            raise bad(f"'messages[{i}].role' must be one of {', '.join(_ROLES)}, not {role!r}", "messages")
        out.append({"role": _ROLES[role], "content": _text_content(item.get("content"), f"messages[{i}].content"),
                    **message_calls(item, i)})
    return out


def _sampling_fields(body: Body, default_max: int | None) -> dict[str, Any]:
    """OpenAI's sampling parameters (plus llama.cpp's extras) → SamplingOptions fields."""
    for key in ("presence_penalty", "frequency_penalty"):
        if body.number(key, 0.0, lo=-2.0, hi=2.0) != 0.0:
            raise bad(f"'{key}' is not supported (use 'repeat_penalty')", key)
    logit_bias = body.raw("logit_bias")
    if logit_bias is not None and (not isinstance(logit_bias, dict) or logit_bias):
        raise bad("'logit_bias' is not supported", "logit_bias")
    fields = common_sampling(body, temperature_max=2.0)
    max_tokens = body.integer("max_completion_tokens", lo=1, hi=MAX_TOKENS_LIMIT)
    if max_tokens is None:
        max_tokens = body.integer("max_tokens", lo=1, hi=MAX_TOKENS_LIMIT)
    fields["max_tokens"] = default_max if max_tokens is None else max_tokens
    stop = body.stop()
    if stop:
        fields["stop"] = stop
    return fields


def _schema(body: Body) -> dict[str, Any] | None:
    fmt = body.obj("response_format")
    if fmt is None:
        return None
    kind = fmt.text("type", required=True)
    if kind == "text":
        return None
    if kind == "json_object":
        return {}
    if kind == "json_schema":
        spec = fmt.obj("json_schema")
        schema = spec.raw("schema") if spec is not None else None
        if not isinstance(schema, dict):
            raise bad("'response_format.json_schema.schema' must be a JSON schema object", "response_format")
        return schema
    raise bad("'response_format.type' must be text, json_object or json_schema", "response_format")


def _include_usage(body: Body, stream: bool) -> bool:
    options = body.obj("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad("'stream_options' is only allowed with stream: true", "stream_options")
    return bool(options.flag("include_usage", False))


def _usage(result: Any) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


async def _complete(request: Any, body: Body, kind: str, payload: Any, default_max: int | None,
                    chat: bool, echo: str = "") -> Any:
    c = ctx(request)
    name = body.text("model", required=True, nonempty=True, max_len=512)
    options = sampling(_sampling_fields(body, default_max))
    extras, think = openai_asks(body, chat=chat)  # n, logprobs, reasoning_effort (choice_shapes)
    stream = bool(body.flag("stream", False))
    include_usage = _include_usage(body, stream)
    schema = _schema(body)
    grammar = await run_blocking(grammar_for, schema, "response_format") if schema is not None else None
    specs, tool_pick = read_tools(body) if chat else ([], None)  # a forced call's grammar wins (tool_shapes)
    grammar = (await run_blocking(forced_grammar, specs, tool_pick) if specs else None) or grammar
    shaped = wants(extras, think)
    prefix = "chatcmpl" if chat else "cmpl"
    base = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": name,
            "system_fingerprint": f"jupyter_llm-{__version__}"}
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(content: str | None, finish: str | None, *, role: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                {} if content is None else {"content": content})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": finish}
        item = {**base, "object": obj, "choices": [choice]}
        if include_usage:
            item["usage"] = None
        return item

    direct = stream and not shaped and not specs  # the pieces are plain chunks: the worker may write them
    if direct:
        extras = dataclasses.replace(extras, direct=direct_framing(lambda text, _stamp: sse(chunk(text, None))))
    loaded = await run_blocking(c.backend.ensure, name, keep_alive=UNCHANGED)
    job = c.backend.start(loaded, kind, payload, options, grammar,
                          "max_completion_tokens" if body.has("max_completion_tokens") else "max_tokens",
                          tools=specs or None, tool_choice=tool_pick, extras=extras, think=think)
    if not await until_disconnect(request, job.prime, job.cancel):
        return _gone()

    if not stream:
        collected = await until_disconnect(request, job.collect, job.cancel)
        if collected is None:
            return _gone()
        text, result = collected
        if chat:
            calls = {"tool_calls": openai_calls(job.tool_calls)} if job.tool_calls else {}
            message = {"role": "assistant", "content": text if text or not calls else None, **calls}
            choice = {"index": 0, "message": message, "logprobs": None,
                      "finish_reason": finish_reason(result, job.tool_calls)}
        else:
            choice = {"index": 0, "text": echo + text, "logprobs": None, "finish_reason": _finish(result.finish_reason)}
        obj = "chat.completion" if chat else "text_completion"
        choices = openai_choices(choice, job.results, chat=chat, echo=echo) if shaped else [choice]
        usage = openai_usage(job.results) if shaped else _usage(result)
        return json_response({**base, "object": obj, "choices": choices, "usage": usage})

    async def events() -> Any:
        try:
            for index in range(extras.n):
                if chat:
                    yield sse(indexed(chunk(None, None, role=True), index))
                if echo:
                    yield sse(indexed(chunk(echo, None), index))
            async for item in job.events():
                if isinstance(item, Raw):  # bytes a slow client left of the worker's chunk
                    yield item
                elif hasattr(item, "n_tokens"):
                    piece = chunk(item.text, None)
                    yield sse(openai_delta(piece, item, chat=chat) if shaped else piece)
                else:
                    for other in job.results[1:]:
                        yield sse(indexed(chunk(None, _finish(other.finish_reason)), other.index))
                    if job.tool_calls:  # parsed once the answer ended: all of them in one delta
                        calls = chunk(None, None)
                        calls["choices"][0]["delta"] = {"tool_calls": openai_calls(job.tool_calls, stream=True)}
                        yield sse(calls)
                    yield sse(chunk(None, finish_reason(item, job.tool_calls) if chat else _finish(item.finish_reason)))
                    if include_usage:
                        usage = openai_usage(job.results) if shaped else _usage(item)
                        yield sse({**base, "object": obj, "choices": [], "usage": usage})
            yield sse("[DONE]")
        except Exception as exc:  # a worker that died mid-answer
            problem = problem_from(exc)
            yield sse({"error": {"message": problem.message, "type": "server_error", "param": None,
                                 "code": problem.code}})

    return Streamed(events(), "text/event-stream", job.cancel, job.hand_over if direct else None)


def _gone() -> Any:
    """The answer to a client that left: nobody reads it; the status is for the metrics."""
    return json_response({"error": {"message": "the client closed the connection", "type": "invalid_request_error",
                                    "param": None, "code": "client_closed"}}, 499)


@endpoint
async def chat_completions(request: Any) -> Any:
    body = Body(await read_json(request))
    messages = messages_of(body.raw("messages"))
    return await _complete(request, body, "chat", messages, None, chat=True)


@endpoint
async def completions(request: Any) -> Any:
    body = Body(await read_json(request))
    prompt = body.raw("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad("'prompt' must be a string (token-id prompts and several prompts are not supported)", "prompt")
    if not prompt:
        raise bad("'prompt' must not be empty", "prompt")
    suffix = body.text("suffix")
    if body.integer("best_of", 1, lo=1, hi=MAX_TOKENS_LIMIT) != 1:
        raise bad("only best_of=1 is supported", "best_of")
    echo = prompt if body.flag("echo", False) else ""
    if suffix is not None:  # fill in the middle, with the model's FIM tokens (400 without: 'insert')
        return await _complete(request, body, "fim", (prompt, suffix), 16, chat=False, echo=echo)
    return await _complete(request, body, "prompt", prompt, 16, chat=False, echo=echo)


@endpoint
async def embeddings(request: Any) -> Any:
    c = ctx(request)
    body = Body(await read_json(request))
    name = body.text("model", required=True, nonempty=True, max_len=512)
    raw = body.raw("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise bad("'input' must be a string or a non-empty list of strings (token ids are not supported)", "input")
    if len(texts) > MAX_INPUTS:
        raise bad(f"'input' has {len(texts)} texts; at most {MAX_INPUTS} per request", "input")
    encoding = body.text("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad("'encoding_format' must be float or base64", "encoding_format")
    if body.raw("dimensions") is not None:
        raise bad("'dimensions' is not supported: embeddings have the model's own size", "dimensions")
    loaded = await run_blocking(c.backend.ensure, name, keep_alive=UNCHANGED)
    vectors, n_tokens = await run_worker_call(request, c.backend.embed, loaded, texts, True)
    data = []
    for i, vector in enumerate(vectors):
        value: Any = vector
        if encoding == "base64":  # little-endian float32, as OpenAI sends it
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return json_response({"object": "list", "data": data, "model": name,
                          "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})


def routes() -> list[Any]:
    """Starlette routes of the OpenAI API."""
    from starlette.routing import Route

    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
    ]
