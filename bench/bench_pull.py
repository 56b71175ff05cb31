"""Throughput of ``download.fetch()`` against a plain httpx streaming GET, on loopback.

Serves a file of random bytes (default 200 MB) from a server in a child process (so the
server does not share the client's GIL), then downloads it several times with:

- ``plain``: ``httpx.Client.stream("GET")`` written to disk in the pieces httpx yields;
- ``plain+fsync``: the same, flushed to disk at the end as ``fetch`` does before its rename;
- ``fetch``: :func:`jupyter_llm.store.download.fetch` (partial file, lock, fsync, atomic rename);
- ``fetch+sha256``: the same with sha256 verification.

Prints the best MB/s of each and the ratios to ``plain``. Usage::

    .venv/bin/python bench/bench_pull.py [--mb 200] [--runs 3]
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import re
import socket
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _serve(path: str, ready: Any, port_box: Any) -> None:
    """The server process: sendfile() with Range support, nothing else."""
    size = os.path.getsize(path)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            start = 0
            m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if m:
                start = int(m.group(1))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(size - start))
            self.end_headers()
            with open(path, "rb") as f:
                self.connection.sendfile(f, start, size - start)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port_box.value = server.server_address[1]
    ready.set()
    server.serve_forever()


def _plain(url: str, dest: Path, durable: bool = False) -> None:
    import httpx

    with httpx.Client() as client, client.stream("GET", url) as resp, open(dest, "wb") as f:
        for piece in resp.iter_raw():
            f.write(piece)
        if durable:
            f.flush()
            os.fsync(f.fileno())


def _fetch(url: str, dest: Path, sha256: str | None, size: int) -> None:
    from jupyter_llm.store.download import fetch

    fetch(url, dest, sha256=sha256, size=size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="file size in MB (default 200)")
    parser.add_argument("--runs", type=int, default=3, help="downloads per method (best is kept)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.bin"
        hasher = hashlib.sha256()
        with open(src, "wb") as f:
            for _ in range(args.mb):
                block = os.urandom(1_000_000)
                hasher.update(block)
                f.write(block)
        size = src.stat().st_size
        sha256 = hasher.hexdigest()

        ready = multiprocessing.Event()
        port = multiprocessing.Value("i", 0)
        server = multiprocessing.Process(target=_serve, args=(str(src), ready, port), daemon=True)
        server.start()
        try:
            if not ready.wait(10):
                raise SystemExit("the bench server did not start")
            url = f"http://127.0.0.1:{port.value}/model.bin"
            socket.create_connection(("127.0.0.1", port.value), timeout=5).close()
            methods = {
                "plain": lambda d: _plain(url, d),
                "plain+fsync": lambda d: _plain(url, d, durable=True),
                "fetch": lambda d: _fetch(url, d, None, size),
                "fetch+sha256": lambda d: _fetch(url, d, sha256, size),
            }
            best: dict[str, float] = {}
            for run in range(args.runs):
                for name, method in methods.items():
                    dest = Path(tmp) / f"out-{name}-{run}"
                    began = time.perf_counter()
                    method(dest)
                    elapsed = time.perf_counter() - began
                    assert dest.stat().st_size == size
                    rate = size / elapsed / 1e6
                    best[name] = max(best.get(name, 0.0), rate)
                    print(f"run {run + 1} {name:>13}: {rate:8.1f} MB/s", flush=True)
                    dest.unlink()
        finally:
            server.terminate()
            server.join(5)

    print(f"\n{args.mb} MB over loopback, best of {args.runs}:")
    for name, rate in best.items():
        print(f"  {name:>13}: {rate:8.1f} MB/s  (ratio to plain {rate / best['plain']:.2f})")


if __name__ == "__main__":
    main()
