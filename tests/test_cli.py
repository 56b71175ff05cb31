"""The ``jupyter-llm`` command, run as a user runs it: in a subprocess, against a real server it
started on a free loopback port (serve, ps, run, stop, SIGTERM), and without one."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_llm import __version__
from jupyter_llm.store.records import Store
from jupyter_llm.store.sources import Pulled
from tests.ggufs import write_tiny_llama

ENTRY_POINT = Path(sys.executable).with_name("jupyter-llm")
TIMEOUT = 180  # generous: the machine is shared, and a load starts a worker process


def cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
        timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jupyter_llm", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where a server started by the CLI leaves its address and token for the other verbs."""
    path = tmp_path / "runtime"
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(path))
    for name in ("JUPYTER_LLM_TOKEN", "OLLAMA_HOST"):
        monkeypatch.delenv(name, raising=False)
    return path


@pytest.fixture
def served(smollm2_path: Path, runtime_dir: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``jupyter-llm serve`` (the installed entry point) on a free port, with smollm2 in its store."""
    Store().put("smollm2", Pulled("pip", [smollm2_path], owned=[]))
    port = free_port()
    command = [str(ENTRY_POINT)] if ENTRY_POINT.exists() else [sys.executable, "-m", "jupyter_llm"]
    proc = subprocess.Popen([*command, "serve", "--port", str(port), "--parallel", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (listening(port) and any(runtime_dir.glob("jupyter-llm-*.json"))):  # the file comes next
            assert proc.poll() is None, f"serve exited early: {proc.communicate()}"
            assert time.monotonic() < deadline, "serve did not start listening"
            time.sleep(0.1)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_version_names_the_package_version() -> None:
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"jupyter-llm {__version__}"


def test_serve_blocks_until_sigterm_and_ps_run_stop_talk_to_it(served: tuple[subprocess.Popen[str], int],
                                                               runtime_dir: Path) -> None:
    proc, port = served
    host = ["--host", f"127.0.0.1:{port}"]
    [info_file] = runtime_dir.glob("jupyter-llm-*.json")
    token = json.loads(info_file.read_text())["token"]
    assert stat.S_IMODE(info_file.stat().st_mode) == 0o600, "the token file is the user's alone"

    empty = cli("ps", *host)
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.split() == ["NAME", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]

    once = cli("run", "smollm2", "Name one colour.", "--temperature", "0", "--max-tokens", "8", *host)
    assert once.returncode == 0, once.stderr
    assert once.stdout.strip(), "the answer is printed"

    listed = cli("ps", *host)
    assert listed.returncode == 0 and "smollm2" in listed.stdout and "100% CPU" in listed.stdout

    loop = cli("run", "smollm2", "--temperature", "0", "--max-tokens", "4", *host, stdin="Hello.\n\nAnd again?\n")
    assert loop.returncode == 0, loop.stderr
    assert len([line for line in loop.stdout.splitlines() if line.strip()]) >= 2, loop.stdout

    wrong = cli("ps", *host, env={"JUPYTER_LLM_TOKEN": "not-the-token"})
    assert wrong.returncode == 1 and "JUPYTER_LLM_TOKEN" in wrong.stderr and token not in wrong.stderr

    stopped = cli("stop", "smollm2", *host)
    assert stopped.returncode == 0, stopped.stderr
    assert "smollm2" not in cli("ps", *host).stdout
    again = cli("stop", "smollm2", *host)
    assert again.returncode == 1 and "not loaded" in again.stderr

    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert f"http://127.0.0.1:{port}" in stdout
    assert token not in stdout + stderr, "the token is never printed"
    assert not listening(port) and not info_file.exists()


def test_run_without_a_server_runs_the_model_in_this_process(tmp_path: Path, runtime_dir: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    out = cli("run", str(path), "hello", "--max-tokens", "4", "--host", f"127.0.0.1:{free_port()}")
    assert out.returncode == 0, out.stderr
    assert "no server at" in out.stderr and "in this process" in out.stderr


def test_ps_without_a_server_says_how_to_start_one(runtime_dir: Path) -> None:
    out = cli("ps", "--host", f"127.0.0.1:{free_port()}")
    assert out.returncode == 1 and "jupyter-llm serve" in out.stderr


def test_serve_on_a_port_in_use_fails_at_once_with_the_reason(runtime_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        out = cli("serve", "--port", str(busy.getsockname()[1]), timeout=60)
    assert out.returncode == 1 and "already in use" in out.stderr


def test_the_store_verbs_work_as_before(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    assert cli("pull", str(path)).returncode == 0
    listed = cli("list")
    assert listed.returncode == 0 and "tiny" in listed.stdout
    assert cli("cp", "tiny", "tiny2").returncode == 0
    assert cli("show", "tiny2").returncode == 0
    assert cli("rm", "tiny2").returncode == 0
    assert "tiny2" not in cli("list").stdout
