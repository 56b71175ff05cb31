"""Connections that never finish are closed: a request head and body must arrive in time, an
answer must be read, only so many connections are kept, and running out of file descriptors
is logged once. Every socket goes to the loopback server only, bounded in count and time."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.apiserver import MODEL, auth, running_server, wait_until

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def served(smollm2_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("JUPYTER_LLM_SERVER_HEAD_TIMEOUT", "1")
    monkeypatch.setenv("JUPYTER_LLM_SERVER_BODY_TIMEOUT", "1")
    monkeypatch.setenv("JUPYTER_LLM_SERVER_MAX_CONNECTIONS", "40")
    with running_server(smollm2_path, tmp_path) as pair:
        yield pair


def _connect(port: int, data: bytes = b"", **options: int) -> socket.socket:
    sock = socket.socket()
    for name, value in options.items():
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, name), value)
    sock.connect(("127.0.0.1", port))
    if data:
        sock.sendall(data)
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing, or None if it is still open after ``seconds``."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_connections_that_never_send_a_whole_request_head_are_closed(served: Any) -> None:
    _, server = served
    baseline = _fds()
    head = f"GET /api/tags HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n".encode()  # no blank line
    idle = [_connect(server.port) for _ in range(15)]
    partial = [_connect(server.port, head) for _ in range(15)]
    try:
        assert wait_until(lambda: _fds() >= baseline + 60, timeout=5)  # both ends of 30 connections
        t0 = time.monotonic()
        assert all(_closed_within(s, 5) == b"" for s in idle)
        answers = [_closed_within(s, 5) for s in partial]
        assert time.monotonic() - t0 < 4
        assert all(a is not None and a.startswith(b"HTTP/1.1 408") for a in answers), answers[:1]
        assert b"request head" in answers[0]
        assert wait_until(lambda: _fds() <= baseline + 30, timeout=5)  # the server's ends are closed
    finally:
        for sock in idle + partial:
            sock.close()
    assert httpx.get(f"{server.url}/api/tags", headers=auth(server)).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics", headers=auth(server)).text
    assert 'jupyter_llm_http_connections_dropped_total{reason="head_timeout"} 30' in metrics


def test_a_request_body_that_never_arrives_in_full_gets_408(served: Any) -> None:
    _, server = served
    head = (f"POST /api/show HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nAuthorization: Bearer {server.token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": ").encode()
    sock = _connect(server.port, head)
    try:
        t0 = time.monotonic()
        answer = _closed_within(sock, 5)
        assert answer is not None and time.monotonic() - t0 < 4
        assert answer.startswith(b"HTTP/1.1 408")
        assert "body" in json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    finally:
        sock.close()


def test_an_answer_the_client_never_reads_is_dropped(served: Any) -> None:
    _, server = served
    body = json.dumps({"model": MODEL, "input": ["hi"] * 300}).encode()  # 300 vectors: ~4 MB of JSON
    head = (f"POST /api/embed HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nAuthorization: Bearer {server.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock = _connect(server.port, head + body, SO_RCVBUF=4096)
    try:
        assert wait_until(lambda: 'reason="send_timeout"} 1' in httpx.get(
            f"{server.url}/metrics", headers=auth(server)).text, timeout=60)
        assert _closed_within(sock, 10) is not None  # it was closed, whatever had been buffered
    finally:
        sock.close()


def test_beyond_the_connection_limit_the_longest_idle_one_is_closed(served: Any) -> None:
    _, server = served
    held = [_connect(server.port) for _ in range(40)]  # the limit; none sends a request
    try:
        time.sleep(0.2)
        with httpx.Client(base_url=server.url, headers=auth(server), timeout=10) as client:
            assert client.get("/api/tags").status_code == 200
        assert _closed_within(held[0], 3) == b""  # the oldest made room
    finally:
        for sock in held:
            sock.close()


def test_when_every_connection_is_busy_a_new_one_gets_503(served: Any) -> None:
    _, server = served
    head = (f"POST /api/show HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nAuthorization: Bearer {server.token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{").encode()
    held = [_connect(server.port, head) for _ in range(40)]  # each one inside a request
    try:
        time.sleep(0.2)
        extra = _connect(server.port)
        answer = _closed_within(extra, 3)
        extra.close()
        assert answer is not None and answer.startswith(b"HTTP/1.1 503")
        assert "connections" in json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    finally:
        for sock in held:
            sock.close()
    assert wait_until(lambda: httpx.get(f"{server.url}/api/tags", headers=auth(server)).status_code == 200)


CHILD = """
import os, resource, sys, logging
from pathlib import Path
resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))
logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
from jupyter_llm import server as api
from jupyter_llm.manager import ModelManager
from jupyter_llm.store.records import Store
manager = ModelManager(Store(root=Path(sys.argv[1])))
server = api.serve(manager, port=0, auth=False)
print(server.port, flush=True)
hog = []
try:
    while True:
        hog.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
print("full", flush=True)
sys.stdin.readline()
for fd in hog:
    os.close(fd)
print("freed", flush=True)
sys.stdin.readline()
api.stop(manager)
"""


def test_running_out_of_file_descriptors_is_logged_once_and_serving_resumes(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-W", "ignore", "-c", CHILD, str(tmp_path)], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        port = int(child.stdout.readline())
        assert child.stdout.readline().strip() == "full"
        clients = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and len(clients) < 100:  # each one wakes the accept loop
            try:
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=0.5))
            except OSError:
                pass
            time.sleep(0.02)
        for sock in clients:
            sock.close()
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "freed"
        assert wait_until(lambda: _health(port), timeout=10)
        child.stdin.write("\n")
        child.stdin.flush()
        _, err = child.communicate(timeout=30)
    finally:
        child.kill()
    assert err.count("Too many open files") + err.count("file descriptors") == 1, err[-3000:]
    assert len(err) < 2000


def _health(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
