"""A remote that speaks Ollama's API (Ollama itself, or another kernel's ``%llm serve``).

Answers stream as NDJSON from ``/api/chat`` and ``/api/generate``; ``/api/ps`` says what is
loaded (size, size_vram, context_length) and ``/api/pull`` pulls onto the remote with its
progress streamed back as the same :class:`~jupyter_llm.progress.PullProgress` events a
local pull gives.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator
from typing import Any

from ..errors import RemoteEngineError
from ..options import SamplingOptions
from ..progress import PullProgress
from .client import Client, Live, Piece, RemoteStream, changed_sampling

_NS = 1e-9


class OllamaEngine:
    """Models, answers, state and pulls of one Ollama-compatible remote."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def models(self) -> list[dict[str, Any]]:
        data = self.client.get_json("/api/tags").get("models") or []
        return [{"model": str(m.get("name") or m.get("model")), "size": m.get("size")}
                for m in data if isinstance(m, dict) and (m.get("name") or m.get("model"))]

    def chat(self, model: str, messages: list[dict[str, Any]], sampling: SamplingOptions, *,
             json_schema: dict[str, Any] | None = None, grammar: str | None = None) -> RemoteStream:
        body = {"model": model, "messages": messages, **_request(sampling, json_schema)}
        return RemoteStream(lambda live: self._pieces("/api/chat", body, live, model), seed=sampling.seed,
                            where=self.client.where)

    def generate(self, model: str, prompt: str, sampling: SamplingOptions, *,
                 json_schema: dict[str, Any] | None = None, grammar: str | None = None) -> RemoteStream:
        body = {"model": model, "prompt": prompt, "raw": True, **_request(sampling, json_schema)}
        return RemoteStream(lambda live: self._pieces("/api/generate", body, live, model), seed=sampling.seed,
                            where=self.client.where)

    def _pieces(self, path: str, body: dict[str, Any], live: Live, model: str) -> Generator[Piece, None, None]:
        with self.client.stream(path, body, live, model=model) as lines:
            for line in lines:
                item = json.loads(line)
                if item.get("error"):
                    raise RemoteEngineError(self.client.scrub(f"{self.client.where} stopped the answer: "
                                                              f"{item['error']}"))
                text = (item.get("message") or {}).get("content") if "message" in item else item.get("response")
                if text:
                    yield Piece(str(text))
                if item.get("done"):
                    yield Piece(done=True, finish_reason=str(item.get("done_reason") or "stop"),
                                prompt_tokens=int(item.get("prompt_eval_count") or 0),
                                completion_tokens=int(item.get("eval_count") or 0),
                                prompt_s=(item.get("prompt_eval_duration") or 0) * _NS or None,
                                eval_s=(item.get("eval_duration") or 0) * _NS or None)
                    return

    def state(self) -> dict[str, Any]:
        return {"ps": self.client.get_json("/api/ps")}

    def running(self, state: dict[str, Any], models: list[str]) -> list[dict[str, Any]]:
        """The models the remote has loaded, as its ``/api/ps`` reports them."""
        rows: list[dict[str, Any]] = []
        for m in (state.get("ps") or {}).get("models") or []:
            if isinstance(m, dict):
                rows.append({"model": str(m.get("name") or m.get("model")), "size": m.get("size"),
                             "size_vram": m.get("size_vram"), "context_length": m.get("context_length"),
                             "expires_at": m.get("expires_at"), "slots": None, "busy": None, "metrics": {}})
        return rows

    def pull(self, model: str, name: str, on_event: Callable[[PullProgress], None]) -> None:
        """Pull ``model`` onto the remote; progress as PullProgress events for ``name``."""
        live = Live()
        with self.client.stream("/api/pull", {"model": model, "stream": True}, live) as lines:
            for line in lines:
                item = json.loads(line)
                if item.get("error"):
                    raise RemoteEngineError(self.client.scrub(f"{self.client.where} could not pull {model!r}: "
                                                              f"{item['error']}"))
                status = str(item.get("status") or "")
                total = item.get("total")
                event = PullProgress(name, "downloading" if total and status.startswith("pulling") else status,
                                     filename=item.get("digest") or model, digest=item.get("digest"),
                                     total=int(total) if total else None, completed=int(item.get("completed") or 0),
                                     message=status)
                on_event(event)
                if status == "success":
                    return
        raise RemoteEngineError(f"{self.client.where} ended the pull of {model!r} without saying it succeeded; "
                                f"`%llm pull {name}` tries again")


def _request(s: SamplingOptions, json_schema: dict[str, Any] | None) -> dict[str, Any]:
    options = changed_sampling(s)
    if s.max_tokens is not None:
        options["num_predict"] = s.max_tokens
    if s.seed is not None:
        options["seed"] = s.seed
    if s.stop:
        options["stop"] = list(s.stop)
    body: dict[str, Any] = {"stream": True, "options": options}
    if json_schema is not None:
        body["format"] = json_schema or "json"
    return body
