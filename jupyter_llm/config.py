"""Every environment variable jupyter_llm reads, parsed in this one module.

Values are read at call time, not import time, so a test (or a user in a running kernel) can
change ``os.environ`` and see the effect. Explicit arguments always win over these.

=================================  ==========================================================
``JUPYTER_LLM_HOME``               our store: records, pip/Ollama blobs, partial downloads
                                   (default ``~/.cache/jupyter_llm``)
``JUPYTER_LLM_ALIASES``            extra alias file (JSON), merged over the shipped table
                                   (default ``$JUPYTER_LLM_HOME/aliases.json``)
``JUPYTER_LLM_HF_ENDPOINT``        Hugging Face endpoint; falls back to ``HF_ENDPOINT`` and
                                   then to huggingface_hub's configured default
``JUPYTER_LLM_OLLAMA_REGISTRY``    default Ollama registry for ``ollama://model:tag`` names,
                                   e.g. ``https://host``; ``http://`` is allowed for loopback
``JUPYTER_LLM_CONNECT_TIMEOUT``    seconds to wait for a TCP connect (default 3)
``JUPYTER_LLM_READ_TIMEOUT``       seconds without a byte before a download retries (default 30)
``JUPYTER_LLM_RETRIES``            transient-error retries per download (default 5)
``JUPYTER_LLM_PROMPT_CACHE``       0 turns off reusing a conversation's evaluated prefix between
                                   requests (default on; benchmarks compare without it)
``OLLAMA_MODELS``                  a local Ollama store, listed and used read-only
``HF_HUB_CACHE`` / ``HF_HOME``     the Hugging Face cache that HF pulls land in
=================================  ==========================================================
"""

from __future__ import annotations

import os
from pathlib import Path


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def _float(name: str, default: float) -> float:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number; unset it or give seconds, e.g. 3") from None


def home() -> Path:
    """Root of jupyter_llm's own store."""
    return Path(_env("JUPYTER_LLM_HOME") or Path.home() / ".cache" / "jupyter_llm").expanduser()


def alias_file() -> Path:
    """The user's alias table, merged over the one shipped in the package."""
    return Path(_env("JUPYTER_LLM_ALIASES") or home() / "aliases.json").expanduser()


def hf_cache() -> Path:
    """The Hugging Face hub cache directory, resolved the way huggingface_hub resolves it."""
    explicit = _env("HF_HUB_CACHE") or _env("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    hf_home = _env("HF_HOME") or os.path.join(_env("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(hf_home).expanduser() / "hub"


def hf_endpoint() -> str:
    """The Hugging Face endpoint: ours, then HF_ENDPOINT, then huggingface_hub's default."""
    explicit = _env("JUPYTER_LLM_HF_ENDPOINT") or _env("HF_ENDPOINT")
    if explicit:
        return explicit.rstrip("/")
    from huggingface_hub import constants  # deferred: keeps %load_ext instant

    return str(constants.ENDPOINT).rstrip("/")


def hf_token() -> str | None:
    """A Hugging Face token if the user configured one (gated repositories need it)."""
    return _env("HF_TOKEN") or _env("HUGGING_FACE_HUB_TOKEN")


def ollama_registry() -> str | None:
    """The default Ollama registry URL, or None when the user has not configured one."""
    raw = _env("JUPYTER_LLM_OLLAMA_REGISTRY")
    return raw.rstrip("/") if raw else None


def ollama_store() -> Path:
    """A local Ollama model store (read-only for us)."""
    return Path(_env("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def connect_timeout() -> float:
    """Seconds to wait for a TCP connection; unreachable hosts must fail fast."""
    return _float("JUPYTER_LLM_CONNECT_TIMEOUT", 3.0)


def read_timeout() -> float:
    """Seconds without a received byte before a download attempt is retried."""
    return _float("JUPYTER_LLM_READ_TIMEOUT", 30.0)


def retries() -> int:
    """How many times a transient download error is retried (with backoff)."""
    return int(_float("JUPYTER_LLM_RETRIES", 5))


def prompt_cache() -> bool:
    """Whether workers reuse the KV of a slot's previous prompt and answer (default on)."""
    return (_env("JUPYTER_LLM_PROMPT_CACHE") or "1").strip().lower() not in ("0", "false", "no", "off")
