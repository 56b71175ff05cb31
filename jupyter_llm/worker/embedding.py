"""Pooled embeddings in the worker: a second, small llama.cpp context beside the generation one.

The generation context keeps its per-slot KV (and the prompt cache in it) and its speed; this
context is made on the first embedding request, with pooled output (the model's pooling type;
MEAN when it has none), and made again, larger, for a longer input. It runs on the engine
thread, like every llama.cpp call of the worker.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from . import RequestError
from .llama import llama_said, model_meta
from .params import base_context_params

_POOLING_MEAN = 1
_POOLING_RANK = 4
_SEQS = 16
"""Inputs decoded together, one sequence each."""


class Embedder:
    """The embedding context of one model; :meth:`free` it when the worker closes."""

    def __init__(self, L: Any, model: Any, *, n_threads: int, errors: deque[str]) -> None:
        self.L, self.model, self.n_threads = L, model, n_threads
        self.errors = errors
        self._ctx: Any = None
        self._size = 0

    def embed(self, inputs: list[list[int]], normalize: bool) -> list[list[float]]:
        """One vector per tokenized input (unit length if ``normalize``). Raises RequestError."""
        L = self.L
        longest = max((len(t) for t in inputs), default=1)
        limit = L.llama_model_n_ctx_train(self.model)
        if longest > limit:
            raise RequestError("ContextOverflowError", f"an input has {longest} tokens; this model embeds "
                               f"at most {limit}; split the text", n_tokens=longest, n_ctx=limit)
        ctx = self._context(longest)
        n_embd = L.llama_model_n_embd(self.model)
        batch = L.llama_batch_init(self._size, 0, 1)
        out: list[list[float]] = []
        try:
            i = 0
            while i < len(inputs):
                n, seqs = 0, 0
                while i < len(inputs) and seqs < _SEQS and n + len(inputs[i]) <= self._size:
                    for pos, token in enumerate(inputs[i]):  # one input per sequence, positions from 0
                        batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
                        batch.seq_id[n][0], batch.logits[n] = seqs, True
                        n += 1
                    seqs, i = seqs + 1, i + 1
                batch.n_tokens = n
                rc = L.llama_decode(ctx, batch)
                if rc != 0:
                    raise RequestError("RuntimeError", f"embedding decode failed ({rc}): "
                                       + llama_said(self.errors, "see the worker log"))
                for s in range(seqs):
                    vec = L.llama_get_embeddings_seq(ctx, s)[:n_embd]
                    if normalize:
                        norm = sum(v * v for v in vec) ** 0.5 or 1.0
                        vec = [v / norm for v in vec]
                    out.append(vec)
                L.llama_memory_clear(L.llama_get_memory(ctx), True)
        finally:
            L.llama_batch_free(batch)
        return out

    def _context(self, longest: int) -> Any:
        L = self.L
        if self._ctx is not None and longest <= self._size:
            return self._ctx
        self.free()
        size = max(512, -(-longest // 256) * 256)
        cp = base_context_params(L, n_ctx=size, n_batch=size, n_ubatch=size, n_seq=_SEQS, n_threads=self.n_threads)
        cp.embeddings = True
        cp.kv_unified = True  # any one input may use the whole context
        pooling = model_meta(L, self.model, f"{model_meta(L, self.model, 'general.architecture')}.pooling_type")
        kind = int(pooling) if pooling and pooling.isdigit() else 0
        if kind == _POOLING_RANK:  # a reranker: its "embedding" is a score, not a vector
            raise RequestError("ValueError", "this is a reranking model; it scores pairs and makes no embeddings")
        cp.pooling_type = kind if kind > 0 else _POOLING_MEAN  # NONE/unset: mean over the tokens
        ctx = L.llama_init_from_model(self.model, cp)
        if not ctx:
            raise RequestError("RuntimeError", "could not create the embedding context: "
                               + llama_said(self.errors, "see the worker log"))
        self._ctx, self._size = ctx, size
        return ctx

    def free(self) -> None:
        """Free the embedding context (idempotent)."""
        if self._ctx is not None:
            self.L.llama_free(self._ctx)
            self._ctx = None


__all__ = ["Embedder"]
