"""Request bodies → validated values: the one place the HTTP API decides what input is bad.

Both APIs read their JSON through :class:`Body`, whose getters check type and range and raise
:class:`HTTPProblem` (a 4xx with a message naming the field) — so a malformed request can never
reach the manager or a worker as a half-checked value and come back as a 500. Ollama's
``options`` and OpenAI's parameters are mapped onto :class:`~jupyter_llm.options.SamplingOptions`
here too, and so is Ollama's ``keep_alive`` duration syntax.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

MAX_BODY_BYTES = 8 * 1024 * 1024
"""Larger request bodies get 413: nothing this API accepts needs more."""
MAX_BLOB_BYTES = 512 * 1024**3
"""Largest blob upload (``POST /api/blobs``): those bodies stream to disk, bounded by this and
the free space (:func:`jupyter_llm.store.upload.receive`), not by :data:`MAX_BODY_BYTES`."""

MAX_STOP = 16
MAX_INPUTS = 2048
"""Texts per embedding request."""

_UNSET: Any = object()


def streams_body(path: str) -> bool:
    """Whether the route at ``path`` streams its body to disk and bounds it itself (blob uploads)."""
    return path.startswith("/api/blobs/")


class HTTPProblem(Exception):
    """An HTTP error answer: status, a message for the user, and for OpenAI a code and param."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})


def bad(message: str, param: str | None = None) -> HTTPProblem:
    """A 400 for invalid input."""
    return HTTPProblem(400, message, param=param, code="invalid_request")


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object (400 if it is anything else)."""
    if not raw.strip():
        raise bad("the request body is empty; send a JSON object")
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise bad("the request body is not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise bad(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad(f"the request body must be a JSON object, not {type(data).__name__}")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class Body:
    """Typed, range-checked access to a JSON object's fields; ``prefix`` names nested objects."""

    def __init__(self, data: Mapping[str, Any], prefix: str = "") -> None:
        self.data = data
        self.prefix = prefix

    def _name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str, default: Any = None) -> Any:
        value = self.data.get(key)
        return default if value is None else value

    def text(self, key: str, default: Any = _UNSET, *, required: bool = False, nonempty: bool = False,
            max_len: int | None = None) -> Any:
        value = self.data.get(key)
        if value is None:
            if required:
                raise bad(f"'{self._name(key)}' is required", self._name(key))
            return None if default is _UNSET else default
        if not isinstance(value, str):
            raise bad(f"'{self._name(key)}' must be a string, not {_kind(value)}", self._name(key))
        if nonempty and not value.strip():
            raise bad(f"'{self._name(key)}' must not be empty", self._name(key))
        if max_len is not None and len(value) > max_len:
            raise bad(f"'{self._name(key)}' is longer than {max_len} characters", self._name(key))
        return value

    def flag(self, key: str, default: Any = None) -> Any:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise bad(f"'{self._name(key)}' must be true or false, not {_kind(value)}", self._name(key))
        return value

    def integer(self, key: str, default: Any = None, *, lo: int | None = None, hi: int | None = None) -> Any:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            value = int(value)  # JSON has one number type; 5.0 is a fine 5
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(f"'{self._name(key)}' must be a whole number, not {_kind(value)}", self._name(key))
        _check_range(self._name(key), value, lo, hi)
        return value

    def number(self, key: str, default: Any = None, *, lo: float | None = None, hi: float | None = None) -> Any:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad(f"'{self._name(key)}' must be a number, not {_kind(value)}", self._name(key))
        value = float(value)
        if not math.isfinite(value):
            raise bad(f"'{self._name(key)}' must be a finite number", self._name(key))
        _check_range(self._name(key), value, lo, hi)
        return value

    def obj(self, key: str) -> Body | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise bad(f"'{self._name(key)}' must be an object, not {_kind(value)}", self._name(key))
        return Body(value, prefix=f"{self._name(key)}.")

    def array(self, key: str, *, required: bool = False) -> Any:
        value = self.data.get(key)
        if value is None:
            if required:
                raise bad(f"'{self._name(key)}' is required", self._name(key))
            return None
        if not isinstance(value, list):
            raise bad(f"'{self._name(key)}' must be a list, not {_kind(value)}", self._name(key))
        return value

    def stop(self, key: str = "stop") -> tuple[str, ...]:
        """A stop string or a list of them."""
        value = self.data.get(key)
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise bad(f"'{self._name(key)}' must be a string or a list of strings", self._name(key))
        if len(items) > MAX_STOP:
            raise bad(f"'{self._name(key)}' has {len(items)} entries; at most {MAX_STOP} are allowed", self._name(key))
        return tuple(s for s in items if s)


def model_name(body: Body) -> str:
    """The model an Ollama request names (``model``, or the older ``name``)."""
    name = body.text("model", max_len=512) or body.text("name", max_len=512)
    if not name or not name.strip():
        raise bad("'model' is required")
    return name


def _check_range(name: str, value: float, lo: float | None, hi: float | None) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if lo is not None and hi is not None else (
            f"≥ {lo}" if lo is not None else f"≤ {hi}")
        raise bad(f"'{name}' must be {bounds}, not {value}", name)


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number"}
    return names.get(type(value), type(value).__name__)


# -- keep_alive ------------------------------------------------------------------------------

def keep_alive(value: Any) -> Any:
    """Ollama's keep_alive: seconds (a number) or a Go duration ("5m", "1h30m", "-1m").

    Returns seconds (0: unload right after this request) or None for forever (any negative
    value). Raises a 400 on anything else.
    """
    from ..options import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise bad(f"'{exc}", "keep_alive") from None  # "'keep_alive '5x': use …"


# -- sampling --------------------------------------------------------------------------------

OLLAMA_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "num_predict", "stop", "repeat_penalty")
OLLAMA_LOAD = ("num_ctx",)
OLLAMA_IGNORED = (
    "numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only",
    "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep", "tfs_z", "typical_p",
    "repeat_last_n", "presence_penalty", "frequency_penalty", "mirostat", "mirostat_tau",
    "mirostat_eta", "penalize_newline",
)
"""Options Ollama knows that this server accepts and does not apply (hardware and load settings
are the kernel's; the rest have no equivalent in our sampler chain). Unknown keys get a 400."""

MAX_SEED = 2**64


def common_sampling(b: Body, *, temperature_max: float) -> dict[str, Any]:
    """Sampling fields both APIs share (temperature, top_p, top_k, min_p, seed, repeat_penalty)."""
    out: dict[str, Any] = {}
    value = b.number("temperature", lo=0.0, hi=temperature_max)
    if value is not None:
        out["temperature"] = value
    value = b.number("top_p", lo=0.0, hi=1.0)
    if value is not None:
        out["top_p"] = value if value > 0 else 1e-6  # 0 means "only the top token"; ours needs > 0
    value = b.integer("top_k", lo=0, hi=1_000_000)
    if value is not None:
        out["top_k"] = value
    value = b.number("min_p", lo=0.0, hi=1.0)
    if value is not None:
        out["min_p"] = value
    value = b.number("repeat_penalty", lo=0.0, hi=10.0)
    if value is not None:
        out["repeat_penalty"] = value if value > 0 else 1.0  # llama.cpp treats ≤ 0 as "off"
    seed = b.integer("seed", lo=-MAX_SEED, hi=MAX_SEED)
    if seed is not None:
        out["seed"] = None if seed < 0 else seed  # -1: a fresh seed, as in llama.cpp and Ollama
    return out


def ollama_options(options: Body | None, n_ctx_max: int) -> tuple[dict[str, Any], int | None]:
    """Ollama's ``options`` → (SamplingOptions fields, num_ctx or None)."""
    if options is None:
        return {"max_tokens": None}, None
    known = set(OLLAMA_SAMPLING) | set(OLLAMA_LOAD) | set(OLLAMA_IGNORED) | {"tool_choice"}  # (server/tool_shapes)
    unknown = sorted(k for k in options.data if k not in known)
    if unknown:
        raise bad(f"unknown option(s) {', '.join(map(repr, unknown))}; supported: "
                  f"{', '.join(OLLAMA_SAMPLING + OLLAMA_LOAD)}", "options")
    for key in OLLAMA_IGNORED:  # still type-checked, so a typo'd value is not silently accepted
        value = options.data.get(key)
        if value is not None and not isinstance(value, bool | int | float):
            raise bad(f"'options.{key}' must be a number or boolean", f"options.{key}")
    out = common_sampling(options, temperature_max=10.0)
    predict = options.integer("num_predict", lo=-2, hi=2**31)
    if predict is not None and predict == 0:
        raise bad("'options.num_predict' must be ≥ 1, or -1 (until the end of the answer)", "options.num_predict")
    out["max_tokens"] = None if predict is None or predict < 0 else predict
    stop = options.stop()
    if stop:
        out["stop"] = stop
    num_ctx = options.integer("num_ctx", lo=16, hi=n_ctx_max)
    return out, num_ctx


def sampling(fields: dict[str, Any]) -> Any:
    """SamplingOptions from mapped fields; its own validation errors become 400s."""
    from ..options import SamplingOptions

    try:
        return SamplingOptions(**fields)
    except (TypeError, ValueError) as exc:
        raise bad(str(exc)) from None


def check_max_tokens(max_tokens: int | None, n_ctx_per_slot: int, param: str) -> None:
    """A request can never produce more tokens than one slot of the context holds."""
    if max_tokens is not None and max_tokens > n_ctx_per_slot:
        raise bad(f"'{param}' is {max_tokens} but this model's context holds {n_ctx_per_slot} tokens per "
                  "request (prompt and answer together); ask for fewer", param)


def json_format(value: Any, param: str = "format") -> dict[str, Any] | None:
    """Ollama's ``format``: "" / None (free text), "json" (any JSON) or a JSON schema object."""
    if value is None or value == "":
        return None
    if value == "json":
        return {}
    if isinstance(value, dict):
        return value
    raise bad(f"'{param}' must be \"json\" or a JSON schema object", param)


def grammar_for(schema: dict[str, Any] | None, param: str = "format") -> str | None:
    """The GBNF grammar constraining output to ``schema`` (400 if the schema cannot be compiled)."""
    if schema is None:
        return None
    from ..runtime.process import schema_grammar

    try:
        return schema_grammar(schema)
    except Exception as exc:  # the converter raises many types on odd schemas
        raise bad(f"'{param}' is not a JSON schema this server can enforce: {type(exc).__name__}: {exc}",
                  param) from None
