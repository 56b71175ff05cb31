"""The worker process: the only place llama.cpp runs (``python -m jupyter_llm.worker FD``).

Nothing here imports the kernel's code: only :mod:`jupyter_llm.wire` (the contract between
the two processes) and :mod:`jupyter_llm.errors`. The kernel starts these modules by name.

=====================  =====================================================================
``__main__``           the worker: load one model, serve requests over the private socket
``params``             the one mapping of load options to llama.cpp's model and context params
``llama``              ctypes helpers: llama.cpp's own words for a failure, metadata, ggml libs
``engine``             the decode loop: slots, continuous batching, sampling
``text``               tokenizing, the chat template, fitting a conversation, text out
``prompt_cache``       which tokens each slot's KV holds; reuse between requests
``embedding``          pooled embeddings in a second context
``probe``              ``python -m jupyter_llm.worker.probe``: dry-run loads and backend devices
=====================  =====================================================================
"""

from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """A request the worker refuses; ``kind`` names the error class the kernel raises."""

    def __init__(self, kind: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.kind = kind
        self.extra = extra
