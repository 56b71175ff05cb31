"""Tables of remote engines: the remotes, their models (``%llm list``) and what they report
as loaded (``%llm ps``). They show the manager's remote states (:meth:`Remotes.states`);
what a remote did not report is shown as "?" — unknown, not zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .display import Table, human_bytes

UNKNOWN = "?"


def _bytes(n: Any) -> str:
    return human_bytes(n) if isinstance(n, int | float) and not isinstance(n, bool) else UNKNOWN


_INTERESTING = ("requests_processing", "requests_deferred", "kv_cache_usage", "num_requests_running",
                "num_requests_waiting", "cache_usage_perc")
"""Metrics shown first in ``%llm ps`` (llama-server's and vLLM's load and KV cache use)."""


def _state(s: dict[str, Any], *, short: bool = False) -> str:
    error = s.get("error") or ""
    if short:  # a table row: what happened, not what to do about it (`%llm remote list` has that)
        error = error.split("; ")[0]
    return str(s["state"]) + (f": {error}" if error else "")


def _metrics(metrics: dict[str, float], n: int = 4) -> str:
    names = sorted(metrics, key=lambda k: not any(i in k for i in _INTERESTING))[:n]
    return ", ".join(f"{k.split(':', 1)[-1]}={metrics[k]:g}" for k in names)


def remotes_table(states: Sequence[dict[str, Any]]) -> Table:
    rows = [[s["name"], s["url"], s["api"], f"${s['token_env']}" if s.get("token_env") else "—",
             len(s["models"]) if s["state"] == "reachable" else UNKNOWN, _state(s)] for s in states]
    return Table(["name", "address", "api", "token", "models", "state"], rows, title="Remote engines",
                 empty="No remotes: `%llm remote add NAME URL --api openai|ollama [--token-env VAR]` adds one.",
                 data=list(states))


def remote_models_table(states: Sequence[dict[str, Any]]) -> Table:
    rows: list[list[Any]] = []
    for s in states:
        if s["state"] != "reachable":
            rows.append([f"{s['name']}/…", UNKNOWN, s["url"], _state(s, short=True)])
        rows += [[m["name"], _bytes(m.get("size")), s["url"], s["api"]] for m in s["models"]]
    return Table(["name", "size", "remote", "api / state"], rows, title="Remote models",
                 empty="The remotes serve no models.", data=list(states))


def remote_ps_table(states: Sequence[dict[str, Any]]) -> Table:
    rows: list[list[Any]] = []
    for s in states:
        if s["state"] != "reachable":
            rows.append([f"{s['name']}/…", UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, _state(s, short=True)])
            continue
        for r in s["running"]:
            slots = UNKNOWN if r.get("slots") is None else (
                f"{r['busy']}/{r['slots']} busy" if r.get("busy") is not None else str(r["slots"]))
            extra = _metrics(r.get("metrics") or {})
            rows.append([r["name"], _bytes(r.get("size")), _bytes(r.get("size_vram")),
                         r.get("context_length") if r.get("context_length") is not None else UNKNOWN, slots,
                         extra or (f"expires {r['expires_at']}" if r.get("expires_at") else "—")])
    return Table(["name", "size", "vram", "ctx", "slots", "reported"], rows, title="Remote engines: loaded",
                 empty="The remotes report no loaded model.", data=list(states))
