"""Tool calling, kernel side: tools described, a reply parsed into calls, a call constrained.

- :func:`tool_spec` turns a Python function (its signature, type hints and docstring) or a
  tool in OpenAI's, Ollama's or Anthropic's shape into OpenAI's function-tool shape, the one
  the worker hands the chat template as ``tools``.
- :func:`parse` reads a model's reply into :class:`ToolCall` s, in the formats models are
  trained on: Hermes/Qwen ``<tool_call>{json}</tool_call>``, Llama 3.x JSON
  (``{"name", "parameters"}``, after ``<|python_tag|>`` or alone), Mistral
  ``[TOOL_CALLS][...]``, and the generic fallback, a bare JSON object with ``name`` and
  ``arguments`` (what the worker's generic tool prompt asks for, and what :func:`call_grammar`
  forces). Only calls of offered tools count: anything else stays text.
- :func:`call_grammar` is the GBNF for one call when ``tool_choice`` is ``"required"`` or names
  a function: the name is one of the allowed ones, the arguments match that function's
  parameter schema (:func:`jupyter_llm.runtime.grammar.schema_grammar`, bounded), so even a
  135M model emits a call that :func:`validate` accepts.
- :class:`CallFilter` holds tool-call markup back from a stream, so front ends show only the
  visible text while the calls are parsed at the end.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_TOOLS = 128
"""Tools one request may offer (OpenAI's own limit)."""


@dataclass(frozen=True)
class ToolCall:
    """One call the model asked for."""

    id: str
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        """The arguments as the JSON string OpenAI's API carries."""
        return json.dumps(self.arguments, ensure_ascii=False)

    def to_message(self) -> dict[str, Any]:
        """The entry of an assistant message's ``tool_calls`` (arguments as an object)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# -- describing tools ----------------------------------------------------------------------------


def tool_spec(tool: Callable[..., Any] | dict[str, Any]) -> dict[str, Any]:
    """``{"type": "function", "function": {"name", "description", "parameters"}}`` for a Python
    callable or a tool in OpenAI's, Ollama's or Anthropic's (``input_schema``) shape; raises
    ValueError for anything else."""
    if callable(tool) and not isinstance(tool, dict):
        return _callable_spec(tool)
    if not isinstance(tool, dict):
        raise ValueError(f"a tool must be a Python function or a tool object, not {type(tool).__name__}")
    if tool.get("type", "function") != "function" and "function" not in tool and "input_schema" not in tool:
        raise ValueError(f"tools of type {tool.get('type')!r} are not supported; give function tools")
    fn = tool.get("function", tool)
    if not isinstance(fn, dict):
        raise ValueError("a tool's 'function' must be an object with a 'name'")
    name = fn.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
        raise ValueError(f"a tool's name must be 1-64 letters, digits, '_', '.' or '-', not {name!r}")
    parameters = fn.get("parameters", fn.get("input_schema"))
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise ValueError(f"the parameters of tool {name!r} must be a JSON schema object")
    function: dict[str, Any] = {"name": name, "description": str(fn.get("description") or ""),
                                "parameters": parameters}
    return {"type": "function", "function": function}


def tool_specs(tools: list[Any] | None) -> list[dict[str, Any]]:
    """:func:`tool_spec` of each tool; ValueError for duplicate names or too many."""
    specs = [tool_spec(t) for t in tools or []]
    if len(specs) > MAX_TOOLS:
        raise ValueError(f"{len(specs)} tools were given; at most {MAX_TOOLS}")
    names = [s["function"]["name"] for s in specs]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"two tools are named {name!r}; tool names must be unique")
    return specs


def _callable_spec(fn: Callable[..., Any]) -> dict[str, Any]:
    name = getattr(fn, "__name__", type(fn).__name__)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # a hint that does not resolve: describe the parameter without a type
        hints = {}
    doc = inspect.getdoc(fn) or ""
    summary, described = _docstring(doc)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.name in ("self", "cls"):
            continue
        schema, optional = _type_schema(hints.get(param.name, inspect.Parameter.empty))
        if param.name in described:
            schema["description"] = described[param.name]
        properties[param.name] = schema
        if param.default is inspect.Parameter.empty and not optional:
            required.append(param.name)
    parameters: dict[str, Any] = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": summary, "parameters": parameters}}


def _docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The summary (the first paragraph) and the parameters a Google- or Sphinx-style docstring
    describes."""
    summary = doc.split("\n\n", 1)[0].strip()
    described: dict[str, str] = {}
    for match in re.finditer(r"^\s*:param\s+(?:\w+\s+)?(\w+):\s*(.+)$", doc, re.M):
        described[match.group(1)] = match.group(2).strip()
    section = re.search(r"^(?:Args|Arguments|Parameters):\s*\n((?:[ \t]+.+\n?)+)", doc, re.M)
    if section:
        for match in re.finditer(r"^\s+(\w+)(?:\s*\([^)]*\))?:\s*(.+)$", section.group(1), re.M):
            described.setdefault(match.group(1), match.group(2).strip())
    return summary, described


_PRIMITIVES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _type_schema(hint: Any) -> tuple[dict[str, Any], bool]:
    """The JSON schema of a type hint, and whether it admits None."""
    if hint is inspect.Parameter.empty or hint is Any:
        return {}, False
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        schema, _ = _type_schema(rest[0]) if len(rest) == 1 else ({"anyOf": [_type_schema(a)[0] for a in rest]}, False)
        return schema, len(rest) < len(args)
    if origin is typing.Literal:
        return {"enum": list(args)}, False
    if hint in _PRIMITIVES:
        return {"type": _PRIMITIVES[hint]}, False
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple, set, frozenset):
        item = _type_schema(args[0])[0] if args and args[0] is not Ellipsis else {}
        return ({"type": "array", "items": item} if item else {"type": "array"}), False
    if origin is dict or hint is dict:
        return {"type": "object"}, False
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"enum": [m.value for m in hint]}, False
    model_schema = getattr(hint, "model_json_schema", None)  # a pydantic model
    if callable(model_schema):
        return dict(model_schema()), False
    return {}, False


# -- tool choice ---------------------------------------------------------------------------------


def tool_choice(choice: Any, specs: list[dict[str, Any]]) -> str | None:
    """``tool_choice`` normalised: None (auto), ``"none"``, ``"required"`` or the name of the
    function the model must call; ValueError for anything else."""
    if choice is None or choice == "auto":
        return None
    if choice in ("none", "required"):
        return str(choice) if specs or choice == "none" else None
    if choice == "any":  # Anthropic's and langchain's word for "required"
        return "required"
    name = None
    if isinstance(choice, dict):
        fn = choice.get("function", choice)
        name = fn.get("name") if isinstance(fn, dict) else None
    elif isinstance(choice, str):
        name = choice
    names = [s["function"]["name"] for s in specs]
    if not isinstance(name, str):
        raise ValueError("tool_choice must be 'auto', 'none', 'required' or {'type': 'function', "
                         "'function': {'name': NAME}}")
    if name not in names:
        offered = ", ".join(names) or "none"
        raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools (offered: {offered})")
    return name


def call_schema(specs: list[dict[str, Any]], choice: str) -> dict[str, Any]:
    """The JSON schema of one call of the allowed functions (``choice`` "required": any)."""
    allowed = [s for s in specs if choice == "required" or s["function"]["name"] == choice]
    if not allowed:  # a choice not normalised by tool_choice(): never an empty grammar
        raise ValueError(f"no tool matches tool_choice {choice!r}")
    options = []
    for spec in allowed:
        parameters = dict(spec["function"]["parameters"] or {})
        if not parameters.get("type") and not any(k in parameters for k in ("anyOf", "oneOf", "allOf", "$ref")):
            parameters["type"] = "object"
        options.append({"type": "object", "properties": {"name": {"const": spec["function"]["name"]},
                                                         "arguments": parameters},
                        "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def call_grammar(specs: list[dict[str, Any]], choice: str) -> str:
    """The GBNF grammar of one call (see :func:`call_schema`); ValueError past the bounds of
    :mod:`jupyter_llm.runtime.grammar`."""
    from .runtime.grammar import schema_grammar

    return schema_grammar(call_schema(specs, choice))


def validate(spec: dict[str, Any], arguments: dict[str, Any]) -> list[str]:
    """What is wrong with ``arguments`` for the tool ``spec`` (empty: nothing): ``jsonschema``
    when it is installed, else the required keys and the primitive types."""
    schema = spec["function"].get("parameters") or {}
    import importlib

    try:
        jsonschema = importlib.import_module("jsonschema")  # optional, and without type stubs
    except ImportError:
        return _validate_simply(schema, arguments)
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(arguments)'}: {e.message}"
            for e in validator.iter_errors(arguments)]


_JSON_TYPES: dict[str, Any] = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
                               "object": dict, "array": list, "null": type(None)}


def _validate_simply(schema: dict[str, Any], arguments: Any) -> list[str]:
    if not isinstance(arguments, dict):
        return ["the arguments must be an object"]
    problems = [f"'{key}' is required" for key in schema.get("required", []) if key not in arguments]
    for key, sub in (schema.get("properties") or {}).items():
        kind = sub.get("type") if isinstance(sub, dict) else None
        if key in arguments and isinstance(kind, str) and kind in _JSON_TYPES:
            value = arguments[key]
            if not isinstance(value, _JSON_TYPES[kind]) or (kind in ("integer", "number") and isinstance(value, bool)):
                problems.append(f"'{key}' must be of type {kind}")
    return problems


# -- parsing replies -----------------------------------------------------------------------------

MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")
"""Where a tool call starts in the formats :func:`parse` reads (besides a bare JSON reply)."""
_DECODER = json.JSONDecoder()


def parse(text: str, names: list[str] | None = None) -> tuple[str, list[ToolCall]]:
    """The visible content of a reply and the tool calls in it (see the module docstring).
    With ``names``, only calls of those functions count; a reply with none is all content."""
    allowed = set(names) if names is not None else None
    for parser in (_hermes, _mistral, _python_tag, _bare):
        found = parser(text)
        if found is None:
            continue
        content, raw = found
        calls = [c for c in (_call(item) for item in raw) if c is not None
                 and (allowed is None or c.name in allowed)]
        if calls:
            return content.strip(), calls
    return text, []


def _call(item: Any) -> ToolCall | None:
    """A call from one parsed JSON value: ``{"name", "arguments"|"parameters"}``, possibly
    wrapped as ``{"type": "function", "function": {...}}``, arguments possibly a JSON string."""
    if not isinstance(item, dict):
        return None
    fn: dict[str, Any] = item["function"] if isinstance(item.get("function"), dict) else item
    name = fn.get("name")
    arguments = fn.get("arguments", fn.get("parameters", {} if "name" in fn else None))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    call_id = item.get("id")
    return ToolCall(call_id if isinstance(call_id, str) and call_id else new_call_id(), name, arguments)


def _json_values(text: str, sep: str = "") -> tuple[list[Any], int]:
    """The JSON values at the start of ``text`` (separated by white space or ``sep``), and
    where reading stopped."""
    values: list[Any] = []
    pos = 0
    while True:
        while pos < len(text) and (text[pos].isspace() or (sep and text[pos] == sep)):
            pos += 1
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except ValueError:
            return values, pos
        values.append(value)
        pos = end


def _hermes(text: str) -> tuple[str, list[Any]] | None:
    if "<tool_call>" not in text:
        return None
    content: list[str] = []
    items: list[Any] = []
    pieces = text.split("<tool_call>")
    content.append(pieces[0])
    for piece in pieces[1:]:
        body, closed, after = piece.partition("</tool_call>")
        values, end = _json_values(body)
        items.extend(v for value in values for v in (value if isinstance(value, list) else [value]))
        content.append(after if closed else body[end:])
    return "".join(content), items


def _mistral(text: str) -> tuple[str, list[Any]] | None:
    if "[TOOL_CALLS]" not in text:
        return None
    head, _, rest = text.partition("[TOOL_CALLS]")
    values, _ = _json_values(rest)
    if values:
        return head, [v for value in values for v in (value if isinstance(value, list) else [value])]
    items = []  # the newer form: [TOOL_CALLS]name[ARGS]{...}
    for match in re.finditer(r"([A-Za-z0-9_.\-]+)\[ARGS\]", rest):
        args, _ = _json_values(rest[match.end():])
        if args:
            items.append({"name": match.group(1), "arguments": args[0]})
    return head, items


def _python_tag(text: str) -> tuple[str, list[Any]] | None:
    if "<|python_tag|>" not in text:
        return None
    head, _, rest = text.partition("<|python_tag|>")
    values, end = _json_values(rest, ";")
    return head + rest[end:], values


def _bare(text: str) -> tuple[str, list[Any]] | None:
    """The whole reply one JSON value (or several), perhaps in a Markdown code fence."""
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.S)
    if fenced:
        body = fenced.group(1)
    if not body.startswith(("{", "[")):
        return None
    values, end = _json_values(body, ";")
    if not values or body[end:].strip():
        return None
    items: list[Any] = []
    for value in values:
        if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
            items.extend(value["tool_calls"])
        else:
            items.extend(value if isinstance(value, list) else [value])
    return "", items


# -- streaming -----------------------------------------------------------------------------------


class CallFilter:
    """The visible part of a streamed reply: text that may be (the start of) a tool call is
    held back until the reply ends, then :meth:`finish` parses the whole reply."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.text = ""
        self.shown = 0
        self._holding = False

    def feed(self, piece: str) -> str:
        """Add a piece of the reply; returns the text that may be shown now."""
        self.text += piece
        if self._holding:
            return ""
        text = self.text
        if not text[self.shown:].strip() and self.shown == 0:
            return ""  # leading white space: wait to see what the reply starts with
        if self.shown == 0 and text.lstrip().startswith(("{", "[", "```")):
            self._holding = True  # perhaps a bare JSON call
            return ""
        hits = [i for i in (text.find(m, self.shown) for m in MARKERS) if i >= 0]
        if hits:
            self._holding = True
            end = min(hits)
        else:
            end = len(text)
            for marker in MARKERS:  # a tail that could grow into a marker waits
                for n in range(min(len(marker) - 1, len(text) - self.shown), 0, -1):
                    if text.endswith(marker[:n]):
                        end = min(end, len(text) - n)
                        break
        out, self.shown = text[self.shown:end], max(self.shown, end)
        return out

    def finish(self) -> tuple[str, str, list[ToolCall]]:
        """(the rest to show, the whole visible content, the calls) once the reply ended."""
        content, calls = parse(self.text, self.names)
        if not calls:
            content = self.text
        shown = self.text[:self.shown]
        rest = content[len(shown):] if content.startswith(shown) else ""
        return rest, shown + rest, calls


__all__ = ["CallFilter", "ToolCall", "call_grammar", "call_schema", "parse", "tool_choice", "tool_spec",
           "tool_specs", "validate"]
