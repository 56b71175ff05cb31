"""Tools in a chat prompt: the template's own ``tools``, or a generic system prompt.

A chat request's payload is a list of messages, or ``{"messages": [...], "tools": [...]}`` when
tools are offered (OpenAI's function-tool shape). Messages may be assistant turns with
``tool_calls`` (``{"id", "type": "function", "function": {"name", "arguments": {...}}}``) and
``tool`` turns with ``tool_call_id`` and ``name``.

A template that mentions ``tools`` (Hermes, Qwen, Llama 3.x, Mistral…) gets the list as the
Jinja variable ``tools`` and those messages as they are, as Hugging Face's renderer passes them.
A template that does not gets, as Ollama and llama-server do for such models, the tools
described in the system prompt, with the instruction to answer with a bare JSON call (the
generic format the kernel parses, and the one a forced call's grammar makes); its assistant
calls are written out as that JSON and, if it knows no ``tool`` role, tool results become user
turns that say which call they answer.
"""

from __future__ import annotations

import json
import re
from typing import Any

Message = dict[str, Any]

_MENTIONS_TOOLS = re.compile(r"\btools\b")
_MENTIONS_TOOL_ROLE = re.compile(r"""['"]tool['"]|\btool_calls\b|\bipython\b""")


def unpack(payload: Any) -> tuple[list[Message], list[dict[str, Any]] | None]:
    """The messages and the tools (None: none offered) of a chat payload."""
    if isinstance(payload, dict):
        tools = payload.get("tools") or None
        return list(payload.get("messages") or []), tools
    return list(payload), None


def pack(messages: list[Message], tools: list[dict[str, Any]] | None) -> Any:
    return {"messages": messages, "tools": tools} if tools else messages


def prepare(source: str, messages: list[Message],
            tools: list[dict[str, Any]] | None) -> tuple[list[Message], dict[str, Any]]:
    """The messages to render with ``source`` and the extra template values (``tools``)."""
    if not tools and not any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
        return messages, {}
    if _MENTIONS_TOOLS.search(source):
        return [_plain_content(m) for m in messages], ({"tools": tools} if tools else {})
    tool_role = bool(_MENTIONS_TOOL_ROLE.search(source))
    out = [_generic(m, tool_role) for m in messages]
    if tools:
        text = generic_system(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{text}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, {}


def generic_system(tools: list[dict[str, Any]]) -> str:
    """The tools described for a model whose template knows none."""
    listed = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    return ("You can call these functions (JSON schemas of their parameters):\n" + listed + "\n\nTo call a "
            'function, answer with only a JSON object, nothing else: {"name": "<function name>", '
            '"arguments": {<its arguments>}}. After the result comes back, answer the user. If no function '
            "helps, answer normally.")


def _plain_content(message: Message) -> Message:
    if message.get("content") is None:
        return {**message, "content": ""}
    return message


def _generic(message: Message, tool_role: bool) -> Message:
    """One message as a template without tool support can render it."""
    calls = message.get("tool_calls")
    if calls:
        written = "\n".join(json.dumps({"name": _function(c).get("name"), "arguments": _function(c).get("arguments")},
                                       ensure_ascii=False) for c in calls)
        content = message.get("content") or ""
        return {"role": message.get("role", "assistant"), "content": f"{content}\n{written}".lstrip()}
    if message.get("role") == "tool" and not tool_role:
        name = message.get("name") or message.get("tool_call_id") or "the function"
        return {"role": "user", "content": f"Result of {name}: {message.get('content') or ''}"}
    return _plain_content(message)


def _function(call: Any) -> dict[str, Any]:
    if not isinstance(call, dict):
        return {}
    fn = call.get("function", call)
    return fn if isinstance(fn, dict) else {}


__all__ = ["generic_system", "pack", "prepare", "unpack"]
