"""A loopback fake of the Hugging Face Hub, speaking the protocol huggingface_hub 2.4 uses.

Routes (docs/notes.md §5):

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` (``?blobs=true`` adds
  sizes and LFS info to ``siblings``), ``GET /api/models/{repo}/tree/{rev}[/{path}]``;
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: ``X-Repo-Commit``, ``X-Linked-Etag`` (the sha256
  for LFS files), ``X-Linked-Size``; LFS files answer 302 to a "CDN" on ``localhost:{port}`` —
  another origin than the ``127.0.0.1:{port}`` endpoint, so clients must take the metadata from
  the redirect itself, as with the real CDN;
- ``GET /cdn/{sha256}`` on the CDN origin, honouring ``Range`` (206 + ``Content-Range``);
- errors with ``X-Error-Code``: RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo.

It never sends ``X-Xet-Hash`` (huggingface_hub would switch to Xet with no fallback).

:class:`LoopbackServer` (also used by ``tests/fakeollama.py``) runs a ThreadingHTTPServer on
port 0 in a daemon thread that shuts itself down after ``lifetime`` seconds, logs every
request (method, path, Range, status, body bytes actually sent) and injects faults into blob
responses: drop the connection after N bytes, corrupt byte K, throttle (down to a byte at a
time), delay, fail with a status, send a chunked body longer than the blob.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import chain
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, urlsplit

_PIECE = 64 * 1024
S = TypeVar("S", bound="LoopbackServer")


@dataclass
class LoggedRequest:
    """One request as the server saw it."""

    method: str
    path: str
    host: str
    range: str | None
    status: int = 0
    sent: int = 0
    """Body bytes the server managed to write before the response ended (or broke)."""
    start: int = 0
    """File offset of the first body byte (blob responses)."""
    key: str | None = None
    """Which blob was served (the sha256 for blobs), None for other routes."""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Faults:
    drop_after: dict[str, list[int]] = field(default_factory=dict)
    corrupt: dict[str, set[int]] = field(default_factory=dict)
    fail: list[int] = field(default_factory=list)
    rate: float | None = None
    delays: list[float] = field(default_factory=list)
    ignore_range: bool = False
    overlong: dict[str, int] = field(default_factory=dict)


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 with a request log and blob fault injection."""

    def __init__(self, lifetime: float = 300.0) -> None:
        self.log: list[LoggedRequest] = []
        self.faults = _Faults()
        self._lock = threading.Lock()
        self._lifetime = lifetime
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self: S) -> S:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                owner._handle(self, "GET")

            def do_HEAD(self) -> None:
                owner._handle(self, "HEAD")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)
        self._thread.start()
        # A hung test must not leave a server behind: it stops itself after `lifetime`.
        self._timer = threading.Timer(self._lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if self._timer is not None:
            self._timer.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self: S) -> S:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """The API origin (127.0.0.1)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn(self) -> str:
        """The blob origin: same server, different host name, so a different origin."""
        return f"http://localhost:{self.port}"

    # -- faults --------------------------------------------------------------------------------

    def drop_after(self, key: str, nbytes: int, times: int = 1) -> None:
        """Close the connection once file offset ``nbytes`` of blob ``key`` has been sent."""
        with self._lock:
            self.faults.drop_after.setdefault(key, []).extend([nbytes] * times)

    def corrupt(self, key: str, offset: int) -> None:
        """Serve blob ``key`` with the byte at ``offset`` flipped (until cleared)."""
        with self._lock:
            self.faults.corrupt.setdefault(key, set()).add(offset)

    def fail_next(self, status: int, times: int = 1) -> None:
        """Answer the next ``times`` blob GETs with ``status``."""
        with self._lock:
            self.faults.fail.extend([status] * times)

    def throttle(self, bytes_per_second: float | None) -> None:
        """Limit each blob response to this rate (None: unlimited)."""
        self.faults.rate = bytes_per_second

    def delay(self, seconds: float, times: int = 1) -> None:
        """Wait ``seconds`` before answering each of the next ``times`` blob requests."""
        with self._lock:
            self.faults.delays.extend([seconds] * times)

    def overlong(self, key: str, extra: int) -> None:
        """Serve blob ``key`` chunked (no Content-Length) with ``extra`` bytes after its end."""
        self.faults.overlong[key] = extra

    def ignore_range(self, value: bool = True) -> None:
        """Answer 200 with the whole blob even when a Range was asked for."""
        self.faults.ignore_range = value

    # -- log queries ---------------------------------------------------------------------------

    def blob_gets(self, key: str) -> list[LoggedRequest]:
        """Every GET that served (part of) blob ``key``, in order."""
        with self._lock:
            return [r for r in self.log if r.key == key and r.method == "GET"]

    def bytes_sent(self, key: str) -> int:
        return sum(r.sent for r in self.blob_gets(key))

    # -- serving -------------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        headers = handler.headers
        entry = LoggedRequest(method, handler.path, headers.get("Host", ""), headers.get("Range"),
                              headers=dict(headers.items()))
        with self._lock:
            self.log.append(entry)
        try:
            self.route(handler, method, entry)
        except (BrokenPipeError, ConnectionResetError):
            handler.close_connection = True

    def route(self, handler: BaseHTTPRequestHandler, method: str, entry: LoggedRequest) -> None:
        raise NotImplementedError

    def reply(self, handler: BaseHTTPRequestHandler, entry: LoggedRequest, status: int,
              headers: dict[str, str] | None = None, body: bytes = b"", method: str = "GET") -> None:
        """A small complete response."""
        entry.status = status
        handler.send_response(status)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if method != "HEAD" and body:
            handler.wfile.write(body)
            entry.sent = len(body)

    def reply_json(self, handler: BaseHTTPRequestHandler, entry: LoggedRequest, data: Any,
                   status: int = 200, headers: dict[str, str] | None = None, method: str = "GET") -> None:
        self.reply(handler, entry, status, {"Content-Type": "application/json", **(headers or {})},
                   json.dumps(data).encode(), method)

    def serve_blob(self, handler: BaseHTTPRequestHandler, entry: LoggedRequest, method: str,
                   key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Serve ``data`` with Range support and the configured faults."""
        entry.key = key
        faults = self.faults
        with self._lock:
            pause = faults.delays.pop(0) if faults.delays and method == "GET" else 0.0
            status = faults.fail.pop(0) if faults.fail and method == "GET" and not pause else None
        if pause:
            time.sleep(pause)
        if status is not None:
            self.reply(handler, entry, status, {"Retry-After": "0"}, b"injected failure", method)
            return
        size = len(data)
        start, end = 0, size - 1
        wanted = handler.headers.get("Range")
        partial = False
        if wanted and not faults.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
            if m is None or int(m.group(1)) >= size:
                self.reply(handler, entry, 416, {"Content-Range": f"bytes */{size}"}, b"", method)
                return
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            partial = True
        entry.start = start
        entry.status = 206 if partial else 200
        extra = faults.overlong.get(key, 0)
        handler.send_response(entry.status)
        handler.send_header("Content-Type", content_type)
        # A chunked body announces no length: only what the client already knows bounds it.
        handler.send_header(*(("Transfer-Encoding", "chunked") if extra else ("Content-Length", str(end - start + 1))))
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("ETag", f'"{key}"')
        if partial:
            handler.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        handler.end_headers()
        if method == "HEAD":
            return
        if extra:  # the blob's bytes, then `extra` more, chunked
            for chunk in chain((data[i:min(i + _PIECE, end + 1)] for i in range(start, end + 1, _PIECE)),
                               (bytes(min(_PIECE, extra - i)) for i in range(0, extra, _PIECE)), [b""]):
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))  # b"" is the last chunk
                entry.sent += len(chunk)
            return
        with self._lock:
            drops = faults.drop_after.get(key, [])
            stop_at = drops.pop(0) if drops else None
        if stop_at is not None and not start < stop_at <= end:
            stop_at = None  # this response does not cross the drop point
        flips = faults.corrupt.get(key, set())
        pos = start
        began = time.monotonic()
        # Slow rates send small pieces, down to a byte at a time: a trickle, not a stall.
        piece = _PIECE if not faults.rate else max(1, min(_PIECE, int(faults.rate / 20)))
        while pos <= end:
            upto = min(end + 1, pos + piece, stop_at if stop_at is not None else end + 1)
            chunk = data[pos:upto]
            if flips:
                chunk = _flip(chunk, pos, flips)
            handler.wfile.write(chunk)
            entry.sent += len(chunk)
            pos = upto
            if stop_at is not None and pos >= stop_at:
                self._drop(handler)
                return
            if faults.rate:
                ahead = entry.sent / faults.rate - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)

    @staticmethod
    def _drop(handler: BaseHTTPRequestHandler) -> None:
        # Everything written so far reaches the client, then EOF before Content-Length is met.
        handler.wfile.flush()
        with contextlib.suppress(OSError):
            handler.connection.shutdown(socket.SHUT_WR)
        handler.close_connection = True


def _flip(chunk: bytes, pos: int, flips: set[int]) -> bytes:
    out = bytearray(chunk)
    for k in flips:
        if pos <= k < pos + len(chunk):
            out[k - pos] ^= 0xFF
    return bytes(out)


# -- the Hub ------------------------------------------------------------------------------------


@dataclass
class FakeFile:
    path: str
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                f"size {len(self.data)}\n").encode()

    @property
    def blob_id(self) -> str:
        """The git object id: of the LFS pointer for LFS files, of the content otherwise."""
        body = self.pointer if self.lfs else self.data
        return hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, FakeFile]
    commit: str
    revisions: dict[str, str]
    gated: bool = False


class FakeHub(LoopbackServer):
    """The Hub: repositories of files, LFS for ``.gguf`` and anything over 1 MB."""

    def __init__(self, lifetime: float = 300.0) -> None:
        super().__init__(lifetime)
        self.repos: dict[str, FakeRepo] = {}
        self.tokens: set[str] = set()

    @property
    def endpoint(self) -> str:
        return self.url

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, gated: bool = False,
                 tags: tuple[str, ...] = ()) -> FakeRepo:
        commit = os.urandom(20).hex()
        fake_files = {
            path: FakeFile(path, data, lfs=path.endswith(".gguf") or len(data) > 1_000_000)
            for path, data in files.items()
        }
        revisions = {"main": commit, commit: commit, **{t: commit for t in tags}}
        repo = FakeRepo(repo_id, fake_files, commit, revisions, gated)
        self.repos[repo_id] = repo
        return repo

    def file(self, repo_id: str, path: str) -> FakeFile:
        return self.repos[repo_id].files[path]

    # -- routing -------------------------------------------------------------------------------

    def route(self, handler: BaseHTTPRequestHandler, method: str, entry: LoggedRequest) -> None:
        parts = urlsplit(handler.path)
        path = parts.path
        query = parse_qs(parts.query)
        if path.startswith("/cdn/"):
            self._cdn(handler, method, entry, path[len("/cdn/"):])
        elif path.startswith("/api/models/"):
            self._api(handler, method, entry, path[len("/api/models/"):], query)
        elif "/resolve/" in path:
            self._resolve(handler, method, entry, path)
        else:
            self.reply(handler, entry, 404, {}, b"not found", method)

    def _error(self, handler: BaseHTTPRequestHandler, entry: LoggedRequest, method: str, status: int,
               code: str, message: str, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        if commit:
            headers["X-Repo-Commit"] = commit
        self.reply_json(handler, entry, {"error": message}, status, headers, method)

    def _find_repo(self, rest: str) -> tuple[FakeRepo | None, str]:
        """Split ``ns/name/tail…`` into a known repo and the tail."""
        for repo_id, repo in self.repos.items():
            if rest == repo_id or rest.startswith(repo_id + "/"):
                return repo, rest[len(repo_id):].lstrip("/")
        return None, rest

    def _api(self, handler: BaseHTTPRequestHandler, method: str, entry: LoggedRequest, rest: str,
             query: dict[str, list[str]]) -> None:
        repo, tail = self._find_repo(rest)
        if repo is None:
            self._error(handler, entry, method, 404, "RepoNotFound", "Repository not found")
            return
        if tail == "" or tail.startswith("revision/"):
            rev = tail[len("revision/"):] if tail else "main"
            commit = repo.revisions.get(rev)
            if commit is None:
                self._error(handler, entry, method, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = []
            for f in repo.files.values():
                sibling: dict[str, Any] = {"rfilename": f.path}
                if blobs:
                    sibling.update(size=len(f.data), blobId=f.blob_id)
                    if f.lfs:
                        sibling["lfs"] = {"sha256": f.sha256, "size": len(f.data),
                                          "pointerSize": len(f.pointer)}
                siblings.append(sibling)
            data = {"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit, "private": False,
                    "gated": "auto" if repo.gated else False, "disabled": False, "tags": ["gguf"],
                    "library_name": "gguf", "siblings": siblings}
            self.reply_json(handler, entry, data, method=method)
            return
        if tail.startswith("tree/"):
            rev, _, sub = tail[len("tree/"):].partition("/")
            if repo.revisions.get(rev) is None:
                self._error(handler, entry, method, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            self.reply_json(handler, entry, _tree(repo, sub, recursive), method=method)
            return
        self.reply(handler, entry, 404, {}, b"not found", method)

    def _resolve(self, handler: BaseHTTPRequestHandler, method: str, entry: LoggedRequest, path: str) -> None:
        repo, tail = self._find_repo(path.lstrip("/"))
        if repo is None or not tail.startswith("resolve/"):
            self._error(handler, entry, method, 404, "RepoNotFound", "Repository not found")
            return
        rev, _, filename = tail[len("resolve/"):].partition("/")
        commit = repo.revisions.get(rev)
        if commit is None:
            self._error(handler, entry, method, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return
        if repo.gated:
            auth = handler.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ").strip()
            if token not in self.tokens:
                status = 401 if not token else 403
                self._error(handler, entry, method, status, "GatedRepo",
                            f"Access to model {repo.repo_id} is restricted.", commit)
                return
        f = repo.files.get(filename)
        if f is None:
            self._error(handler, entry, method, 404, "EntryNotFound", f"{filename} does not exist", commit)
            return
        common = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if f.lfs:
            location = f"{self.cdn}/cdn/{f.sha256}?expires={int(time.time()) + 3600}&name={quote(filename)}"
            headers = {**common, "Location": location, "ETag": f'"{f.blob_id}"',
                       "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(len(f.data))}
            self.reply(handler, entry, 302, headers, b"", method)
        else:
            self.reply(handler, entry, 200, {**common, "ETag": f'"{f.blob_id}"'}, f.data, method)

    def _cdn(self, handler: BaseHTTPRequestHandler, method: str, entry: LoggedRequest, sha: str) -> None:
        if not entry.host.startswith("localhost:"):
            # Blobs live on the CDN origin only: this proves clients follow the cross-origin redirect.
            self.reply(handler, entry, 404, {}, b"blobs are served by the CDN origin", method)
            return
        for repo in self.repos.values():
            for f in repo.files.values():
                if f.lfs and f.sha256 == sha:
                    self.serve_blob(handler, entry, method, sha, f.data)
                    return
        self.reply(handler, entry, 404, {}, b"no such blob", method)


def _tree(repo: FakeRepo, sub: str, recursive: bool) -> list[dict[str, Any]]:
    prefix = sub.strip("/") + "/" if sub.strip("/") else ""
    out: list[dict[str, Any]] = []
    folders: set[str] = set()
    for f in sorted(repo.files.values(), key=lambda f: f.path):
        if not f.path.startswith(prefix):
            continue
        rel = f.path[len(prefix):]
        dirs = rel.split("/")[:-1]
        for i in range(1, len(dirs) + 1):
            folder = prefix + "/".join(dirs[:i])
            if folder not in folders and (recursive or i == 1):
                folders.add(folder)
                out.append({"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0,
                            "path": folder})
        if dirs and not recursive:
            continue
        entry: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": len(f.data), "path": f.path}
        if f.lfs:
            entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": len(f.pointer)}
        out.append(entry)
    return out
