"""The ``%%chat`` cell: stream a chat turn into the cell's output.

Tokens arrive from the worker as fast as it makes them; the output is redrawn at most every
``REDRAW_SECONDS`` (less often when a redraw gets expensive), so rendering Markdown never holds
generation back (the worker does not wait for the kernel). The final redraw adds a statistics
line and metadata recording the model, its sha256, the sampling parameters and the seed, so an
output can be reproduced.
"""

from __future__ import annotations

import json
import random
import re
import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

REDRAW_SECONDS = 0.1
_VAR = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")


@magic_arguments()
@argument("-m", "--model", default=None, help="loaded (or cached) model; default: the last used")
@argument("--system", default=None, help="system prompt (starts a new conversation when it changes)")
@argument("--new", action="store_true", help="forget this session's history first")
@argument("--session", default="default", help="conversation name; each keeps its own history")
@argument("--temperature", type=float, default=None)
@argument("--top-p", dest="top_p", type=float, default=None)
@argument("--max-tokens", dest="max_tokens", type=int, default=None)
@argument("--seed", type=int, default=None)
@argument("--format", default="markdown", choices=["markdown", "text", "code", "json"])
def _chat_args(line: str) -> None:
    """%%chat options."""


def substitute(text: str, namespace: dict[str, Any]) -> str:
    """Replace ``{name}`` with the notebook variable ``name``; unknown names and ``{{x}}`` stay."""

    def repl(match: re.Match[str]) -> str:
        name = match.group(1)
        return str(namespace[name]) if name in namespace else match.group(0)

    return _VAR.sub(repl, text)


def run_chat_cell(shell: Any, manager: Any, line: str, cell: str) -> Any:
    """Run one ``%%chat`` turn; returns None (the output is the streamed display), or the
    parsed answer with ``--format json``."""
    from IPython.display import display

    from .. import chat
    from ..options import SamplingOptions

    try:
        args = parse_argstring(_chat_args, line)
    except UsageError:
        raise
    except SystemExit as exc:  # argparse's choices error
        raise UsageError(str(exc)) from None
    user = substitute(cell.strip(), shell.user_ns if shell is not None else {})
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
    renderer = _Renderer(args.format)
    handle = None
    turn = None
    model = None
    text = ""
    last = 0.0
    stopped = False
    result = None
    try:
        turn = chat.session_turn(manager, session, user, sampling, model=args.model, system=args.system,
                                 new=args.new, json_schema={} if args.format == "json" else None)
        model = turn.model
        with manager.using(model.name):
            if turn.notice:
                display(_notice(turn.notice))
            # Drawn while the worker evaluates the prompt, off the path to the first token.
            handle = display(renderer.render("", final=False), display_id=True)
            interval = REDRAW_SECONDS
            for chunk in turn:
                text += chunk.text
                now = time.perf_counter()
                if now - last >= interval:
                    handle.update(renderer.render(text, final=False))
                    last = time.perf_counter()
                    # Redrawing costs more as the answer grows; keep it under ~5 % of the time so
                    # the kernel never takes CPU the worker's threads need.
                    interval = max(REDRAW_SECONDS, 20 * (last - now))
    except KeyboardInterrupt:
        stopped = True
        raise
    finally:
        if turn is not None and model is not None:
            result = turn.result
            turn.finish()
            stats = _stats_line(result, stopped)
            metadata = {"jupyter_llm": {
                "model": model.name, "sha256": model.record.sha256, "session": session.name,
                "sampling": sampling.to_dict(), "seed": seed, "stopped": stopped,
                "prompt_tokens": getattr(result, "prompt_tokens", None),
                "completion_tokens": getattr(result, "completion_tokens", None),
            }}
            final = renderer.render(text, final=True, stats=stats)
            if handle is None:
                display(final, metadata=metadata)
            else:
                handle.update(final, metadata=metadata)
    if args.format == "code" and text:
        shell.set_next_input(extract_code(text), replace=False)
    if args.format == "json":
        try:
            return json.loads(text)
        except ValueError:
            cut = result is not None and result.finish_reason == "length"
            reason = "it hit --max-tokens; raise it" if cut else "the model stopped early"
            display(_notice(f"the answer is not complete JSON ({reason}); the text is in the output above"))
            return None
    return None


def _stats_line(result: Any, stopped: bool) -> str:
    if result is None:
        return "stopped" if stopped else ""
    parts = [f"{result.completion_tokens} tokens"]
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


def extract_code(text: str) -> str:
    """The first fenced code block of a Markdown answer, or the whole answer."""
    match = re.search(r"```[\w+-]*\n(.*?)```", text, re.S)
    return (match.group(1) if match else text).rstrip() + "\n"


class _notice:
    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"⚠ {self.text}"

    def _repr_markdown_(self) -> str:
        return f"*⚠ {self.text}*"


class _Renderer:
    """Builds the displayable for the current text in the chosen format."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt

    def render(self, text: str, *, final: bool, stats: str = "") -> Any:
        from IPython.display import Markdown, Pretty

        cursor = "" if final else " ▌"
        if self.fmt == "markdown":
            footer = f"\n\n<sub>{stats}</sub>" if final and stats else ""
            return Markdown(text + cursor + footer)
        if self.fmt in ("code", "json"):
            fence = "python" if self.fmt == "code" else "json"
            body = extract_code(text) if (final and self.fmt == "code") else text
            footer = f"\n\n<sub>{stats}</sub>" if final and stats else ""
            return Markdown(f"```{fence}\n{body}{cursor}\n```{footer}")
        footer = f"\n\n[{stats}]" if final and stats else ""
        return Pretty(text + cursor + footer)
