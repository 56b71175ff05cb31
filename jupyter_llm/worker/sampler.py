"""The sampling of one answer: repeat penalty, then greedy or top-k/top-p/min-p/temperature, and
an optional grammar.

The grammar is applied the way llama.cpp's own common sampler does it by default: the chain
picks a token from the unconstrained logits, the grammar checks that one token, and only when
it is rejected are all candidates masked by the grammar and the chain asked again. Masking the
whole vocabulary at every step (a grammar first in the chain) halved the speed of a
JSON-constrained answer here (62 vs 130 tok/s, docs/notes.md §13); for a greedy answer both
pick the same tokens (the best token, if allowed, is the best allowed one).

A chain that is only llama.cpp's greedy sampler (temperature 0, no penalty, no grammar) is not
called: the token is numpy's argmax of the row, which is the greedy sampler's choice (the
first of the largest logits) without building the vocabulary's candidate array each time
(a 4-answer step's sampling 0.42 → 0.20 ms in the engine, docs/notes.md §14; reading the row
from a cache the decode emptied is most of what is left); the chain has no state to accept it
into.

Built by the thread preparing a request (samplers not yet queued belong to no other thread) and
freed by the engine when the answer ends.
"""

from __future__ import annotations

import ctypes
from collections import deque
from typing import Any

from . import RequestError
from .llama import llama_said


class Sampler:
    """One answer's sampler chain and its grammar, sampled as the module docstring says."""

    def __init__(self, L: Any, chain: Any, grammar: Any, n_vocab: int) -> None:
        self.L, self.chain, self.grammar, self.n_vocab = L, chain, grammar, n_vocab
        self._buf: Any = None
        self._ids: Any = None
        self._one = (L.llama_token_data * 1)()
        self._np: Any = None
        """numpy, once the chain is known to be greedy alone (:func:`sampler_chain`)."""

    def sample(self, ctx: Any, idx: int) -> int:
        """The next token from row ``idx`` of the last decode's logits; accepted by the samplers."""
        L = self.L
        if self._np is not None:
            logits = L.llama_get_logits_ith(ctx, idx)
            if not logits:
                raise RequestError("RuntimeError", f"llama.cpp has no logits for batch row {idx}")
            return int(self._np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())
        if self.grammar is None:
            return int(L.llama_sampler_sample(self.chain, ctx, idx))
        logits = L.llama_get_logits_ith(ctx, idx)
        token = self._pick(self._candidates(logits))
        self._one[0].id, self._one[0].logit, self._one[0].p = token, 1.0, 0.0
        one = L.llama_token_data_array(ctypes.cast(self._one, ctypes.POINTER(L.llama_token_data)), 1, -1, False)
        L.llama_sampler_apply(self.grammar, ctypes.byref(one))
        if self._one[0].logit == float("-inf"):  # not allowed here: mask everything, ask again
            cur = self._candidates(logits)
            L.llama_sampler_apply(self.grammar, ctypes.byref(cur))
            token = self._pick(cur)
        L.llama_sampler_accept(self.grammar, token)
        L.llama_sampler_accept(self.chain, token)
        return token

    def _candidates(self, logits: Any) -> Any:
        """Every token with its logit, as llama.cpp's own sampling builds them (numpy: no Python loop)."""
        import numpy as np

        if self._buf is None:
            dtype = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
            assert dtype.itemsize == ctypes.sizeof(self.L.llama_token_data)
            self._buf = np.zeros(self.n_vocab, dtype)
            self._ids = np.arange(self.n_vocab, dtype=np.int32)
        self._buf["id"] = self._ids  # again each time: the samplers sort the candidates in place
        self._buf["logit"] = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        self._buf["p"] = 0.0
        data = self._buf.ctypes.data_as(ctypes.POINTER(self.L.llama_token_data))
        return self.L.llama_token_data_array(data, self.n_vocab, -1, False)

    def _pick(self, cur: Any) -> int:
        self.L.llama_sampler_apply(self.chain, ctypes.byref(cur))
        if not 0 <= cur.selected < cur.size:
            raise RequestError("RuntimeError", "the sampler chain selected no token")
        return int(cur.data[cur.selected].id)

    def free(self) -> None:
        self.L.llama_sampler_free(self.chain)
        if self.grammar is not None:
            self.L.llama_sampler_free(self.grammar)


def greedy_rows(L: Any, ctx: Any, samplers: list[Sampler]) -> list[int] | None:
    """The tokens of a generation step of several answers that are all greedy alone, from one
    argmax over the step's logits (row ``i``: batch row ``i``, as every row of a generation step
    has logits and llama_get_logits gives them in batch order); None for any other step.

    Reading each row on its own cost ~130 µs a row in a 4-answer step (getting the row ~30 µs,
    then reading memory the decode's weights pushed out of the caches), ~0.5 ms of a 28 ms step
    (docs/notes.md §14)."""
    if len(samplers) < 2 or any(s._np is None for s in samplers):
        return None
    logits = L.llama_get_logits(ctx)
    if not logits:
        raise RequestError("RuntimeError", "llama.cpp has no logits for this step")
    block = samplers[0]._np.ctypeslib.as_array(logits, shape=(len(samplers), samplers[0].n_vocab))
    return block.argmax(axis=1).tolist()


def sampler_chain(L: Any, vocab: Any, s: dict[str, Any], grammar: str | None, seed: int,
                  errors: deque[str]) -> Sampler:
    """A new sampler for the sampling options ``s`` (a SamplingOptions dict, every key present:
    the kernel sends them whole, its defaults are the only ones). Raises RequestError when the
    grammar does not parse, in llama.cpp's words (``errors``: its recent error lines)."""
    g = None
    if grammar:
        errors.clear()
        g = L.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if not g:
            raise RequestError("ValueError", "the grammar does not parse: " + llama_said(errors, "?"))
    params = L.llama_sampler_chain_default_params()
    params.no_perf = True
    chain = L.llama_sampler_chain_init(params)
    sampler = Sampler(L, chain, g, int(L.llama_vocab_n_tokens(vocab)))
    add = lambda one: L.llama_sampler_chain_add(chain, one)  # noqa: E731
    if s["repeat_penalty"] != 1.0:
        add(L.llama_sampler_init_penalties(64, s["repeat_penalty"], 0.0, 0.0))
    if s["temperature"] <= 0.0:
        add(L.llama_sampler_init_greedy())
        if g is None and s["repeat_penalty"] == 1.0:
            import numpy

            sampler._np = numpy
        return sampler
    if s["top_k"] > 0:
        add(L.llama_sampler_init_top_k(s["top_k"]))
    add(L.llama_sampler_init_top_p(s["top_p"], 1))
    add(L.llama_sampler_init_min_p(s["min_p"], 1))
    add(L.llama_sampler_init_temp(s["temperature"]))
    add(L.llama_sampler_init_dist(seed))
    return sampler
