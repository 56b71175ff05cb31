"""A few hundred malformed requests get 4xx answers only, and the server (and model) keep working.

Each case takes a valid request and breaks exactly one thing: the body's syntax, a field's type,
a value's range, a required field, the model's name, the method. Values are drawn per field from
pools that are invalid *for that field*, so every case must be refused; a 5xx or a dropped
connection fails the test. Loopback only, bounded, deterministic (seeded).
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.apiserver import MODEL, auth, running_server, worker_stats

NOT_STR = [1, -1.5, True, False, [], {}, ["x"], {"a": 1}]
NOT_BOOL = ["yes", "true", 1, 0, [], {}, "false"]
NOT_NUM = ["x", "1", [], {}, [1], {"v": 1}, True]
NOT_LIST = ["x", 1, {}, True]
MESSAGES = [[1], ["hi"], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 5}],
            [{"content": "x"}], [{"role": 7, "content": "x"}], [None], [[{"role": "user"}]],
            [{"role": "user", "content": "word " * 3000}]]
MSG = [{"role": "user", "content": "hi"}]
OPTIONS = [
    {"temperature": -1}, {"temperature": 1e9}, {"top_p": 2}, {"top_p": -0.5}, {"top_k": -3}, {"top_k": 1e12},
    {"min_p": 3}, {"num_predict": 0}, {"num_predict": -7}, {"num_predict": 10**12}, {"num_ctx": 1},
    {"num_ctx": 10**9}, {"seed": 10**30}, {"stop": 5}, {"stop": [1, 2]}, {"stop": ["x"] * 100},
    {"repeat_penalty": 99}, {"bogus_option": 1}, {"num_thread": "many"}, {"temperature": "hot"},
    {"num_predict": 5000},
]
OPTION_TYPES = [{k: v} for k in ("temperature", "top_p", "top_k", "seed", "num_predict", "num_ctx")
                for v in NOT_NUM]
KEEP_ALIVE = ["forever", "5x", "1h5", "--5m", [], {}, True, "1e400", "m", "5 m"]
FORMAT = [5, "yaml", [], True, "JSON ", ["json"]]
UNKNOWN_MODEL = ["no-such-model", "nope:latest", "x" * 600, "", "   "]

# route → (method, valid base body, {field: invalid values})
CASES: dict[str, tuple[str, dict[str, Any], dict[str, list[Any]]]] = {
    "/api/generate": ("POST", {"model": MODEL, "prompt": "hi", "options": {"num_predict": 1}}, {
        "model": NOT_STR + UNKNOWN_MODEL, "prompt": [*NOT_STR, "word " * 3000], "system": NOT_STR,
        "raw": NOT_BOOL,
        "stream": NOT_BOOL, "options": [*NOT_STR[:2], "x", [1], *OPTIONS, *OPTION_TYPES], "keep_alive": KEEP_ALIVE,
        "format": FORMAT, "images": [["aGk="]], "suffix": ["tail"], "context": [[1, 2, 3]], "think": [True, "high"],
        "template": ["{{ .Prompt }}"]}),
    "/api/chat": ("POST", {"model": MODEL, "messages": MSG, "options": {"num_predict": 1}}, {
        "model": NOT_STR + UNKNOWN_MODEL, "stream": NOT_BOOL,
        "messages": [*NOT_LIST, *MESSAGES, [{"role": "user", "content": "x", "images": ["aGk="]}]],
        "options": OPTIONS + OPTION_TYPES, "keep_alive": KEEP_ALIVE, "format": FORMAT,
        "tools": [[{"type": "function", "function": {"name": ""}}], [{"type": "function"}], "x", [5]],
        "tool_choice": ["sometimes", {"function": {"name": "nope"}}]}),
    "/api/embed": ("POST", {"model": MODEL, "input": "hi"}, {
        "model": NOT_STR + UNKNOWN_MODEL, "input": [1, True, {}, [1, 2], [["x"]], ["x", 3]],
        "dimensions": [64, "x"], "truncate": NOT_BOOL, "keep_alive": KEEP_ALIVE, "options": [{"bogus": 1}, "x"]}),
    "/api/embeddings": ("POST", {"model": MODEL, "prompt": "hi"}, {
        "model": NOT_STR + UNKNOWN_MODEL, "prompt": NOT_STR, "keep_alive": KEEP_ALIVE}),
    "/api/show": ("POST", {"model": MODEL}, {"model": NOT_STR + UNKNOWN_MODEL, "verbose": NOT_BOOL}),
    "/api/pull": ("POST", {"model": MODEL, "stream": False}, {"model": [*NOT_STR, "", "   "],
                                                             "stream": NOT_BOOL, "insecure": NOT_BOOL}),
    "/api/copy": ("POST", {"source": MODEL, "destination": "fuzz-copy"}, {
        "source": NOT_STR + UNKNOWN_MODEL, "destination": [*NOT_STR, "", "  ", "d" * 600]}),
    "/api/delete": ("DELETE", {"model": "no-such-model"}, {"model": NOT_STR + UNKNOWN_MODEL}),
    "/v1/chat/completions": ("POST", {"model": MODEL, "messages": MSG, "max_tokens": 1}, {
        "model": NOT_STR + UNKNOWN_MODEL, "messages": [[], *NOT_LIST, *MESSAGES,
                                                       [{"role": "user", "content": [{"type": "image_url"}]}],
                                                       [{"role": "user", "content": [{"text": "x"}]}]],
        "max_tokens": [*NOT_NUM, 0, -1, 5000, 10 ** 12], "temperature": [*NOT_NUM, -1, 3], "top_p": [*NOT_NUM, 1.5],
        "n": [65, 0, "x"], "stream": NOT_BOOL, "stop": [5, [1], ["x"] * 100], "seed": NOT_NUM,
        "logprobs": ["x", 3], "top_logprobs": [21, "x"], "reasoning_effort": ["high", "x"],
        "presence_penalty": [1.0, 5, "x"], "frequency_penalty": [-1.0],
        "response_format": ["json", 5, {"type": "xml"}, {"type": "json_schema"}, {}],
        "stream_options": [{"include_usage": True}, "x"],
        "tools": [[{"type": "function"}], [{"type": "web_search"}], "x"],
        "tool_choice": ["sometimes", {"type": "function", "function": {"name": "nope"}}],
        "logit_bias": [{"50": 10}, "x"]}),
    "/v1/completions": ("POST", {"model": MODEL, "prompt": "hi", "max_tokens": 1}, {
        "model": NOT_STR + UNKNOWN_MODEL, "prompt": [1, [1, 2], ["a", "b"], {}, "", True],
        "max_tokens": [*NOT_NUM, 0, 10 ** 12], "echo": NOT_BOOL, "suffix": ["tail"], "best_of": [3]}),
    "/v1/embeddings": ("POST", {"model": MODEL, "input": "hi"}, {
        "model": NOT_STR + UNKNOWN_MODEL, "input": [[], 1, [1, 2], [[1]], {}, ["x", 2]],
        "encoding_format": ["int8", 5], "dimensions": [32]}),
}
BROKEN_BODIES = [b"", b"{", b"[]", b'"x"', b"null", b"1", b"\xff\xfe\x00", b"[" * 100_000 + b"]" * 100_000,
                 b'{"model": NaN}', b'{"model": "smollm2", "prompt": "hi", "options": {"temperature": Infinity}}',
                 b'{"model": "smollm2",}', b"model=smollm2&prompt=hi", b'{"a": "\\ud800"}'[:-1]]


@pytest.fixture(scope="module")
def served(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with running_server(smollm2_path, tmp_path_factory.mktemp("fuzz"), parallel=2) as pair:
        yield pair


def malformed_requests(seed: int = 4) -> Iterator[tuple[str, str, bytes]]:
    """(method, path, body) triples, each invalid in exactly one place."""
    rng = random.Random(seed)
    for path, (method, base, fields) in CASES.items():
        for field, values in fields.items():
            for value in values:
                yield method, path, json.dumps({**base, field: value}).encode()
        for required in [k for k in base if k in ("model", "messages", "prompt", "input", "source", "destination")]:
            if path.startswith("/api/") and required in ("prompt", "messages", "input"):
                continue  # no prompt, messages or input is valid in Ollama: it loads the model
            body = {k: v for k, v in base.items() if k != required}
            yield method, path, json.dumps(body).encode()
        for raw in BROKEN_BODIES:
            yield method, path, raw
        wrong = "GET" if method != "GET" else "DELETE"
        yield wrong, path, b""
    for _ in range(20):  # random bytes
        path = rng.choice(list(CASES))
        yield CASES[path][0], path, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    yield "POST", "/api/generate", b'{"model": "smollm2", "prompt": "' + b"x" * (9 * 1024 * 1024) + b'"}'
    for path in ("/api/nothing", "/v1/nothing", "/api/create", "/api/push", "/api/blobs/sha256:00"):
        yield "POST", path, b"{}"
    load_only = [("/api/generate", {"prompt": ""}), ("/api/chat", {"messages": []}), ("/api/embed", {})]
    for (path, empty), (field, value) in itertools.product(load_only, [("stream", "yes"), ("keep_alive", "soon"),
                                                                       ("options", {"num_ctx": "big"}),
                                                                       ("model", "no-such-model")]):
        if not (path == "/api/embed" and field == "stream"):  # /api/embed has no stream field
            yield "POST", path, json.dumps({"model": MODEL, **empty, field: value}).encode()


def test_malformed_requests_get_only_4xx_and_the_server_keeps_working(served: Any) -> None:
    manager, server = served
    cases = list(malformed_requests())
    assert len(cases) >= 300
    failures = []
    with httpx.Client(base_url=server.url, headers={**auth(server), "Content-Type": "application/json"},
                      timeout=60) as client:
        for method, path, body in cases:
            response = client.request(method, path, content=body)
            if not 400 <= response.status_code < 500:
                failures.append((method, path, body[:200], response.status_code, response.text[:300]))
                continue
            error = response.json()["error"]
            message = error["message"] if path.startswith("/v1") else error
            if not isinstance(message, str) or not message:
                failures.append((method, path, body[:200], response.status_code, "no error message"))
        assert failures == []
        assert client.get("/health").json()["status"] == "ok"
        ok = client.post("/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False,
                                                "options": {"num_predict": 2}})
        assert ok.status_code == 200 and ok.json()["eval_count"] == 2
    assert manager.store.get("fuzz-copy") is None  # nothing a malformed request asked for happened
    assert manager.store.get(MODEL) is not None
    stats = worker_stats(manager)
    assert stats["busy"] == 0 and stats["queued"] == 0
    assert not server.context.backend.in_flight()
