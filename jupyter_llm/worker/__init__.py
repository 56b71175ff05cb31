"""The worker process: the only place llama.cpp runs (``python -m jupyter_llm.worker FD``).

Nothing here imports the kernel's code: only :mod:`jupyter_llm.wire` (the contract between
the two processes) and :mod:`jupyter_llm.errors`. The kernel starts these modules by name.

=====================  =====================================================================
``__main__``           the worker: load one model, serve requests over the private socket
``params``             the one mapping of load options to llama.cpp's model and context params
``llama``              ctypes helpers: llama.cpp's own words for a failure, metadata, ggml libs
``prep``               one thread per request: render, tokenize, fit, sampler (cancellable)
``engine``             the decode loop: slots, continuous batching, sampling, ``n`` answers per prompt
``generation``         one answer being generated: slot, prompt progress, sampler, text out
``sampler``            the sampler chain of one answer (grammar, penalties, greedy or random)
``logprobs``           log probabilities from the sampled logits rows (only when asked)
``fim``                fill-in-the-middle prompts from the vocabulary's FIM tokens
``text``               tokenizing in chunks, the byte bound, fitting a conversation, text out
``direct``             a streamed answer written into the API client's socket (the server's fast path)
``template``           chat templates rendered with limits (time, output, memory, cancel)
``prompt_cache``       which tokens each slot's KV holds; reuse between requests
``embedding``          pooled embeddings in a second context
``probe``              ``python -m jupyter_llm.worker.probe``: dry-run loads and backend devices
``repack_probe``       ``python -m jupyter_llm.worker.repack_probe``: is weight repacking safe and faster here
``sched``              a short CPU time slice for the worker's threads, so tokens reach the kernel sooner
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


class PromptTooLong(RequestError):
    """A prompt (or a rendered conversation) longer than the context: known before it is all
    tokenized, so ``n_tokens`` is a lower bound."""

    def __init__(self, message: str, *, n_tokens: int, n_ctx: int) -> None:
        super().__init__("ContextOverflowError", message, n_tokens=n_tokens, n_ctx=n_ctx)
        self.n_tokens = n_tokens


class Cancelled(Exception):
    """The kernel cancelled the request while it was being prepared (rendered, tokenized)."""
