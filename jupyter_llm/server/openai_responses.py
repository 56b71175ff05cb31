"""OpenAI's Responses API: ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``.

A response answers ``input`` (a string, or a list of message, ``function_call`` and
``function_call_output`` items) after the ``instructions``, through the same chat turn as
every other route. With ``previous_response_id`` the conversation kept for that response
(:mod:`.response_store`: in memory, bounded, per server) comes first; ``store: false``
responses are not kept. Tools are function tools in the Responses' flat shape
(``{"type": "function", "name", "parameters"}``); the model's calls come back as
``function_call`` output items. ``text.format`` json_schema / json_object constrains the
text with a grammar. Streams are server-sent events in the order the official client
expects: ``response.created``, ``response.in_progress``, each output item's added / delta /
done events, then ``response.completed`` (``response.incomplete`` when ``max_output_tokens``
cut the answer), every event with its ``sequence_number``.

Refused with a 400 that says so: built-in tools (web search, files, computer…), images and
files in the input, ``item_reference`` items, ``truncation: auto``, background mode.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from ..tools import tool_choice
from .backend import UNCHANGED
from .openai_api import MAX_TOKENS_LIMIT, _gone
from .params import Body, HTTPProblem, bad, common_sampling, grammar_for, sampling
from .response_store import ResponseStore
from .responses import Streamed, ctx, endpoint, json_response, problem_from, read_json, run_blocking, until_disconnect
from .tool_shapes import forced_grammar

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


def _store(request: Any) -> ResponseStore:
    state = request.app.state
    store = getattr(state, "responses", None)
    if store is None:  # one per server, made on first use (only the event loop's thread gets here)
        store = state.responses = ResponseStore()
    return store


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- the request -----------------------------------------------------------------------------

def _text(value: Any, where: str) -> str:
    """A message's content: a string or a list of text parts."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise bad(f"'{where}' must be a string or a list of content parts", "input")
    out = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            raise bad(f"'{where}[{i}]' is a content part of type {kind!r}; this server runs text models and takes "
                      "only input_text and output_text parts", "input")
        text = part.get("text", part.get("refusal"))
        if not isinstance(text, str):
            raise bad(f"'{where}[{i}].text' must be a string", "input")
        out.append(text)
    return "".join(out)


def _arguments(raw: Any, where: str) -> dict[str, Any]:
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        raise bad(f"'{where}.arguments' is not valid JSON", "input") from None
    if not isinstance(value, dict):
        raise bad(f"'{where}.arguments' must be a JSON object (as a string)", "input")
    return value


def messages_of(raw: Any, names: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """``input`` → chat messages; ``names`` maps earlier call ids to their function's name."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise bad("'input' must be a string or a non-empty list of input items", "input")
    names = dict(names or {})
    out: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(f"'{where}' must be an object", "input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise bad(f"'{where}.role' must be one of {', '.join(_ROLES)}, not {role!r}", "input")
            out.append({"role": _ROLES[role], "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise bad(f"'{where}' needs a 'call_id' and a 'name' (strings)", "input")
            names[call_id] = name
            call = {"id": call_id, "type": "function",
                    "function": {"name": name, "arguments": _arguments(item.get("arguments"), where)}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":  # one turn: its text and its calls
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise bad(f"'{where}.call_id' must be a string", "input")
            if call_id not in names:
                raise bad(f"'{where}' answers call {call_id!r}, which no function_call in this conversation made",
                          "input")
            out.append({"role": "tool", "content": _text(item.get("output"), f"{where}.output"),
                        "tool_call_id": call_id, "name": names[call_id]})
        elif kind == "reasoning":
            continue  # another model's reasoning: nothing this one can use
        else:
            raise bad(f"'{where}' is an item of type {kind!r}; this server takes message, function_call and "
                      "function_call_output items", "input")
    return out


def _call_names(history: list[dict[str, Any]]) -> dict[str, str]:
    return {c["id"]: c["function"]["name"] for m in history for c in m.get("tool_calls") or ()}


def tools_of(body: Body) -> list[dict[str, Any]] | None:
    """Responses' flat function tools → the chat turn's ``{"type": "function", "function": …}``."""
    raw = body.array("tools")
    if not raw:
        return None
    out = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise bad(f"'tools[{i}]' is a {kind!r} tool; this server runs only function tools", "tools")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise bad(f"'tools[{i}].name' must be a non-empty string", "tools")
        parameters = tool.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise bad(f"'tools[{i}].parameters' must be a JSON schema object", "tools")
        function = {"name": name, "description": tool.get("description") or "", "parameters": parameters}
        out.append({"type": "function", "function": function})
    return out


def tool_choice_of(value: Any, tools: list[dict[str, Any]] | None) -> Any:
    """Responses' ``tool_choice`` → the chat turn's (None, "none", "required" or a named function)."""
    if value is None or value == "auto":
        return None
    if not tools and value != "none":
        raise bad("'tool_choice' needs 'tools'", "tool_choice")
    if value in ("none", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
        if value["name"] not in {t["function"]["name"] for t in tools or ()}:
            raise bad(f"'tool_choice' names {value['name']!r}, which is not one of 'tools'", "tool_choice")
        return {"type": "function", "function": {"name": value["name"]}}
    raise bad("'tool_choice' must be auto, none, required or {\"type\": \"function\", \"name\": NAME}", "tool_choice")


def _format(body: Body) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``text.format`` → (the format to echo, the JSON schema to enforce or None)."""
    text = body.obj("text")
    fmt = text.obj("format") if text is not None else None
    if fmt is None:
        return {"type": "text"}, None
    kind = fmt.text("type", required=True)
    if kind == "text":
        return {"type": "text"}, None
    if kind == "json_object":
        return {"type": "json_object"}, {}
    if kind == "json_schema":
        schema = fmt.raw("schema")
        if not isinstance(schema, dict):
            raise bad("'text.format.schema' must be a JSON schema object", "text.format")
        return dict(fmt.data), schema
    raise bad("'text.format.type' must be text, json_object or json_schema", "text.format")


def _sampling_fields(body: Body) -> dict[str, Any]:
    if body.flag("background", False):
        raise bad("background responses are not supported: stream instead", "background")
    if body.text("truncation", "disabled") != "disabled":
        raise bad("only truncation: disabled is supported (a conversation too long for the context gets a 400)",
                  "truncation")
    fields = common_sampling(body, temperature_max=2.0)
    fields["max_tokens"] = body.integer("max_output_tokens", lo=1, hi=MAX_TOKENS_LIMIT)
    return fields


# -- the answer ------------------------------------------------------------------------------

def _usage(result: Any) -> dict[str, Any]:
    return {"input_tokens": result.prompt_tokens,
            "input_tokens_details": {"cached_tokens": result.prompt_tokens_cached, "cache_write_tokens": 0},
            "output_tokens": result.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _message(mid: str, text: str, status: str) -> dict[str, Any]:
    done = status != "in_progress"
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if done else []
    return {"id": mid, "type": "message", "role": "assistant", "status": status, "content": content}


def _call_item(call: Any, status: str = "completed") -> dict[str, Any]:
    return {"id": "fc_" + call.id.removeprefix("call_"), "type": "function_call", "call_id": call.id,
            "name": call.name, "arguments": call.arguments_json if status == "completed" else "", "status": status}


class Answer:
    """One response being made: its fixed fields, then output items and usage as they come."""

    def __init__(self, body: Body, name: str, options: Any, previous: str | None,
                 tools: list[dict[str, Any]] | None, fmt: dict[str, Any], store: bool) -> None:
        self.id = _new_id("resp")
        self.message_id = _new_id("msg")
        self.created = int(time.time())
        self.base = {
            "id": self.id, "object": "response", "created_at": self.created, "model": name,
            "instructions": body.raw("instructions"), "max_output_tokens": body.raw("max_output_tokens"),
            "previous_response_id": previous, "temperature": options.temperature,
            "top_p": options.top_p, "parallel_tool_calls": bool(body.flag("parallel_tool_calls", True)),
            "tool_choice": body.raw("tool_choice", "auto"),
            "tools": [{"type": "function", **t["function"], "strict": bool(raw.get("strict", False))}
                      for t, raw in zip(tools or (), body.array("tools") or (), strict=True)],
            "text": {"format": fmt}, "truncation": "disabled", "store": store, "metadata": body.raw("metadata", {}),
            "error": None, "incomplete_details": None, "reasoning": {"effort": None, "summary": None},
            "user": body.raw("user"), "background": False,
        }

    def snapshot(self, status: str, output: list[dict[str, Any]] | None = None, result: Any = None,
                 **extra: Any) -> dict[str, Any]:
        out = {**self.base, "status": status, "output": output or [], "usage": None if result is None else
               _usage(result), **extra}
        if status in ("completed", "incomplete"):
            out["completed_at"] = int(time.time())
        return out

    def finished(self, text: str, result: Any, calls: list[Any]) -> dict[str, Any]:
        output = [_message(self.message_id, text, "completed")] if text or not calls else []
        output += [_call_item(c) for c in calls]
        if result.finish_reason == "length":
            return self.snapshot("incomplete", output, result, incomplete_details={"reason": "max_output_tokens"})
        return self.snapshot("completed", output, result)


def history_after(messages: list[dict[str, Any]], text: str, calls: list[Any]) -> list[dict[str, Any]]:
    """The conversation a next response continues: these messages (the instructions are not among
    them) and the answer."""
    answer: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        answer["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name,
                                                                             "arguments": c.arguments}}
                                for c in calls]
    return [*messages, answer]


@endpoint
async def create(request: Any) -> Any:
    c = ctx(request)
    body = Body(await read_json(request))
    name = body.text("model", required=True, nonempty=True, max_len=512)
    store = _store(request)
    previous = body.text("previous_response_id")
    history: list[dict[str, Any]] = []
    if previous is not None:
        kept = store.get(previous)
        if kept is None:
            raise HTTPProblem(404, f"Previous response with id {previous!r} not found: this server keeps the last "
                              f"{store.max_responses} responses in memory (not those with store: false, nor after "
                              "it restarted); send the whole conversation as 'input' instead",
                              code="previous_response_not_found", param="previous_response_id")
        history = kept.history
    new = messages_of(body.raw("input"), _call_names(history))
    instructions = body.text("instructions")
    head = [{"role": "system", "content": instructions}] if instructions else []
    messages = [*head, *history, *new]
    tools = tools_of(body)
    choice = tool_choice_of(body.raw("tool_choice"), tools)
    fmt, schema = _format(body)
    options = sampling(_sampling_fields(body))
    keep = bool(body.flag("store", True))
    stream = bool(body.flag("stream", False))
    answer = Answer(body, name, options, previous, tools, fmt, keep)
    grammar = await run_blocking(grammar_for, schema, "text.format") if schema is not None else None
    # a forced call's grammar wins over text.format, as on the chat route (tool_shapes)
    grammar = (await run_blocking(forced_grammar, tools, tool_choice(choice, tools)) if tools else None) or grammar
    loaded = await run_blocking(c.backend.ensure, name, keep_alive=UNCHANGED)
    job = c.backend.start(loaded, "chat", messages, options, grammar, "max_output_tokens", tools=tools,
                          tool_choice=choice)
    if not await until_disconnect(request, job.prime, job.cancel):
        return _gone()

    def remember(response: dict[str, Any], text: str, calls: list[Any]) -> None:
        if keep:
            store.put(answer.id, response, history_after([*history, *new], text, calls))

    if not stream:
        collected = await until_disconnect(request, job.collect, job.cancel)
        if collected is None:
            return _gone()
        text, result = collected
        response = answer.finished(text, result, job.tool_calls)
        remember(response, text, job.tool_calls)
        return json_response(response)

    return Streamed(_events(answer, job, remember), "text/event-stream", job.cancel)


async def _events(answer: Answer, job: Any, remember: Any) -> Any:
    """The server-sent events of one streamed response."""
    seq = itertools.count()

    def event(kind: str, **fields: Any) -> bytes:
        data = json.dumps({"type": kind, "sequence_number": next(seq), **fields}, ensure_ascii=False)
        return f"event: {kind}\ndata: {data}\n\n".encode()

    mid = answer.message_id
    yield event("response.created", response=answer.snapshot("in_progress"))
    yield event("response.in_progress", response=answer.snapshot("in_progress"))
    parts: list[str] = []
    opened = False
    where = {"output_index": 0, "item_id": mid}
    try:
        async for text in job.texts():
            if not opened:
                opened = True
                for piece in _open_message(event, mid):
                    yield piece
            parts.append(text)
            yield event("response.output_text.delta", **where, content_index=0, delta=text, logprobs=[])
        result = job.result
        if result is None:
            raise bad("the generation was cancelled")
        text, calls = "".join(parts), job.tool_calls
        index = 0
        if opened or not calls:
            if not opened:
                for piece in _open_message(event, mid):
                    yield piece
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            yield event("response.output_text.done", **where, content_index=0, text=text, logprobs=[])
            yield event("response.content_part.done", **where, content_index=0, part=part)
            yield event("response.output_item.done", output_index=0, item=_message(mid, text, "completed"))
            index = 1
        for call in calls:
            item_id = _call_item(call)["id"]
            yield event("response.output_item.added", output_index=index, item=_call_item(call, "in_progress"))
            yield event("response.function_call_arguments.delta", output_index=index, item_id=item_id,
                        delta=call.arguments_json)
            yield event("response.function_call_arguments.done", output_index=index, item_id=item_id,
                        name=call.name, arguments=call.arguments_json)
            yield event("response.output_item.done", output_index=index, item=_call_item(call))
            index += 1
        response = answer.finished(text, result, calls)
        remember(response, text, calls)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        yield event(kind, response=response)
    except Exception as exc:  # a worker that died mid-answer
        problem = problem_from(exc)
        error = {"code": "server_error", "message": problem.message}
        yield event("response.failed", response=answer.snapshot("failed", error=error))


def _open_message(event: Any, mid: str) -> Iterator[bytes]:
    yield event("response.output_item.added", output_index=0, item=_message(mid, "", "in_progress"))
    yield event("response.content_part.added", output_index=0, item_id=mid, content_index=0,
                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})


def _not_found(rid: str) -> HTTPProblem:
    return HTTPProblem(404, f"Response with id {rid!r} not found (this server keeps recent responses in memory "
                       "only, not those made with store: false)", code="not_found", param="response_id")


@endpoint
async def retrieve(request: Any) -> Any:
    rid = request.path_params["response_id"]
    kept = _store(request).get(rid)
    if kept is None:
        raise _not_found(rid)
    return json_response(kept.response)


@endpoint
async def delete(request: Any) -> Any:
    rid = request.path_params["response_id"]
    if not _store(request).delete(rid):
        raise _not_found(rid)
    return json_response({"id": rid, "object": "response", "deleted": True})


def routes() -> list[Any]:
    """Starlette routes of the Responses API."""
    from starlette.routing import Route

    return [
        Route("/v1/responses", create, methods=["POST"]),
        Route("/v1/responses/{response_id}", retrieve, methods=["GET"]),
        Route("/v1/responses/{response_id}", delete, methods=["DELETE"]),
    ]
