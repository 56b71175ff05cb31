"""JSON schemas to GBNF grammars, without loading llama.cpp into the kernel, bounded in size.

The conversion is llama-cpp-python's own (pure Python); constrained sampling with the grammar
happens in the worker. The converter spells repetitions out: ``minItems: N`` is N copies of the
item rule, ``maxLength: N`` N nested optional groups, and a ``pattern`` quantifier ``{m,n}`` the
same. A 203-byte request with ``minItems: 10000000`` grew the kernel by 500 MB, and
``minLength: 100000000`` killed the worker (llama.cpp's parser needs ~45× the grammar's size:
an 8 MB grammar took 365 MB). So, before anything is built:

- every repetition count (``minItems``, ``maxItems``, ``minLength``, ``maxLength``, the bounds of
  ``pattern`` quantifiers) must be a whole number up to MAX_REPEAT, the most llama.cpp's parser
  takes (measured: ``maxLength`` 1000 parses, 1001 "exceeds sane defaults", 100000 overflows its
  stack and kills the worker);
- the schema may hold MAX_SUBSCHEMAS objects and nest MAX_DEPTH deep (the converter's work grows
  with the square of the subschemas whose rule names collide: 5000 of them took 10 s);

and while it is built, each repetition is priced before it is spelled out and the rules are
counted as they are added, up to MAX_GRAMMAR_BYTES in all (about 45 MB in the worker's parser).
Each limit raises a ValueError naming what is over it (the HTTP API answers 400).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

MAX_REPEAT = 1000
"""The largest repetition count a schema may ask for (per keyword or quantifier)."""
MAX_GRAMMAR_BYTES = 1 << 20
"""The largest grammar made or sent to a worker (1 MiB)."""
MAX_SUBSCHEMAS = 2000
"""Objects in a schema (subschemas and the maps holding them), and visits of the converter."""
MAX_DEPTH = 100
"""Nesting of objects and arrays in a schema."""
_REPEATS = ("minItems", "maxItems", "minLength", "maxLength")
_active = threading.local()  # the budget of the conversion running in this thread


def schema_grammar(json_schema: dict[str, Any]) -> str:
    """A GBNF grammar for JSON matching ``json_schema``; ``{}`` means any JSON object. Raises
    ValueError for a schema beyond the limits above, or one the converter cannot handle."""
    converter = _grammar_converter()
    if not json_schema:
        return str(converter.JSON_GBNF)
    try:
        schema = json.loads(json.dumps(json_schema))  # a copy the converter may change
        _check(schema)
        _active.budget = _Budget()
        bounded = converter.Bounded(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        bounded.visit(bounded.resolve_refs(schema, "stdin"), "")
        return str(bounded.format_grammar())
    except RecursionError:
        raise ValueError(f"the JSON schema nests too deeply (at most {MAX_DEPTH} levels)") from None
    except AssertionError as exc:  # the converter's way of refusing what it does not support
        raise ValueError(f"the JSON schema is not supported for structured output: {exc}") from None
    finally:
        _active.budget = None


class _Budget:
    """What one conversion may still make."""

    def __init__(self) -> None:
        self.left = MAX_GRAMMAR_BYTES
        self.visits = 0

    def charge(self, size: int, what: str) -> None:
        self.left -= size
        if self.left < 0:
            raise ValueError(f"the grammar for this JSON schema would be larger than {MAX_GRAMMAR_BYTES >> 20} MiB "
                             f"({what}); ask for fewer repetitions (minItems, maxItems, minLength, maxLength) "
                             "or fewer fields, or use shorter property names")

    def visit(self) -> None:
        self.visits += 1
        if self.visits > MAX_SUBSCHEMAS:
            raise ValueError(f"the JSON schema has more than {MAX_SUBSCHEMAS} subschemas to convert (counting "
                             "each $ref it follows); simplify it")


def _check(schema: Any) -> None:
    """The limits that can be checked before building (see the module docstring); whole floats
    are made ints (JSON has one number type, the converter needs ints)."""
    stack: list[tuple[Any, str, int]] = [(schema, "", 0)]
    objects = 0
    while stack:
        node, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"the JSON schema nests too deeply at {where} (at most {MAX_DEPTH} levels)")
        if isinstance(node, list):
            stack.extend((item, f"{where}/{i}", depth + 1) for i, item in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        objects += 1
        if objects > MAX_SUBSCHEMAS:
            raise ValueError(f"the JSON schema has more than {MAX_SUBSCHEMAS} objects (subschemas); simplify it")
        for keyword in _REPEATS:
            value = node.get(keyword)
            if value is not None and not isinstance(value, dict | list):  # (else a property so named)
                node[keyword] = _count(keyword, value, where)
        if isinstance(node.get("pattern"), str):
            for low, high in _quantifiers(node["pattern"]):
                for value in (low, high):
                    if value is not None and value > MAX_REPEAT:
                        raise ValueError(f"'pattern' at {where or '/'} repeats {value:,} times; a schema may repeat "
                                         f"at most {MAX_REPEAT} times (the grammar spells every repetition out)")
        stack.extend((value, f"{where}/{_escape(key)}", depth + 1) for key, value in node.items())


def _count(keyword: str, value: Any, where: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"'{keyword}' at {where or '/'} must be a whole number from 0 to {MAX_REPEAT}, "
                         f"not {value!r}")
    if value > MAX_REPEAT:
        raise ValueError(f"'{keyword}' at {where or '/'} is {value:,}; a schema may repeat at most {MAX_REPEAT} "
                         "times per keyword (the grammar spells every repetition out)")
    return value


def _quantifiers(pattern: str) -> list[tuple[int | None, int | None]]:
    """The ``{m}``, ``{m,}`` and ``{m,n}`` quantifiers of a regular expression, read the way the
    converter reads them (escapes and character classes skipped)."""
    found: list[tuple[int | None, int | None]] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            i += 1
            while i < len(pattern) and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
        elif c == "{":
            end = pattern.find("}", i)
            if end < 0:
                break
            parts = [p.strip() for p in pattern[i + 1:end].split(",")]
            if len(parts) <= 2 and all(p.isdigit() or p == "" for p in parts):
                bounds = [int(p) if p else None for p in parts]
                found.append((bounds[0], bounds[-1]))
            i = end
        i += 1
    return found


def _escape(key: Any) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _grammar_converter() -> Any:
    """llama-cpp-python's pure-Python schema-to-GBNF converter, loaded from its file alone, with
    the budget of :func:`schema_grammar` built in (a private copy: llama_cpp's own is untouched).

    ``import llama_cpp.llama_grammar`` would run ``llama_cpp/__init__``, which loads libllama into
    the kernel, installs a log callback and leaves two /dev/null files open: llama.cpp belongs in
    the workers only. The converter module itself imports nothing but the standard library.
    """
    import importlib.util

    name = "_jupyter_llm_llama_grammar"
    if name in sys.modules:
        return sys.modules[name]
    package = importlib.util.find_spec("llama_cpp")  # locates the package without importing it
    if package is None or not package.submodule_search_locations:
        raise ModelLoadError("llama-cpp-python is not installed; `pip install jupyter-llm` installs it")
    path = Path(next(iter(package.submodule_search_locations))) / "llama_grammar.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _add_budget(module)
    sys.modules[name] = module
    return module


def _add_budget(module: Any) -> None:
    """Price every repetition before the converter spells it out, count its rules and visits."""
    spell_out = module._build_repetition

    def priced(item_rule: str, min_items: int, max_items: int | None, separator_rule: str | None = None,
               item_rule_is_literal: bool = False) -> str:
        budget = getattr(_active, "budget", None)
        if budget is not None:
            times = max(min_items, max_items or 0) + 1
            budget.charge(times * (len(item_rule) + len(separator_rule or "") + 8), "a repetition")
        return str(spell_out(item_rule, min_items, max_items, separator_rule, item_rule_is_literal))

    class Bounded(module.SchemaConverter):
        def visit(self, schema: Any, name: str) -> Any:
            _active.budget.visit()
            return super().visit(schema, name)

        def _add_rule(self, name: str, rule: str) -> Any:
            _active.budget.charge(len(name) + len(rule) + 5, "its rules")
            return super()._add_rule(name, rule)

    module._build_repetition = priced
    module.Bounded = Bounded
    # JSON strings may not hold raw control characters (RFC 8259 §7), but the converter's char
    # rule lets the model write them (a name with a raw newline: "Invalid control character").
    # The converter's own JSON_GBNF already excludes them; its schema rules get the same class.
    module.PRIMITIVE_RULES["char"] = module.BuiltinRule(
        r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])', [])


__all__ = ["MAX_GRAMMAR_BYTES", "MAX_REPEAT", "schema_grammar"]
