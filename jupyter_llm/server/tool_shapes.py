"""Tool calling in the HTTP API's two shapes: requests read, calls written back.

OpenAI: ``tools`` and ``tool_choice`` (``auto``, ``none``, ``required`` or
``{"type": "function", "function": {"name"}}``); assistant messages with ``tool_calls`` whose
``function.arguments`` is a JSON *string*; ``tool`` messages with ``tool_call_id``. Answers carry
``message.tool_calls[]`` (``id``, ``type: "function"``, arguments as a string) and
``finish_reason: "tool_calls"``; streams send them as ``delta.tool_calls`` with an ``index``.

Ollama: ``tools``; calls as ``message.tool_calls[].function.arguments`` *objects*; tool results as
``tool`` messages (``tool_name``). Ollama's API has no ``tool_choice``; this server takes the
OpenAI values as an extension, at the top level or as ``options.tool_choice`` (what
``ollama.chat(options=...)`` and langchain's ``ChatOllama(...).bind_tools(..., options=...)`` can
send), to force a call by grammar.

The tools and the choice go to the backend's job (``backend.start(..., tools=, tool_choice=)``),
which hands them to :func:`jupyter_llm.chat.start`; the calls come back in ``job.tool_calls``.
"""

from __future__ import annotations

import json
from typing import Any

from ..tools import ToolCall, call_grammar, new_call_id, tool_choice, tool_specs
from .params import Body, bad


def read_tools(body: Body, *, options: Body | None = None) -> tuple[list[dict[str, Any]], Any]:
    """The request's tools (OpenAI's function shape) and normalised tool choice; 400 when malformed."""
    raw = body.array("tools") or []
    choice = body.raw("tool_choice")
    if choice is None and options is not None:
        choice = options.raw("tool_choice")
    try:
        specs = tool_specs(raw)
        normal = tool_choice(choice, specs)
    except ValueError as exc:
        raise bad(str(exc), "tools" if "tool_choice" not in str(exc) else "tool_choice") from None
    return specs, normal


def forced_grammar(specs: list[dict[str, Any]], choice: Any) -> str | None:
    """The grammar of a forced call (tool_choice required or named), else None; 400 past the bounds."""
    if not specs:
        return None
    try:
        choice = tool_choice(choice, specs)  # idempotent: a raw choice must not make an empty grammar
    except ValueError as exc:
        raise bad(str(exc), "tool_choice") from None
    if choice in (None, "none"):
        return None
    try:
        return call_grammar(specs, choice)
    except ValueError as exc:
        raise bad(f"the tools' parameter schemas cannot be enforced: {exc}", "tools") from None


def _arguments(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            raise bad(f"'{where}' must be a JSON object (as a string)", where) from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"'{where}' must be a JSON object", where)
    return value


def message_calls(item: dict[str, Any], i: int) -> dict[str, Any]:
    """The tool fields of message ``i`` (either shape): ``tool_calls`` with arguments as objects,
    or a tool result's ``tool_call_id`` and ``name``; {} for a plain message."""
    extra: dict[str, Any] = {}
    calls = item.get("tool_calls")
    if calls:
        if not isinstance(calls, list):
            raise bad(f"'messages[{i}].tool_calls' must be a list", f"messages[{i}].tool_calls")
        out = []
        for j, call in enumerate(calls):
            where = f"messages[{i}].tool_calls[{j}]"
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad(f"'{where}.function' must be an object with a 'name'", where)
            call_id = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else new_call_id()
            out.append({"id": call_id, "type": "function",
                        "function": {"name": fn["name"], "arguments": _arguments(fn.get("arguments"),
                                                                                 f"{where}.function.arguments")}})
        extra["tool_calls"] = out
    if item.get("role") == "tool":
        for key, target in (("tool_call_id", "tool_call_id"), ("name", "name"), ("tool_name", "name")):
            if isinstance(item.get(key), str):
                extra[target] = item[key]
    return extra


def openai_calls(calls: list[ToolCall], *, stream: bool = False) -> list[dict[str, Any]]:
    """``tool_calls`` as OpenAI writes them (arguments a JSON string; with ``index`` in streams)."""
    out = []
    for i, call in enumerate(calls):
        item: dict[str, Any] = {"id": call.id, "type": "function",
                                "function": {"name": call.name, "arguments": call.arguments_json}}
        out.append({"index": i, **item} if stream else item)
    return out


def ollama_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """``tool_calls`` as Ollama writes them (arguments an object)."""
    return [{"id": c.id, "function": {"index": i, "name": c.name, "arguments": c.arguments}}
            for i, c in enumerate(calls)]


def finish_reason(result: Any, calls: list[ToolCall]) -> str:
    """OpenAI's finish reason: ``tool_calls`` when the model called a tool."""
    if calls:
        return "tool_calls"
    return "length" if result.finish_reason == "length" else "stop"


__all__ = ["finish_reason", "forced_grammar", "message_calls", "ollama_calls", "openai_calls", "read_tools"]
