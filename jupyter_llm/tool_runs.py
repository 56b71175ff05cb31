"""Running the tools a model calls: the Python functions called with the parsed arguments, their
results sent back as ``tool`` messages, and the model asked again until it answers in text.

:class:`ToolRun` is that loop, the same for ``Model.chat(..., run_tools=True)`` and ``%%chat
--tools``. It is bounded: at most ``max_rounds`` answers, the last one with no tools offered (so
it is text). After the first round ``tool_choice`` goes back to "auto": a forced choice applies
to the first answer only (else a forced model could never answer in text).

A round that only repeats calls already run is not run again: the next answer is asked for with
no tools offered (small models tend to call the same function over and over).

A function that raises does not end the turn: the model gets ``error: ...`` as the result, as
agent frameworks do, and can answer or try again. Results that are not strings are sent as JSON
(``str()`` when they are not JSON-serialisable).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .tools import ToolCall

if TYPE_CHECKING:
    from .chat import Turn

MAX_ROUNDS = 5
"""Answers one run may take (calls and the final text together)."""


class Reply(str):
    """The text of a chat answer, carrying the tool calls the model asked for (those it made
    last, not run) and the messages of the tool rounds that were run."""

    tool_calls: list[ToolCall]
    messages: list[dict[str, Any]]

    def __new__(cls, text: str, tool_calls: list[ToolCall] | None = None,
                messages: list[dict[str, Any]] | None = None) -> Reply:
        self = super().__new__(cls, text)
        self.tool_calls = list(tool_calls or [])
        self.messages = list(messages or [])
        return self


def functions_of(tools: list[Any] | None) -> dict[str, Callable[..., Any]]:
    """The tools given as Python callables, by the name the model calls them."""
    return {getattr(t, "__name__", type(t).__name__): t for t in tools or [] if callable(t) and not isinstance(t, dict)}


def run_call(fn: Callable[..., Any], call: ToolCall) -> str:
    """``fn(**arguments)``, its result as the text of a tool message (see the module docstring)."""
    try:
        result = fn(**call.arguments)
    except Exception as exc:  # the model is told, and may answer or try again
        return f"error: {type(exc).__name__}: {exc}"
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(result)


def call_message(text: str, calls: list[ToolCall]) -> dict[str, Any]:
    """The assistant message that made ``calls``."""
    return {"role": "assistant", "content": text or None, "tool_calls": [c.to_message() for c in calls]}


def result_message(call: ToolCall, result: str) -> dict[str, Any]:
    return {"role": "tool", "content": result, "tool_call_id": call.id, "name": call.name}


class ToolRun:
    """Iterate for the text pieces of every answer; :attr:`reply` once it ended.

    ``start(messages, tool_choice)`` begins one answer (a :class:`~jupyter_llm.chat.Turn`);
    ``on_call(call, result)`` is told each call run (result None: the call is not run).
    """

    def __init__(self, start: Callable[[list[dict[str, Any]], Any], Turn], messages: list[dict[str, Any]],
                 tools: list[Any] | None, tool_choice: Any = None, *, run_tools: bool = True,
                 max_rounds: int = MAX_ROUNDS,
                 on_call: Callable[[ToolCall, str | None], None] | None = None) -> None:
        self._start, self._messages = start, list(messages)
        self._functions = functions_of(tools) if run_tools else {}
        self._choice, self._max = tool_choice, max(1, max_rounds)
        self._on_call = on_call
        self.turns: list[Turn] = []
        self.exchanged: list[dict[str, Any]] = []
        """The assistant calls and tool results of the rounds run (to keep in a history)."""
        self.reply: Reply | None = None

    def __iter__(self) -> Iterator[str]:
        messages, choice, pieces = list(self._messages), self._choice, []
        calls: list[ToolCall] = []
        ran: set[str] = set()
        for n in range(self._max):
            last = n == self._max - 1 and n > 0
            turn = self._start(messages, "none" if last else choice)
            self.turns.append(turn)
            with turn.stream:  # leaving early stops the generation in the worker
                for chunk in turn:
                    pieces.append(chunk.text)
                    yield chunk.text
            calls = turn.tool_calls
            if not calls or not self._functions or any(c.name not in self._functions for c in calls):
                for call in calls:
                    if self._on_call is not None:
                        self._on_call(call, None)
                break
            keys = {f"{c.name}:{c.arguments_json}" for c in calls}
            if keys <= ran:  # the same calls again (small models loop): answer from the results it has
                choice, calls = "none", []
                continue
            ran |= keys
            round_messages = [call_message(turn.text, calls)]
            for call in calls:
                result = run_call(self._functions[call.name], call)
                if self._on_call is not None:
                    self._on_call(call, result)
                round_messages.append(result_message(call, result))
            self.exchanged += round_messages
            messages += round_messages
            choice, calls = None, []
        self.reply = Reply("".join(pieces), calls, self.exchanged)

    def result(self) -> Reply:
        """Run to the end and return the reply."""
        for _ in self:
            pass
        assert self.reply is not None
        return self.reply


class Pieces:
    """The text pieces of a streamed :class:`ToolRun`; ``.reply`` (with ``.tool_calls``) once they ended."""

    def __init__(self, pieces: Iterator[str], run: ToolRun) -> None:
        self._pieces, self._run = pieces, run

    def __iter__(self) -> Pieces:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    @property
    def reply(self) -> Reply | None:
        return self._run.reply

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self._run.reply.tool_calls if self._run.reply is not None else []


__all__ = ["MAX_ROUNDS", "Pieces", "Reply", "ToolRun", "functions_of", "run_call"]
