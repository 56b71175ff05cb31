"""Chat sessions: the conversation kept per notebook, and what happens when it outgrows the context.

A session is a list of messages plus the model and system prompt it was started with. Before
each turn the conversation is measured in tokens (with the model's own chat template, in the
worker); when it would not leave room for the answer, the oldest turns are dropped *with a
visible notice* — or, if even the newest message alone does not fit, the turn is refused with
the numbers. Nothing is ever truncated silently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ContextOverflowError

Message = dict[str, str]


@dataclass
class ChatSession:
    """One named conversation."""

    name: str
    model: str | None = None
    system: str | None = None
    messages: list[Message] = field(default_factory=list)
    dropped: int = 0
    """How many old messages were dropped to fit the context so far."""

    def prompt_messages(self, user: str) -> list[Message]:
        """System prompt, the history, and the new user message."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.messages, {"role": "user", "content": user}]

    def record(self, user: str, assistant: str) -> None:
        self.messages.append({"role": "user", "content": user})
        self.messages.append({"role": "assistant", "content": assistant})

    def reset(self, *, system: str | None = None, model: str | None = None) -> None:
        self.messages.clear()
        self.dropped = 0
        if system is not None:
            self.system = system
        if model is not None:
            self.model = model

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "system": self.system,
                "messages": list(self.messages), "dropped": self.dropped}


@dataclass
class FitResult:
    """The messages to send, how many tokens they take, and what had to go."""

    messages: list[Message]
    prompt_tokens: int
    dropped_messages: int
    notice: str | None


def fit_history(
    session: ChatSession,
    user: str,
    *,
    count_tokens: Callable[[list[Message]], int],
    n_ctx: int,
    reserve: int,
) -> FitResult:
    """Drop the oldest user/assistant pairs until prompt + ``reserve`` answer tokens fit.

    Raises ContextOverflowError when the system prompt and the new message alone do not fit.
    """
    history = list(session.messages)
    dropped = 0
    while True:
        head = [{"role": "system", "content": session.system}] if session.system else []
        messages = [*head, *history, {"role": "user", "content": user}]
        tokens = count_tokens(messages)
        if tokens + reserve <= n_ctx:
            break
        if not history:
            raise ContextOverflowError(
                f"this message needs {tokens} prompt tokens + {reserve} for the answer, but the "
                f"context holds {n_ctx}; shorten the message, lower --max-tokens, or load the model "
                f"with a larger context (`%llm load MODEL --ctx {_next_ctx(tokens + reserve)}`)",
                n_tokens=tokens + reserve, n_ctx=n_ctx,
            )
        # Drop a whole exchange at a time so the history never starts with an assistant turn.
        cut = 2 if len(history) >= 2 else 1
        history = history[cut:]
        dropped += cut
    notice = None
    if dropped:
        notice = (f"dropped the {dropped} oldest message{'s' if dropped != 1 else ''} of this "
                  f"conversation to fit the {n_ctx}-token context (`%%chat --new` starts over)")
        session.messages[:] = history
        session.dropped += dropped
    return FitResult(messages, tokens, dropped, notice)


def _next_ctx(tokens: int) -> int:
    size = 512
    while size < tokens:
        size *= 2
    return size
