"""The server's own counters and histograms, and GET /metrics in Prometheus' text format.

Counters and histograms are kept here (requests by route and status, latencies, tokens);
gauges — queue depth, busy slots, models loaded, bytes per device — are read from the manager
and the workers at scrape time, so they are never stale. A few dozen lines of text format are
simpler than a dependency (and need no global registry shared with the user's own code).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Labels = tuple[tuple[str, str], ...]


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

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One finished HTTP request (streams count when their last byte is sent)."""
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

    def total_requests(self) -> int:
        with self._lock:
            return sum(self.requests.values())

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


def model_gauges(models: list[Any], stats: dict[str, dict[str, Any]], waiting: dict[str, int]
                 ) -> list[tuple[str, str, str, list[tuple[Labels, float]]]]:
    """Gauges of the loaded models: slots, busy slots, queue depth, memory per device and kind.

    ``stats`` maps a model name to its worker's ``Runtime.stats()``; ``waiting`` to the requests
    the server admitted that have no slot yet.
    """
    slots: list[tuple[Labels, float]] = []
    busy: list[tuple[Labels, float]] = []
    queued: list[tuple[Labels, float]] = []
    memory: list[tuple[Labels, float]] = []
    rss: list[tuple[Labels, float]] = []
    for model in models:
        label: Labels = (("model", model.name),)
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
