"""The store's files on disk: opened without following links, regular files only, and locked.

A link or a FIFO where the downloader expects its own file was put there by someone else:
writing through a link overwrites whatever it points at (a planted ``.partial`` link once
truncated its target to zero bytes), and opening a FIFO blocks forever. So every store file a
download touches is opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked to be a regular file,
a new partial is created with ``O_EXCL``, and a finished file is judged by ``lstat``.

:func:`locked` serialises two processes downloading the same file (``<dest>.lock``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from .. import config
from ..errors import PullError, StoreError
from .deadline import Deadline

_LOCK_STALL_WINDOWS = 10  # a lock holder may show no progress this many read timeouts (its retries)
_LOCK_POLL = (0.05, 0.5)  # first and longest wait between two tries of a held lock
# Never through a link; never blocking on a FIFO someone put in our place.
_NO_FOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def is_complete(dest: Path, size: int | None) -> bool:
    """A regular file of the right size at ``dest``; a link there is never trusted (lstat)."""
    try:
        st = dest.lstat()
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{dest} is a directory where a downloaded file belongs; remove it, then pull again")
    return stat.S_ISREG(st.st_mode) and (size is None or st.st_size == size)


def open_existing(path: Path, flags: int) -> int | None:
    """Open an existing file of the store without following a link; None when it is absent."""
    try:
        fd = os.open(path, flags | _NO_FOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _not_a_file(path, exc) from None
    _require_regular(path, fd)
    return fd


def create(path: Path) -> int:
    """Create a store file that must not exist yet (``O_EXCL`` also refuses a planted link)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NO_FOLLOW, 0o644)
    except FileExistsError:  # it appeared since we looked: open it under the same rules
        existing = open_existing(path, os.O_RDWR)
        if existing is None:
            raise StoreError(f"{path} keeps appearing and disappearing; check who else writes to the store") from None
        return existing
    except OSError as exc:
        raise _not_a_file(path, exc) from None
    _require_regular(path, fd)
    return fd


def _require_regular(path: Path, fd: int) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise StoreError(
            f"{path} is not a regular file; jupyter_llm only writes its own files into the store — remove "
            f"it (`rm {path}`) and pull again"
        )


def _not_a_file(path: Path, exc: OSError) -> OSError:
    if exc.errno == errno.ELOOP:
        return StoreError(
            f"{path} is a symbolic link; jupyter_llm never writes through links in its store (it would "
            f"overwrite whatever the link points at) — remove the link (`rm {path}`) and pull again"
        )
    if exc.errno in (errno.EISDIR, errno.ENXIO, errno.ENODEV):
        return StoreError(f"{path} is not a regular file; remove it (`rm -r {path}`) and pull again")
    return exc


def same_file(path: Path, fd: int) -> bool:
    st, mine = os.lstat(path), os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


@contextlib.contextmanager
def locked(dest: Path, deadline: Deadline) -> Iterator[None]:
    """An exclusive ``flock`` on ``<dest>.lock`` that removes the lock file when released.

    Removing it is safe because a waiter that wakes up on an unlinked file notices (its inode
    no longer matches the path) and locks the new file instead. Waiting ends with the pull's
    deadline, or when the holder's partial has grown slower than ``JUPYTER_LLM_PULL_MIN_RATE``
    for ten read timeouts: a holder spends at most about six of them on one run of retries, so
    longer means it is stuck, stopped, or trickling — and the waiters must not queue behind it.
    """
    path = dest.with_name(dest.name + ".lock")
    wait = _LockWait(path, dest, deadline)
    while True:
        fd = _open_lock(path)
        try:
            while not _try_lock(fd):
                wait.pause()
            current = same_file(path, fd)
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


def _open_lock(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NO_FOLLOW, 0o644)
    except OSError as exc:
        raise _not_a_file(path, exc) from None
    _require_regular(path, fd)
    return fd


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class _LockWait:
    """Waiting for another process's download of the same file, as long as it keeps the pace.

    The holder's pace is the growth of its partial, held to the same minimum rate as a download
    (at least a byte when the rate check is off); a partial that shrinks (a restart) counts from
    its new size.
    """

    def __init__(self, lock: Path, dest: Path, deadline: Deadline) -> None:
        self.lock = lock
        self.partial = dest.with_name(dest.name + ".partial")
        self.deadline = deadline
        self.min_rate = config.pull_min_rate()
        self.stall = _LOCK_STALL_WINDOWS * config.read_timeout()
        self.began = self.since = time.monotonic()
        self.size = self._size()
        self.delay = _LOCK_POLL[0]

    def _size(self) -> int:
        try:
            return self.partial.lstat().st_size
        except FileNotFoundError:
            return 0

    def pause(self) -> None:
        now, size = time.monotonic(), self._size()
        if size < self.size:
            self.size = size
        elif size - self.size >= max(1.0, self.min_rate * (now - self.since)):
            self.size, self.since = size, now
        elif now - self.since >= self.stall:
            raise PullError(
                f"another process holds the download lock {self.lock} (for {now - self.began:.0f} s), and its "
                f"download has been slower than {self.min_rate:.0f} B/s (JUPYTER_LLM_PULL_MIN_RATE) for "
                f"{self.stall:g} s; if another kernel is pulling the same model, let it finish and pull again; "
                f"otherwise a stopped process holds the lock (`fuser {self.lock}` names it): end it and pull again"
            )
        self.deadline.sleep(self.delay, f"waiting for {self.lock}")
        self.delay = min(self.delay * 2, _LOCK_POLL[1])
