"""``%%chat --tools NAME,NAME``: the notebook's functions offered to the model, run when it calls them.

:class:`ToolCellTurn` is a chat turn as the ``%%chat`` cell draws it (it has a turn's ``model``,
``notice``, ``load_notices``, chunks, ``result`` and ``finish``), made of the rounds of a
:class:`~jupyter_llm.tool_runs.ToolRun`: each call the model makes is run with its parsed
arguments, and a line showing the call and its result is drawn into the cell's output between
the answers. The session keeps the whole exchange (the calls and results too), so the next
``%%chat`` cell continues it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from IPython.core.error import UsageError

from ..runtime.stream import Chunk
from ..tool_runs import ToolRun, call_message
from ..tools import ToolCall

MAX_SHOWN = 300
"""Characters of a call's arguments or result drawn in the cell (the model gets all of it)."""


def notebook_functions(shell: Any, names: str) -> dict[str, Callable[..., Any]]:
    """The functions named in ``--tools a,b`` from the notebook's namespace (UsageError if not)."""
    namespace = getattr(shell, "user_ns", {}) or {}
    found: dict[str, Callable[..., Any]] = {}
    for name in (n.strip() for n in names.split(",")):
        if not name:
            continue
        fn = namespace.get(name)
        if fn is None:
            raise UsageError(f"--tools names {name!r}, which is not defined in this notebook; define the function "
                             "first (a def with type hints and a docstring works best)")
        if not callable(fn):
            raise UsageError(f"--tools names {name!r}, which is a {type(fn).__name__}, not a function")
        found[name] = fn
    if not found:
        raise UsageError("--tools needs function names, e.g. `%%chat --tools get_weather,add`")
    return found


def _short(text: str) -> str:
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "…"


def call_line(call: ToolCall, result: str | None) -> str:
    """The Markdown drawn for one call (and its result)."""
    arguments = ", ".join(f"{k}={v!r}" for k, v in call.arguments.items())
    shown = f"`{_short(f'{call.name}({arguments})')}`"
    if result is None:
        return f"\n\n> 🔧 the model asked for {shown}, which is not among `--tools`: not run\n\n"
    return f"\n\n> 🔧 {shown} → `{_short(result)}`\n\n"


class ToolCellTurn:
    """One ``%%chat`` turn with tools (see the module docstring)."""

    def __init__(self, manager: Any, session: Any, user: str, sampling: Any, *, model: str | None,
                 system: str | None, new: bool, functions: dict[str, Callable[..., Any]], tool_choice: Any) -> None:
        from .. import chat

        if new or (system is not None and system != session.system):
            session.reset(system=system)
        name = chat.choose_model(manager, session, model)
        loaded_now = manager.load(name) if name is not None and not manager.is_loaded(name) else None
        loaded = manager.get(name)
        session.model = loaded.name
        self.model, self.session, self.user = loaded, session, user
        self.load_notices = list(loaded_now.notices) if loaded_now is not None else []
        tools = list(functions.values())
        first: Any = chat.start(loaded, session.prompt_messages(user), sampling, fit=True, tools=tools,
                                tool_choice=tool_choice)
        self._first = first
        self.notice = chat.fit_notice(first.dropped, first.n_ctx)
        session.forget_oldest(first.dropped)

        def start(messages: list[dict[str, Any]], choice: Any) -> Any:
            nonlocal first
            if first is not None:  # the first round started above (its fitting notice is shown first)
                turn, first = first, None
                return turn
            return chat.start(loaded, messages, sampling, fit=True, tools=tools, tool_choice=choice)

        self._lines: list[str] = []
        self.run = ToolRun(start, session.prompt_messages(user), tools, tool_choice,
                           on_call=lambda call, result: self._lines.append(call_line(call, result)))
        self._recorded = False

    def _drawn(self) -> Iterator[Chunk]:
        while self._lines:
            yield Chunk(self._lines.pop(0), 0)

    def __iter__(self) -> Iterator[Chunk]:
        try:
            for piece in self.run:
                yield from self._drawn()
                yield Chunk(piece, 0)
            yield from self._drawn()
        finally:
            self.finish()

    @property
    def result(self) -> Any:
        turns = self.run.turns or [self._first]
        return turns[-1].result

    def finish(self) -> None:
        """Keep the exchange in the session (once): the user's message, the calls and their
        results, and the last answer."""
        if self._recorded:
            return
        self._recorded = True
        turns = self.run.turns or [self._first]
        last = turns[-1]
        if self.run.reply is None and not last.stream.done:
            last.stream.cancel()
        answer = call_message(last.text, last.tool_calls) if last.tool_calls else {
            "role": "assistant", "content": last.text}
        if last.text or last.tool_calls or self.run.exchanged:
            self.session.messages += [{"role": "user", "content": self.user}, *self.run.exchanged, answer]


__all__ = ["ToolCellTurn", "call_line", "notebook_functions"]
