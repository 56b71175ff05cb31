"""The ``%%chat`` cell: what its prompt may refer to, and drawing a chat turn as it streams.

The prompt may name the notebook's state: ``{name}`` a variable, ``{In[n]}`` / ``{Out[n]}`` a
cell's input and output, ``{Err}`` the last exception and ``{Err[n]}`` cell ``n``'s, with its
traceback made compact (IPython ≥ 9 records each cell's exception; no exception handler of
ours is involved). Unknown ``{names}`` and ``{{escaped}}`` braces stay as typed, so code in a
prompt is safe; a reference to a cell that has no such input, output or exception is an error.

Drawing depends on the front end. Where there is one that renders (a kernel), the output is
redrawn at most every ``REDRAW_SECONDS`` (less often when a redraw gets expensive), so rendering
Markdown never holds generation back, and the worker sends the text twice as often (the first
piece at once), not every token: each message takes the kernel's CPU from the decode. The
empty answer with its cursor is drawn only when the first token is slow (``PLACEHOLDER_AFTER_S``),
since drawing costs CPU the prompt's evaluation needs. The final redraw adds a statistics line
naming the model and metadata recording how the answer was made (model, sha256, load options,
llama.cpp's version, sampling, seed, system prompt, what was substituted), so an output can be
reproduced. In a terminal (no kernel) every display would be printed anew, so the answer is
written to stdout as it comes, once.
"""

from __future__ import annotations

import functools
import json
import random
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.utils.process import arg_split

REDRAW_SECONDS = 0.1
PLACEHOLDER_AFTER_S = 0.3
"""A cell shows the empty answer (its cursor) only when the first token takes longer than this."""
TRACEBACK_LINES = 40
"""Lines of a traceback sent to the model at most: the first few and the innermost frames."""

_REF = re.compile(r"(?<!\{)\{(?:(In|Out|Err)\[(\d+)\]|([A-Za-z_][A-Za-z0-9_]*))\}(?!\})")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_TB_HEADER = re.compile(r"^\S+\s{2,}(Traceback \(most recent call last\))$")
_FENCE = re.compile(r"^ {0,3}(`{3,})([\w+-]*)[^\n`]*\n", re.M)
_TYPING_FENCE = re.compile(r"(?:^|\n) {0,3}`+[^\n`]*\Z")


@magic_arguments()
@argument("-m", "--model", default=None, help="loaded (or cached) model; default: the most recently loaded")
@argument("--system", default=None, help="system prompt (starts a new conversation when it changes)")
@argument("--new", action="store_true", help="forget this session's history first")
@argument("--session", default="default", help="conversation name; each keeps its own history")
@argument("--temperature", type=float, default=None)
@argument("--top-p", dest="top_p", type=float, default=None)
@argument("--max-tokens", dest="max_tokens", type=int, default=None)
@argument("--seed", type=int, default=None)
@argument("--format", default="markdown", choices=["markdown", "text", "code", "json"])
@argument("--tools", default=None, help="NAME,NAME: notebook functions the model may call (run when it does)")
@argument("--tool-choice", dest="tool_choice", default=None, help="auto, none, required or a function's name")
@argument("--think", nargs="?", const="true", default=None, choices=["true", "false", "low", "medium", "high"],
          help="a reasoning model thinks first (shown collapsed above the answer); false: it does not")
def _chat_args(line: str) -> None:
    """%%chat options."""


# -- the prompt --------------------------------------------------------------------------------

def substitute(text: str, namespace: Mapping[str, Any],
               errors: Mapping[int, str] | Callable[[], Mapping[int, str] | None] | None = None
               ) -> tuple[str, list[dict[str, Any]]]:
    """Replace the references in ``text`` (see the module doc); returns the text and, for the
    output's metadata, what each reference was replaced with.

    ``namespace`` is the notebook's (``In`` and ``Out`` are IPython's there); ``errors`` maps
    execution counts to their compact tracebacks (:func:`recorded_errors`), or is a function
    returning them, called once and only for a cell that names an exception. A notebook
    variable named ``Err`` wins over the recorded exceptions.
    """
    used: list[dict[str, Any]] = []
    recorded = functools.cache(errors if callable(errors) else lambda: errors)

    def repl(match: re.Match[str]) -> str:
        kind, index, name = match.groups()
        ref = match.group(0)
        entry: dict[str, Any] = {"ref": ref}
        if name is not None and name in namespace:
            value = str(namespace[name])
        elif name == "Err":
            count, value = _last_error(recorded())
            entry["as"] = f"Err[{count}]"
        elif name is not None:
            return ref
        else:
            value = _cell(kind, int(index), namespace, recorded() if kind == "Err" else None)
        entry["text"] = value
        used.append(entry)
        return value

    return _REF.sub(repl, text), used


def prompt_from_cell(cell: str, shell: Any) -> tuple[str, list[dict[str, Any]]]:
    """The user message of a ``%%chat`` cell, references replaced (:func:`substitute`). The
    recorded exceptions are made compact only when the cell names one: a notebook's every
    traceback is not worked through again at every turn."""
    namespace = shell.user_ns if shell is not None else {}
    return substitute(cell.strip(), namespace, lambda: recorded_errors(shell))


def recorded_errors(shell: Any) -> dict[int, str] | None:
    """Each cell's exception, compact, by execution count, from IPython's own record (≥ 9);
    None where IPython keeps none."""
    recorded = getattr(getattr(shell, "history_manager", None), "exceptions", None)
    if not isinstance(recorded, Mapping):
        return None
    return {int(n): compact_traceback(e.get("traceback") or [f"{e.get('ename')}: {e.get('evalue')}"])
            for n, e in recorded.items()}


def compact_traceback(lines: Sequence[str]) -> str:
    """IPython's traceback as a model should read it: no colours, rulers or blank lines, and at
    most ``TRACEBACK_LINES`` lines (the outermost few and the innermost, where the error is)."""
    kept = []
    for line in _ANSI.sub("", "\n".join(lines)).splitlines():
        line = line.rstrip()
        if not line or set(line) == {"-"}:
            continue
        kept.append(_TB_HEADER.sub(r"\1:", line))
    if len(kept) > TRACEBACK_LINES:
        head, tail = 4, TRACEBACK_LINES - 5
        kept = [*kept[:head], f"… ({len(kept) - head - tail} lines)", *kept[-tail:]]
    return "\n".join(kept)


def _last_error(errors: Mapping[int, str] | None) -> tuple[int, str]:
    if errors is None:
        raise UsageError("{Err} needs IPython ≥ 9, which records each cell's exception: pip install -U ipython")
    if not errors:
        raise UsageError("{Err} is the last exception, and no cell has raised one yet ({{Err}} keeps the braces)")
    count = max(errors)
    return count, errors[count]


def _cell(kind: str, n: int, namespace: Mapping[str, Any], errors: Mapping[int, str] | None) -> str:
    ref = f"{{{kind}[{n}]}}"
    if kind == "In":
        inputs = namespace.get("In") or []
        if n >= len(inputs):
            raise UsageError(f"{ref}: there is no cell {n} yet (this cell is In[{len(inputs) - 1}])")
        return str(inputs[n])
    if kind == "Out":
        outputs = namespace.get("Out") or {}
        if n not in outputs:
            have = ", ".join(str(k) for k in sorted(outputs)[-5:]) or "none yet"
            raise UsageError(f"{ref}: cell {n} has no output (cells with output: {have})")
        return str(outputs[n])
    if errors is None:
        raise UsageError(f"{ref} needs IPython ≥ 9, which records each cell's exception: pip install -U ipython")
    if n not in errors:
        have = ", ".join(str(k) for k in sorted(errors)[-5:]) or "none yet"
        raise UsageError(f"{ref}: cell {n} raised no exception (cells that did: {have})")
    return errors[n]


# -- the turn ----------------------------------------------------------------------------------

def run_chat_cell(shell: Any, manager: Any, line: str, cell: str) -> Any:
    """Run one ``%%chat`` turn; returns None (the output is the streamed display), or the
    parsed answer with ``--format json``."""
    from .. import chat
    from ..options import SamplingOptions

    try:
        args = _chat_args.parser.parse_args(arg_split(line, posix=True))  # quotes work, as in %llm
    except UsageError:
        raise
    except SystemExit as exc:  # argparse's choices error
        raise UsageError(str(exc)) from None
    except ValueError as exc:  # shlex: "No closing quotation"
        raise UsageError(f"cannot read `%%chat {line}`: {exc}; close the quote and run it again") from None
    user, used = prompt_from_cell(cell, shell)
    if not user:
        raise UsageError("%%chat needs a message in the cell body")

    seed = args.seed if args.seed is not None else random.randrange(2**31)
    defaults = SamplingOptions()
    try:
        sampling = SamplingOptions(
            temperature=defaults.temperature if args.temperature is None else args.temperature,
            top_p=defaults.top_p if args.top_p is None else args.top_p,
            max_tokens=defaults.max_tokens if args.max_tokens is None else args.max_tokens,
            seed=seed,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    session = manager.session(args.session)
    before = session.model
    renderer = Renderer(args.format)
    view: _CellView | _TerminalView = _TerminalView(renderer) if in_terminal(shell) else _CellView(renderer)
    turn: Any = None  # a chat Turn, or chattools.ToolCellTurn (the same interface)
    model = None
    text = ""
    stopped = False
    result = None
    try:
        if args.tools:  # the tool loop (notebook/chattools): calls run, drawn between the answers
            from .chattools import ToolCellTurn, notebook_functions

            turn = ToolCellTurn(manager, session, user, sampling, model=args.model, system=args.system, new=args.new,
                                functions=notebook_functions(shell, args.tools), tool_choice=args.tool_choice)
        else:
            think = {"true": True, "false": False}.get(args.think, args.think)
            turn = chat.session_turn(manager, session, user, sampling, model=args.model, system=args.system,
                                     new=args.new, json_schema={} if args.format == "json" else None, think=think,
                                     every=view.every)
        model = turn.model
        with chat.using(manager, model):
            if args.model is None and before is not None and before != model.name:
                view.notice(f"answering with {model.name}, the model loaded most recently; this conversation "
                            f"was with {before} so far (`%%chat -m {before}` goes back to it)")
            for note in [*turn.load_notices, *([turn.notice] if turn.notice else [])]:
                view.notice(note)
            view.begin(getattr(turn, "arrived", None))
            for chunk in turn:
                text += chunk.text
                renderer.thinking += getattr(chunk, "thinking", "")  # drawn collapsed above the answer
                view.update(text, chunk.text)
    except KeyboardInterrupt:
        stopped = True
        raise
    finally:
        if turn is not None and model is not None:
            result = turn.result
            turn.finish()
            view.end(text, _stats_line(model.name, result, stopped),
                     _metadata(model, session, sampling, seed, stopped, result, used))
    if args.format == "code" and text:
        shell.set_next_input(extract_code(text), replace=False)
    if args.format == "json":
        try:
            return json.loads(text)
        except ValueError:
            cut = result is not None and result.finish_reason == "length"
            reason = "it hit --max-tokens; raise it" if cut else "the model stopped early"
            view.notice(f"the answer is not complete JSON ({reason}); the text is in the output above")
            return None
    return None


def in_terminal(shell: Any) -> bool:
    """No front end that redraws a display in place: a terminal IPython, or no IPython."""
    return getattr(shell, "kernel", None) is None


def _metadata(model: Any, session: Any, sampling: Any, seed: int, stopped: bool, result: Any,
              used: list[dict[str, Any]]) -> dict[str, Any]:
    report = model.report
    options = model.options
    return {"jupyter_llm": {
        "model": model.name, "sha256": model.record.sha256, "session": session.name, "system": session.system,
        "sampling": sampling.to_dict(), "seed": seed, "stopped": stopped,
        "prompt_tokens": getattr(result, "prompt_tokens", None),
        "completion_tokens": getattr(result, "completion_tokens", None),
        "n_ctx": report.n_ctx if report is not None else options.n_ctx,
        "parallel": options.parallel, "kv_type": options.kv_type, "flash_attn": options.flash_attn,
        "gpu_layers": report.n_gpu_layers if report is not None else options.gpu_layers,
        "llama_cpp": {"version": llama_cpp_version(),
                      "system_info": report.system_info if report is not None else None},
        "substituted": used,
    }}


@functools.lru_cache(maxsize=1)
def llama_cpp_version() -> str | None:
    """llama-cpp-python's version, from its installed metadata (llama_cpp itself runs only in
    the worker and is never imported here)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def _stats_line(name: str, result: Any, stopped: bool) -> str:
    if result is None:
        return f"{name} · stopped" if stopped else name
    parts = [name, f"{result.completion_tokens} tokens"]
    if result.gen_tok_per_s:
        parts.append(f"{result.gen_tok_per_s:.1f} tok/s")
    if result.ttft_s is not None:
        parts.append(f"first token {result.ttft_s * 1000:.0f} ms")
    cached = getattr(result, "prompt_tokens_cached", 0)
    parts.append(f"prompt {result.prompt_tokens} tokens" + (f" ({cached} cached)" if cached else ""))
    if stopped or result.finish_reason == "cancelled":
        parts.append("stopped")
    elif result.finish_reason == "length":
        parts.append("hit --max-tokens")
    return " · ".join(parts)


# -- drawing -----------------------------------------------------------------------------------

def split_code(text: str) -> tuple[str, str]:
    """``(language, code)`` of the first fenced block of a Markdown answer, also of one still
    being written; ``("", text)`` when the answer has no fence (yet)."""
    match = _FENCE.search(text)
    if match is None:
        return "", text
    rest = text[match.end():]
    close = re.search(rf"^ {{0,3}}{match.group(1)}`*[ \t]*$", rest, re.M)
    return match.group(2), rest[: close.start()] if close else rest


def extract_code(text: str) -> str:
    """The first fenced code block of a Markdown answer, or the whole answer."""
    return split_code(text)[1].rstrip() + "\n"


def _fenced(language: str, body: str) -> str:
    # A fence longer than any run of backticks inside, so code that quotes Markdown stays one block.
    runs = [len(r) for r in re.findall(r"`{3,}", body)]
    fence = "`" * max([3, *(n + 1 for n in runs)])
    return f"{fence}{language}\n{body}\n{fence}"


class Answer:
    """The answer as drawn: Markdown for front ends that render it, and always the same
    content as plain text (terminals, text-only front ends, nbconvert)."""

    def __init__(self, plain: str, markdown: str | None = None) -> None:
        self.plain = plain
        self.markdown = markdown

    def __repr__(self) -> str:
        return self.plain

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        bundle = {"text/plain": self.plain}
        if self.markdown is not None:
            bundle["text/markdown"] = self.markdown
        return bundle


class Notice:
    """A visible note beside the answer (messages dropped to fit, another model, cut JSON)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"⚠ {self.text}"

    def _repr_markdown_(self) -> str:
        return f"*⚠ {self.text}*"


class Renderer:
    """Builds the displayable for the current text in the chosen format."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.thinking = ""
        """The model's reasoning so far (``--think``), drawn as a collapsed block before the answer."""

    def render(self, text: str, *, final: bool, stats: str = "") -> Answer:
        answer = self._render(text, final=final, stats=stats)
        if not self.thinking:
            return answer
        import html

        # a closed <details> block (JupyterLab's sanitizer keeps it); the text escaped, so it stays inert
        inner = html.escape(self.thinking.strip())
        block = f"<details><summary>Thinking</summary>\n\n<pre>{inner}</pre>\n\n</details>\n\n"
        markdown = block + answer.markdown if answer.markdown is not None else None
        return Answer(f"[thinking]\n{self.thinking.strip()}\n[/thinking]\n\n{answer.plain}", markdown)

    def _render(self, text: str, *, final: bool, stats: str = "") -> Answer:
        cursor = "" if final else " ▌"
        plain_footer = f"\n\n[{stats}]" if final and stats else ""
        md_footer = f"\n\n<sub>{stats}</sub>" if final and stats else ""
        if self.fmt == "markdown":
            return Answer(text + cursor + plain_footer, text + cursor + md_footer)
        if self.fmt == "code":
            # A fence still being typed ("``", "```pyth") is not code yet: it waits for its line.
            language, code = split_code(text if final else _TYPING_FENCE.sub("", text))
            body = code.rstrip("\n") + cursor
            return Answer(body + plain_footer, _fenced(language or "python", body) + md_footer)
        if self.fmt == "json":
            return Answer(text + cursor + plain_footer, _fenced("json", text + cursor) + md_footer)
        return Answer(text + cursor + plain_footer)


class _CellView:
    """One output redrawn in place, at most every ``REDRAW_SECONDS``."""

    every = REDRAW_SECONDS / 2
    """The worker sends the text at most this often (chat.session_turn's ``every``): a redraw
    shows it at most this much later, and the kernel is not woken for every token while the
    worker decodes on the same cores (docs/notes.md §14)."""

    def __init__(self, renderer: Renderer) -> None:
        self.renderer = renderer
        self.handle: Any = None
        self.last = 0.0
        self.interval = REDRAW_SECONDS

    def notice(self, text: str) -> None:
        from IPython.display import display

        display(Notice(text))

    def begin(self, arrived: Callable[[float], bool] | None = None) -> None:
        """The empty answer with its cursor, unless the first chunk comes within
        ``PLACEHOLDER_AFTER_S`` (``arrived`` waits for it): drawing it at once costs the kernel
        CPU while the worker evaluates the prompt on the same cores, ~15 ms of first token on 2
        cores, and for a short prompt the first token is as soon."""
        from IPython.display import display

        if arrived is not None and arrived(PLACEHOLDER_AFTER_S):
            return
        self.handle = display(self.renderer.render("", final=False), display_id=True)

    def update(self, text: str, piece: str) -> None:
        now = time.perf_counter()
        if self.handle is None:  # the first chunk came before the placeholder was due
            from IPython.display import display

            self.handle = display(self.renderer.render(text, final=False), display_id=True)
            self.last = time.perf_counter()
        elif now - self.last >= self.interval:
            self.handle.update(self.renderer.render(text, final=False))
            self.last = time.perf_counter()
            # Redrawing costs more as the answer grows; keep it under ~5 % of the time so the
            # kernel never takes CPU the worker's threads need.
            self.interval = max(REDRAW_SECONDS, 20 * (self.last - now))

    def end(self, text: str, stats: str, metadata: dict[str, Any]) -> None:
        from IPython.display import display

        final = self.renderer.render(text, final=True, stats=stats)
        if self.handle is None:
            display(final, metadata=metadata)
        else:
            self.handle.update(final, metadata=metadata)


class _TerminalView:
    """The answer written to stdout as it comes, then the statistics line."""

    every = 0.0
    """Each piece as it comes: a terminal shows every one."""

    def __init__(self, renderer: Renderer) -> None:
        self.renderer = renderer

    def notice(self, text: str) -> None:
        print(repr(Notice(text)), flush=True)

    def begin(self, arrived: Callable[[float], bool] | None = None) -> None:
        pass

    def update(self, text: str, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    def end(self, text: str, stats: str, metadata: dict[str, Any]) -> None:
        newline = "\n" if text and not text.endswith("\n") else ""
        sys.stdout.write(f"{newline}[{stats}]\n")
        sys.stdout.flush()
