"""Ollama's Modelfile: read one the way Ollama does, write one back, type its parameters.

A Modelfile is a list of instructions, one per line, the name case-insensitive::

    FROM smollm2                      # a model name, or a path to a GGUF file
    SYSTEM You are a pirate.          # the rest of the line ...
    TEMPLATE \"\"\"{{ .Prompt }}\"\"\"      # ... or a quoted text, which may span lines
    PARAMETER temperature 0.2         # typed: num_ctx is an int, temperature a float
    PARAMETER stop "<|im_end|>"       # repeated: a list
    MESSAGE user Are you a pirate?    # a conversation put before every chat
    ADAPTER ./lora.gguf               # a LoRA adapter (a GGUF of general.type "adapter")
    LICENSE \"\"\"...\"\"\"

Ollama's rules, kept: a ``#`` starts a comment only where an instruction could start (inside a
value it is text); a value that opens with ``"`` or ``\"\"\"`` ends at the first line end where it
is closed again, so it may span lines and hold quotes; an unquoted value is the rest of the line,
trimmed; the last SYSTEM / TEMPLATE wins; LICENSE, ADAPTER and MESSAGE add up; a file needs a
FROM. Errors name the line and say what to write instead (:class:`ModelfileError`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelfileError

INSTRUCTIONS = ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser",
                "parameter", "message", "requires")
UNSUPPORTED = ("draft", "renderer", "parser")
"""Instructions Ollama reads that need its own engine (speculative drafts, Go renderers/parsers)."""
ROLES = ("system", "user", "assistant")

INT_PARAMETERS = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep", "seed",
                  "num_predict", "top_k", "repeat_last_n")
FLOAT_PARAMETERS = ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                    "frequency_penalty")
BOOL_PARAMETERS = ("use_mmap", "numa")
LIST_PARAMETERS = ("stop",)
DEPRECATED_PARAMETERS = ("penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock",
                         "mirostat", "mirostat_tau", "mirostat_eta", "tfs_z")
"""Ollama warns about and ignores these; so do we (they reach nothing in llama.cpp's sampler here)."""
PARAMETERS = INT_PARAMETERS + FLOAT_PARAMETERS + BOOL_PARAMETERS + LIST_PARAMETERS


@dataclass
class Command:
    """One instruction: ``name`` is ``model`` for FROM, the parameter's name for PARAMETER, else
    the instruction in lower case; ``args`` its text (``role: content`` for MESSAGE)."""

    name: str
    args: str
    line: int = 0


@dataclass
class Modelfile:
    """A parsed Modelfile: its commands in order, and what they mean together."""

    commands: list[Command] = field(default_factory=list)

    def _last(self, name: str) -> str | None:
        found = [c.args for c in self.commands if c.name == name]
        return found[-1] if found else None

    @property
    def from_(self) -> str:
        return self._last("model") or ""

    @property
    def system(self) -> str | None:
        return self._last("system")

    @property
    def template(self) -> str | None:
        return self._last("template")

    @property
    def licenses(self) -> list[str]:
        return [c.args for c in self.commands if c.name == "license"]

    @property
    def adapters(self) -> list[str]:
        return [c.args for c in self.commands if c.name == "adapter"]

    @property
    def messages(self) -> list[dict[str, str]]:
        out = []
        for c in self.commands:
            if c.name == "message":
                role, _, content = c.args.partition(": ")
                out.append({"role": role, "content": content})
        return out

    @property
    def parameters(self) -> dict[str, Any]:
        """PARAMETER values typed as Ollama types them; ``stop`` a list, deprecated ones left out."""
        params: dict[str, Any] = {}
        for c in self.commands:
            if c.name in _NOT_PARAMETERS or c.name in DEPRECATED_PARAMETERS:
                continue
            value = parameter_value(c.name, c.args, line=c.line)
            if c.name in LIST_PARAMETERS:
                params.setdefault(c.name, []).extend(value)
            else:
                params[c.name] = value
        return params

    def unsupported(self) -> list[Command]:
        return [c for c in self.commands if c.name in UNSUPPORTED]


_NOT_PARAMETERS = frozenset({"model", "license", "template", "system", "adapter", "draft", "renderer", "parser",
                             "message", "requires"})


def parameter_value(name: str, raw: Any, *, line: int = 0) -> Any:
    """``raw`` (a Modelfile's text, or a JSON value from ``/api/create``) as parameter ``name``'s
    type; ModelfileError for an unknown name or a value of the wrong type."""
    where = f"Modelfile line {line}: " if line else ""
    if name in DEPRECATED_PARAMETERS:
        return None
    if name not in PARAMETERS:
        import difflib

        close = difflib.get_close_matches(name, PARAMETERS, n=1)
        hint = f" — did you mean {close[0]!r}?" if close else f"; known: {', '.join(PARAMETERS)}"
        raise ModelfileError(f"{where}unknown parameter {name!r}{hint}", line)
    text = raw.strip() if isinstance(raw, str) else raw
    try:
        if name in LIST_PARAMETERS:
            items = [text] if isinstance(text, str) else text
            if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
                raise ValueError
            return list(items)
        if name in BOOL_PARAMETERS:
            if isinstance(text, bool):
                return text
            if isinstance(text, str) and text.lower() in ("true", "false", "1", "0", "t", "f"):
                return text.lower() in ("true", "1", "t")
            raise ValueError
        if isinstance(text, bool):
            raise ValueError
        if name in INT_PARAMETERS:
            if isinstance(text, float) and text.is_integer():
                return int(text)
            return int(text) if isinstance(text, int | str) else _raise()
        return float(text) if isinstance(text, int | float | str) else _raise()
    except ValueError:
        kind = ("a list of strings" if name in LIST_PARAMETERS else "true or false" if name in BOOL_PARAMETERS
                else "a whole number" if name in INT_PARAMETERS else "a number")
        raise ModelfileError(f"{where}parameter {name} must be {kind}, not {raw!r}", line) from None


def _raise() -> Any:
    raise ValueError


def check_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """An ``/api/create`` ``parameters`` object typed like PARAMETER lines (ModelfileError if not)."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        typed = parameter_value(str(name), value)
        if typed is not None:
            out[str(name)] = typed
    return out


# -- reading ---------------------------------------------------------------------------------

def parse(text: str) -> Modelfile:
    """Read a Modelfile's text (see the module docstring); ModelfileError names the line."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    commands: list[Command] = []
    i = 0
    while i < len(lines):
        number, line = i + 1, lines[i].strip(" \t")
        i += 1
        if not line or line.startswith("#"):
            continue
        word, _, rest = _cut(line)
        name = word.lower()
        if name not in INSTRUCTIONS:
            raise ModelfileError(
                f"Modelfile line {number}: {word!r} is not an instruction; a line starts with one of "
                f"{', '.join(n.upper() for n in INSTRUCTIONS)} (or # for a comment)", number)
        if name == "parameter":
            key, _, rest = _cut(rest)
            if not key or not all(c.isascii() and (c.isalnum() or c == "_") for c in key) or not rest:
                raise ModelfileError(f"Modelfile line {number}: PARAMETER needs a name and a value, "
                                     "e.g. PARAMETER num_ctx 4096", number)
            name = key
        role = ""
        if name == "message":
            role, _, rest = _cut(rest)
            if role not in ROLES:
                raise ModelfileError(f"Modelfile line {number}: MESSAGE needs a role ({', '.join(ROLES)}) and "
                                     f"a text, e.g. MESSAGE user Hello; not {role!r}", number)
        value, i = _value(rest, lines, i, number)
        if not value and name in ("model", "from", "adapter"):
            raise ModelfileError(f"Modelfile line {number}: {word.upper()} needs a model name or a path", number)
        commands.append(Command("model" if name == "from" else name, f"{role}: {value}" if role else value, number))
    if not any(c.name == "model" for c in commands):
        raise ModelfileError("the Modelfile has no FROM line; start it with FROM and a model name (FROM smollm2) "
                             "or a GGUF path", 0)
    return Modelfile(commands)


def _cut(text: str) -> tuple[str, str, str]:
    """The first word, a separator and the rest (leading blanks removed)."""
    for j, c in enumerate(text):
        if c in " \t":
            return text[:j], c, text[j:].lstrip(" \t")
    return text, "", ""


def _value(rest: str, lines: list[str], i: int, number: int) -> tuple[str, int]:
    """The value starting with ``rest`` (line ``number``), continued on later lines while a
    quote is open; returns it and the index of the next line to read."""
    quote = '"""' if rest.startswith('"""') else '"' if rest.startswith('"') else ""
    if not quote:
        return rest.rstrip(" \t"), i
    text = rest.rstrip(" \t")
    while not (len(text) >= 2 * len(quote) and text.endswith(quote)):
        if i >= len(lines):
            raise ModelfileError(f"Modelfile line {number}: the {quote} opened here is never closed; end the "
                                 f"text with {quote} at the end of a line", number)
        text = f"{text}\n{lines[i]}".rstrip(" \t")
        i += 1
    return text[len(quote):-len(quote)], i


# -- writing ---------------------------------------------------------------------------------

def quote(text: str) -> str:
    """A value as Modelfile text: bare when that reads back the same, else in quotes."""
    if "\n" in text or text != text.strip(" \t") or text.startswith('"') or text.startswith("#"):
        return f'"""{text}"""' if '"' in text or "\n" in text else f'"{text}"'
    return text


def render(from_: str, *, system: str | None = None, template: str | None = None,
           parameters: dict[str, Any] | None = None, messages: list[dict[str, str]] | None = None,
           adapters: list[str] | tuple[str, ...] = (), licenses: list[str] | tuple[str, ...] = (),
           header: str = "") -> str:
    """A Modelfile that :func:`parse` reads back to the same model (``/api/show``'s ``modelfile``)."""
    out = [f"# {line}".rstrip() for line in header.splitlines()] + [f"FROM {from_}"]
    if template:
        out.append(f"TEMPLATE {quote(template)}")
    if system:
        out.append(f"SYSTEM {quote(system)}")
    out += [f"ADAPTER {quote(a)}" for a in adapters]
    for name, values in (parameters or {}).items():
        for value in values if isinstance(values, list) else [values]:
            shown = ("true" if value else "false") if isinstance(value, bool) else str(value)
            out.append(f"PARAMETER {name} {quote(shown)}")
    out += [f"MESSAGE {m['role']} {quote(m['content'])}" for m in messages or ()]
    out += [f"LICENSE {quote(text)}" for text in licenses]
    return "\n".join(out) + "\n"


def parameters_text(parameters: dict[str, Any]) -> str:
    """``/api/show``'s ``parameters``: one ``name value`` line per value, names padded as Ollama does."""
    import json

    lines = []
    for name, values in parameters.items():
        for value in values if isinstance(values, list) else [values]:
            shown = json.dumps(value) if isinstance(value, str) else ("true" if value is True else "false"
                                                                      if value is False else str(value))
            lines.append(f"{name:<30} {shown}")
    return "\n".join(lines)
