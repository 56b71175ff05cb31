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

import dataclasses
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .options import SamplingOptions
from .thinking import thinking_request
from .tools import CallFilter, ToolCall, call_grammar, tool_choice, tool_specs

if TYPE_CHECKING:
    from .loaded import LoadedModel
    from .manager import ModelManager
    from .remote.client import RemoteStream
    from .remote.model import RemoteModel
    from .runtime import Completion, Stream
    from .runtime.stream import Chunk, Extras

Message = dict[str, Any]


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

    def __init__(self, model: LoadedModel | RemoteModel, stream: Stream | RemoteStream, *, n_ctx: int,
                 session: ChatSession | None = None, user: str | None = None,
                 tool_names: list[str] | None = None, prefix: int = 0) -> None:
        self.model = model
        self.stream = stream
        self._calls = CallFilter(tool_names) if tool_names else None
        self.tool_calls: list[ToolCall] = []
        """The tool calls the model asked for, complete once the answer ended."""
        self._polled = 0
        self._content: str | None = None
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
            session.forget_oldest(self.dropped - prefix)  # the model's MESSAGE lines went first

    @property
    def notice(self) -> str | None:
        """What the user must be told about fitting, or None."""
        return fit_notice(self.dropped, self.n_ctx)

    @property
    def filters_calls(self) -> bool:
        """Whether iterating the turn holds back tool-call markup (tools were offered), so that
        its chunks are not simply the stream's."""
        return self._calls is not None

    def arrived(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for the answer's first chunk (see Answering.arrived)."""
        return self.stream.arrived(timeout)

    def __iter__(self) -> Iterator[Chunk]:
        try:
            if self._calls is None:
                yield from self.stream
                return
            from .runtime.stream import Chunk

            for chunk in self.stream:  # tool-call markup is held back (tools.CallFilter)
                shown = self._calls.feed(chunk.text)
                if shown:
                    yield Chunk(shown, chunk.n_tokens)
            rest = self._end_calls()
            if rest:
                yield Chunk(rest, 0)
        finally:
            self.finish()

    def _end_calls(self) -> str:
        """Parse the tool calls once the answer ended; the visible text not yet shown."""
        if self._calls is None or self._content is not None:
            return ""
        rest, self._content, self.tool_calls = self._calls.finish()
        return rest

    def new_tool_calls(self) -> list[ToolCall]:
        """The tool calls parsed since the last poll (they are known once the answer ended)."""
        calls = self.tool_calls[self._polled:]
        self._polled = len(self.tool_calls)
        return calls

    @property
    def text(self) -> str:
        """The visible text (tool-call markup left out)."""
        if self._calls is None:
            return self.stream.text
        if self._content is None and self.stream.done:
            self._end_calls()
        return self._content if self._content is not None else self.stream.text[:self._calls.shown]

    @property
    def result(self) -> Completion | None:
        """The completion of an answer that has ended (normally or cancelled), else None; with
        tool calls its ``finish_reason`` is ``"tool_calls"`` and its text the visible content."""
        if not self.stream.done:
            return None
        try:
            completion = self.stream.result
        except Exception:  # the error itself is what the caller is handling
            return None
        if self._calls is None:
            return completion
        self._end_calls()
        reason = "tool_calls" if self.tool_calls else completion.finish_reason
        return dataclasses.replace(completion, text=self.text, finish_reason=reason)

    def finish(self) -> None:
        """Record the exchange in the session (once), whatever ended the answer."""
        with self._lock:
            if self._recorded or self.session is None or self.user is None:
                return
            self._recorded = True
        if self.text:
            self.session.record(self.user, self.text)


def start(model: LoadedModel | RemoteModel, messages: list[Message], sampling: SamplingOptions | None = None, *,
          grammar: str | None = None, json_schema: dict[str, Any] | None = None, fit: bool = False,
          session: ChatSession | None = None, user: str | None = None, tools: list[Any] | None = None,
          tool_choice: Any = None, extras: Extras | None = None, think: Any = None) -> Turn:
    """Begin answering ``messages`` with a loaded ``model``; returns at once (the worker works).

    ``fit=True`` keeps room for the answer (``max_tokens``, at most a quarter of the slot) and
    lets the worker drop the oldest turns to make it; without it a conversation that does not
    fit its slot is refused (ContextOverflowError). With a ``session`` (and the ``user``
    message that ends ``messages``) the exchange is recorded there when the answer ends.

    ``tools`` (functions or tool objects, see :func:`jupyter_llm.tools.tool_spec`) are offered
    to the model through its chat template; ``tool_choice`` "none" offers none, "required" or a
    function's name constrains the answer to one call by a grammar. The calls the model makes
    are in :attr:`Turn.tool_calls` once the answer ended.

    ``extras``: several answers, log probabilities (:class:`~jupyter_llm.runtime.stream.Extras`);
    ``think`` (True/False or a level) asks a reasoning model to think, its reasoning split off the
    answer into the chunks' and the completion's ``thinking`` (:mod:`jupyter_llm.thinking`;
    a model without the capability raises CapabilityError).
    """
    # An Ollama manifest's SYSTEM is the default system prompt and its PARAMS the default sampling
    # (docs/notes.md §6): what the caller gives wins.
    layers = model.record.ollama
    if layers.get("messages"):  # a Modelfile's MESSAGE lines: a conversation before every chat, as in Ollama
        messages = [*layers["messages"], *messages]
    if layers.get("system") and not any(m.get("role") == "system" for m in messages):
        messages = [{"role": "system", "content": str(layers["system"])}, *messages]
    sampling = (sampling or SamplingOptions()).with_model_defaults(layers.get("params") or {})
    n_ctx = slot_context(model)
    reserve = min(sampling.max_tokens or 256, max(n_ctx // 4, 1)) if fit else None
    specs = tool_specs(tools)
    choice = _tool_choice(tool_choice, specs)
    offered = specs if specs and choice != "none" else None
    if offered and choice is not None and grammar is None and json_schema is None:
        grammar = call_grammar(offered, choice)
    extras = with_thinking(model, extras, think)
    stream = model.runtime.chat(messages, sampling, grammar=grammar, json_schema=json_schema, reserve=reserve,
                                tools=offered, **({"extras": extras} if extras is not None else {}))
    names = [s["function"]["name"] for s in offered] if offered else None
    try:
        return Turn(model, stream, n_ctx=n_ctx, session=session, user=user, tool_names=names,
                    prefix=len(layers.get("messages") or ()))
    except BaseException:
        stream.cancel()
        raise


_tool_choice = tool_choice  # (the parameter of start() has the same name)


def with_thinking(model: LoadedModel | RemoteModel, extras: Extras | None, think: Any) -> Extras | None:
    """``extras`` with what ``think`` asks of ``model`` (:mod:`jupyter_llm.thinking`); unchanged
    when it is None; CapabilityError for a model without reasoning markers."""
    request = thinking_request(model, think) if think is not None else None
    if request is None:
        return extras
    from .runtime.stream import Extras

    base = extras or Extras()
    return dataclasses.replace(base, template={**base.template, **request.variables}, markers=request.markers)


def session_turn(manager: ModelManager, session: ChatSession, user: str, sampling: SamplingOptions, *,
                 model: str | None = None, system: str | None = None, new: bool = False,
                 json_schema: dict[str, Any] | None = None, think: Any = None, every: float = 0.0) -> Turn:
    """The next turn of ``session``: reset it when asked (or when the system prompt changed),
    pick the model (:func:`choose_model`, loading it on demand) and start the turn fitted to
    the context. The history goes on with whichever model answers. ``think``: as for :func:`start`;
    ``every``: the chunks' interval for a local model (:attr:`~jupyter_llm.runtime.stream.Extras.every`)."""
    if new or (system is not None and system != session.system):
        session.reset(system=system)
    name = choose_model(manager, session, model)
    remote = manager.remotes.model(name)
    if remote is not None:  # NAME/MODEL: the remote engine answers, the history stays here
        session.model = remote.name
        return start(remote, session.prompt_messages(user), sampling, json_schema=json_schema, fit=True,
                     session=session, user=user)
    from .runtime.stream import Extras

    loaded_now = manager.load(name) if name is not None and not manager.is_loaded(name) else None
    loaded = manager.get(name)
    session.model = loaded.name
    turn = start(loaded, session.prompt_messages(user), sampling, json_schema=json_schema, fit=True,
                 session=session, user=user, think=think, extras=Extras(every=every) if every else None)
    if loaded_now is not None:
        turn.load_notices = list(loaded_now.notices)
    return turn


def using(manager: ModelManager, model: LoadedModel | RemoteModel) -> AbstractContextManager[object]:
    """The model marked busy while it answers; a remote engine keeps its own models loaded."""
    return manager.using(model.name) if manager.remotes.model(model.name) is None else nullcontext()


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


def slot_context(model: LoadedModel | RemoteModel) -> int:
    """Tokens one request may use: its slot's share of the context (n_ctx / parallel)."""
    report = model.report
    if report is not None:
        return int(report.n_ctx_per_slot)
    return int(model.options.n_ctx) // max(1, model.options.parallel)
