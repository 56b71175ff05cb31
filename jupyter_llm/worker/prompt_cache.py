"""The prompt cache of the decode engine: which tokens each slot's KV holds, and which slot to reuse.

When a request ends its slot keeps its KV; :class:`SlotCache` keeps the matching token list
(prompt and answer, exactly the tokens decoded, at positions 0…n-1). A new request takes the
free slot holding the longest prefix of its prompt, the KV is cut after that prefix and only the
rest is evaluated, so a chat's next turn evaluates the new message, not the whole conversation.

Exactness. On the CPU without flash attention, llama.cpp computes a token's KV bit for bit the
same whichever chunk of *two or more* tokens of its sequence it is evaluated in; a token
evaluated alone (every generated token, and a prompt's lone first token when batched with
another sequence) goes through other kernels and differs in the last bits, enough to change a
greedy answer later on (measured). So in ``exact`` mode the cache reuses only the prefix that
was evaluated in chunks (``settled``); the rest (a turn's answer) is evaluated again, in chunks,
as part of the next prompt, so a reused prefix gives the same outputs as evaluating the whole
prompt.

With flash attention on the CPU (f16 KV), a chunk of at least ``tile`` (64) rows goes through
ggml's tiled kernel and a smaller one through its vector kernel, which differ too (docs/notes.md
§14): a token's KV then also depends on whether its chunk was that large. So the cache records
each token's *class* (alone, small chunk, tiled chunk), reuses only a prefix whose classes are
those a fresh evaluation of the new prompt would give (its chunks end at :func:`chunk_ends`),
and the engine evaluates the rest along those same chunk ends, the first of them at least
``tile`` long where a fresh evaluation's is.

Optionally (``settle_idle``, ``JUPYTER_LLM_IDLE_SETTLE=1``) the engine evaluates a turn's answer
again while idle instead (``settle``): the next turn's first token comes sooner, but an idle
model then burns CPU the user's next cell wants.
Settling waits for an engine with no request at all, and stops within ~10 ms when one arrives;
tokens not settled by then are evaluated again as part of the next prompt. With ``tile`` it
evaluates in tiled chunks only, what any longer prompt's fresh evaluation would tile; the last few
tokens whose class depends on the length of a prompt not seen yet are left to that prompt.
Without ``exact`` (flash attention off the CPU or with a quantized KV cache; a recurrent model, whose state cannot
be cut back) every decoded token is reused at once, as llama-server and Ollama do, and outputs
may differ from a fresh evaluation in the last bits.

A second tier (:mod:`jupyter_llm.worker.prompt_store`): before a slot drops what its new prompt
cannot reuse, the slot's KV is copied to host memory; a prompt that such a copy holds more of
than the slot does gets the copy restored into the slot, with its bookkeeping, so the rules
above apply to it as to a slot never taken over.

Runs on the engine thread only, except :attr:`SlotCache.stats`, read by the control thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .prompt_store import PromptStore


class SlotCache:
    """Per slot: the tokens whose KV its sequence holds, how many of them are settled, and
    which tokens are being settled (see the module docstring)."""

    def __init__(self, L: Any, mem: Any, parallel: int, *, n_swa: int, enabled: bool, exact: bool,
                 settle_idle: bool = False, room: int = 512, tile: int = 0, store: PromptStore | None = None) -> None:
        """``room``: the most tokens one prompt decode takes (n_ubatch); ``tile``: in exact mode,
        the chunk length from which the backend computes a chunk's tokens differently (0: none);
        ``store``: host-memory copies of what slots taken over held (None: lost)."""
        self.L, self.mem = L, mem
        self.store = store if enabled else None
        self.restored = 0
        """Prompt tokens reused from the store's copies (counted in what :meth:`reuse` returns too)."""
        self.room, self.tile = room, (tile if exact else 0)  # the classes matter only when exact
        self.settle_idle = settle_idle
        """Settle while the engine is idle (the next turn's first token comes sooner, but an idle
        model then costs CPU: ~1.9 CPU-s after a 256-token answer). Off by default: the unsettled
        tail is evaluated again as part of the next prompt, in chunks, so the reuse stays exact."""
        self.n_swa = n_swa
        self.enabled = enabled
        """Reuse a slot's KV for the common prefix of the next prompt (off: every prompt afresh)."""
        self.exact = exact
        """Reuse only KV computed as a prompt chunk; settle generated tokens when idle."""
        self.tokens: list[list[int]] = [[] for _ in range(parallel)]
        """Per slot, the tokens whose KV its sequence holds, at positions 0…len-1."""
        self.settled = [0] * parallel
        """Per slot, how many leading tokens were evaluated in chunks of two or more."""
        self.classes = [bytearray() for _ in range(parallel)]
        """Per slot and token (with ``tile``): how it was evaluated, ALONE, SMALL or TILED."""
        self.redo: list[list[int]] = [[] for _ in range(parallel)]
        """Per slot, tokens taken out of the KV to be evaluated again as a chunk (settling)."""
        self.used = [0] * parallel  # when each slot was last taken or released: the oldest goes first
        self._clock = 0
        self._in_flight = 0  # tokens of the settling chunk being decoded: still unsettled (stats)

    # -- choosing and preparing a slot ---------------------------------------------------------

    def pick(self, prompt: list[int], free: list[int]) -> int:
        """The free slot for ``prompt``: the one holding the longest prefix of it (ties: least
        recently used). A slot only counts as holding the prompt when it holds all of it, or
        when the shared prefix is at least half of what it holds, i.e. when reusing it saves
        more tokens than it throws away: a shared system prompt alone must not evict a longer
        conversation while an empty or older slot is free. Else the least recently used slot
        (whatever prefix it shares is still reused)."""
        if self.enabled:
            held = {i: self.tokens[i] + self.redo[i] for i in free}
            common = {i: common_prefix(held[i], prompt) for i in free}
            holders = [i for i in free
                       if common[i] > 0 and (common[i] == len(prompt) or 2 * common[i] >= len(held[i]))]
            if holders:
                return max(holders, key=lambda i: (common[i], -self.used[i]))
        return min(free, key=self.used.__getitem__)

    def reuse(self, slot: int, prompt: list[int]) -> int:
        """Prepare ``slot`` for ``prompt``: keep the KV of the longest usable common prefix and
        drop the rest; returns its length. At least the last two prompt tokens are always
        evaluated (the last one for its logits; two so that no token is evaluated alone)."""
        self.redo[slot] = []  # a settling in progress ends here
        if not self.enabled:
            return self.keep(slot, 0)
        n = self._usable(self.tokens[slot], self.settled[slot], self.classes[slot], prompt)
        restored = self._from_store(slot, prompt, n) if self.store is not None else 0
        n = restored or n  # (a refused restore emptied the slot: keep then keeps nothing)
        kept = self.keep(slot, n)
        self.restored += kept if restored else 0  # (kept < n: the restored state could not be cut there)
        return kept

    def _reusable(self, tokens: list[int], settled: int) -> int:
        """How many leading tokens of a slot holding ``tokens`` (``settled``) a prompt may reuse."""
        return settled if self.exact else len(tokens)

    def _usable(self, tokens: list[int], settled: int, classes: bytearray, prompt: list[int]) -> int:
        """How much of ``prompt`` a slot holding ``tokens`` (``settled``, ``classes``) may reuse."""
        n = min(common_prefix(tokens, prompt), self._reusable(tokens, settled), max(len(prompt) - 2, 0))
        if self.tile and n > 0:
            n = self._same_classes(classes, len(prompt), n)
        return n

    def _from_store(self, slot: int, prompt: list[int], n: int) -> int:
        """Before ``slot`` drops what ``prompt`` cannot reuse (``n`` tokens kept), copy it to the
        store if that is worth it; if a copy there holds more of ``prompt``, restore it instead.
        Returns how many tokens of ``prompt`` the restored copy holds (0: none restored)."""
        assert self.store is not None
        best, got = None, n
        for saved in reversed(self.store.saved):  # the most recent first: ties go to it
            usable = self._usable(saved.tokens, saved.settled, saved.classes, prompt)
            if usable > got:
                best, got = saved, usable
        if self._reusable(self.tokens[slot], self.settled[slot]) - n >= STORE_MIN:  # what a copy could give back
            self.store.save(slot, self.tokens[slot], self.settled[slot], self.classes[slot])
        if best is None:
            return 0
        self.clear(slot)
        if not self.store.restore(best, slot):  # (not seen: a copy of this very context) the slot stays empty
            return 0
        self.tokens[slot], self.settled[slot], self.classes[slot] = best.tokens, best.settled, best.classes
        return got

    def _same_classes(self, classes: bytearray, n_prompt: int, n: int) -> int:
        """The longest prefix, at most ``n``, whose tokens were evaluated as a fresh evaluation of a
        prompt of ``n_prompt`` tokens would evaluate them, and after which the engine's first chunk
        (up to that evaluation's next chunk end) is of the same class as that evaluation's."""
        start = 0
        for end in chunk_ends(n_prompt, self.room):
            cls = TILED if end - start >= self.tile else SMALL
            seg = classes[start:min(end, n)]
            same = len(seg) - len(seg.lstrip(bytes([cls])))
            if start + same < min(end, n):  # a token evaluated otherwise: reuse stops before it
                n = start + same
            if n < end:  # the first chunk evaluated, [n, end), must be of the class of [start, end)
                need = self.tile if cls == TILED else 2
                return n if n == start or end - n >= need else max(start, end - need)
            start = end
        return n

    def next_chunk(self, n_prompt: int, done: int) -> int:
        """How many tokens of a prompt of ``n_prompt`` tokens, ``done`` of them evaluated, the next
        decode takes: with ``tile``, up to where a fresh evaluation's chunk ends (see the module
        docstring); else as many as fit."""
        if not self.tile:
            return chunk_size(n_prompt - done, self.room)
        for end in chunk_ends(n_prompt, self.room):
            if end > done:
                return end - done
        raise ValueError(f"{done} of {n_prompt} prompt tokens evaluated: nothing is left")

    def keep(self, slot: int, n: int) -> int:
        """Drop the slot's KV from position ``n`` on; returns how many tokens are kept: ``n``, or
        0 when the memory cannot be cut there (a recurrent state; a sliding window that no
        longer covers the prefix) and the slot was emptied instead."""
        L, mem = self.L, self.mem
        if n > 0 and L.llama_memory_seq_rm(mem, slot, n, -1):
            # what the prefix needs is still there: every position below n (a sliding-window
            # cache only the last n_swa of them), and nothing from n on
            lowest, highest = L.llama_memory_seq_pos_min(mem, slot), L.llama_memory_seq_pos_max(mem, slot)
            if 0 <= lowest <= max(0, n - self.n_swa) and highest == n - 1:
                del self.tokens[slot][n:]
                del self.classes[slot][n:]
                self.settled[slot] = min(self.settled[slot], n)
                return n
        self.clear(slot)
        return 0

    def clear(self, slot: int) -> None:
        """Empty the slot (removing a whole sequence never fails)."""
        self.L.llama_memory_seq_rm(self.mem, slot, -1, -1)
        self.tokens[slot].clear()
        self.classes[slot].clear()
        self.redo[slot] = []
        self.settled[slot] = 0
        self._in_flight = 0

    def copy(self, src: int, dst: int) -> None:
        """Give ``dst`` the KV ``src`` holds (a prompt evaluated once for several answers). With
        per-slot KV (``kv_unified = False``) llama.cpp copies the whole stream, at the next decode."""
        self.clear(dst)
        self.L.llama_memory_seq_cp(self.mem, src, dst, -1, -1)
        self.tokens[dst] = list(self.tokens[src])
        self.classes[dst] = bytearray(self.classes[src])
        self.settled[dst] = self.settled[src]

    def touch(self, slot: int) -> None:
        """Mark the slot as just used."""
        self._clock += 1
        self.used[slot] = self._clock

    # -- bookkeeping of decodes ----------------------------------------------------------------

    def decoded(self, slot: int, tokens: list[int]) -> None:
        """``tokens`` were decoded into the slot, after what it held, in one chunk."""
        if len(tokens) >= 2 and self.settled[slot] == len(self.tokens[slot]):
            self.settled[slot] += len(tokens)
        self.tokens[slot].extend(tokens)
        self._in_flight = 0
        if self.tile:
            n = len(tokens)
            self.classes[slot].extend(bytes([ALONE if n == 1 else TILED if n >= self.tile else SMALL]) * n)

    def released(self, slot: int, *, failed: bool) -> None:
        """The slot's request ended: keep what it decoded, unless the decode failed or the
        cache is off."""
        if failed or not self.enabled:
            self.clear(slot)
        self.touch(slot)

    # -- settling (engine idle) ----------------------------------------------------------------

    def next_settle(self, chunk: int) -> tuple[int, list[int]] | None:
        """The next chunk to evaluate again and its slot (the most recently used first), or None.

        Starting a slot takes its unsettled tokens out of the KV (from the first one, or one
        earlier so that the chunk has two tokens; with ``tile``, see :meth:`_span`): they come
        back chunk by chunk, through :meth:`decoded`; if settling is interrupted,
        :meth:`interrupted` forgets the rest.
        """
        waiting = [i for i in range(len(self.tokens)) if self._unsettled(i)]
        if not waiting:
            return None
        slot = max(waiting, key=self.used.__getitem__)
        if not self.redo[slot]:
            start, end = self._span(slot) or (0, 0)
            rest = self.tokens[slot][start:end]
            if self.keep(slot, start) != start:
                return None  # the memory could not be cut: the slot was emptied
            self.redo[slot] = rest
        redo = self.redo[slot]
        take = chunk_size(len(redo), chunk)
        if self.tile and 0 < len(redo) - take < self.tile:
            take = len(redo) - self.tile  # every chunk tiled (_span: chunk >= 2 * tile)
        part, self.redo[slot] = redo[:take], redo[take:]
        self._in_flight = len(part)
        return slot, part

    def interrupted(self, slot: int) -> None:
        """A settling decode was aborted: forget what it had not put back (the engine removed
        the aborted chunk's KV)."""
        self.redo[slot] = []
        self._in_flight = 0

    def _unsettled(self, slot: int) -> int:
        """Tokens of the slot that settling would evaluate again (none if it cannot: a slot of
        one token, or not in exact mode)."""
        if not (self.enabled and self.exact):
            return 0
        if self.redo[slot]:
            return len(self.redo[slot])
        start, end = self._span(slot) or (0, 0)
        return end - start

    def _span(self, slot: int) -> tuple[int, int] | None:
        """The tokens settling would evaluate again, ``[start, end)``, or None.

        Without ``tile``: from the first unsettled token (or one earlier, so that no chunk has a
        lone token) to the end. With it, settling evaluates in tiled chunks only, since a fresh
        evaluation of any longer prompt computes these positions in chunks of at least ``tile``
        (where their boundaries fall does not matter, docs/notes.md §14): from the first token not
        tiled to the end of the slot's last ``room`` window if that window holds ``tile`` tokens
        or more, else to the window's start (a shorter next prompt could end the window in a small
        chunk: those tokens are left to it); a chunk shorter than ``tile`` starts earlier."""
        tokens = self.tokens[slot]
        n = len(tokens)
        if not self.tile:
            return None if n < 2 or self.settled[slot] >= n else (max(0, min(self.settled[slot], n - 2)), n)
        if self.room < 2 * self.tile:
            return None  # no room for a tiled chunk and what follows it
        window = n % self.room
        end = n if window == 0 or window >= self.tile else n - window
        # find scans without copying the classes
        classes = self.classes[slot]
        first = min((i for i in (classes.find(ALONE, 0, end), classes.find(SMALL, 0, end)) if i >= 0), default=end)
        if end < self.tile or first >= end:
            return None
        return min(first, end - self.tile), end

    @property
    def unsettled(self) -> int:
        """Tokens waiting to be settled, over all slots. Worked out when asked, not at each decode:
        counting ran for every slot at every decoded token, 68 µs of a 10.9 ms token with one
        client (docs/notes.md §14); the engine asks only when no slot generates, other threads
        for stats (reads only: a count a decode races with is only a little out of date)."""
        return self._in_flight + sum(self._unsettled(i) for i in range(len(self.tokens)))

    @property
    def idle_work(self) -> int:
        """Tokens the engine would settle now if it has nothing else to do (0: it may sleep)."""
        return self.unsettled if self.settle_idle else 0

    def stats(self) -> dict[str, Any]:
        """How many tokens each slot's KV holds, and how many wait to be settled."""
        store = self.store.stats() if self.store is not None else {"ram_prompts": 0, "ram_bytes": 0}
        return {"slot_tokens": [len(t) for t in self.tokens], "unsettled_tokens": self.unsettled,
                "prompt_tokens_restored": self.restored, **store}


STORE_MIN = 8
"""A slot taken over is copied to the store only when it would lose at least this many tokens a
later prompt could reuse (in exact mode its settled ones: an unsettled answer is evaluated again
anyway). On this CPU a decode costs ~7 ms plus ~4 ms a token (8 tokens: ~40 ms); copying the
default model's KV ~10 µs a token (a 600-token slot: ~6 ms)."""

ALONE, SMALL, TILED = 0, 1, 2
"""How a token was evaluated (:attr:`SlotCache.classes`): alone, in a chunk shorter than the
tile, in a chunk of at least the tile."""


def chunk_ends(n_prompt: int, room: int) -> Iterator[int]:
    """Where the chunks of a fresh evaluation of ``n_prompt`` tokens end (:func:`chunk_size` each)."""
    done = 0
    while done < n_prompt:
        done += chunk_size(n_prompt - done, room)
        yield done


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case (a chat's next turn), at C speed
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


def chunk_size(left: int, room: int) -> int:
    """How many of ``left`` tokens to evaluate now with room for ``room``: as many as fit, but
    never leaving a lone last token for later (a lone token is computed differently)."""
    take = min(left, room)
    if take < left and left - take == 1 and take > 2:
        take -= 1
    return take


__all__ = ["SlotCache", "chunk_ends", "chunk_size", "common_prefix"]
