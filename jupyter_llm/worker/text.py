"""Text in the worker: tokens, the chat template, fitting a conversation, and text out.

:class:`Vocab` touches only the model's vocabulary and template (read-only), so the worker's
control thread uses it while the engine thread decodes. A chat request is rendered and
tokenized once, here: :meth:`Vocab.fit` drops the oldest turns that do not fit (the one rule,
for every front end) and says how many it dropped. :class:`TextOut` turns the bytes of
generated tokens into text to stream.
"""

from __future__ import annotations

import codecs
import ctypes
from collections.abc import Callable
from typing import Any

from . import RequestError

Message = dict[str, Any]


class Vocab:
    """Tokenizing, detokenizing and chat rendering for one model."""

    def __init__(self, L: Any, model: Any) -> None:
        self.L, self.model = L, model
        self.vocab = L.llama_model_get_vocab(model)
        self.bos = L.llama_vocab_bos(self.vocab)
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self._pieces: dict[int, bytes] = {}
        self._template: Any = None

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of ``text`` with the model's vocabulary (special tokens parsed by default)."""
        data = text.encode("utf-8")
        size = len(data) + 8
        while True:
            buf = (self.L.llama_token * size)()
            n = self.L.llama_tokenize(self.vocab, data, len(data), buf, size, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            size = -n

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    def piece(self, token: int) -> bytes:
        """The bytes of one token (cached: every generated token goes through here)."""
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = self.L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self.L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def is_eog(self, token: int) -> bool:
        return bool(self.L.llama_vocab_is_eog(self.vocab, token))

    def render(self, messages: list[Message]) -> str:
        """The chat prompt: the GGUF's Jinja chat template, rendered in a sandbox."""
        if self._template is None:
            source = self.L.llama_model_chat_template(self.model, None)
            if not source:
                raise RequestError("ValueError", "this model has no chat template; use generate() "
                                   "with a prompt you format yourself")
            self._template = compile_template(source.decode("utf-8"))
        bos, eos = self._special_text(self.bos), self._special_text(self.L.llama_vocab_eos(self.vocab))
        try:
            return str(self._template.render(messages=messages, add_generation_prompt=True,
                                             bos_token=bos, eos_token=eos))
        except Exception as exc:  # a template's raise_exception(), or a malformed message
            raise RequestError("ValueError", f"the chat template refused these messages: {exc}") from exc

    def _special_text(self, token: int) -> str:
        text = self.L.llama_vocab_get_text(self.vocab, token) if token >= 0 else None
        return text.decode("utf-8", "replace") if text else ""

    def prompt_tokens(self, kind: str, payload: Any) -> list[int]:
        """Tokens of a raw prompt or of rendered chat messages, with BOS once if the model wants it."""
        tokens = self.tokenize(self.render(payload) if kind == "chat" else str(payload))
        if self.add_bos and self.bos >= 0 and (not tokens or tokens[0] != self.bos):
            tokens.insert(0, self.bos)
        return tokens

    def fit(self, messages: list[Message], *, reserve: int, n_ctx: int) -> tuple[list[int], int]:
        """Tokens of the conversation fitted by :func:`fit` (rendered and tokenized here, once
        per candidate, never in the kernel), and how many messages were dropped."""
        _, tokens, dropped = fit(messages, lambda m: self.prompt_tokens("chat", m), reserve=reserve, n_ctx=n_ctx)
        return tokens, dropped


def fit(messages: list[Message], tokens_of: Callable[[list[Message]], list[int]], *, reserve: int,
        n_ctx: int) -> tuple[list[Message], list[int], int]:
    """The one rule for a conversation that outgrows its context: drop the oldest turns until
    prompt + ``reserve`` answer tokens fit into ``n_ctx``.

    Leading system messages and the last message always stay; turns go oldest first, a whole
    exchange at a time, so the history never starts with an assistant turn. Returns the
    messages kept, their tokens and how many messages were dropped. Raises a
    ContextOverflowError (with the numbers and the context to load instead) when the system
    prompt and the last message alone do not fit.
    """
    head = 0
    while head < len(messages) - 1 and messages[head].get("role") == "system":
        head += 1
    history, last = list(messages[head:-1]), messages[-1:]
    dropped = 0
    while True:
        kept = [*messages[:head], *history, *last]
        tokens = tokens_of(kept)
        if len(tokens) + reserve <= n_ctx:
            return kept, tokens, dropped
        if not history:
            needed = len(tokens) + reserve
            raise RequestError(
                "ContextOverflowError",
                f"this message needs {len(tokens)} prompt tokens + {reserve} for the answer, but the "
                f"context holds {n_ctx}; shorten the message, lower --max-tokens, or load the model "
                f"with a larger context (`%llm load MODEL --ctx {_next_ctx(needed)}`)",
                n_tokens=needed, n_ctx=n_ctx)
        cut = 2 if len(history) >= 2 else 1
        history = history[cut:]
        dropped += cut


def _next_ctx(tokens: int) -> int:
    size = 512
    while size < tokens:
        size *= 2
    return size


class TextOut:
    """Token bytes → text to emit: never half a UTF-8 character, never part of a stop string."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stop = tuple(s for s in stop if s)
        self._held = ""

    def feed(self, piece: bytes) -> tuple[str, bool]:
        """Add one token's bytes; returns (text ready to emit, whether a stop string matched)."""
        self._held += self._decoder.decode(piece)
        if not self._stop:
            out, self._held = self._held, ""
            return out, False
        hits = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
        if hits:
            out, self._held = self._held[: min(hits)], ""
            return out, True
        keep = 0  # the longest tail that could still grow into a stop string is held back
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._held)), keep, -1):
                if self._held.endswith(s[:n]):
                    keep = n
                    break
        cut = len(self._held) - keep
        out, self._held = self._held[:cut], self._held[cut:]
        return out, False

    def flush(self) -> str:
        """What is held back, at the end of a generation that did not hit a stop string."""
        out, self._held = self._held + self._decoder.decode(b"", final=True), ""
        return out


def compile_template(source: str) -> Any:
    """A chat template compiled in an immutable Jinja sandbox (templates come from downloads)."""
    import json
    from datetime import datetime

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, ensure_ascii=False, indent=indent)
    return env.from_string(source)
