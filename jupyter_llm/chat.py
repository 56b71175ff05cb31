"""Chat: the conversations kept per notebook, and one chat turn, the same for every front end.

A :class:`ChatSession` is a list of messages plus the model and system prompt it was started
with. :func:`start` begins one turn on a loaded model: ``%%chat`` (with a session), the Python
API's ``Model.chat`` and the HTTP API's chat routes (with the messages they were given) all go
through it. The worker renders the chat template and tokenizes the conversation once; when a
turn is fitted (``reserve`` tokens kept for the answer) and would not fit, the worker drops the
oldest turns and says how many (:attr:`Turn.notice`), or, if even the newest message alone
does not fit, refuses with the numbers. Nothing is ever truncated silently. A session records
the exchange when the answer ends.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .options import SamplingOptions

if TYPE_CHECKING:
    from .loaded import LoadedModel
    from .manager import ModelManager
    from .runtime import Completion, Stream
    from .runtime.stream import Chunk

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

    def forget_oldest(self, n: int) -> None:
        """Drop the ``n`` oldest messages of the history (the worker dropped them to fit)."""
        if n > 0:
            del self.messages[:n]
            self.dropped += n

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


class Turn:
    """One chat turn in flight: iterate for the answer's chunks; ``result`` once it ended.

    With a session, the exchange is recorded when the answer has text (also after a stop).
    """

    def __init__(self, model: LoadedModel, stream: Stream, *, n_ctx: int, session: ChatSession | None = None,
                 user: str | None = None) -> None:
        self.model = model
        self.stream = stream
        self.session = session
        self.user = user
        self.n_ctx = n_ctx
        self._recorded = False
        self._lock = threading.Lock()
        self.dropped = stream.fitted()
        """How many of the oldest messages were dropped to make the conversation fit."""
        self.load_notices: list[str] = []
        """What loading the model for this turn had to say (options reused, models evicted)."""
        if session is not None:
            session.forget_oldest(self.dropped)

    @property
    def notice(self) -> str | None:
        """What the user must be told about fitting, or None."""
        return fit_notice(self.dropped, self.n_ctx)

    def __iter__(self) -> Iterator[Chunk]:
        try:
            yield from self.stream
        finally:
            self.finish()

    @property
    def text(self) -> str:
        return self.stream.text

    @property
    def result(self) -> Completion | None:
        """The completion of an answer that has ended (normally or cancelled), else None."""
        if not self.stream.done:
            return None
        try:
            return self.stream.result
        except Exception:  # the error itself is what the caller is handling
            return None

    def finish(self) -> None:
        """Record the exchange in the session (once), whatever ended the answer."""
        with self._lock:
            if self._recorded or self.session is None or self.user is None:
                return
            self._recorded = True
        if self.stream.text:
            self.session.record(self.user, self.stream.text)


def start(model: LoadedModel, messages: list[Message], sampling: SamplingOptions | None = None, *,
          grammar: str | None = None, json_schema: dict[str, Any] | None = None, fit: bool = False,
          session: ChatSession | None = None, user: str | None = None) -> Turn:
    """Begin answering ``messages`` with a loaded ``model``; returns at once (the worker works).

    ``fit=True`` keeps room for the answer (``max_tokens``, at most a quarter of the slot) and
    lets the worker drop the oldest turns to make it; without it a conversation that does not
    fit its slot is refused (ContextOverflowError). With a ``session`` (and the ``user``
    message that ends ``messages``) the exchange is recorded there when the answer ends.
    """
    # An Ollama manifest's SYSTEM is the default system prompt and its PARAMS the default sampling
    # (docs/notes.md §6): what the caller gives wins.
    layers = model.record.ollama
    if layers.get("system") and not any(m.get("role") == "system" for m in messages):
        messages = [{"role": "system", "content": str(layers["system"])}, *messages]
    sampling = (sampling or SamplingOptions()).with_model_defaults(layers.get("params") or {})
    n_ctx = slot_context(model)
    reserve = min(sampling.max_tokens or 256, max(n_ctx // 4, 1)) if fit else None
    stream = model.runtime.chat(messages, sampling, grammar=grammar, json_schema=json_schema, reserve=reserve)
    try:
        return Turn(model, stream, n_ctx=n_ctx, session=session, user=user)
    except BaseException:
        stream.cancel()
        raise


def session_turn(manager: ModelManager, session: ChatSession, user: str, sampling: SamplingOptions, *,
                 model: str | None = None, system: str | None = None, new: bool = False,
                 json_schema: dict[str, Any] | None = None) -> Turn:
    """The next turn of ``session``: reset it when asked (or when the system prompt changed),
    pick the model (:func:`choose_model`, loading it on demand) and start the turn fitted to
    the context. The history goes on with whichever model answers."""
    if new or (system is not None and system != session.system):
        session.reset(system=system)
    name = choose_model(manager, session, model)
    loaded_now = manager.load(name) if name is not None and not manager.is_loaded(name) else None
    loaded = manager.get(name)
    session.model = loaded.name
    turn = start(loaded, session.prompt_messages(user), sampling, json_schema=json_schema, fit=True,
                 session=session, user=user)
    if loaded_now is not None:
        turn.load_notices = list(loaded_now.notices)
    return turn


def choose_model(manager: ModelManager, session: ChatSession, named: str | None) -> str | None:
    """The model that answers the next turn: the one the user named, else the one loaded most
    recently (a user who runs ``%llm load`` of another model means to chat with it next), else
    the session's own, reloaded (keep_alive unloaded it); None when there is none of these
    (the manager then says what to load)."""
    if named:
        return named
    loaded = manager.ps()
    if loaded:
        return max(loaded, key=lambda m: m.chosen_at).name
    return session.model


def fit_notice(dropped: int, n_ctx: int, restart: str = "`%%chat --new` starts over") -> str | None:
    """The visible notice for messages dropped to fit, None when none were; ``restart`` says
    how to start the conversation over in the front end that shows it."""
    if not dropped:
        return None
    s = "s" if dropped != 1 else ""
    return f"dropped the {dropped} oldest message{s} of this conversation to fit the {n_ctx}-token context ({restart})"


def slot_context(model: LoadedModel) -> int:
    """Tokens one request may use: its slot's share of the context (n_ctx / parallel)."""
    report = model.report
    if report is not None:
        return int(report.n_ctx_per_slot)
    return int(model.options.n_ctx) // max(1, model.options.parallel)
