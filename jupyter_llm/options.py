"""The options a user gives for loading a model, for sampling and for the API, validated in one place.

Shared by the estimate (what would this take?), the runtime (load it) and every front end
(magics, widgets, the sidebar, the HTTP API), so that all of them mean the same thing: every
default is stated here once, and :func:`parse_duration` is the one reader of keep_alive values.
The load defaults of n_ctx, kv_type, flash_attn and keep_alive follow the environment when the
user set ``JUPYTER_LLM_*`` or Ollama's ``OLLAMA_*`` variables for them (:mod:`jupyter_llm.config`),
read at each ``LoadOptions()``; explicit arguments win.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final, Literal

KV_TYPES = ("f16", "q8_0", "q4_0")
AUTO: Final = "auto"

DEFAULT_KEEP_ALIVE = 300.0
"""Seconds an idle model stays loaded (Ollama's 5 minutes)."""
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434
"""Ollama's port, so tools configured for Ollama find us (choose another if Ollama runs)."""
DEFAULT_PARALLEL = 4
"""Slots of a model the API loads on demand (its concurrent requests)."""
DEFAULT_MAX_QUEUE = 16
"""Requests per model the API queues beyond its slots before answering 503."""
DEFAULT_CTX_PER_SLOT = 2048
"""Context per request for models the API loads (Ollama's default num_ctx)."""

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float | None:
    """A keep_alive value in Ollama's syntax → seconds, or None for "forever".

    Accepts a number of seconds (``300``, ``"300"``) or a Go duration (``"5m"``, ``"30s"``,
    ``"1h30m"``, ``"500ms"``); any negative value means forever, 0 unloads right after use.
    Raises ValueError, with the accepted forms, on anything else.
    """
    usage = f"keep_alive {value!r}: use a duration like 5m, 30s, 1h30m, -1 (forever) or 0 (unload after use)"
    if isinstance(value, bool):
        raise ValueError(usage)
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(usage)
        return None if value < 0 else float(value)
    if not isinstance(value, str):
        raise ValueError(usage)
    text = value.strip()
    negative = text.startswith("-")
    body = text[1:] if text[:1] in ("+", "-") else text
    try:
        seconds = float(body)  # a bare number in a string means seconds
    except ValueError:
        pos, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(body):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNIT_S[match.group(2)]
            pos = match.end()
        if pos != len(body) or not body:
            raise ValueError(usage) from None
    if not math.isfinite(seconds):
        raise ValueError(usage)
    return None if negative and seconds > 0 else seconds

DEFAULT_CTX = 4096
"""Context of a load in tokens (shared by its slots)."""


def _default_keep_alive() -> float | None:
    from . import config  # the environment is read at each LoadOptions(), not at import

    found = config.keep_alive()
    if found is None:
        return DEFAULT_KEEP_ALIVE
    name, raw = found
    try:
        return parse_duration(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r}: {exc}; or unset it (5m)") from None


def _default_ctx() -> int:
    from . import config

    return config.context_length() or DEFAULT_CTX


def _default_kv_type() -> str:
    from . import config

    return config.kv_cache_type() or "f16"


def _default_flash_attn() -> bool:
    """On unless the environment turns it off: as llama-server's default (``-fa auto``) on the
    CPU, where it measured ~10 % faster decoding on an AMD EPYC (Zen 3) and level on Zen 4, with
    a smaller compute buffer; the prompt cache stays exact with it (docs/notes.md §14)."""
    from . import config

    return config.flash_attention() is not False


GpuLayers = int | Literal["auto"]
Context = int | Literal["auto"]


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model. ``"auto"`` asks the estimate to choose what fits."""

    gpu_layers: GpuLayers = AUTO
    """Layers offloaded to GPUs; 0 = CPU only; ``"auto"`` = as many as fit (0 without a GPU)."""
    n_ctx: Context = field(default_factory=_default_ctx)
    """Context length in tokens shared by all slots; ``"auto"`` = largest that fits, capped at
    the model's training context."""
    kv_type: str = field(default_factory=_default_kv_type)
    """KV cache element type: f16, q8_0 or q4_0 (quantized V needs flash attention)."""
    flash_attn: bool = field(default_factory=_default_flash_attn)
    """Flash attention; on by default (``JUPYTER_LLM_FLASH_ATTENTION=0`` or ``--no-flash-attn``: off)."""
    threads: int | None = None
    """CPU threads for generation; None = the physical cores this process may use (hyperthreads
    of one core count once, as llama.cpp's own default; docs/notes.md §8)."""
    parallel: int = 1
    """Slots: sequences decoded together in one batch (the HTTP API's concurrent requests)."""
    n_batch: int = 512
    n_ubatch: int = 512
    keep_alive: float | None = field(default_factory=_default_keep_alive)
    """Seconds idle before the model is unloaded; None = forever; 0 = right after use."""
    tensor_split: tuple[float, ...] = field(default_factory=tuple)
    rpc: tuple[str, ...] = field(default_factory=tuple)
    """``host:port`` of llama.cpp rpc-servers whose devices take layers like GPUs (after the
    local ones); ``"a:1,b:2"`` or a sequence, normalised once (:mod:`jupyter_llm.memory.rpc_endpoints`)."""
    lora: tuple[tuple[str, float], ...] = field(default_factory=tuple)
    """LoRA adapters (GGUF path, scale) applied to the context, set from a derived model's ADAPTER
    lines (:mod:`jupyter_llm.store.derive`); a worker keeps one adapter set for its lifetime."""

    def __post_init__(self) -> None:
        if self.rpc:  # parsed once, here: every later reader sees normalised "host:port" strings
            from .memory.rpc_endpoints import parse_endpoints

            object.__setattr__(self, "rpc", parse_endpoints(self.rpc))
        elif not isinstance(self.rpc, tuple):
            object.__setattr__(self, "rpc", ())
        # JSON (remembered options, the sidebar) gives lists: one form, so equal loads compare equal
        object.__setattr__(self, "lora", tuple((str(p), float(scale)) for p, scale in self.lora or ()))
        if self.gpu_layers != AUTO and (not isinstance(self.gpu_layers, int) or self.gpu_layers < 0):
            raise ValueError(f"gpu_layers must be a whole number ≥ 0 or 'auto', not {self.gpu_layers!r}")
        if self.n_ctx != AUTO and (not isinstance(self.n_ctx, int) or self.n_ctx < 16):
            raise ValueError(f"n_ctx must be a whole number ≥ 16 or 'auto', not {self.n_ctx!r}")
        if self.kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}, not {self.kv_type!r}")
        if self.kv_type != "f16" and not self.flash_attn:
            # llama.cpp refuses a quantized V cache without flash attention; say so before loading.
            raise ValueError(f"kv_type {self.kv_type!r} needs flash attention: add --flash-attn (flash_attn=True)")
        if self.parallel < 1 or self.parallel > 64:
            raise ValueError(f"parallel must be between 1 and 64, not {self.parallel!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be ≥ 1, not {self.threads!r}")
        if self.n_ubatch < 1 or self.n_batch < self.n_ubatch:
            raise ValueError("n_ubatch must be ≥ 1 and n_batch ≥ n_ubatch")

    def with_(self, **changes: Any) -> LoadOptions:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick tokens. ``seed=None`` draws a fresh seed (recorded with the output)."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    max_tokens: int | None = 512
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 10.0:
            raise ValueError(f"temperature must be between 0 and 10, not {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be ≥ 1, not {self.max_tokens!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_model_defaults(self, params: dict[str, Any]) -> SamplingOptions:
        """These options under a model's own defaults (an Ollama manifest's PARAMS, in Ollama's
        names): a field still at its default here takes the model's value; ``stop`` strings are
        added to any given. Values that do not validate are ignored: they came with a download."""
        if not params:
            return self
        defaults, merged = SamplingOptions(), self
        for ours, theirs in _OLLAMA_SAMPLING.items():
            value = params.get(theirs)
            if value is None or isinstance(value, bool) or getattr(self, ours) != getattr(defaults, ours):
                continue
            kind = type(getattr(defaults, ours)) if getattr(defaults, ours) is not None else int
            try:
                change: dict[str, Any] = {ours: kind(value) if kind in (int, float) else value}
                merged = replace(merged, **change)
            except (TypeError, ValueError):
                continue  # came with a download: a value that does not validate is left out
        stop = params.get("stop")
        extra = [stop] if isinstance(stop, str) else [s for s in stop or () if isinstance(s, str)]
        if extra:
            merged = replace(merged, stop=tuple(dict.fromkeys([*merged.stop, *extra])))
        return merged


_OLLAMA_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                    "repeat_penalty": "repeat_penalty", "seed": "seed", "max_tokens": "num_predict"}
