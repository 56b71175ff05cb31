"""The server's own counters and histograms, and GET /metrics in Prometheus' text format.

Counters and histograms are kept here (requests by route and status, latencies, tokens);
gauges — queue depth, busy slots, models loaded, bytes per device — are read from the manager
and, through :class:`StatsCache`, from the workers at scrape time. A few dozen lines of text
format are simpler than a dependency (and need no global registry shared with the user's own code).

Every label takes its value from a fixed set: routes are the route table's templates (or
``unmatched``), methods outside :data:`METHODS` are ``other``, statuses are the ones this
server sends. Requests the Guard refuses (no token, foreign Host or Origin) only increment
counters that exist from the start: 2,000 requests with distinct 15 KB method names once grew
the kernel by 76 MB and /metrics to 31 MB (issue 11), so nothing a client without the token
sends may create state.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
"""Methods counted under their own name; any other is counted as ``other``."""
REFUSED = ("token", "host", "origin")
"""Why the Guard refused a request (the label values of jupyter_llm_http_refused_total)."""
DROPPED = ("connection_limit", "head_timeout", "body_timeout", "send_timeout")
"""Why the server closed a connection itself (jupyter_llm_http_connections_dropped_total)."""
STATS_WAIT_S = 0.5
"""How long a scrape waits for the workers' fresh counters before it shows their last ones."""

Labels = tuple[tuple[str, str], ...]
log = logging.getLogger("jupyter_llm.server")


class _Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


class Metrics:
    """Thread-safe counters and histograms of one server (the event loop and pump threads write)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[Labels, int] = {}
        self.latency: dict[Labels, _Histogram] = {}
        self.ttft: dict[Labels, _Histogram] = {}
        self.tokens: dict[Labels, int] = {}
        self.rejected: dict[Labels, int] = {}
        self.refused: dict[Labels, int] = {(("reason", r),): 0 for r in REFUSED}
        self.dropped: dict[Labels, int] = {(("reason", r),): 0 for r in DROPPED}

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One finished HTTP request that passed the Guard (streams count when their last byte is sent).

        ``route`` must be a route template or ``unmatched``; ``method`` may be anything.
        """
        method = method if method in METHODS else "other"
        with self._lock:
            key = (("route", route), ("method", method), ("status", str(status)))
            self.requests[key] = self.requests.get(key, 0) + 1
            hist = self.latency.setdefault((("route", route),), _Histogram(LATENCY_BUCKETS))
            hist.observe(seconds)

    def generation(self, model: str, prompt_tokens: int, completion_tokens: int, ttft_s: float | None) -> None:
        """Tokens in and out of one finished generation, and its time to first token."""
        with self._lock:
            for direction, n in (("in", prompt_tokens), ("out", completion_tokens)):
                key = (("model", model), ("direction", direction))
                self.tokens[key] = self.tokens.get(key, 0) + n
            if ttft_s is not None:
                self.ttft.setdefault((("model", model),), _Histogram(TTFT_BUCKETS)).observe(ttft_s)

    def rejected_busy(self, model: str) -> None:
        """A request turned away because the model's queue was full (503)."""
        with self._lock:
            key = (("model", model),)
            self.rejected[key] = self.rejected.get(key, 0) + 1

    def refuse(self, reason: str) -> None:
        """A request the Guard refused (one of :data:`REFUSED`)."""
        with self._lock:
            key = (("reason", reason),)
            if key in self.refused:
                self.refused[key] += 1

    def drop(self, reason: str) -> None:
        """A connection the server closed itself (one of :data:`DROPPED`)."""
        with self._lock:
            key = (("reason", reason),)
            if key in self.dropped:
                self.dropped[key] += 1

    def total_requests(self) -> int:
        with self._lock:
            return sum(self.requests.values()) + sum(self.refused.values())

    def render(self, gauges: Iterable[tuple[str, str, str, list[tuple[Labels, float]]]]) -> str:
        """The text exposition: our counters and histograms, then ``gauges`` (name, help, type, samples)."""
        lines: list[str] = []
        with self._lock:
            _family(lines, "jupyter_llm_http_requests_total", "HTTP requests by route, method and status.",
                    "counter", list(self.requests.items()))
            _histograms(lines, "jupyter_llm_http_request_duration_seconds",
                        "Time from request to the last byte of the answer.", self.latency)
            _family(lines, "jupyter_llm_tokens_total", "Tokens processed: in = prompt, out = generated.",
                    "counter", list(self.tokens.items()))
            _histograms(lines, "jupyter_llm_time_to_first_token_seconds",
                        "Time from request to the first generated text.", self.ttft)
            _family(lines, "jupyter_llm_rejected_requests_total",
                    "Requests answered 503 because the model's queue was full.", "counter",
                    list(self.rejected.items()))
            _family(lines, "jupyter_llm_http_refused_total",
                    "Requests refused before any route ran: no or a wrong token, a foreign Host or Origin.",
                    "counter", list(self.refused.items()))
            _family(lines, "jupyter_llm_http_connections_dropped_total",
                    "Connections closed by the server: over the connection limit, too slow to send a request "
                    "head or body, or not reading the answer.", "counter", list(self.dropped.items()))
        for name, help_text, kind, samples in gauges:
            _family(lines, name, help_text, kind, samples)
        return "\n".join(lines) + "\n"


def _family(lines: list[str], name: str, help_text: str, kind: str, samples: list[tuple[Labels, float]]) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        lines.append(f"{name}{_labels(labels)} {_number(value)}")


def _histograms(lines: list[str], name: str, help_text: str, hists: dict[Labels, _Histogram]) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} histogram")
    for labels, hist in hists.items():
        for bound, count in zip(hist.buckets, hist.counts, strict=True):
            lines.append(f"{name}_bucket{_labels((*labels, ('le', _number(bound))))} {count}")
        lines.append(f"{name}_bucket{_labels((*labels, ('le', '+Inf')))} {hist.count}")
        lines.append(f"{name}_sum{_labels(labels)} {_number(hist.sum)}")
        lines.append(f"{name}_count{_labels(labels)} {hist.count}")


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + ",".join(escaped) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def model_gauges(models: list[Any], stats: dict[str, dict[str, Any]], waiting: dict[str, int],
                 ages: dict[str, float] | None = None) -> list[tuple[str, str, str, list[tuple[Labels, float]]]]:
    """Gauges of the loaded models: slots, busy slots, queue depth, memory per device and kind.

    ``stats`` maps a model name to its worker's ``Runtime.stats()``, ``ages`` to how many
    seconds ago they were read; ``waiting`` to the requests the server admitted that have no
    slot yet.
    """
    slots: list[tuple[Labels, float]] = []
    busy: list[tuple[Labels, float]] = []
    queued: list[tuple[Labels, float]] = []
    memory: list[tuple[Labels, float]] = []
    rss: list[tuple[Labels, float]] = []
    age: list[tuple[Labels, float]] = []
    for model in models:
        label: Labels = (("model", model.name),)
        if ages is not None and model.name in ages:
            age.append((label, round(ages[model.name], 3)))
        s = stats.get(model.name, {})
        slots.append((label, s.get("slots", model.options.parallel)))
        busy.append((label, s.get("busy", 0)))
        queued.append((label, max(s.get("queued", 0), waiting.get(model.name, 0))))
        if "rss_bytes" in s:
            rss.append((label, s["rss_bytes"]))
        described = model.to_dict()
        for source in ("measured", "estimate"):
            for device, kinds in _per_device(described.get(source)).items():
                for kind, value in kinds.items():
                    memory.append(((("model", model.name), ("device", device), ("kind", kind),
                                    ("source", source)), value))
    return [
        ("jupyter_llm_models_loaded", "Models loaded in worker processes.", "gauge", [((), float(len(models)))]),
        ("jupyter_llm_slots", "Parallel decoding slots per model.", "gauge", slots),
        ("jupyter_llm_slots_busy", "Slots decoding a request now.", "gauge", busy),
        ("jupyter_llm_queue_depth", "Requests waiting for a slot.", "gauge", queued),
        ("jupyter_llm_worker_rss_bytes", "Resident memory of each model's worker process.", "gauge", rss),
        ("jupyter_llm_worker_stats_age_seconds",
         "Seconds since the worker last reported the slot, queue and memory numbers shown (a worker that "
         "stopped answering keeps its last ones and this grows).", "gauge", age),
        ("jupyter_llm_memory_bytes",
         "Bytes per device by kind (weights, kv, graph, output): measured from llama.cpp's log, and the "
         "estimate made before loading.", "gauge", memory),
    ]


_KIND = {"weights": "weights", "kv": "kv", "compute": "graph", "output": "output"}


def _per_device(data: Any) -> dict[str, dict[str, int]]:
    """``{device: {weights, kv, graph, output}}`` from a measured breakdown or an estimate dict."""
    out: dict[str, dict[str, int]] = {}
    if not data:
        return out
    if isinstance(data, dict) and "devices" in data:  # MemoryEstimate.to_dict()
        rows = [(d.get("device_id", "?"), d) for d in data["devices"]]
    elif isinstance(data, dict):
        rows = list(data.items())
    else:
        return out
    for device, sizes in rows:
        if not isinstance(sizes, dict):
            continue
        kinds = {_KIND[k]: int(v) for k, v in sizes.items() if k in _KIND and isinstance(v, int | float)}
        if kinds:
            out[str(device)] = kinds
    return out


class StatsCache:
    """Each worker's last ``Runtime.stats()``, refreshed in the background when a scrape asks.

    A scrape starts one refresh per model (never a second one while the first is out), waits
    at most ``wait_s`` (not at all for a refresh that has kept earlier scrapes waiting
    already), and shows whatever is known by then. A worker that does not answer
    (stopped, or stuck inside llama.cpp) holds one refresh thread, never a thread of the
    server: 45 scrapes of a stopped worker once took every server thread, and /api/tags,
    /v1/models and chats to other models hung with them (issue 11).
    """

    def __init__(self, wait_s: float = STATS_WAIT_S) -> None:
        self.wait_s = wait_s
        self._lock = threading.Lock()
        self._last: dict[str, tuple[Any, float, dict[str, Any]]] = {}
        """model name → (its runtime, monotonic time read, stats)"""
        self._pending: dict[str, tuple[Any, threading.Event, float]] = {}
        """model name → (its runtime, set when the refresh is done, monotonic time it started)"""

    def read(self, models: list[Any]) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
        """(stats, their age in seconds) of ``models``' workers; blocks at most ``wait_s``."""
        waits = []
        start = time.monotonic()
        with self._lock:
            current = {m.name: m.runtime for m in models}
            for name in [n for n in self._last if current.get(n) is not self._last[n][0]]:
                del self._last[name]  # unloaded, or reloaded into a new worker
            for name, runtime in current.items():
                pending = self._pending.get(name)
                if pending is None or pending[0] is not runtime:
                    pending = (runtime, threading.Event(), start)
                    self._pending[name] = pending
                    threading.Thread(target=self._refresh, args=(name, runtime, pending[1]), daemon=True,
                                     name="jupyter_llm-http-stats").start()
                if start - pending[2] < self.wait_s:
                    waits.append(pending[1])
        deadline = start + self.wait_s
        for done in waits:
            done.wait(max(0.0, deadline - time.monotonic()))
        now = time.monotonic()
        with self._lock:
            known = {n: v for n, v in self._last.items() if current.get(n) is v[0]}
        return {n: v[2] for n, v in known.items()}, {n: now - v[1] for n, v in known.items()}

    def _refresh(self, name: str, runtime: Any, done: threading.Event) -> None:
        try:
            stats = runtime.stats()
        except Exception as exc:  # a worker that died or was unloaded meanwhile: its model goes too
            log.debug("no stats from %s's worker: %s", name, exc)
            stats = None
        with self._lock:
            if stats is not None:
                self._last[name] = (runtime, time.monotonic(), stats)
            if self._pending.get(name, (None,))[0] is runtime:
                del self._pending[name]
        done.set()
