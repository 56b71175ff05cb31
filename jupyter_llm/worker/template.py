"""Chat templates from GGUF files, rendered with limits on time, output and memory; a cancel stops them.

A chat template is a program that came with a download. Jinja's immutable sandbox keeps it away
from Python's internals but not from runaway work: three nested ``range(100000)`` loops grew a
worker by ~85 MB/s until it was killed, ``tojson(indent=300000000)`` reached 3.7 GB. So every
render runs under a :class:`Meter`, consulted at every step the template takes:

- **time**: after ``seconds`` (all renders of one request together) a ValueError ends it;
- **output**: nothing it makes or prints may be longer than ``cap`` characters, the longest
  prompt the context can hold (PromptTooLong, which fitting treats as "does not fit");
- **memory**: the worker's private memory growing by MEMORY_BYTES during the render ends it
  (the backstop for anything that accumulates slowly);
- **cancel**: the kernel's cancel raises Cancelled at the next step.

The steps are every attribute or item lookup, call, intercepted operator, filter and printed
value, and every few iterations of each ``{% for %}`` loop: the syntax tree is rewritten when the
template compiles so that loops iterate a metered iterator and list, dict and tuple literals and
``~`` operands pass a size check. Operations that can make far more than their inputs
(repetition, padding and format widths, replace, join, JSON indentation, powers) are sized
before they run; every value a call, filter or operator returns is sized after.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

from jinja2 import nodes
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from . import Cancelled, PromptTooLong, RequestError

MEMORY_BYTES = 512 * 2**20
"""Growth of the worker's private memory during one render that ends it: a bounded render of
the longest prompt needs a few MB."""
MAX_SOURCE = 1 << 20
"""Characters of template source (real templates, tool calling included, are under 50 KB)."""
MAX_INDENT = 16
"""The largest ``tojson`` indent (templates use 2 or 4)."""
MAX_INT_BITS = 1 << 16
"""Integers a template may compute (a prompt needs none near this; ``10 ** 10 ** 9`` would run
for minutes inside one C call)."""
_LOOP = "jupyter_llm_loop"
_SIZED = "jupyter_llm_sized"
_ITEMS_PER_TICK = 64
_TICKS_PER_MEMORY_CHECK = 256
_PAGE = 4096

_current: contextvars.ContextVar[Meter] = contextvars.ContextVar("jupyter_llm_template_meter")


class Meter:
    """The limits of one request's renders (see the module docstring)."""

    def __init__(self, *, n_ctx: int, bytes_per_token: int, seconds: float,
                 cancelled: Callable[[], bool] = lambda: False) -> None:
        self.n_ctx, self.bytes_per_token = n_ctx, bytes_per_token
        self.cap = n_ctx * bytes_per_token
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.cancelled = cancelled
        self._ticks = 0
        self._memory0 = _private_memory()

    def tick(self) -> None:
        if self.cancelled():
            raise Cancelled
        if time.monotonic() > self.deadline:
            raise RequestError("ValueError", f"the chat template ran for more than {self.seconds:g} seconds and "
                               "was stopped; the model's template is broken or hostile: fix it in the GGUF, or "
                               "format the prompt yourself and call generate()")
        self._ticks += 1
        if self._ticks % _TICKS_PER_MEMORY_CHECK == 0 and _private_memory() - self._memory0 > MEMORY_BYTES:
            raise RequestError("ValueError", f"the chat template used more than {MEMORY_BYTES >> 20} MiB and was "
                               "stopped; fix it in the GGUF, or format the prompt yourself and call generate()")

    def room(self, size: int, what: str) -> None:
        """Refuse to make ``what`` of ``size`` characters (or items) if that exceeds ``cap``."""
        if size > self.cap:
            raise PromptTooLong(
                f"the chat template would make {what} of {size:,} characters, more than the longest prompt a "
                f"slot can hold ({self.cap:,} characters: {self.n_ctx} tokens of at most {self.bytes_per_token} "
                "bytes)", n_tokens=size // self.bytes_per_token, n_ctx=self.n_ctx)

    def sized(self, value: Any, what: str = "a value") -> Any:
        """``value``, if what it prints as is within ``cap`` (and it is no giant integer)."""
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            _too_big(value.bit_length())
        if not isinstance(value, str | int | float | type(None)):
            self.room(text_size(value, self.cap), what)
        elif isinstance(value, str):
            self.room(len(value), what)
        return value


def text_size(value: Any, limit: int) -> int:
    """About how many characters ``value`` prints as, counted until past ``limit`` (a container
    prints everything it holds, shared items as often as they occur)."""
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, list | tuple | set | frozenset):
            total += 2 + 2 * len(item)
            if total <= limit:
                stack.extend(item)
        elif isinstance(item, dict):
            total += 2 + 4 * len(item)
            if total <= limit:
                stack.extend(item.keys())
                stack.extend(item.values())
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 1
        else:
            total += 8
    return total


def compile_template(source: str, meter: Meter) -> Any:
    """The template compiled in the limited sandbox (under ``meter``: compiling folds constants)."""
    if len(source) > MAX_SOURCE:
        raise RequestError("ValueError", f"the chat template is {len(source):,} characters long (at most "
                           f"{MAX_SOURCE:,}); format the prompt yourself and call generate()")
    token = _current.set(meter)
    try:
        return _Sandbox().from_string(source)
    except (Cancelled, RequestError):
        raise
    except Exception as exc:  # a syntax error, recursion in the parser
        raise RequestError("ValueError", f"the chat template does not compile: {type(exc).__name__}: {exc}") from exc
    finally:
        _current.reset(token)


def render(template: Any, meter: Meter, **values: Any) -> str:
    """Render ``template`` with ``values`` under ``meter``; raises RequestError (or PromptTooLong,
    Cancelled) when it breaks a limit, RequestError for a template that refuses the messages."""
    token = _current.set(meter)
    try:
        parts, total = [], 0
        for piece in template.generate(**values):
            total += len(piece)
            meter.room(total, "a prompt")
            meter.tick()
            parts.append(piece)
        return "".join(parts)
    except (Cancelled, RequestError):
        raise
    except Exception as exc:  # a template's raise_exception(), a malformed message, a blocked attribute
        raise RequestError("ValueError", f"the chat template refused these messages: {exc}") from exc
    finally:
        _current.reset(token)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with every step metered (see the module docstring)."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})  # intercepted ones are also never constant-folded

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
                         finalize=lambda value: _current.get().sized(value, "a printed value"))
        self.filters["tojson"] = _tojson
        self.filters = {name: _metered_filter(name, f) for name, f in self.filters.items()}
        self.filters[_LOOP] = _metered_loop
        self.filters[_SIZED] = lambda value: _current.get().sized(value)
        self.globals["raise_exception"] = _raise
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(str(fmt))

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = _Metering().visit(super()._parse(source, name, filename))
        tree.set_environment(self)
        return tree

    def getattr(self, obj: Any, attribute: str) -> Any:
        _current.get().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _current.get().tick()
        return super().getitem(obj, argument)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # Jinja's own signature
        meter = _current.get()
        meter.tick()
        args = _check_method(meter, __obj, args, kwargs)
        return meter.sized(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        meter = _current.get()
        meter.tick()
        _check_binop(meter, operator, left, right)
        return meter.sized(super().call_binop(context, operator, left, right))


class _Metering(NodeTransformer):
    """Loops iterate metered; literals and ``~`` operands are sized where they are made."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)  # (changes the children in place)
        node.iter = _filter(node.iter, _LOOP)
        return node

    def visit_List(self, node: nodes.List) -> nodes.Node:
        return _filter(self.generic_visit(node), _SIZED)

    def visit_Dict(self, node: nodes.Dict) -> nodes.Node:
        return _filter(self.generic_visit(node), _SIZED)

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        self.generic_visit(node)
        return _filter(node, _SIZED) if node.ctx == "load" else node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [_filter(part, _SIZED) for part in node.nodes]
        return node


def _filter(node: nodes.Node, name: str) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


def _metered_loop(iterable: Iterable[Any]) -> Iterator[Any]:
    meter = _current.get()
    for n, item in enumerate(iterable):
        if n % _ITEMS_PER_TICK == 0:
            meter.tick()
        yield item


def _metered_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    # Filters marked pass_context / pass_eval_context / pass_environment get that object first.
    offset = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(func)  # keeps the pass_* mark Jinja reads
    def run(*args: Any, **kwargs: Any) -> Any:
        meter = _current.get()
        meter.tick()
        if len(args) > offset:  # (its input was sized where it was made)
            args = (*args[:offset], *_check_filter(meter, name, args[offset], args[offset + 1:], kwargs))
        return meter.sized(func(*args, **kwargs), f"the result of the {name} filter")

    return run


def _check_filter(meter: Meter, name: str, value: Any, rest: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Size a filter's result before it runs, where it can outgrow its input; returns the
    arguments to call it with (an iterable to join is materialized, counted)."""
    def arg(i: int, key: str, default: Any) -> Any:
        return rest[i] if len(rest) > i else kwargs.get(key, default)

    if name == "center":
        meter.room(_whole(arg(0, "width", 80)), "a centered string")
    elif name == "indent":
        width = arg(0, "width", 4)
        width = len(width) if isinstance(width, str) else _whole(width)
        meter.room(len(str(value)) + width * (str(value).count("\n") + 1), "an indented string")
    elif name == "format":
        meter.room(_format_size(str(value), rest), "a formatted string")
    elif name == "replace":
        meter.room(_replaced(str(value), arg(0, "old", ""), arg(1, "new", ""), arg(2, "count", None)), "a replacement")
    elif name == "join":
        items = _items(meter, value)
        meter.room(_joined(str(arg(0, "d", "")), items), "a joined string")
        return (items, *rest)
    elif name in ("batch", "slice") and arg(1, "fill_with", None) is not None:
        meter.room(_whole(arg(0, "linecount" if name == "batch" else "slices", 0)), f"a {name}")
    return (value, *rest)


def _check_method(meter: Meter, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """The same for the string methods that can outgrow the string."""
    func = getattr(func, "__wrapped__", func)  # the sandbox wraps str.format
    owner, name = getattr(func, "__self__", None), getattr(func, "__name__", "")
    if not isinstance(owner, str):
        return args
    if name in ("center", "ljust", "rjust", "zfill") and args:
        meter.room(_whole(args[0]), f"str.{name}()")
    elif name == "expandtabs":
        tabs = _whole(args[0] if args else kwargs.get("tabsize", 8))
        meter.room(len(owner) + tabs * owner.count("\t"), "str.expandtabs()")
    elif name == "replace" and len(args) >= 2:
        meter.room(_replaced(owner, args[0], args[1], args[2] if len(args) > 2 else None), "str.replace()")
    elif name == "join" and args:
        items = _items(meter, args[0])
        meter.room(_joined(owner, items), "str.join()")
        return (items, *args[1:])
    elif name in ("format", "format_map"):
        meter.room(_format_size(owner, ()), f"str.{name}()")
    return args


def _check_binop(meter: Meter, operator: str, left: Any, right: Any) -> None:
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, str | list | tuple) and isinstance(times, int):
                meter.room(text_size(seq, meter.cap) * max(times, 0), "a repetition")
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            _too_big(left.bit_length() + right.bit_length())
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        if left.bit_length() * right > MAX_INT_BITS:
            _too_big(left.bit_length() * right)
    elif operator == "%" and isinstance(left, str):
        meter.sized(right, "the values of a %-format")
        meter.room(_format_size(left, right if isinstance(right, tuple) else (right,)), "a %-format")


def _format_size(fmt: str, values: Any) -> int:
    """A bound on what formatting ``fmt`` makes, from the numbers in it (widths, precisions) and,
    for ``*`` widths, in its values."""
    size = len(fmt)
    for digits in re.findall(r"\d+", fmt):
        size += int(digits) if len(digits) <= 12 else 10**12
    if "*" in fmt:
        size += sum(v for v in values if isinstance(v, int) and v > 0)
    return size


def _replaced(text: str, old: Any, new: Any, count: Any) -> int:
    if not (isinstance(old, str) and isinstance(new, str)):
        return len(text)
    hits = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * max(len(new) - len(old), 0)


def _items(meter: Meter, iterable: Any) -> list[Any]:
    """What is to be joined, as a list (a generator is drawn, counted, before anything is joined)."""
    if isinstance(iterable, list | tuple | str):
        return list(iterable)
    items = []
    for item in iterable:
        items.append(item)
        if len(items) % _ITEMS_PER_TICK == 0:
            meter.tick()
            meter.room(len(items), "a list to join")
    return items


def _joined(separator: str, items: list[Any]) -> int:
    return len(separator) * max(len(items) - 1, 0) + sum(len(x) if isinstance(x, str) else 8 for x in items)


def _whole(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _too_big(bits: int) -> None:
    raise RequestError("ValueError", f"the chat template computes a number of {bits:,} bits (at most "
                       f"{MAX_INT_BITS:,}); fix the template, or format the prompt yourself and call generate()")


def _tojson(value: Any, indent: Any = None, **_: Any) -> str:
    if indent is not None and not (isinstance(indent, int) and 0 <= indent <= MAX_INDENT):
        raise RequestError("ValueError", f"the chat template asks tojson for an indent of {indent!r} (at most "
                           f"{MAX_INDENT}); fix the template, or format the prompt yourself and call generate()")
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _raise(message: str) -> None:
    raise ValueError(message)


def _private_memory() -> int:
    """The process's resident anonymous memory (resident minus file-backed and shared pages):
    model weights paged in from their mmapped file do not count."""
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


__all__ = ["MAX_SOURCE", "MEMORY_BYTES", "Meter", "compile_template", "render", "text_size"]
