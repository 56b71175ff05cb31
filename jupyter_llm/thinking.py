"""Reasoning ("thinking") kept apart from the answer, for models whose template has markers for it.

A reasoning model writes ``<think>…</think>`` (or another pair of :data:`MARKERS`) before its
answer; some templates open the block themselves in the generation prompt (DeepSeek-R1), in
which case the worker starts the answer's text with the opening marker (``think_open``, see
``worker/prep.py``), so that one rule reads every such answer. Asking for thinking
(Ollama's ``think``, OpenAI's ``reasoning_effort``, ``Model.chat(think=True)``):

- :func:`thinking_request` checks the capability (:mod:`jupyter_llm.capabilities`; a model
  without it raises :class:`~jupyter_llm.errors.CapabilityError`) and gives the worker what
  the template expects: ``enable_thinking`` (Qwen3), ``thinking`` (DeepSeek V3.1) and, for a
  level, ``reasoning_effort`` (gpt-oss);
- :class:`ThinkingSplitter` splits the streamed text into reasoning and content, with markers
  split across chunks anywhere.

``think=False`` only tells the template (Qwen3 then writes an empty block itself); the text is
not split. A model that thinks without being asked keeps its markers in the text, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import CapabilityError

if TYPE_CHECKING:
    from .loaded import LoadedModel
    from .remote.model import RemoteModel

MARKERS = (("<think>", "</think>"), ("<thinking>", "</thinking>"), ("<seed:think>", "</seed:think>"),
           ("◁think▷", "◁/think▷"), ("[THINK]", "[/THINK]"), ("<|begin_of_thought|>", "<|end_of_thought|>"))
"""Opening and closing reasoning markers, as templates and models spell them."""
LEVELS = ("low", "medium", "high")

Think = bool | str | None
"""True/False, a level ("low", "medium", "high"), or None (not asked)."""


@dataclass(frozen=True)
class ThinkingRequest:
    """What a turn with ``think`` set sends to the worker, and the markers to split at."""

    variables: dict[str, Any]
    """For the chat template."""
    markers: tuple[str, str] | None
    """The pair to split the answer at; None when the text is not split (``think=False``)."""


def check_level(think: Any, param: str = "think") -> Think:
    """``think`` validated: a bool, None, or one of :data:`LEVELS` (ValueError otherwise)."""
    if think is None or isinstance(think, bool):
        return think
    if isinstance(think, str) and think.lower() in LEVELS:
        return think.lower()
    raise ValueError(f"'{param}' must be true, false or one of {', '.join(LEVELS)}, not {think!r}")


def markers_of(template: str) -> tuple[str, str] | None:
    """The first pair of :data:`MARKERS` a template mentions, else None."""
    for pair in MARKERS:
        if pair[0] in template or pair[1] in template:
            return pair
    return None


def thinking_request(model: LoadedModel | RemoteModel, think: Think) -> ThinkingRequest | None:
    """What to send for ``think`` on ``model`` (None when it was not asked); raises
    CapabilityError when thinking is asked of a model whose template has no reasoning."""
    think = check_level(think)
    if think is None:
        return None
    from .capabilities import capabilities
    from .store.gguf import scan_cached
    from .store.records import ModelRecord

    record = model.record
    if not isinstance(record, ModelRecord):  # its template is the remote engine's: not known here
        raise CapabilityError(f"{model.name} runs on a remote engine; thinking is split only for local models",
                              "thinking")
    ollama_template = record.ollama.get("template") or None
    info = scan_cached(record.path)
    templates = [t for t in (ollama_template, info.chat_template) if isinstance(t, str) and t]
    pair = next((p for p in map(markers_of, templates) if p), None)
    capable = "thinking" in capabilities(info, ollama_template=ollama_template)
    if not capable and pair is None:
        if think is False:
            return None  # nothing to switch off
        raise CapabilityError(f"{model.name} does not support thinking: its chat template has no reasoning "
                              "markers (the 'thinking' capability); leave out think / reasoning_effort, or use a "
                              "reasoning model (Qwen3, DeepSeek-R1…)", "thinking")
    pair = pair or MARKERS[0]
    on = think is not False
    variables: dict[str, Any] = {"enable_thinking": on, "thinking": on}
    if isinstance(think, str):
        variables["reasoning_effort"] = think
    return ThinkingRequest(variables, pair if on else None)


class ThinkingSplitter:
    """Reasoning and content of a streamed answer: :meth:`feed` each piece, :meth:`finish` at the end.

    The answer is reasoning when it begins (whitespace aside) with the opening marker, up to
    the closing one; anything else is content. A marker may arrive split over any number of
    pieces: the text that could still be the start of one is held back until it is decided.
    Whitespace right after a marker is dropped, as Ollama does.
    """

    def __init__(self, markers: tuple[str, str] = MARKERS[0]) -> None:
        self.open, self.close = markers
        self._state = "start"
        self._held = ""
        self._trim = True  # drop whitespace at the start of a section
        self.thinking = ""
        self.content = ""
        """Everything split so far."""

    def feed(self, text: str) -> tuple[str, str]:
        """Add a piece; returns (reasoning, content) that can be shown now."""
        self._held += text
        thinking, content = "", ""
        while True:
            if self._state == "start":
                head = self._held.lstrip()
                if not head or (len(head) < len(self.open) and self.open.startswith(head)):
                    break  # still could be the opening marker
                if head.startswith(self.open):
                    self._held, self._state, self._trim = head[len(self.open):], "thinking", True
                    continue
                self._state = "content"
            if self._state == "thinking":
                at = self._held.find(self.close)
                if at >= 0:
                    thinking += self._emit(self._held[:at])
                    self._held, self._state, self._trim = self._held[at + len(self.close):], "content", True
                    continue
                keep = _partial_tail(self._held, self.close)
                thinking += self._emit(self._held[:len(self._held) - keep])
                self._held = self._held[len(self._held) - keep:]
                break
            content += self._emit(self._held)
            self._held = ""
            break
        self.thinking += thinking
        self.content += content
        return thinking, content

    def finish(self) -> tuple[str, str]:
        """The end of the answer: what was held back (an unclosed block stays reasoning)."""
        rest, self._held = self._held, ""
        if self._state == "thinking":
            piece = self._emit(rest)
            self.thinking += piece
            return piece, ""
        piece = self._emit(rest.lstrip() if self._state == "start" else rest)
        self.content += piece
        self._state = "content"
        return "", piece

    def _emit(self, text: str) -> str:
        if self._trim:
            text = text.lstrip()
            self._trim = not text
        return text


def _partial_tail(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that is a start of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


__all__ = ["MARKERS", "ThinkingRequest", "ThinkingSplitter", "check_level", "markers_of", "thinking_request"]
