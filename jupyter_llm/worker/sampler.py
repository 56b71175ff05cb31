"""The sampler chain of one answer: grammar, repeat penalty, then greedy or top-k/top-p/min-p/temperature.

Built by the thread preparing a request (chains not yet queued belong to no other thread) and
freed by the engine when the answer ends.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from . import RequestError
from .llama import llama_said


def sampler_chain(L: Any, vocab: Any, s: dict[str, Any], grammar: str | None, seed: int, errors: deque[str]) -> Any:
    """A new chain for the sampling options ``s`` (a SamplingOptions dict, every key present:
    the kernel sends them whole, its defaults are the only ones). Raises RequestError when the
    grammar does not parse, in llama.cpp's words (``errors``: its recent error lines)."""
    params = L.llama_sampler_chain_default_params()
    params.no_perf = True
    chain = L.llama_sampler_chain_init(params)
    add = lambda sampler: L.llama_sampler_chain_add(chain, sampler)  # noqa: E731
    if grammar:
        errors.clear()
        g = L.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if not g:
            L.llama_sampler_free(chain)
            raise RequestError("ValueError", "the grammar does not parse: " + llama_said(errors, "?"))
        add(g)
    if s["repeat_penalty"] != 1.0:
        add(L.llama_sampler_init_penalties(64, s["repeat_penalty"], 0.0, 0.0))
    if s["temperature"] <= 0.0:
        add(L.llama_sampler_init_greedy())
        return chain
    if s["top_k"] > 0:
        add(L.llama_sampler_init_top_k(s["top_k"]))
    add(L.llama_sampler_init_top_p(s["top_p"], 1))
    add(L.llama_sampler_init_min_p(s["min_p"], 1))
    add(L.llama_sampler_init_temp(s["temperature"]))
    add(L.llama_sampler_init_dist(seed))
    return chain
