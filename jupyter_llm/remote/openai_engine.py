"""A remote that speaks OpenAI's API (llama.cpp's ``llama-server``, vLLM, LM Studio).

Answers stream as server-sent events from ``/v1/chat/completions`` and ``/v1/completions``.
What the engine reports about its state is read from whichever of llama-server's ``/slots``
and ``/props`` and the Prometheus ``/metrics`` (llama-server with ``--metrics``, vLLM) it
answers; an endpoint it does not have is left out, never an error (what llama-server answers
is in docs/notes.md §10).
"""

from __future__ import annotations

import json
from collections.abc import Generator
from typing import Any

from ..errors import RemoteEngineError
from ..options import SamplingOptions
from .client import Client, Live, Piece, RemoteStream, changed_sampling

_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "content_filter": "stop"}
_METRIC_PREFIXES = ("llamacpp:", "vllm:")
"""Metrics kept from ``/metrics``: the engine's own (the process and Python ones are noise)."""
_MAX_METRICS = 40


class OpenAIEngine:
    """Models, answers and state of one OpenAI-compatible remote."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def models(self) -> list[dict[str, Any]]:
        data = self.client.get_json("/v1/models").get("data") or []
        return [{"model": str(m["id"]), "size": None} for m in data if isinstance(m, dict) and m.get("id")]

    def chat(self, model: str, messages: list[dict[str, Any]], sampling: SamplingOptions, *,
             json_schema: dict[str, Any] | None = None, grammar: str | None = None) -> RemoteStream:
        body = {"model": model, "messages": messages, **_sampling(sampling, json_schema, grammar)}
        return RemoteStream(lambda live: self._pieces("/v1/chat/completions", body, live, model, chat=True),
                            seed=sampling.seed, where=self.client.where)

    def generate(self, model: str, prompt: str, sampling: SamplingOptions, *,
                 json_schema: dict[str, Any] | None = None, grammar: str | None = None) -> RemoteStream:
        body = {"model": model, "prompt": prompt, **_sampling(sampling, json_schema, grammar)}
        return RemoteStream(lambda live: self._pieces("/v1/completions", body, live, model, chat=False),
                            seed=sampling.seed, where=self.client.where)

    def _pieces(self, path: str, body: dict[str, Any], live: Live, model: str, *,
                chat: bool) -> Generator[Piece, None, None]:
        finish, usage = "stop", dict[str, Any]()
        with self.client.stream(path, body, live, model=model) as lines:
            for line in lines:
                if not line.startswith("data:"):
                    continue  # comments and event names of the SSE stream
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                item = json.loads(data)
                if item.get("error"):
                    error = item["error"]
                    message = error.get("message") if isinstance(error, dict) else error
                    raise RemoteEngineError(self.client.scrub(f"{self.client.where} stopped the answer: {message}"))
                usage = item.get("usage") or usage
                for choice in item.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if text:
                        yield Piece(text)
                    if choice.get("finish_reason"):
                        finish = _FINISH.get(choice["finish_reason"], "stop")
        yield Piece(done=True, finish_reason=finish, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    completion_tokens=int(usage.get("completion_tokens") or 0))

    def state(self) -> dict[str, Any]:
        """What the engine says of itself; raises RemoteEngineError only if it is unreachable."""
        state: dict[str, Any] = {}
        for path, key in (("/props", "props"), ("/slots", "slots")):
            try:
                state[key] = self.client.get_json(path)
            except RemoteEngineError as exc:
                if exc.status is None:
                    raise
            except ValueError:  # not JSON: not llama-server's endpoint
                pass
        try:
            state["metrics"] = parse_metrics(self.client.get_text("/metrics"))
        except RemoteEngineError as exc:
            if exc.status is None:
                raise
        return state

    def running(self, state: dict[str, Any], models: list[str]) -> list[dict[str, Any]]:
        """One row per model the engine serves, with the context and slots it reports."""
        props: dict[str, Any] = state["props"] if isinstance(state.get("props"), dict) else {}
        slots: list[Any] | None = state["slots"] if isinstance(state.get("slots"), list) else None
        settings = props.get("default_generation_settings") or {}
        n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
        if n_ctx is None and slots:
            n_ctx = slots[0].get("n_ctx") if isinstance(slots[0], dict) else None
        row: dict[str, Any] = {"size": None, "size_vram": None, "context_length": n_ctx,
                               "slots": len(slots) if slots is not None else props.get("total_slots"),
                               "busy": sum(1 for s in slots if isinstance(s, dict) and s.get("is_processing"))
                               if slots is not None else None,
                               "metrics": state.get("metrics") or {}}
        return [{"model": m, **row} for m in models]


def _sampling(s: SamplingOptions, json_schema: dict[str, Any] | None, grammar: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}, **changed_sampling(s)}
    if s.max_tokens is not None:
        body["max_tokens"] = s.max_tokens
    if s.seed is not None:
        body["seed"] = s.seed
    if s.stop:
        body["stop"] = list(s.stop)
    if json_schema is not None:
        body["response_format"] = ({"type": "json_schema", "json_schema": {"name": "answer", "schema": json_schema}}
                                   if json_schema else {"type": "json_object"})
    elif grammar is not None:  # llama-server's own field (the HTTP API turned a schema into GBNF)
        body["grammar"] = grammar
    return body


def parse_metrics(text: str) -> dict[str, float]:
    """The engine's Prometheus metrics, summed over their labels: ``{name: value}``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or not line.startswith(_METRIC_PREFIXES):
            continue
        if "{" in line:  # name{label="a b"} value [timestamp]
            name, rest = line[:line.index("{")], line[line.rindex("}") + 1:]
        else:
            name, _, rest = line.partition(" ")
        value = (rest.split() or [""])[0]
        try:
            number = float(value)
        except ValueError:
            continue
        if name in out or len(out) < _MAX_METRICS:
            out[name] = out.get(name, 0.0) + number
    return out
