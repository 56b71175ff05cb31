"""Host-memory copies of slot KV states: the prompt cache's second tier.

A slot holds one conversation's KV. When a request takes a slot whose KV it cannot use (another
conversation, another prompt), what the slot held would be lost; :class:`PromptStore` first
copies the slot's state into host memory (``llama_state_seq_get_data``), and a later request
whose prompt such a copy holds more of than any slot gets it back (``llama_state_seq_set_data``)
instead of evaluating it again. llama-server does the same (``--cache-ram``, on by default):
without it, a benchmark alternating four prompts over four slots and then coming back to the
first evaluated that prompt again where llama-server restored it, ~70 ms of each such first
token here (docs/notes.md §14).

A copy is the slot's KV byte for byte, with the slot's bookkeeping (tokens, settled count, chunk
classes), so a restored prefix is reused under the same exactness rules as one never evicted
(:mod:`jupyter_llm.worker.prompt_cache`). Copies live in the worker, within a byte budget
(``JUPYTER_LLM_PROMPT_RAM``), least recently used dropped first. Engine thread only, except
:meth:`PromptStore.stats`.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any


@dataclass(eq=False)  # compared by identity: the data is megabytes
class Saved:
    """One slot's state, copied out of the KV."""

    tokens: list[int]
    settled: int
    classes: bytearray
    data: bytearray  # what llama_state_seq_get_data wrote


class PromptStore:
    """Copies of slot states within ``budget`` bytes (see the module docstring)."""

    def __init__(self, L: Any, ctx: Any, budget: int) -> None:
        self.L, self.ctx, self.budget = L, ctx, budget
        self.saved: list[Saved] = []  # the most recently used last
        self.bytes = 0

    def save(self, slot: int, tokens: list[int], settled: int, classes: bytearray) -> bool:
        """Copy the state of ``slot``, which holds ``tokens``; False when it is not kept (a copy
        already holds them all, it exceeds the budget, or llama.cpp wrote nothing)."""
        if any(s.tokens[:len(tokens)] == tokens for s in self.saved):
            return False
        size = int(self.L.llama_state_seq_get_size(self.ctx, slot))
        if not 0 < size <= self.budget:
            return False
        data = bytearray(size)
        wrote = int(self.L.llama_state_seq_get_data(self.ctx, _pointer(data), size, slot))
        if wrote == 0:
            return False
        del data[wrote:]
        # a copy whose tokens this one extends holds nothing more: this one replaces it
        self._drop([s for s in self.saved if tokens[:len(s.tokens)] == s.tokens])
        while self.saved and self.bytes + wrote > self.budget:
            self._drop([self.saved[0]])
        self.saved.append(Saved(list(tokens), settled, bytearray(classes), data))
        self.bytes += wrote
        return True

    def restore(self, saved: Saved, slot: int) -> bool:
        """Put the copy into ``slot`` (which the caller emptied) and forget it: the slot holds it
        now, and is copied again if it is ever taken over. False when llama.cpp refused it."""
        self._drop([saved])
        n = len(saved.data)
        return int(self.L.llama_state_seq_set_data(self.ctx, _pointer(saved.data), n, slot)) == n

    def _drop(self, gone: list[Saved]) -> None:
        for s in gone:
            if s in self.saved:
                self.saved.remove(s)
                self.bytes -= len(s.data)

    def stats(self) -> dict[str, int]:
        return {"ram_prompts": len(self.saved), "ram_bytes": self.bytes}


def _pointer(data: bytearray) -> Any:
    """A ``uint8_t *`` into ``data`` (no copy)."""
    return (ctypes.c_uint8 * len(data)).from_buffer(data)


__all__ = ["PromptStore", "Saved"]
