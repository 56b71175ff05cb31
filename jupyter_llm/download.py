"""Download one file: resumable, sha256-verified, atomic, locked, retried, failing fast.

:func:`fetch` is the only code path that moves model bytes over HTTP (Hugging Face blobs,
Ollama blobs). huggingface_hub's own downloader cannot be used for this: it writes a
per-process ``.incomplete`` file that is deleted on Ctrl-C and orphaned on a kill, and it never
hashes what it downloaded (NOTES §5). So:

- bytes go into a stable ``<dest>.partial`` next to ``dest``; the next call continues it with
  an HTTP ``Range`` request, whatever stopped the previous one (Ctrl-C, ``kill -9``, a dropped
  connection, a crashed kernel);
- the partial's bytes are hashed on resume, so the digest covers the whole file; a mismatch
  deletes the partial and raises :class:`~jupyter_llm.errors.IntegrityError`;
- ``dest`` appears only complete and verified (``os.replace``), so its existence means "done";
- an ``fcntl`` lock on ``<dest>.lock`` serialises two kernels pulling the same file: the second
  one waits and then finds ``dest`` complete;
- transient failures (dropped connection, read timeout, 5xx, 429) are retried with backoff
  from the current offset, while an unreachable host fails within seconds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from . import config
from .errors import HostUnreachableError, InsufficientSpaceError, IntegrityError, PullError, RemoteError

if TYPE_CHECKING:
    import httpx

ByteCallback = Callable[[int, "int | None"], None]
T = TypeVar("T")

CHUNK = 1 << 20
"""Read size when hashing a partial; also the progress that renews the retry budget."""
_PROGRESS_INTERVAL = 0.05  # at most ~20 progress calls per second: views redraw, not the network
_BACKOFF_BASE = 0.5
_BACKOFF_CAP = 8.0
_RETRY_AFTER_CAP = 30.0
_QUICK_RETRY_DELAY = 0.25  # one retry for a refused/unresolved host, then give up: it is not transient
_TRANSIENT_STATUS = frozenset({408, 429})


class _Transient(Exception):
    """An attempt failed in a way a retry from the current offset may fix."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class _Hasher:
    """sha256 on a helper thread, so hashing overlaps the network instead of following it.

    hashlib releases the GIL for large updates; the bounded queue keeps memory flat when the
    disk or the network outruns the hash. ``close()`` must always be called (``fetch`` does).
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=64)
        self._thread = threading.Thread(target=self._run, name="jupyter_llm-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            self._hash.update(data)

    def update(self, data: bytes) -> None:
        self._queue.put(bytes(data))

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self.close()
        return self._hash.hexdigest()


def make_client() -> httpx.Client:
    """An httpx client with our timeouts: short connect (fail fast), longer read, redirects on."""
    import httpx

    timeout = httpx.Timeout(config.read_timeout(), connect=config.connect_timeout())
    return httpx.Client(follow_redirects=True, timeout=timeout)


def fetch(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    size: int | None = None,
    headers: Mapping[str, str] | None = None,
    on_bytes: ByteCallback | None = None,
    client: httpx.Client | None = None,
) -> Path:
    """Download ``url`` to ``dest`` (resumably, verified, atomically) and return ``dest``.

    ``sha256`` (hex) and ``size`` are checked when given; a mismatch discards the partial and
    raises :class:`IntegrityError`. An existing ``dest`` of the right size is trusted (it only
    ever appears verified) and no request is made. ``on_bytes(completed, total)`` is called
    with the resumed offset first, then at most ~20 times a second, then once at the end.

    Raises :class:`HostUnreachableError` (within seconds), :class:`RemoteError` (4xx),
    :class:`InsufficientSpaceError`, :class:`IntegrityError` or :class:`PullError` (retries
    exhausted). Whatever was downloaded stays in ``<dest>.partial`` for the next call, except
    after an integrity failure.
    """
    dest = Path(dest)
    expected = sha256.lower() if sha256 else None
    # Fast path without the lock: a finished blob in a read-only cache must still be usable.
    if _is_complete(dest, size):
        _report_done(dest, on_bytes)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest.with_name(dest.name + ".lock")):
        if _is_complete(dest, size):  # another process finished it while we waited
            _report_done(dest, on_bytes)
            return dest
        own_client = client is None
        active = client if client is not None else make_client()
        try:
            download = _Download(url, dest, expected, size, dict(headers or {}), on_bytes, active)
            try:
                download.run()
            finally:
                download.close()
        finally:
            if own_client:
                active.close()
    return dest


def get_bytes(
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    client: httpx.Client | None = None,
    limit: int = 16 << 20,
) -> bytes:
    """GET a small document (a manifest) with the same retry and fail-fast rules as :func:`fetch`.

    A 4xx answer raises :class:`RemoteError` whose ``status`` the caller can map (404 → "not
    found"); bodies larger than ``limit`` are refused.
    """
    own_client = client is None
    active = client if client is not None else make_client()

    def once() -> bytes:
        with active.stream("GET", url, headers=dict(headers or {})) as resp:
            _raise_for_status(url, resp)
            body = bytearray()
            for piece in resp.iter_bytes():
                body += piece
                if len(body) > limit:
                    raise RemoteError(f"{_short(url)} sent more than {limit} bytes", resp.status_code)
            return bytes(body)

    try:
        return _retrying(url, once, progressed=lambda: False)
    finally:
        if own_client:
            active.close()


# -- one download ------------------------------------------------------------------------------


class _Download:
    """The state of one fetch: offset, running hash, and the partial file."""

    def __init__(
        self,
        url: str,
        dest: Path,
        sha256: str | None,
        size: int | None,
        headers: dict[str, str],
        on_bytes: ByteCallback | None,
        client: httpx.Client,
    ) -> None:
        self.url = url
        self.dest = dest
        self.partial = dest.with_name(dest.name + ".partial")
        self.sha256 = sha256
        self.size = size
        self.total = size
        self.headers = headers
        self.on_bytes = on_bytes
        self.client = client
        self.offset = 0
        self.hasher = _Hasher() if sha256 else None
        self._space_checked_for: int | None = None
        self._last_report = 0.0

    def close(self) -> None:
        if self.hasher is not None:
            self.hasher.close()

    def run(self) -> None:
        self._load_partial()
        if self.total is not None:
            self._check_space(self.total)
        self._report(force=True)
        if self.size is None or self.offset < self.size:
            start = [self.offset]

            def once() -> None:
                start[0] = self.offset
                self._attempt()

            # "Progress" resets the retry budget: a flaky link that keeps delivering still finishes.
            _retrying(self.url, once, progressed=lambda: self.offset - start[0] >= CHUNK)
        self._finish()

    def _load_partial(self) -> None:
        try:
            have = self.partial.stat().st_size
        except FileNotFoundError:
            return
        if self.size is not None and have > self.size:
            self.partial.unlink()  # longer than the file can be: not ours to continue
            return
        if self.hasher is not None and have:
            # Hash what is already there so the final digest covers the whole file.
            with open(self.partial, "rb") as f:
                for block in iter(lambda: f.read(CHUNK), b""):
                    self.hasher.update(block)
        self.offset = have

    def _attempt(self) -> None:
        """One GET from the current offset to the end (or to a failure)."""
        headers = dict(self.headers)
        # Byte offsets must mean file offsets: no content coding on the wire.
        headers["Accept-Encoding"] = "identity"
        if self.offset:
            headers["Range"] = f"bytes={self.offset}-"
        with self.client.stream("GET", self.url, headers=headers) as resp:
            if resp.status_code == 416 and self.offset:
                self._restart()  # our partial does not fit the remote file: start over
                raise _Transient("the server refused to continue the partial download (HTTP 416)", 0)
            _raise_for_status(self.url, resp)
            if resp.status_code == 206:
                start, total = _content_range(resp.headers.get("Content-Range"))
                if start != self.offset:
                    self._restart()
                    raise _Transient(f"the server sent bytes from {start}, not {self.offset}", 0)
            else:
                if self.offset:
                    self._restart()  # 200 to a Range request: the whole file follows, from byte 0
                length = resp.headers.get("Content-Length")
                total = int(length) if length is not None and length.isdigit() else None
            if total is not None:
                if self.size is not None and total != self.size:
                    self._discard()
                    raise IntegrityError(
                        f"{_short(self.url)} has {total} bytes but the source promised {self.size}; "
                        "the source changed or is inconsistent — pull again, and report it if it persists"
                    )
                self.total = total
                self._check_space(total)
            self._stream(resp)
        if self.total is not None and self.offset < self.total:
            raise _Transient(f"the connection ended at byte {self.offset} of {self.total}")
        if self.total is None:
            self.total = self.offset  # no length given: a clean end of the body is the end

    def _stream(self, resp: httpx.Response) -> None:
        # iter_raw() without a chunk size, each piece written at once: httpx's own chunker drops
        # what it buffered when the connection breaks, and every received byte must reach the
        # partial to be resumable. An unbuffered file: the pieces are already ~64 KiB.
        with open(self.partial, "ab", buffering=0) as f:
            for piece in resp.iter_raw():
                self._write(f, piece)
                self._report()

    def _write(self, f: Any, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:  # an unbuffered write may be short
                view = view[f.write(view):]
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise InsufficientSpaceError(
                    f"the disk holding {self.dest.parent} filled up while downloading; free some space "
                    "and pull again (the download resumes where it stopped)"
                ) from exc
            raise
        if self.hasher is not None:
            self.hasher.update(data)
        self.offset += len(data)

    def _finish(self) -> None:
        if self.size is not None and self.offset != self.size:
            self._discard()
            raise IntegrityError(
                f"{_short(self.url)}: got {self.offset} bytes, expected {self.size}; the partial download "
                "was discarded — pull again"
            )
        if self.hasher is not None:
            digest = self.hasher.hexdigest()
            if digest != self.sha256:
                self._discard()
                raise IntegrityError(
                    f"sha256 mismatch for {_short(self.url)}: expected {self.sha256}, got {digest}; the "
                    "download was discarded — pull again; if it fails again the source serves a corrupt file"
                )
        if not self.partial.exists():  # a zero-byte body never opened the file
            self.partial.touch()
        with open(self.partial, "rb") as f:
            os.fsync(f.fileno())  # the rename must not publish a file whose bytes are still in flight
        os.replace(self.partial, self.dest)
        self._report(force=True)

    def _restart(self) -> None:
        with open(self.partial, "wb"):
            pass
        self.offset = 0
        if self.hasher is not None:
            self.hasher.close()
            self.hasher = _Hasher()

    def _discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.partial.unlink()
        self.offset = 0

    def _check_space(self, total: int) -> None:
        if self._space_checked_for == total:
            return
        self._space_checked_for = total
        remaining = max(total - self.offset, 0)
        free = shutil.disk_usage(self.dest.parent).free
        if remaining > free:
            raise InsufficientSpaceError(
                f"not enough disk space for {self.dest.name}: {_human(remaining)} still to download, "
                f"{_human(free)} free in {self.dest.parent}. Free up {_human(remaining - free)} or more, or "
                "point JUPYTER_LLM_HOME / HF_HUB_CACHE at a larger disk, then pull again"
            )

    def _report(self, force: bool = False) -> None:
        if self.on_bytes is None:
            return
        now = time.monotonic()
        if force or now - self._last_report >= _PROGRESS_INTERVAL:
            self._last_report = now
            self.on_bytes(self.offset, self.total)


# -- retries and error mapping -------------------------------------------------------------------


def _retrying(url: str, once: Callable[[], T], *, progressed: Callable[[], bool]) -> T:
    """Run ``once`` until it returns, retrying transient failures with exponential backoff.

    A host that cannot be reached before any answer gets one quick retry (connection refused
    and DNS failures are rarely transient) and then raises :class:`HostUnreachableError`;
    only a host that answered before spends the retry budget on connect failures.
    """
    import httpx

    failures = 0
    reached = False
    quick_retry_used = False
    while True:
        try:
            return once()
        except httpx.ConnectTimeout as exc:
            if not reached:
                raise _unreachable(url, "connection timed out", exc) from None
            reason: str = f"connect timed out ({exc})"
            retry_after: float | None = None
        except httpx.ConnectError as exc:
            if not reached:
                if quick_retry_used:
                    raise _unreachable(url, str(exc), exc) from None
                quick_retry_used = True
                time.sleep(_QUICK_RETRY_DELAY)
                continue
            reason, retry_after = f"connect failed ({exc})", None
        except _Transient as exc:
            reason, retry_after = str(exc), exc.retry_after
        except (httpx.TransportError, httpx.DecodingError) as exc:
            # ReadTimeout, ReadError (reset), RemoteProtocolError (peer closed mid-body), ...
            reason, retry_after = f"{type(exc).__name__}: {exc}", None
        except httpx.TooManyRedirects as exc:
            raise RemoteError(f"{_short(url)} redirects in a loop ({exc})") from None
        reached = True
        failures = 0 if progressed() else failures + 1
        limit = config.retries()
        if failures > limit:
            raise PullError(
                f"downloading {_short(url)} failed {failures} times in a row (last: {reason}); "
                "run the pull again later — it resumes where it stopped"
            )
        if retry_after is None:
            delay = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** max(failures - 1, 0))
        else:  # the server said when (a 429/503 Retry-After), or 0 for "restart now"
            delay = min(retry_after, _RETRY_AFTER_CAP)
        time.sleep(delay)


def _raise_for_status(url: str, resp: httpx.Response) -> None:
    status = resp.status_code
    if status < 400:
        return
    if status in _TRANSIENT_STATUS or status >= 500:
        raise _Transient(f"HTTP {status}", _retry_after(resp.headers.get("Retry-After")))
    hint = {
        401: "the server wants credentials (for Hugging Face: set HF_TOKEN)",
        403: "access denied (a gated or private model needs a token with access: set HF_TOKEN)",
        404: "not found — check the model name and tag",
    }.get(status, "the server refused the request")
    raise RemoteError(f"{_short(url)} answered HTTP {status}: {hint}", status)


def _unreachable(url: str, reason: str, exc: Exception) -> HostUnreachableError:
    host = urlsplit(url).netloc or url
    error = HostUnreachableError(
        f"cannot reach {host} ({reason}). Check the network connection and the configured endpoint "
        "(JUPYTER_LLM_HF_ENDPOINT / HF_ENDPOINT, JUPYTER_LLM_OLLAMA_REGISTRY); offline, use a model that "
        "is already pulled (`%llm list`)"
    )
    error.__cause__ = exc
    return error


def _retry_after(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        return max(float(raw), 0.0)
    except ValueError:
        return None  # an HTTP date: our own backoff is good enough


def _content_range(raw: str | None) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` → (START, TOTAL); None for what is missing or ``*``."""
    if not raw or not raw.startswith("bytes "):
        return None, None
    span, _, total = raw[6:].partition("/")
    start = span.partition("-")[0]
    return (int(start) if start.isdigit() else None, int(total) if total.isdigit() else None)


# -- files ------------------------------------------------------------------------------------------


def _is_complete(dest: Path, size: int | None) -> bool:
    try:
        st = dest.stat()
    except FileNotFoundError:
        return False
    return size is None or st.st_size == size


def _report_done(dest: Path, on_bytes: ByteCallback | None) -> None:
    if on_bytes is not None:
        n = dest.stat().st_size
        on_bytes(n, n)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` that removes the lock file when released.

    Removing it is safe because a waiter that wakes up on an unlinked file notices (its inode
    no longer matches the path) and locks the new file instead.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _short(url: str) -> str:
    """A URL without its query string (signed CDN URLs carry long tokens)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.scheme else url


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
