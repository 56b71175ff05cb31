"""An answer (or a streamed piece of one) that is a ``str`` and also carries reasoning and log probabilities.

``Model.chat(..., think=True)`` and ``logprobs=k`` return an :class:`Answer`: the text, so every
use of the plain string keeps working, with ``.thinking`` (the reasoning split off the answer,
see :mod:`jupyter_llm.thinking`) and ``.logprobs`` (one
:class:`~jupyter_llm.runtime.stream.TokenLogprob` per generated token: the model's raw
distribution at that step). With ``stream=True`` every piece is an Answer of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class Answer(str):
    """Text with ``thinking`` (None when thinking was not asked for) and ``logprobs`` (a tuple
    when asked for, else None)."""

    thinking: str | None
    logprobs: tuple[Any, ...] | None

    def __new__(cls, text: str, thinking: str | None = None, logprobs: tuple[Any, ...] | None = None) -> Answer:
        answer = super().__new__(cls, text)
        answer.thinking, answer.logprobs = thinking, logprobs
        return answer

    @classmethod
    def of_chunk(cls, chunk: Any, *, thinking: bool, logprobs: bool) -> Answer:
        """A streamed piece (a :class:`~jupyter_llm.runtime.stream.Chunk`)."""
        return cls(chunk.text, chunk.thinking if thinking else None, tuple(chunk.logprobs) if logprobs else None)

    @classmethod
    def joined(cls, pieces: Iterable[Answer]) -> Answer:
        """The whole answer of its streamed pieces."""
        parts = list(pieces)
        first = parts[0] if parts else cls("")
        thinking = "".join(p.thinking or "" for p in parts) if first.thinking is not None else None
        lps = tuple(lp for p in parts for lp in p.logprobs or ()) if first.logprobs is not None else None
        return cls("".join(parts), thinking, lps)


__all__ = ["Answer"]
