"""Ollama's chat templates (Go ``text/template``) rewritten as Jinja, for the worker's renderer.

A model pulled from an Ollama registry or found in an Ollama store may carry its chat template
only in its manifest's TEMPLATE layer, written for Go's ``text/template``. The subset Ollama's
library templates use is translated here into the Jinja that :mod:`jupyter_llm.worker.template`
renders under its meter:

- fields: ``.System``, ``.Prompt``, ``.Response``, ``.Messages``, ``.Tools``, and inside ``range`` over the
  messages ``.Role``, ``.Content`` and ``.ToolCalls`` (``$.System`` reaches the top level from inside);
- tools: ``range .Tools`` (``.``, ``.Function``, ``.Function.Name``/``Description``/``Parameters``)
  and ``range .ToolCalls`` in a message (``.Function.Name``, ``.Function.Arguments``); objects
  print as JSON, as Ollama's types print themselves, and ``json X`` too; the idiom
  ``$last := eq (len (slice $.Messages $i)) 1`` is the loop's last message;
- ``{{ if X }}`` / ``{{ else if X }}`` / ``{{ else }}`` / ``{{ end }}``, ``{{ range .Messages }}``
  and ``{{ range $i, $m := .Messages }}``, with conditions built from fields, ``eq``/``ne``
  with a string, ``and``/``or``/``not``;
- ``{{-`` and ``-}}`` trim the white space beside them, as in Go; nothing else is trimmed (the
  block tags written here opt out of the renderer's ``trim_blocks`` and ``lstrip_blocks``).

Anything else (variables, ``len``, ``slice``, tool calls, pipelines) raises ValueError naming
the construct, so the caller can fall back to the GGUF's own template or say why it cannot chat.
A template without ``.Messages`` (the older single-turn form) is rendered once per exchange by
:func:`render_turns`, as Ollama does.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_FIELDS_TOP = {".System": "system", ".Prompt": "prompt", ".Response": "response", ".Messages": "messages",
               "$.System": "system", "$.Prompt": "prompt", "$.Response": "response", "$.Messages": "messages",
               ".Tools": "tools", "$.Tools": "tools"}
_FIELDS_MESSAGE = {".Role": "message.role", ".Content": "message.content", ".ToolCalls": "message.tool_calls"}
# Inside ``range .Tools`` and ``range .ToolCalls`` (tools and calls in OpenAI's shape, see worker/tool_prompt)
_FIELDS_TOOL = {".": "tool", ".Type": "tool.type", ".Function": "tool.function", ".Function.Name": "tool.function.name",
                ".Function.Description": "tool.function.description",
                ".Function.Parameters": "tool.function.parameters"}
_FIELDS_CALL = {".": "call", ".ID": "call.id", ".Function": "call.function", ".Function.Name": "call.function.name",
                ".Function.Arguments": "call.function.arguments"}
_OBJECTS = {"tools", "tool", "tool.function", "tool.function.parameters", "message.tool_calls", "call",
            "call.function", "call.function.arguments"}
"""Values Go prints as JSON (Ollama's tool types print themselves so): printed with tojson."""
_LAST = re.compile(r"^\$(\w+)\s*:=\s*eq\s+\(len\s+\(slice\s+\$\.Messages\s+\$\w+\)\)\s+1$")
"""``$last := eq (len (slice $.Messages $i)) 1``, the idiom of Ollama's templates for the last message."""
_STRING = re.compile(r'^"(?:[^"\\]|\\.)*"$')


def is_multi_turn(source: str) -> bool:
    """Whether the template loops over ``.Messages`` itself (else it renders one exchange)."""
    return ".Messages" in source


def to_jinja(source: str) -> str:
    """The Jinja equivalent of an Ollama Go template (the subset in the module docstring)."""
    out: list[str] = []
    stack: list[str] = []  # "if" / "for", to close with the right end tag
    loop_vars: list[dict[str, str]] = []  # names of $index and $message in each range
    pos = 0
    trim_next = False
    for match in _ACTION.finditer(source):
        text = source[pos:match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        out.append(_literal(text))
        trim_next = bool(match.group(3))
        pos = match.end()
        action = match.group(2).strip()
        names = loop_vars[-1] if loop_vars else {}  # (the innermost range's variables and fields)
        fields = {k: v for k, v in names.items() if k.startswith(".")}
        out.append(_action(action, stack, loop_vars, fields, names))
    tail = source[pos:]
    out.append(_literal(tail.lstrip() if trim_next else tail))
    if "".join(out).endswith("\n"):
        out.append("\n")  # Jinja drops a template's last newline (keep_trailing_newline off); Go keeps it
    if stack:
        raise ValueError(f"the Ollama template leaves {len(stack)} block(s) open (a missing {{{{ end }}}})")
    return "".join(out)


def _action(action: str, stack: list[str], loop_vars: list[dict[str, str]], fields: dict[str, str],
            names: dict[str, str]) -> str:
    if action.startswith("/*"):
        return ""  # a comment
    if action == "end":
        if not stack:
            raise ValueError("the Ollama template has an {{ end }} without a block")
        kind = stack.pop()
        if kind == "for":
            loop_vars.pop()
        return "{%+ endif +%}" if kind == "if" else "{%+ endfor +%}"
    if action == "else":
        return "{%+ else +%}"
    if action.startswith("else if "):
        return "{%+ elif " + _condition(action[8:], fields, names) + " +%}"
    if action.startswith("if "):
        stack.append("if")
        return "{%+ if " + _condition(action[3:], fields, names) + " +%}"
    if action.startswith("range "):
        target = action[6:].strip()
        declared: dict[str, str] = {}
        m = re.match(r"^\$(\w+)\s*,\s*\$(\w+)\s*:=\s*(.+)$", target)
        if m:
            declared = {f"${m.group(1)}": "loop.index0", f"${m.group(2)}": "message"}
            target = m.group(3).strip()
        ranges = {".Messages": ("message", "messages", _FIELDS_MESSAGE), ".Tools": ("tool", "tools", _FIELDS_TOOL),
                  ".ToolCalls": ("call", "message.tool_calls", _FIELDS_CALL)}
        ranged = ranges.get(target[1:] if target.startswith("$.") else target)
        if ranged is None or (ranged[0] == "call" and "message" not in names.values()):
            raise ValueError(f"the Ollama template ranges over {target!r}; only .Messages, .Tools and a message's "
                             ".ToolCalls are supported")
        item, over, item_fields = ranged
        if item != "message":
            declared = {k: (item if v == "message" else v) for k, v in declared.items()}
        stack.append("for")
        loop_vars.append({**item_fields, **declared})
        return "{%+ for " + item + " in " + over + " +%}"
    last = _LAST.match(action)
    if last and loop_vars:
        loop_vars[-1][f"${last.group(1)}"] = "loop.last"
        return ""
    words = _split(action)
    if len(words) == 2 and words[0] == "json":
        return "{{ (" + _value(words[1], fields, names) + " | tojson) }}"
    value = _value(action, fields, names)
    return "{{ " + (f"({value} | tojson)" if value in _OBJECTS else value) + " }}"


def _condition(expr: str, fields: dict[str, str], names: dict[str, str]) -> str:
    words = _split(expr)
    if not words:
        raise ValueError("the Ollama template has an empty condition")
    head, args = words[0], words[1:]
    if head in ("eq", "ne") and len(args) == 2:
        op = "==" if head == "eq" else "!="
        return f"({_value(args[0], fields, names)} {op} {_value(args[1], fields, names)})"
    if head in ("and", "or") and args:
        return "(" + f" {head} ".join(_condition(a, fields, names) for a in args) + ")"
    if head == "not" and len(args) == 1:
        return f"(not {_condition(args[0], fields, names)})"
    if len(words) == 1:
        return _value(head, fields, names)
    raise ValueError(f"the Ollama template uses {expr!r}, which jupyter_llm cannot render")


def _value(word: str, fields: dict[str, str], names: dict[str, str]) -> str:
    word = word.strip()
    if word.startswith("(") and word.endswith(")"):
        return _condition(word[1:-1], fields, names)
    if _STRING.match(word):
        return word
    if word in fields:
        return fields[word]
    if word in _FIELDS_TOP:
        return _FIELDS_TOP[word]
    for var, name in names.items():
        if not var.startswith("$"):
            continue
        if word == var:
            return name
        if word.startswith(var + "."):
            return _FIELDS_MESSAGE.get("." + word[len(var) + 1:]) or _unsupported(word)
    return _unsupported(word)


def _unsupported(word: str) -> str:
    raise ValueError(f"the Ollama template uses {word!r}, which jupyter_llm cannot render")


def _split(expr: str) -> list[str]:
    """Words of a Go template expression; parenthesised groups and strings stay whole."""
    words, depth, current, quoted = [], 0, "", False
    for i, c in enumerate(expr):
        if quoted:
            current += c
            if c == '"' and expr[i - 1] != "\\":
                quoted = False
            continue
        if c == '"':
            quoted = True
            current += c
        elif c == "(":
            depth += 1
            current += c
        elif c == ")":
            depth -= 1
            current += c
        elif c.isspace() and depth == 0:
            if current:
                words.append(current)
            current = ""
        else:
            current += c
    if current:
        words.append(current)
    return words


def _literal(text: str) -> str:
    """Template text as Jinja literal text (Jinja's own delimiters escaped)."""
    if not any(d in text for d in ("{{", "{%", "{#")):
        return text
    return "{% raw %}" + text + "{% endraw %}"


def render_turns(render: Callable[..., str], messages: list[dict[str, str]]) -> str:
    """A single-turn template applied the way Ollama applies it: once per exchange of the
    conversation (the answer filled in), then once for the new message with an empty answer."""
    system = "\n\n".join(m.get("content", "") for m in messages if m.get("role") == "system")
    turns = [m for m in messages if m.get("role") != "system"]
    out, first = [], True
    i = 0
    while i < len(turns):
        prompt = turns[i].get("content", "") if turns[i].get("role") == "user" else ""
        response = ""
        if i + 1 < len(turns) and turns[i + 1].get("role") == "assistant":
            response = turns[i + 1].get("content", "")
            i += 1
        i += 1
        last = i >= len(turns)
        out.append(render(system=system if first else "", prompt=prompt, response="" if last else response,
                          messages=[]))
        first = False
    return "".join(out)
