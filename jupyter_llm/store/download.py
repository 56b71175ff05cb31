"""Download one file: resumable, sha256-verified, atomic, locked, retried, failing fast.

:func:`fetch` is the only code path that moves model bytes over HTTP (Hugging Face blobs,
Ollama blobs). huggingface_hub's own downloader cannot be used for this: it writes a
per-process ``.incomplete`` file that is deleted on Ctrl-C and orphaned on a kill, and it never
hashes what it downloaded (docs/notes.md §5). So:

- bytes go into a stable ``<dest>.partial`` next to ``dest``; the next call continues it with
  an HTTP ``Range`` request, whatever stopped the previous one (Ctrl-C, ``kill -9``, a dropped
  connection, a crashed kernel);
- the partial's bytes are hashed on resume, so the digest covers the whole file; a mismatch
  deletes the partial and raises :class:`~jupyter_llm.errors.IntegrityError`;
- ``dest`` appears only complete and verified (``os.replace``), so its existence means "done";
- an ``fcntl`` lock on ``<dest>.lock`` serialises two kernels pulling the same file: the second
  one waits and then finds ``dest`` complete — but gives up when the holder's partial has grown
  slower than the minimum rate for ten ``JUPYTER_LLM_READ_TIMEOUT`` windows (a stopped process,
  or one stuck on a trickle);
- transient failures (dropped connection, read timeout, 5xx, 429, a rate below
  ``JUPYTER_LLM_PULL_MIN_RATE``) are retried with backoff from the current offset, while an
  unreachable host fails within seconds;
- nothing is written past the size the caller expects or the server announces: a longer body
  is stopped at once and the partial discarded, so a lying source cannot fill the disk;
- the pull's :class:`~jupyter_llm.store.deadline.Deadline` (``JUPYTER_LLM_PULL_DEADLINE``, or
  ``Deadline.cancel()`` from another thread) ends lock waits, backoffs and blocked reads;
- no file in the store is reached through a symbolic link: the partial and the lock are opened
  with ``O_NOFOLLOW`` and must be regular files, and a link in place of ``dest`` is never
  trusted as finished (the verified file replaces it). A link there was planted by someone
  else; writing through it would overwrite whatever it points at.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ..errors import InsufficientSpaceError, IntegrityError, StoreError
from .deadline import Deadline, scope
from .files import create, is_complete, locked, open_existing, same_file
from .http import (
    RateGuard,
    Transient,
    abort_on_cancel,
    content_range,
    get_bytes,
    make_client,
    raise_for_status,
    retrying,
    short_url,
)

if TYPE_CHECKING:
    import httpx

ByteCallback = Callable[[int, "int | None"], None]
T = TypeVar("T")

CHUNK = 1 << 20
"""Read size when hashing a partial; also the progress that renews the retry budget."""
_PROGRESS_INTERVAL = 0.05  # at most ~20 progress calls per second: views redraw, not the network


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
    :class:`InsufficientSpaceError`, :class:`IntegrityError` (also for a body longer than
    announced), :class:`StoreError` (a link or other non-file in place of ours) or
    :class:`PullError` (retries exhausted, too slow, past the pull's deadline, cancelled, or
    another process holding the lock without progress). Whatever was downloaded stays in
    ``<dest>.partial`` for the next call, except after an integrity failure.
    """
    dest = Path(dest)
    expected = sha256.lower() if sha256 else None
    # Fast path without the lock: a finished blob in a read-only cache must still be usable.
    if is_complete(dest, size):
        _report_done(dest, on_bytes)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with scope() as deadline, locked(dest, deadline):
        if is_complete(dest, size):  # another process finished it while we waited
            _report_done(dest, on_bytes)
            return dest
        own_client = client is None
        active = client if client is not None else make_client()
        try:
            download = _Download(url, dest, expected, size, dict(headers or {}), on_bytes, active, deadline)
            try:
                download.run()
            finally:
                download.close()
        finally:
            if own_client:
                active.close()
    return dest


# -- one download ------------------------------------------------------------------------------


class _Download:
    """The state of one fetch: offset, running hash, and the partial file (one descriptor)."""

    def __init__(
        self,
        url: str,
        dest: Path,
        sha256: str | None,
        size: int | None,
        headers: dict[str, str],
        on_bytes: ByteCallback | None,
        client: httpx.Client,
        deadline: Deadline,
    ) -> None:
        self.url = url
        self.where = short_url(url)
        self.dest = dest
        self.partial = dest.with_name(dest.name + ".partial")
        self.sha256 = sha256
        self.size = size
        self.total = size
        self.headers = headers
        self.on_bytes = on_bytes
        self.client = client
        self.deadline = deadline
        self.offset = 0
        self.hasher = _Hasher() if sha256 else None
        # The partial is reached through this descriptor only, checked once when opened: no path
        # lookup later can be redirected by a link swapped in meanwhile.
        self._fd: int | None = None
        self._space_checked_for: int | None = None
        self._last_report = 0.0

    def close(self) -> None:
        if self.hasher is not None:
            self.hasher.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

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
            retrying(self.url, once, progressed=lambda: self.offset - start[0] >= CHUNK, deadline=self.deadline)
        self._finish()

    def _load_partial(self) -> None:
        self._fd = open_existing(self.partial, os.O_RDWR)
        if self._fd is None:
            return
        have = os.fstat(self._fd).st_size
        if self.size is not None and have > self.size:
            self._discard()  # longer than the file can be: not ours to continue
            return
        if self.hasher is not None:
            # Hash what is already there so the final digest covers the whole file.
            pos = 0
            while block := os.pread(self._fd, CHUNK, pos):
                self.hasher.update(block)
                pos += len(block)
        self.offset = have

    def _attempt(self) -> None:
        """One GET from the current offset to the end (or to a failure)."""
        headers = dict(self.headers)
        # Byte offsets must mean file offsets: no content coding on the wire.
        headers["Accept-Encoding"] = "identity"
        if self.offset:
            headers["Range"] = f"bytes={self.offset}-"
        with self.client.stream("GET", self.url, headers=headers) as resp, abort_on_cancel(self.deadline, resp):
            if resp.status_code == 416 and self.offset:
                self._restart()  # our partial does not fit the remote file: start over
                raise Transient("the server refused to continue the partial download (HTTP 416)", 0)
            raise_for_status(self.url, resp)
            if resp.status_code == 206:
                start, total = content_range(resp.headers.get("Content-Range"))
                if start != self.offset:
                    self._restart()
                    raise Transient(f"the server sent bytes from {start}, not {self.offset}", 0)
            else:
                if self.offset:
                    self._restart()  # 200 to a Range request: the whole file follows, from byte 0
                length = resp.headers.get("Content-Length")
                total = int(length) if length is not None and length.isdigit() else None
            if total is not None:
                if self.size is not None and total != self.size:
                    self._discard()
                    raise IntegrityError(
                        f"{self.where} has {total} bytes but the source promised {self.size}; "
                        "the source changed or is inconsistent — pull again, and report it if it persists"
                    )
                self.total = total
                self._check_space(total)
            self._stream(resp)
        if self.total is not None and self.offset < self.total:
            raise Transient(f"the connection ended at byte {self.offset} of {self.total}")
        if self.total is None:
            self.total = self.offset  # no length given: a clean end of the body is the end

    def _stream(self, resp: httpx.Response) -> None:
        # iter_raw() without a chunk size, each piece written at once: httpx's own chunker drops
        # what it buffered when the connection breaks, and every received byte must reach the
        # partial to be resumable. The pieces are already ~64 KiB.
        limit = self.total  # the caller's size, or what this response announced
        rate = RateGuard()
        for piece in resp.iter_raw():
            if limit is not None and self.offset + len(piece) > limit:
                # A chunked body carries no length: without this a source could fill the disk.
                self._discard()
                raise IntegrityError(
                    f"{self.where} sent more than the {limit} bytes announced for it; the download was "
                    "discarded — pull again, and report it to the source if it persists"
                )
            self._write(piece)
            self._report()
            self.deadline.check(self.where)
            rate.add(len(piece))

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            self._fd = create(self.partial)
        try:
            view = memoryview(data)
            while view:  # a write may be short
                view = view[os.pwrite(self._fd, view, self.offset + len(data) - len(view)):]
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
            got = self.offset
            self._discard()
            raise IntegrityError(
                f"{self.where}: got {got} bytes, expected {self.size}; the partial download "
                "was discarded — pull again"
            )
        if self.hasher is not None:
            digest = self.hasher.hexdigest()
            if digest != self.sha256:
                self._discard()
                raise IntegrityError(
                    f"sha256 mismatch for {self.where}: expected {self.sha256}, got {digest}; the "
                    "download was discarded — pull again; if it fails again the source serves a corrupt file"
                )
        if self._fd is None:  # a zero-byte body never created the file
            self._fd = create(self.partial)
        os.fsync(self._fd)  # the rename must not publish a file whose bytes are still in flight
        try:
            same = same_file(self.partial, self._fd)
        except FileNotFoundError:
            same = False
        if not same:
            raise StoreError(
                f"{self.partial} was replaced by another file while it was being downloaded; the store "
                "is being tampered with — check who else writes to it, then pull again"
            )
        os.replace(self.partial, self.dest)
        self._report(force=True)

    def _restart(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
        self.offset = 0
        if self.hasher is not None:
            self.hasher.close()
            self.hasher = _Hasher()

    def _discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            self.partial.unlink()  # unlinking a link removes the link, never its target
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


# -- progress -------------------------------------------------------------------------------------


def _report_done(dest: Path, on_bytes: ByteCallback | None) -> None:
    if on_bytes is not None:
        n = dest.lstat().st_size
        on_bytes(n, n)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


__all__ = ["ByteCallback", "fetch", "get_bytes", "make_client"]
