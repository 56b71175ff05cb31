"""llama.cpp's own binaries (llama-server, llama-bench, rpc-server) for tests, and rpc-servers.

``scripts/build-llama-cpp.sh`` builds them once per machine outside the clone, and ``make test``
runs it (``make tools``). :func:`tool_path` finds a binary through that script's ``--where``;
it skips only when the build is impossible here (no cmake or C++ compiler). A binary that was
simply not built yet is a failure that says how to build it: the suite must not pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "build-llama-cpp.sh"


def bin_dir() -> Path:
    """Where the build script puts (or would put) the binaries."""
    out = subprocess.run(["bash", str(SCRIPT), "--where"], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHON": sys.executable}, timeout=60)
    return Path(out.stdout.strip().splitlines()[-1])


def tool_path(name: str) -> Path:
    """The path of llama.cpp's ``name`` binary; skips if it cannot be built here, fails if it
    simply was not."""
    path = bin_dir() / name
    if path.is_file() and os.access(path, os.X_OK):
        return path
    missing = [tool for tool in ("cmake", "c++", "make") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"llama.cpp's {name} cannot be built here: {', '.join(missing)} not installed")
    pytest.fail(f"llama.cpp's {name} is not built ({path}): run `make tools` "
                "(or scripts/build-llama-cpp.sh); `make test` does it first")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RpcServer:
    """A running ``rpc-server`` on loopback: ``endpoint`` is its ``127.0.0.1:PORT``."""

    def __init__(self, proc: subprocess.Popen[bytes], endpoint: str) -> None:
        self.proc = proc
        self.endpoint = endpoint

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@contextmanager
def rpc_server(threads: int = 1) -> Iterator[RpcServer]:
    """An rpc-server on a free loopback port (CPU device, ``threads`` threads), killed at the end."""
    binary = tool_path("rpc-server")
    port = free_port()
    proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RpcServer(proc, f"127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 20
        while True:  # a connection it accepts and we close at once costs it nothing
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"rpc-server did not start on port {port} (exit {proc.poll()})") from None
                time.sleep(0.05)
        yield server
    finally:
        server.kill()
