"""Log probabilities of generated tokens, from the logits row each token was sampled from.

Computed only for requests that ask (the engine's per-token cost is zero otherwise; ~1.7 ms per
token for SmolLM2's vocabulary when asked, docs/notes.md §12), on the
engine thread right after sampling, while the row is still llama.cpp's: the log-softmax of
the **raw model distribution** over the whole vocabulary. Temperature, top-k/top-p/min-p, a
repeat penalty or a grammar shape which token is drawn, not these numbers, so a sampled
token may have a low logprob, and with a grammar it may even be absent from the top list (as
llama-server's ``n_probs`` and OpenAI's logprobs also report the model's distribution).

One entry per token: ``(token text, logprob, token bytes, [(text, logprob, bytes), …])``
with the alternatives sorted, most likely first. Plain tuples: they are pickled per token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MAX_TOP = 20
"""Alternatives per token at most (OpenAI's limit for ``top_logprobs``)."""

Entry = tuple[str, float, bytes, list[tuple[str, float, bytes]]]


class Logprobs:
    """Reads logits rows of one context (engine thread only)."""

    def __init__(self, L: Any, ctx: Any, n_vocab: int, piece: Callable[[int], bytes]) -> None:
        import numpy as np  # llama-cpp-python depends on it; imported only when a request asks

        self.np, self.L, self.ctx, self.n_vocab, self.piece = np, L, ctx, n_vocab, piece

    def entry(self, row: int, token: int, top: int) -> Entry:
        """The entry of ``token``, sampled from batch row ``row``, with ``top`` alternatives."""
        np = self.np
        logits = np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
        x = logits.astype(np.float64)
        peak = float(x.max())
        lse = peak + float(np.log(np.exp(x - peak).sum()))
        alternatives: list[tuple[str, float, bytes]] = []
        if top > 0:
            k = min(top, self.n_vocab)
            best = np.argpartition(-x, k - 1)[:k]
            best = best[np.argsort(-x[best], kind="stable")]
            for t in best.tolist():
                piece = self.piece(t)
                alternatives.append((piece.decode("utf-8", "replace"), min(float(x[t]) - lse, 0.0), piece))
        piece = self.piece(token)
        return piece.decode("utf-8", "replace"), min(float(x[token]) - lse, 0.0), piece, alternatives
