"""Concurrent requests are decoded together; leaving frees a slot; a full queue answers 503."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from tests.apiserver import MODEL, auth, raw_request, running_server, wait_until, worker_stats

PROMPTS = ["Write a haiku about the sea.", "List three fruits.", "What is 2+2? Explain.",
           "Tell me about Paris in two sentences."]
LONG = {"model": MODEL, "prompt": "Tell me a very long story about a dragon.",
        "options": {"num_predict": 1500, "temperature": 0.8}}


@pytest.fixture(scope="module")
def served(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with running_server(smollm2_path, tmp_path_factory.mktemp("concurrency"), parallel=4, max_queue=2) as pair:
        _manager, server = pair
        with httpx.Client(base_url=server.url, headers=auth(server), timeout=120) as warm:
            warm.post("/api/generate", json={"model": MODEL, "prompt": ""}).raise_for_status()  # load it
        yield pair


def _stream_chat(server: Any, prompt: str) -> str:
    with ollama.Client(host=server.url, headers=auth(server)) as client:
        parts = client.chat(MODEL, messages=[{"role": "user", "content": prompt}], stream=True,
                            options={"temperature": 0, "num_predict": 40})
        return "".join(p.message.content for p in parts)


def _idle(manager: Any, server: Any) -> bool:
    return worker_stats(manager)["busy"] == 0 and not server.context.backend.in_flight()


def test_four_concurrent_clients_decode_together_and_match_sequential_greedy_runs(served: Any) -> None:
    manager, server = served
    sequential = [_stream_chat(server, p) for p in PROMPTS]
    busy: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            busy.append(worker_stats(manager)["busy"])
            done.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            concurrent = list(pool.map(lambda p: _stream_chat(server, p), PROMPTS))
    finally:
        done.set()
        sampler.join()
    assert all(concurrent)
    assert concurrent == sequential
    assert max(busy) == 4  # all four in the worker's slots at once: one batch per step, not a queue


def test_a_streaming_client_that_disconnects_frees_its_slot(served: Any) -> None:
    manager, server = served
    before = worker_stats(manager)["tokens_out"]
    with httpx.stream("POST", f"{server.url}/api/generate", json=LONG, headers=auth(server), timeout=60) as r:
        lines = r.iter_lines()
        first = json.loads(next(lines))
        assert first.get("done") is False, first
        next(lines)
        assert worker_stats(manager)["busy"] == 1
    assert wait_until(lambda: _idle(manager, server), timeout=15)
    assert worker_stats(manager)["tokens_out"] - before < 1500  # stopped, not run to the end


def test_a_waiting_non_streaming_client_that_disconnects_frees_its_slot(served: Any) -> None:
    manager, server = served
    sock = raw_request(server, "/api/generate", {**LONG, "stream": False})
    try:
        assert wait_until(lambda: worker_stats(manager)["busy"] == 1, timeout=15)
    finally:
        sock.close()
    assert wait_until(lambda: _idle(manager, server), timeout=15)


def test_requests_beyond_the_slots_and_the_queue_get_503_with_retry_after(served: Any) -> None:
    manager, server = served
    held = [raw_request(server, "/api/generate", LONG) for _ in range(4 + 2)]  # 4 slots + 2 queued
    try:
        assert wait_until(lambda: server.context.backend.in_flight().get(MODEL) == 6, timeout=15)
        assert wait_until(lambda: worker_stats(manager)["busy"] == 4, timeout=15)
        with httpx.Client(base_url=server.url, headers=auth(server), timeout=30) as client:
            refused = client.post("/api/generate", json=LONG)
            assert refused.status_code == 503
            assert int(refused.headers["retry-after"]) > 0
            assert "busy" in refused.json()["error"]
            refused_v1 = client.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
            assert refused_v1.status_code == 503 and refused_v1.json()["error"]["code"] == "model_busy"
            metrics = client.get("/metrics").text
        assert 'jupyter_llm_slots_busy{model="smollm2"} 4' in metrics
        assert 'jupyter_llm_queue_depth{model="smollm2"} 2' in metrics
        assert 'jupyter_llm_rejected_requests_total{model="smollm2"} 2' in metrics
    finally:
        for sock in held:
            sock.close()
    assert wait_until(lambda: _idle(manager, server), timeout=20)
    with httpx.Client(base_url=server.url, headers=auth(server), timeout=60) as client:
        again = client.post("/api/generate", json={**LONG, "stream": False, "options": {"num_predict": 2}})
    assert again.status_code == 200 and again.json()["eval_count"] == 2


def test_a_worker_that_dies_mid_answer_is_reported_and_the_next_request_reloads_it(served: Any) -> None:
    manager, server = served
    with httpx.Client(base_url=server.url, headers=auth(server), timeout=60) as client:
        with client.stream("POST", "/api/generate", json=LONG) as r:
            lines = r.iter_lines()
            assert json.loads(next(lines))["done"] is False
            old_pid = manager.get(MODEL).runtime.pid
            os.kill(old_pid, signal.SIGKILL)  # as the out-of-memory killer would
            rest = [json.loads(line) for line in lines if line]
        assert "error" in rest[-1] and "SIGKILL" in rest[-1]["error"]
        again = client.post("/api/generate", json={**LONG, "stream": False, "options": {"num_predict": 2}})
        assert again.status_code == 200 and again.json()["eval_count"] == 2
        assert manager.get(MODEL).runtime.pid != old_pid
        assert client.get("/health").status_code == 200
