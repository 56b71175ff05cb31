"""The worker's CPU time slice: short, so that the kernel's threads do not wait for a whole one.

While a model generates, ggml's threads keep both cores of a small machine busy. Each token the
worker sends wakes a reader thread in the kernel, and Linux's scheduler (EEVDF) lets that reader
run only when the running decode thread's slice ends: 1.4 ms by default on 2 cores, so the
``%%chat`` cell saw its first token 1.1-2.7 ms after the worker sent it. With a 0.3 ms slice
asked for the worker's threads (Linux 6.12+, ``sched_setattr``'s ``sched_runtime`` for
SCHED_OTHER), that hop measured 0.31 ms and decoding kept its speed (docs/notes.md §14, where
the options that lost are given too: nice, SCHED_IDLE, yielding after a token).

Only the slice changes: the policy and nice value stay what the worker inherited, so no
privilege is needed. Threads started later inherit the slice, so :func:`shorten_slice` runs in
the worker's main thread before it starts any (llama.cpp's OpenMP threads included). Older
kernels ignore the field; other systems and architectures are left as they are.
"""

from __future__ import annotations

import ctypes
import platform
import struct
import sys

# (sched_setattr, sched_getattr) system call numbers; glibc wraps neither before 2.41
_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}
_SCHED_OTHER, _SCHED_BATCH = 0, 3
# struct sched_attr, version 0: size, policy, flags, nice, priority, runtime, deadline, period
_ATTR = struct.Struct("=IIQiIQQQ")


def _syscalls() -> tuple[ctypes.CDLL, int, int] | None:
    numbers = _SYSCALLS.get(platform.machine())
    if not sys.platform.startswith("linux") or numbers is None:
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc, numbers[0], numbers[1]


def _get_attr(calls: tuple[ctypes.CDLL, int, int]) -> tuple[int, ...] | None:
    """This thread's ``struct sched_attr`` fields, None if the call failed."""
    libc, _, getattr_nr = calls
    buf = ctypes.create_string_buffer(_ATTR.size)
    if libc.syscall(getattr_nr, 0, buf, _ATTR.size, 0) != 0:
        return None
    return _ATTR.unpack(buf.raw)


def get_slice_ns() -> int | None:
    """This thread's time slice in ns as the kernel reports it (``sched_runtime``, Linux 6.12+;
    0 on older kernels); None where it cannot be read."""
    calls = _syscalls()
    attr = _get_attr(calls) if calls is not None else None
    return None if attr is None else int(attr[5])


def shorten_slice(slice_us: int) -> bool:
    """Ask for a ``slice_us`` µs time slice for this thread and the threads it starts later;
    True if the kernel took the request. 0 asks for nothing. Never raises: a worker runs the
    same without it, only its tokens reach the kernel's threads later."""
    calls = _syscalls() if slice_us > 0 else None
    attr = _get_attr(calls) if calls is not None else None
    if calls is None or attr is None:
        return False
    _size, policy, _flags, nice, _prio, _runtime, _dl, _period = attr
    if policy not in (_SCHED_OTHER, _SCHED_BATCH):
        return False  # a real-time or idle policy set by the user: theirs to keep
    packed = ctypes.create_string_buffer(_ATTR.pack(_ATTR.size, policy, 0, nice, 0, slice_us * 1000, 0, 0), _ATTR.size)
    return calls[0].syscall(calls[1], 0, packed, 0) == 0
