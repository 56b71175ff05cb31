"""A worker's refusal or death as the exception the kernel raises (one mapping for every call).

The worker names the kind of error (``RequestError.kind``) and the kernel raises that class:
``ContextOverflowError`` with its numbers, ``CapabilityError`` naming what the model lacks,
``ValueError`` for bad input; anything else is a :class:`~jupyter_llm.errors.JupyterLLMError`
prefixed with the model's name. A crash is one error raised in many threads: each gets a copy,
and says how the worker ended and what it last said.
"""

from __future__ import annotations

import copy
import os
import signal
from collections.abc import Iterable
from typing import Any

from .. import wire
from ..errors import CapabilityError, ContextOverflowError, JupyterLLMError, WorkerCrashedError


def error_from(msg: tuple[Any, ...], name: str) -> BaseException:
    """The exception for a worker's ``error`` message (or the kernel's ``crash``) about model ``name``."""
    if msg[0] == wire.CRASH:
        return fresh(msg[2])
    _, _, kind, message, extra = msg
    if kind == "ContextOverflowError":
        return ContextOverflowError(message, extra.get("n_tokens"), extra.get("n_ctx"))
    if kind == "CapabilityError":
        return CapabilityError(message, str(extra.get("capability", "")))
    if kind == "ValueError":
        return ValueError(message)
    return JupyterLLMError(f"{name}: {message}")


def fresh(error: JupyterLLMError) -> JupyterLLMError:
    """A copy to raise: one crash is raised in many threads, each with its own traceback."""
    return copy.copy(error).with_traceback(None)


def crash_error(name: str, code: int, *, hung: bool, loading: bool, last: str | None, said: str,
                hung_after_s: float) -> WorkerCrashedError:
    """What to tell the user about the worker running ``name`` that ended with exit ``code``
    (negative: a signal); ``hung``: the kernel killed it for not answering; ``last``: its last
    words (introduced as ``said``)."""
    if hung:
        what = f"stopped responding (no answer for {hung_after_s:.0f} s) and was killed"
    elif code < 0:
        what = f"was killed by {signal.Signals(-code).name}"
        if code == -signal.SIGKILL:
            what += " (often the out-of-memory killer)"
    else:
        what = f"exited with code {code}"
    if loading:
        what += " while loading"
    message = f"the worker running {name} {what}"
    if last and not hung:
        message += f"; {said}: {last}"
    advice = ("if it happens again, check that nothing stops the process (a debugger, kill -STOP, a frozen "
              "container)" if hung else
              "if it keeps crashing try a smaller context (--ctx 2048) or fewer GPU layers (--gpu-layers 0)")
    message += f". The kernel is fine: load it again with `%llm load {name}`; {advice}."
    return WorkerCrashedError(message, signal=-code if code < 0 and not hung else None, last_log=last)


def last_words(errfile: Any, logs: Iterable[tuple[int, str]]) -> tuple[str | None, str]:
    """The last line a worker wrote to stderr (``errfile``: an assert, a traceback), else its
    last error or warning log line; with how to introduce it."""
    try:
        errfile.seek(0, os.SEEK_END)
        size = errfile.tell()
        errfile.seek(max(0, size - 8192))
        tail = errfile.read().decode("utf-8", "replace").strip().splitlines()
    except (OSError, ValueError):
        tail = []
    if tail:
        return tail[-1].strip(), "its last words"
    logs = list(logs)
    for wanted, said in ((4, "llama.cpp's last error"), (3, "llama.cpp's last warning")):
        for level, text in reversed(logs):
            if level == wanted and text.strip():
                return text.strip(), said
    return None, ""
