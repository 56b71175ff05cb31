"""One answer the decode engine is generating: its slot, how far its prompt is, its sampler, its text.

Made by the thread preparing the request (:func:`answers`), then engine-thread state only
(:mod:`jupyter_llm.worker.engine`); a request for ``n`` answers is ``n`` of these sharing one
``rid``, the first holding the group.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .direct import DirectOut
from .sampler import Sampler, sampler_chain
from .text import TextOut


@dataclass(eq=False)
class Generation:
    """One answer in the engine (see the module docstring)."""

    rid: int
    tokens: list[int]
    chain: Sampler
    max_tokens: int | None
    out: TextOut
    seed: int
    t_recv: float = field(default_factory=time.perf_counter)
    t_start: float = 0.0
    cancelled: bool = False
    slot: int = -1
    n_past: int = 0
    n_prompt_done: int = 0
    n_cached: int = 0
    last_token: int = -1
    n_gen: int = 0
    n_unsent: int = 0
    t_first: float = 0.0
    t_last: float = 0.0
    index: int = 0
    """Which of the request's answers this is (``n`` > 1); all share ``rid``."""
    group: list[Generation] = field(default_factory=list)
    left: int = 1
    """On the first answer: all answers (itself first), and how many have not finished."""
    head: Generation | None = None
    """The first answer of the group (None on the first itself)."""
    waiting: bool = False
    """An answer holding its slot until the first answer's prompt is evaluated and copied."""
    top: int | None = None
    """Log probabilities asked for: None none, else the alternatives per token (0…20)."""
    lp: list[Any] = field(default_factory=list)
    """Log-probability entries not sent yet (they go with the next text)."""
    prefix: str = ""
    """Text sent before the first token's (the reasoning marker the template opened)."""
    direct: DirectOut | None = None
    """Written into the HTTP client's socket once the kernel attaches it (:mod:`.direct`)."""
    every: float = 0.0
    """Seconds text may be held back after the first piece (the kernel's ``Extras.every``)."""
    held: str = ""
    t_sent: float = 0.0

    @property
    def plain(self) -> bool:
        """One answer without log probabilities: its messages carry nothing extra."""
        return self.top is None and self.head is None and len(self.group) <= 1

    def due(self, text: str, now: float) -> str:
        """What to send now: ``text`` after the prefix and what was held back, or "" while
        ``every`` holds it (the first text goes at once; each message wakes the kernel on the
        cores the decode needs)."""
        if self.t_sent and now - self.t_sent < self.every:
            self.held += text
            return ""
        text, self.held, self.prefix = self.prefix + self.held + text, "", ""
        if text:
            self.t_sent = now
        return text

    def extra(self) -> dict[str, Any]:
        """The answer's index and the log-probability entries not sent yet (when asked for)."""
        if self.top is None:
            return {"index": self.index}
        lp, self.lp = self.lp, []
        return {"index": self.index, "logprobs": lp}


def answers(L: Any, vocab: Any, rid: int, tokens: list[int], sampling: dict[str, Any], grammar: str | None,
            extra: dict[str, Any], errors: deque[str]) -> list[Generation]:
    """The ``extra["n"]`` answers of one request (the engine checked it), the first holding the
    group; each its own sampler and seed, so that they differ when sampled. Raises RequestError
    when the grammar does not parse."""
    n, top = int(extra.get("n") or 1), extra.get("logprobs")
    seed = sampling["seed"]
    seed = random.getrandbits(32) if seed is None else int(seed) & 0xFFFFFFFF
    group: list[Generation] = []
    for i in range(n):
        own = (seed + i) & 0xFFFFFFFF  # each answer its own seed
        chain = sampler_chain(L, vocab, sampling, grammar, own, errors)
        group.append(Generation(rid, tokens, chain, sampling["max_tokens"], TextOut(tuple(sampling["stop"] or ())),
                                own, index=i, top=None if top is None else int(top),
                                prefix=str(extra.get("prefix") or ""), every=float(extra.get("every") or 0.0)))
    first = group[0]
    first.group, first.left = group, n
    if extra.get("direct") and first.plain:  # (the kernel asks only for plain answers)
        first.direct = DirectOut(*map(bytes, extra["direct"]), cancel=lambda: setattr(first, "cancelled", True))
    for req in group[1:]:
        req.head = first
    return group


__all__ = ["Generation", "answers"]
