"""The contract between the kernel and its worker processes: the only module both sides import.

The kernel (:mod:`jupyter_llm.runtime`) starts ``python -m jupyter_llm.worker FD`` and the
probe ``python -m jupyter_llm.worker.probe …`` by module name, never importing their code; the
worker side (:mod:`jupyter_llm.worker`) imports nothing of the kernel's but this module and
:mod:`jupyter_llm.errors`. What crosses between them is defined here: the framing of the
private socket (:class:`Pipe`), the message tags (the table in :mod:`jupyter_llm.worker`'s
docstring), the environment a worker starts in (:func:`worker_env`) and how either side reads a
process's resident memory (:func:`rss`).
"""

from __future__ import annotations

import os
import pickle
import struct
import time
from pathlib import Path
from typing import Any

# Kernel → worker.
LOAD = "load"
GEN = "gen"
CANCEL = "cancel"
EMBED = "embed"
CALL = "call"
CLOSE = "close"
ATTACH = "attach"
"""``("attach", rid, has_socket)``: write the answer's text into the HTTP client's socket that
comes with the message (passed as a descriptor), or, without one, send it all here again
(:mod:`jupyter_llm.worker.direct`)."""
PING = "ping"
"""Answered by the worker's control thread at once, even while it loads or decodes: a worker
that does not answer is hung (stopped, deadlocked), not busy."""
# Worker → kernel.
LOADED = "loaded"
LOAD_ERROR = "load_error"
TOKEN = "tok"
FITTED = "fit"
DONE = "done"
REPLY = "reply"
ERROR = "error"
LOG = "log"
CLOSED = "closed"
PONG = "pong"
SPILL = "spill"
"""``("spill", rid, raw)``: an attached answer's client did not take all of a write; ``raw`` are
the bytes it did not take (the rest of an HTTP chunk), the kernel writes them and all that follows."""
STEP = "step"
"""Several of the messages above in one: what one decode step of the engine produced for the
requests it serves (tokens, ends), in order. One write and one wake-up of the kernel's reader
per step instead of one per generating request."""
CRASH = "crash"
"""Not sent by the worker: the kernel's reader puts it into every waiting inbox when it dies."""

OLLAMA_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"
"""The UTC time in Ollama's lines (``created_at``), as the API server and a worker writing
them (jupyter_llm/worker/direct.py) put it."""

WORKER_MODULE = "jupyter_llm.worker"
PROBE_MODULE = "jupyter_llm.worker.probe"

LOG_ERROR = 4
LOG_CONT = 5
"""ggml's log levels as llama.cpp sends them: 1 DEBUG, 2 INFO, 3 WARN, 4 ERROR, 5 continuation
of the previous message (docs/notes.md §2; llama-cpp-python's own level table is stale)."""


class Pipe:
    """Pickled messages, framed, over the private socket (both ends use it).

    ``multiprocessing.connection.Connection.send`` builds a new ForkingPickler per message
    (tens of µs); plain ``pickle.dumps`` takes about 2 µs per streamed token. The framing is
    Connection's own (a 4-byte big-endian length, or -1 and an 8-byte one), also for
    :meth:`send` with a ``timeout``, which writes it without blocking.
    """

    def __init__(self, fd: int, *, takes_fds: bool = False) -> None:
        """``takes_fds``: the receiving end of :meth:`send_fd` (the worker's): reads keep the
        descriptors that come with the bytes, in order, in :attr:`fds`."""
        from collections import deque
        from multiprocessing.connection import Connection

        self._conn = Connection(fd)
        self._fd = fd
        self._fd_sock: Any = None
        if takes_fds:
            import socket

            self._fd_sock = socket.socket(fileno=os.dup(fd))
        self.fds: deque[int] = deque()
        """Descriptors received (``takes_fds``), oldest first; each message that says it carries one
        takes the oldest (they arrive in the order they were sent, with their messages)."""
        self._inbuf = bytearray()
        """Bytes read but not yet taken as messages (see :meth:`recv`)."""
        self._sender: Any = None
        self.broken = False
        """A send timed out partway through a message: the stream cannot be used any more."""

    def send(self, message: tuple[Any, ...], timeout: float | None = None) -> None:
        """Send one message. With ``timeout``: raise TimeoutError if the other side has not taken
        it within that many seconds (a stopped process takes nothing once the socket buffer is
        full). If part of the message went, :attr:`broken` is set: give up on the other side."""
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        if timeout is None:
            self._conn.send_bytes(data)
            return
        n = len(data)
        header = struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)
        self._send_within(memoryview(header + data), time.monotonic() + timeout)

    def send_fd(self, message: tuple[Any, ...], fd: int, timeout: float) -> None:
        """Send one message with a copy of the descriptor ``fd`` (SCM_RIGHTS); the other end
        must read with ``takes_fds``. TimeoutError and :attr:`broken` as for :meth:`send`."""
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        self._send_within(memoryview(struct.pack("!i", len(data)) + data), time.monotonic() + timeout, fd)

    def _send_within(self, data: memoryview, deadline: float, fd: int | None = None) -> None:
        import select
        import socket

        if self._sender is None:  # a second handle on the socket, for sends that must not block
            self._sender = socket.socket(fileno=os.dup(self._conn.fileno()))
        whole = len(data)
        while data:
            try:
                if fd is None:
                    data = data[self._sender.send(data, socket.MSG_DONTWAIT):]
                else:  # the descriptor goes with the first bytes sent
                    data = data[socket.send_fds(self._sender, [data], [fd], socket.MSG_DONTWAIT):]
                    fd = None
                continue
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [self._sender], [], left)[1]:
                self.broken = len(data) < whole
                raise TimeoutError("the other side stopped reading")

    def recv(self) -> Any:
        """The next message (one reader per pipe). Reads whatever the socket holds in one system
        call, so a streamed token costs one read, not two (length, then body), and messages that
        queued up meanwhile cost none. EOFError once the other side closed."""
        buf = self._inbuf
        while True:
            if len(buf) >= 4:
                (n,) = struct.unpack_from("!i", buf)
                head, size = (4, n) if n >= 0 else (12, struct.unpack_from("!Q", buf, 4)[0] if len(buf) >= 12 else -1)
                if size >= 0 and len(buf) >= head + size:
                    data = bytes(buf[head:head + size])
                    del buf[:head + size]
                    return pickle.loads(data)
            got = os.read(self._fd, 1 << 16) if self._fd_sock is None else self._read_with_fds()
            if not got:
                raise EOFError
            buf += got

    def _read_with_fds(self) -> bytes:
        import socket

        got, ancillary, _flags, _addr = self._fd_sock.recvmsg(1 << 16, socket.CMSG_SPACE(16 * 4))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                n = len(payload) // 4
                self.fds.extend(struct.unpack(f"{n}i", payload[:n * 4]))
        return bytes(got)

    def pending(self) -> bool:
        """Whether something has arrived that is not read yet (does not read it)."""
        return bool(self._inbuf) or bool(self._conn.poll(0))

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
        if self._fd_sock is not None:
            self._fd_sock.close()
        self._conn.close()


def worker_env() -> dict[str, str]:
    """The environment of a worker or probe process: ours, with the package importable and
    ggml told not to fork gdb when it aborts (docs/notes.md §2)."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["GGML_NO_BACKTRACE"] = "1"
    # OpenMP's wait policy stays llama.cpp's default: ggml's CPU backend synchronises its threads
    # many times per token, and a PASSIVE policy turns each into a futex sleep (docs/notes.md §8:
    # a plain decode loop ran 4-5× slower with it). A user's own OMP_WAIT_POLICY is kept.
    env["PYTHONUNBUFFERED"] = "1"
    return env


def rss(pid: int) -> int:
    """Resident memory of a process in bytes (VmRSS), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
