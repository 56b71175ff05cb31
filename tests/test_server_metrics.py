"""/metrics has a fixed label set that no client can grow, and it never waits on a worker.

Attack traffic goes to the loopback server only, bounded in count and time.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.apiserver import MODEL, auth, running_server, wait_until

OTHER = "smollm2-other"


@pytest.fixture(scope="module")
def served(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with running_server(smollm2_path, tmp_path_factory.mktemp("metrics"), parallel=1) as pair:
        yield pair


def _series(text: str) -> set[str]:
    """The metric series of an exposition (name and labels, without values or comments)."""
    return {line.rpartition(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def _raw(port: int, head: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode("latin-1"))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_requests_without_a_token_create_no_metric_series(served: Any) -> None:
    _, server = served
    with httpx.Client(base_url=server.url, headers=auth(server), timeout=30) as client:
        client.get("/metrics")  # its own series exist from now on
        before = client.get("/metrics").text
        for i in range(200):  # odd methods, paths and headers, none with the token
            method = f"X{i:04d}" + "A" * 4000
            answer = _raw(server.port, f"{method} /api/x{i}?q={i} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                       "Connection: close\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 401")
        for i in range(20):
            assert client.get(f"/api/tags?{i}", headers={"Authorization": f"Bearer wrong{i}"}).status_code == 401
            assert client.get("/api/tags", headers={"Host": f"evil{i}.example"}).status_code == 403
        after = client.get("/metrics").text
    assert _series(after) == _series(before)
    assert len(after) < len(before) + 2000
    refused = re.search(r'jupyter_llm_http_refused_total\{reason="token"\} (\d+)', after)
    assert refused is not None and int(refused.group(1)) >= 220
    assert re.search(r'jupyter_llm_http_refused_total\{reason="host"\} (\d+)', after)


def test_methods_and_paths_of_authenticated_requests_fall_into_fixed_labels(served: Any) -> None:
    _, server = served
    for i in range(50):
        method = f"PROPFIND{i}"
        answer = _raw(server.port, f"{method} /nowhere/{i} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                   f"Authorization: Bearer {server.token}\r\nConnection: close\r\n\r\n")
        assert answer.startswith((b"HTTP/1.1 404", b"HTTP/1.1 405"))
    metrics = httpx.get(f"{server.url}/metrics", headers=auth(server)).text
    assert "PROPFIND" not in metrics and "/nowhere" not in metrics
    assert 'route="unmatched",method="other",status="404"} 50' in metrics


def test_a_hung_worker_blocks_neither_metrics_nor_listings_nor_other_models(served: Any) -> None:
    manager, server = served
    manager.store.copy(MODEL, OTHER)
    with httpx.Client(base_url=server.url, headers=auth(server), timeout=120) as client:
        for name in (MODEL, OTHER):  # two workers
            client.post("/api/generate", json={"model": name, "prompt": ""}).raise_for_status()
        assert 'jupyter_llm_slots{model="smollm2"} 1' in client.get("/metrics").text
    hung = manager.get(MODEL).runtime.pid
    os.kill(hung, signal.SIGSTOP)  # alive but never answering, as a worker stuck in llama.cpp
    try:
        def scrape(_: int) -> tuple[int, float]:
            t0 = time.perf_counter()
            response = httpx.get(f"{server.url}/metrics", headers=auth(server), timeout=10)
            return response.status_code, time.perf_counter() - t0

        with ThreadPoolExecutor(50) as pool:  # more scrapes than the server has threads
            scrapes = list(pool.map(scrape, range(60)))
        assert all(status == 200 for status, _ in scrapes)
        assert max(seconds for _, seconds in scrapes) < 5
        with httpx.Client(base_url=server.url, headers=auth(server), timeout=10) as client:
            text = client.get("/metrics").text
            assert 'jupyter_llm_slots{model="smollm2"} 1' in text  # the last answer it gave
            assert 'jupyter_llm_worker_stats_age_seconds{model="smollm2"}' in text
            assert client.get("/api/tags").status_code == 200
            assert client.get("/v1/models").status_code == 200
            other = client.post("/api/generate", json={"model": OTHER, "prompt": "hi", "stream": False,
                                                       "options": {"num_predict": 2}})
            assert other.status_code == 200 and other.json()["eval_count"] == 2
    finally:
        with contextlib.suppress(ProcessLookupError):  # the runtime's own deadline may have killed it
            os.kill(hung, signal.SIGCONT)
    # answering again: fresh numbers (or, killed as hung, it is gone from the gauges)
    assert wait_until(lambda: _stats_age(server, MODEL) < 2 or not manager.is_loaded(MODEL))
    manager.unload(all=True)


def _stats_age(server: Any, model: str) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=auth(server), timeout=10).text
    found = re.search(r'jupyter_llm_worker_stats_age_seconds\{model="' + re.escape(model) + r'"\} (\S+)', text)
    return float(found.group(1)) if found else float("inf")
