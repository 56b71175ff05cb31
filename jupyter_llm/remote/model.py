"""A model on a remote engine, shaped like a loaded model where a chat turn needs one.

:func:`jupyter_llm.chat.start` and the HTTP API's jobs read a model's ``record.ollama``
(defaults of an Ollama manifest), its context per request (``report`` / ``options``) and call
``runtime.chat`` / ``runtime.generate``; a :class:`RemoteModel` answers those, so a remote
turn goes through the same entry as a local one. The engine keeps its own models loaded:
there is nothing to load, unload or count here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import CapabilityError
from ..options import SamplingOptions

if TYPE_CHECKING:
    from ..runtime.stream import Extras
    from .client import RemoteStream
    from .ollama_engine import OllamaEngine
    from .openai_engine import OpenAIEngine

UNKNOWN_CONTEXT = 1 << 20
"""The context a remote model is given credit for: the engine itself refuses what does not fit."""


@dataclass(frozen=True)
class RemoteOptions:
    """What the callers of a loaded model read from its options."""

    n_ctx: int = UNKNOWN_CONTEXT
    parallel: int = 1
    keep_alive: float | None = None
    kv_type: str | None = None
    flash_attn: bool | None = None
    gpu_layers: int | None = None
    """The engine's own settings: not known here."""


@dataclass(frozen=True)
class RemoteRecord:
    """A remote model has no store record: no manifest defaults, no file."""

    name: str
    ollama: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    size: int | None = None
    sha256: str | None = None


class RemoteRuntime:
    """``chat`` and ``generate`` on the remote engine, as :class:`~jupyter_llm.runtime.Runtime` has them."""

    report = None
    alive = True

    def __init__(self, engine: OpenAIEngine | OllamaEngine, model: str) -> None:
        self.engine = engine
        self.model = model

    def chat(self, messages: list[dict[str, Any]], sampling: SamplingOptions, *, grammar: str | None = None,
             json_schema: dict[str, Any] | None = None, reserve: int | None = None,
             tools: list[dict[str, Any]] | None = None, extras: Extras | None = None) -> RemoteStream:
        if tools:
            raise CapabilityError(f"tool calling with a remote model ({self.model!r}) is not supported yet; "
                                  "use a local model (`%llm load NAME`) for tools", "tools")
        self._plain(extras)
        return self.engine.chat(self.model, messages, sampling, json_schema=json_schema, grammar=grammar)

    def generate(self, prompt: str, sampling: SamplingOptions, *, grammar: str | None = None,
                 json_schema: dict[str, Any] | None = None, extras: Extras | None = None) -> RemoteStream:
        self._plain(extras)
        return self.engine.generate(self.model, prompt, sampling, json_schema=json_schema, grammar=grammar)

    def _plain(self, extras: Extras | None) -> None:
        """Several answers, log probabilities and thinking are not asked of a remote yet: refused, not dropped."""
        if extras is not None and (extras.n != 1 or extras.logprobs is not None or extras.markers is not None
                                   or extras.template):
            raise CapabilityError(f"several answers, log probabilities and thinking are not supported with a remote "
                                  f"model ({self.model!r}) yet; ask for one plain answer, or use a local model",
                                  "completion")

    def embed(self, texts: list[str], normalize: bool = True) -> list[list[float]]:
        raise CapabilityError("embeddings from a remote engine are not supported yet; load a local model "
                              "(`%llm load NAME`) to embed", "embedding")

    def tokenize(self, text: str, **kwargs: Any) -> list[int]:
        raise CapabilityError("tokenizing on a remote engine is not supported; embed with a local model", "embedding")


@dataclass
class RemoteModel:
    """``NAME/MODEL``: ``model`` served by the remote ``remote``."""

    name: str
    remote: str
    model: str
    runtime: RemoteRuntime
    options: RemoteOptions = field(default_factory=RemoteOptions)
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    active: int = 0
    notices: list[str] = field(default_factory=list)

    @property
    def record(self) -> RemoteRecord:
        return RemoteRecord(self.name)

    @property
    def report(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"RemoteModel({self.name!r})"
