"""Anthropic's Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

The official ``anthropic`` client works against this server with ``base_url`` set to it and
the server's token as ``api_key`` (sent as ``x-api-key``, which :mod:`.auth` accepts). The
request goes through the same chat turn as every other route: ``system`` (a string or text
blocks) first, then ``messages`` whose content is a string or text, ``tool_use`` and
``tool_result`` blocks; ``max_tokens`` is required as in Anthropic's API (one larger than
a slot of the model's context lets the answer run until the slot is full). Tools
(``{"name", "description", "input_schema"}``) come back as ``tool_use`` blocks with an ``id``
and an ``input`` object; ``tool_choice`` is ``auto``, ``any``, ``tool`` (with its ``name``) or
``none``. ``output_config.format`` (``json_schema``: structured outputs, what ``messages.parse``
sends) constrains the text with a grammar. Streams are server-sent events: ``message_start``, per
block ``content_block_start``,
``content_block_delta`` (``text_delta`` / ``input_json_delta``) and ``content_block_stop``,
then ``message_delta`` (stop reason and usage, the input tokens included) and ``message_stop``.
Errors have Anthropic's shape ``{"type": "error", "error": {"type", "message"}}``
(:func:`.auth.error_body`), so the client raises its usual exceptions.

The stop reason is ``end_turn``, ``max_tokens``, ``tool_use`` or ``stop_sequence`` (with the
matched string in ``stop_sequence``; the worker reports which one ended the text).
Refused with a 400: images, documents and other non-text blocks; extended thinking; a last
assistant message (prefill).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

from .backend import UNCHANGED
from .openai_api import MAX_TOKENS_LIMIT
from .params import Body, bad, common_sampling, grammar_for, sampling
from .responses import (
    Streamed,
    ctx,
    endpoint,
    json_response,
    problem_from,
    read_json,
    run_blocking,
    run_worker_call,
    until_disconnect,
)


def _blocks(value: Any, where: str) -> list[dict[str, Any]]:
    """A message's content as a list of blocks (a string is one text block)."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if not isinstance(value, list):
        raise bad(f"'{where}' must be a string or a list of content blocks", where)
    for i, block in enumerate(value):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise bad(f"'{where}[{i}]' must be a content block object with a 'type'", where)
    return value


def _text_of(blocks: list[dict[str, Any]], where: str) -> str:
    parts = []
    for i, block in enumerate(blocks):
        if block["type"] != "text":
            raise bad(f"'{where}[{i}]' is a {block['type']!r} block; here this server takes text blocks only", where)
        if not isinstance(block.get("text"), str):
            raise bad(f"'{where}[{i}].text' must be a string", where)
        parts.append(block["text"])
    return "\n".join(parts)


def system_of(value: Any) -> str | None:
    """``system``: a string or a list of text blocks."""
    if value is None:
        return None
    return _text_of(_blocks(value, "system"), "system")


def messages_of(raw: Any) -> list[dict[str, Any]]:
    """Anthropic messages → chat messages (tool_use → tool_calls, tool_result → tool messages)."""
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty list", "messages")
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise bad(f"'{where}' must be an object whose 'role' is user or assistant", "messages")
        role = message["role"]
        texts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(_blocks(message.get("content"), f"{where}.content")):
            at = f"{where}.content[{j}]"
            kind = block["type"]
            if kind == "text":
                texts.append(block)
            elif kind == "tool_use" and role == "assistant":
                tid, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
                if not isinstance(tid, str) or not isinstance(name, str) or not isinstance(arguments, dict):
                    raise bad(f"'{at}' needs an 'id', a 'name' (strings) and an 'input' object", "messages")
                names[tid] = name
                calls.append({"id": tid, "type": "function", "function": {"name": name, "arguments": arguments}})
            elif kind == "tool_result" and role == "user":
                tid = block.get("tool_use_id")
                if tid not in names:
                    raise bad(f"'{at}' answers tool_use {tid!r}, which no assistant message before it made",
                              "messages")
                content = _text_of(_blocks(block.get("content", ""), f"{at}.content"), f"{at}.content")
                if block.get("is_error"):
                    content = f"Error: {content}"
                out.append({"role": "tool", "content": content, "tool_call_id": tid, "name": names[tid]})
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                continue  # another model's reasoning: nothing this one can use
            else:
                raise bad(f"'{at}' is a {kind!r} block, which this server does not take in a {role} message "
                          "(text models only: text, tool_use and tool_result blocks)", "messages")
        if texts or not calls:
            text = _text_of(texts, f"{where}.content")
            out.append({"role": role, "content": text, **({"tool_calls": calls} if calls else {})})
        else:
            out.append({"role": role, "content": None, "tool_calls": calls})
    if out[-1]["role"] == "assistant":
        raise bad("the last message is the assistant's: prefilling the answer is not supported by this server; "
                  "end with a user message", "messages")
    return out


def tools_of(body: Body) -> list[dict[str, Any]] | None:
    """Anthropic tools → the chat turn's function tools."""
    raw = body.array("tools")
    if not raw:
        return None
    out = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise bad(f"'tools[{i}]' must be an object with a 'name'", "tools")
        if tool.get("type") not in (None, "custom"):
            raise bad(f"'tools[{i}]' is a {tool['type']!r} tool; this server runs only custom tools", "tools")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise bad(f"'tools[{i}].input_schema' must be a JSON schema object", "tools")
        out.append({"type": "function", "function": {"name": tool["name"],
                                                     "description": tool.get("description") or "",
                                                     "parameters": schema}})
    return out


def tool_choice_of(body: Body, tools: list[dict[str, Any]] | None) -> Any:
    choice = body.obj("tool_choice")
    if choice is None:
        return None
    kind = choice.text("type", required=True)
    if kind == "auto":
        return None
    if kind == "none":
        return "none"
    if not tools:
        raise bad("'tool_choice' needs 'tools'", "tool_choice")
    if kind == "any":
        return "required"
    if kind == "tool":
        name = choice.text("name", required=True)
        if name not in {t["function"]["name"] for t in tools}:
            raise bad(f"'tool_choice.name' is {name!r}, which is not one of 'tools'", "tool_choice")
        return {"type": "function", "function": {"name": name}}
    raise bad("'tool_choice.type' must be auto, any, tool or none", "tool_choice")


def _output_schema(body: Body) -> dict[str, Any] | None:
    """``output_config.format`` (structured outputs, what ``messages.parse`` sends) → its JSON schema."""
    config = body.obj("output_config")
    fmt = config.obj("format") if config is not None else None
    if fmt is None:
        return None
    schema = fmt.raw("schema")
    if fmt.text("type") != "json_schema" or not isinstance(schema, dict):
        raise bad("'output_config.format' must be {\"type\": \"json_schema\", \"schema\": {...}}", "output_config")
    return schema


def _sampling_fields(body: Body) -> dict[str, Any]:
    thinking = body.obj("thinking")
    if thinking is not None and thinking.text("type") != "disabled":
        raise bad("extended thinking is not supported by this server", "thinking")
    max_tokens = body.integer("max_tokens", lo=1, hi=MAX_TOKENS_LIMIT)
    if max_tokens is None:
        raise bad("max_tokens: Field required", "max_tokens")
    fields = common_sampling(body, temperature_max=1.0)
    fields["max_tokens"] = max_tokens
    stop = body.stop("stop_sequences")
    if stop:
        fields["stop"] = stop
    return fields


def _stop(result: Any, calls: list[Any]) -> dict[str, Any]:
    """The message's ``stop_reason`` and ``stop_sequence`` (the string, when one ended it)."""
    if calls:
        return {"stop_reason": "tool_use", "stop_sequence": None}
    if result.finish_reason == "length":
        return {"stop_reason": "max_tokens", "stop_sequence": None}
    matched = result.stop_sequence
    return {"stop_reason": "stop_sequence" if matched else "end_turn", "stop_sequence": matched}


def _tool_use(call: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}


def _conversation(body: Body) -> list[dict[str, Any]]:
    system = system_of(body.raw("system"))
    head = [{"role": "system", "content": system}] if system else []
    return [*head, *messages_of(body.raw("messages"))]


@endpoint
async def create(request: Any) -> Any:
    c = ctx(request)
    body = Body(await read_json(request))
    name = body.text("model", required=True, nonempty=True, max_len=512)
    options = sampling(_sampling_fields(body))
    messages = _conversation(body)
    tools = tools_of(body)
    choice = tool_choice_of(body, tools)
    stream = bool(body.flag("stream", False))
    schema = _output_schema(body)
    # a forced call keeps its own grammar (chat.start builds it when none is given)
    forced = tools and choice not in (None, "none")
    grammar = await run_blocking(grammar_for, schema, "output_config.format") if schema and not forced else None
    loaded = await run_blocking(c.backend.ensure, name, keep_alive=UNCHANGED)
    if options.max_tokens > loaded.n_ctx_per_slot:
        # max_tokens is required, and clients send generous ones (4096, 32000): past what one slot
        # holds, the answer runs until the slot is full and stop_reason says max_tokens
        options = dataclasses.replace(options, max_tokens=None)
    job = c.backend.start(loaded, "chat", messages, options, grammar, tools=tools, tool_choice=choice)
    if not await until_disconnect(request, job.prime, job.cancel):
        return _gone()
    mid = f"msg_{uuid.uuid4().hex[:24]}"
    base = {"id": mid, "type": "message", "role": "assistant", "model": name}
    if not stream:
        collected = await until_disconnect(request, job.collect, job.cancel)
        if collected is None:
            return _gone()
        text, result = collected
        calls = job.tool_calls
        content = [{"type": "text", "text": text}] if text or not calls else []
        content += [_tool_use(call) for call in calls]
        return json_response({**base, "content": content, **_stop(result, calls),
                              "usage": {"input_tokens": result.prompt_tokens,
                                        "output_tokens": result.completion_tokens}})
    return Streamed(_events(base, job), "text/event-stream", job.cancel)


def _event(kind: str, **fields: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields}, ensure_ascii=False)}\n\n".encode()


async def _events(base: dict[str, Any], job: Any) -> Any:
    """The server-sent events of one streamed message."""
    # the prompt's token count is known when the answer ends: message_delta carries it
    start = {**base, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": 0, "output_tokens": 0}}
    yield _event("message_start", message=start)
    opened = False
    try:
        async for text in job.texts():
            if not opened:
                opened = True
                yield _event("content_block_start", index=0, content_block={"type": "text", "text": ""})
            yield _event("content_block_delta", index=0, delta={"type": "text_delta", "text": text})
        result = job.result
        if result is None:
            raise bad("the generation was cancelled")
        calls = job.tool_calls
        index = 0
        if opened or not calls:
            if not opened:
                yield _event("content_block_start", index=0, content_block={"type": "text", "text": ""})
            yield _event("content_block_stop", index=0)
            index = 1
        for call in calls:
            block = {**_tool_use(call), "input": {}}
            yield _event("content_block_start", index=index, content_block=block)
            yield _event("content_block_delta", index=index,
                         delta={"type": "input_json_delta", "partial_json": json.dumps(call.arguments)})
            yield _event("content_block_stop", index=index)
            index += 1
        yield _event("message_delta", delta=_stop(result, calls),
                     usage={"input_tokens": result.prompt_tokens, "output_tokens": result.completion_tokens})
        yield _event("message_stop")
    except Exception as exc:  # a worker that died mid-answer
        problem = problem_from(exc)
        kind = "invalid_request_error" if problem.status < 500 else "api_error"
        yield _event("error", error={"type": kind, "message": problem.message})


def _gone() -> Any:
    """The answer to a client that left: nobody reads it; the status is for the metrics."""
    return json_response({"type": "error", "error": {"type": "invalid_request_error",
                                                      "message": "the client closed the connection"}}, 499)


@endpoint
async def count_tokens(request: Any) -> Any:
    c = ctx(request)
    body = Body(await read_json(request))
    name = body.text("model", required=True, nonempty=True, max_len=512)
    messages = _conversation(body)
    tools = tools_of(body)
    loaded = await run_blocking(c.backend.ensure, name, keep_alive=UNCHANGED)
    try:
        runtime = loaded.model.runtime
        if tools:  # the prompt the template makes with the tools, counted as a raw prompt
            n = await run_worker_call(request, lambda: runtime.count_tokens(runtime.render(messages, tools)))
        else:
            n = await run_worker_call(request, runtime.count_tokens, messages)
    finally:
        loaded.release()
    return json_response({"input_tokens": int(n)})


def routes() -> list[Any]:
    """Starlette routes of the Anthropic API."""
    from starlette.routing import Route

    return [
        Route("/v1/messages", create, methods=["POST"]),
        Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
    ]
