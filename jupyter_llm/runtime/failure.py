"""A worker's refusal or death as the exception the kernel raises (one mapping for every call).

The worker names the kind of error (``RequestError.kind``) and the kernel raises that class:
``ContextOverflowError`` with its numbers, ``CapabilityError`` naming what the model lacks,
``ValueError`` for bad input; anything else is a :class:`~jupyter_llm.errors.JupyterLLMError`
prefixed with the model's name. A crash is one error raised in many threads: each gets a copy.
"""

from __future__ import annotations

import copy
from typing import Any

from .. import wire
from ..errors import CapabilityError, ContextOverflowError, JupyterLLMError


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
