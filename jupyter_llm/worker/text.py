"""Text in the worker: tokens, the chat template, fitting a conversation, and text out.

:class:`Vocab` touches only the model's vocabulary and template (read-only), so the threads
that prepare requests use it while the engine thread decodes. A chat request is rendered and
tokenized once, here: :meth:`Vocab.fit` drops the oldest turns that do not fit (the one rule,
for every front end) and says how many it dropped. :class:`TextOut` turns the bytes of
generated tokens into text to stream.

Long prompts. llama.cpp's tokenizer cannot be interrupted and is quadratic in the special
tokens of one call (200,000 ``<|im_start|>``, 2.4 MB, took 70 s), so:

- **the byte bound**: a token stands for at most :attr:`Vocab.bytes_per_token` bytes of the
  input (its longest piece, for SPM and BPE vocabularies, whose pieces are the input's own
  bytes), so a prompt of more than ``n_ctx × bytes_per_token`` bytes cannot fit and is refused
  before any tokenizing; for other tokenizers (which normalize, or tokens that swallow the
  whitespace around them) ``ASSUMED_BYTES_PER_TOKEN`` is used instead;
- **chunks**: the text is tokenized in pieces of about ``chunk_bytes``, cut just before a
  special token where llama.cpp itself cuts the text (it tokenizes the fragments between special
  tokens separately), so the tokens are exactly those of one call; between two pieces the
  caller may stop (a cancel), and counting stops as soon as the prompt has more tokens than fit.
"""

from __future__ import annotations

import codecs
import ctypes
from collections.abc import Callable, Iterator
from typing import Any

from . import PromptTooLong, RequestError, gotemplate, tool_prompt
from .template import Meter, compile_template, render

Message = dict[str, Any]
CHUNK_BYTES = 8192
"""Characters per tokenizer call: a few ms even when they are all special tokens."""
ASSUMED_BYTES_PER_TOKEN = 64
"""The byte bound of tokenizers whose tokens may stand for more than their piece (WPM, UGM …)."""
TEMPLATE_SECONDS = 10.0
"""How long the chat template may run for one request (all of its renders when fitting): real
templates take milliseconds, a thousand-message conversation well under a second."""


class Vocab:
    """Tokenizing, detokenizing and chat rendering for one model."""

    def __init__(self, L: Any, model: Any, *, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.L, self.model = L, model
        self.vocab = L.llama_model_get_vocab(model)
        self.bos = L.llama_vocab_bos(self.vocab)
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self.chunk_bytes = chunk_bytes
        self.template_seconds = TEMPLATE_SECONDS
        self._pieces: dict[int, bytes] = {}
        self._template: Any = None
        self._source = ""
        self.ollama_template: str | None = None
        """An Ollama (Go) chat template from the model's manifest; it wins over the GGUF's, as in
        Ollama, when :mod:`~jupyter_llm.worker.gotemplate` can render it."""
        self._single_turn = False
        self.bytes_per_token = self._scan_vocabulary()
        """At most how many input bytes one token stands for (see the module docstring)."""
        self._affixes = self._special_affixes()

    def _scan_vocabulary(self) -> int:
        """Collect the texts llama.cpp splits at (special tokens) and the byte bound."""
        L, vocab = self.L, self.vocab
        partitioned = L.LLAMA_TOKEN_ATTR_CONTROL | L.LLAMA_TOKEN_ATTR_USER_DEFINED | L.LLAMA_TOKEN_ATTR_UNKNOWN
        strip = L.LLAMA_TOKEN_ATTR_LSTRIP | L.LLAMA_TOKEN_ATTR_RSTRIP
        self._specials: list[tuple[str, bool, bool]] = []  # (text, parsed only as special, strips left)
        longest, strips = 4, False  # 4: an unknown character is one token
        buf = ctypes.create_string_buffer(256)
        for token in range(L.llama_vocab_n_tokens(vocab)):
            attr = L.llama_vocab_get_attr(vocab, token)
            n = L.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
            longest = max(longest, n if n >= 0 else -n)
            if attr & partitioned:
                strips = strips or bool(attr & strip)
                text = (L.llama_vocab_get_text(vocab, token) or b"").decode("utf-8", "replace")
                if text:
                    self._specials.append((text, not attr & L.LLAMA_TOKEN_ATTR_USER_DEFINED,
                                           bool(attr & L.LLAMA_TOKEN_ATTR_LSTRIP)))
        self._specials.sort(key=lambda s: -len(s[0]))
        exact = L.llama_vocab_type(vocab) in (L.LLAMA_VOCAB_TYPE_SPM, L.LLAMA_VOCAB_TYPE_BPE) and not strips
        return longest if exact else max(longest, ASSUMED_BYTES_PER_TOKEN)

    def _special_affixes(self) -> tuple[list[int], list[int]] | None:
        """What ``add_special`` puts before and after the text (BOS, EOS, CLS …), or None if
        that cannot be told apart (then such calls are tokenized whole)."""
        body = whole_tokens(self.L, self.vocab, "a", False, False)
        full = whole_tokens(self.L, self.vocab, "a", True, False)
        for i in range(len(full) - len(body) + 1):
            if full[i:i + len(body)] == body:
                return full[:i], full[i + len(body):]
        return None

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True, *,
                 limit: int | None = None, check: Callable[[], None] | None = None) -> list[int]:
        """Token ids of ``text`` with the model's vocabulary (special tokens parsed by default),
        exactly those of one llama.cpp call, made in chunks: ``check()`` runs before each (it may
        raise to stop), and more than ``limit`` tokens raise PromptTooLong once counted."""
        if add_special and self._affixes is None:
            return whole_tokens(self.L, self.vocab, text, True, parse_special)
        head, tail = self._affixes if add_special and self._affixes else ([], [])
        tokens = list(head)
        for piece in self._chunks(text, parse_special):
            if check is not None:
                check()
            tokens += whole_tokens(self.L, self.vocab, piece, False, parse_special)
            if limit is not None and len(tokens) > limit:
                raise PromptTooLong(f"the prompt has more than {limit} tokens (counting stopped at {len(tokens)})",
                                    n_tokens=len(tokens), n_ctx=limit)
        return tokens + tail

    def check_bytes(self, text: str, n_ctx: int) -> None:
        """Refuse, without tokenizing, a text too long in bytes to fit ``n_ctx`` tokens."""
        n_bytes = len(text.encode("utf-8"))
        if n_bytes > n_ctx * self.bytes_per_token:
            at_least = -(-n_bytes // self.bytes_per_token)
            raise PromptTooLong(f"the prompt is {n_bytes:,} bytes, so at least {at_least:,} tokens (a token of "
                                f"this model stands for at most {self.bytes_per_token} bytes); it was not tokenized",
                                n_tokens=at_least, n_ctx=n_ctx)

    def _chunks(self, text: str, parse_special: bool) -> Iterator[str]:
        specials = [s for s in self._specials if parse_special or not s[1]]
        start, found = 0, {s[0]: -2 for s in specials}  # the next occurrence of each, -1 for none
        while len(text) - start > self.chunk_bytes and specials:
            cut = self._cut(text, start + self.chunk_bytes, specials, found)
            if cut is None:
                break
            yield text[start:cut]
            start = cut
        yield text[start:]

    def _cut(self, text: str, at: int, specials: list[tuple[str, bool, bool]], found: dict[str, int]) -> int | None:
        """The first position from ``at`` on where llama.cpp's own partition starts a special
        token, so that cutting there changes no token; None if there is none."""
        while True:
            for s, _, _ in specials:
                if -1 < found[s] < at or found[s] == -2:
                    found[s] = text.find(s, at)
            hits = [p for p in found.values() if p >= at]
            if not hits:
                return None
            p = min(hits)
            if self._clean(text, p, specials):
                return p
            at = p + 1

    @staticmethod
    def _clean(text: str, p: int, specials: list[tuple[str, bool, bool]]) -> bool:
        # The longest special token at p is one llama.cpp takes (it matches the longest first)
        # unless another occurrence overlaps it or crosses p; and a token that strips the
        # whitespace before it would change the piece before p.
        here = next(s for s in specials if text.startswith(s[0], p))
        if here[2] and p > 0 and text[p - 1].isspace():
            return False
        length = len(here[0])
        for s, _, _ in specials:
            crossing = text.find(s, max(p - len(s) + 1, 0), p + len(s) - 1)
            if -1 < crossing < p:
                return False
            inside = text.find(s, p + 1, p + length - 1 + len(s))
            if -1 < inside < p + length:
                return False
        return True

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

    def meter(self, n_ctx: int, cancelled: Callable[[], bool] = lambda: False) -> Meter:
        """The limits of one request's template renders for a context of ``n_ctx`` tokens."""
        return Meter(n_ctx=n_ctx, bytes_per_token=self.bytes_per_token, seconds=self.template_seconds,
                     cancelled=cancelled)

    def render(self, payload: list[Message] | dict[str, Any], meter: Meter,
               variables: dict[str, Any] | None = None) -> str:
        """The chat prompt: the GGUF's Jinja chat template, rendered in a sandbox under ``meter``
        (``payload``: the messages, or messages and tools, see :mod:`.tool_prompt`)."""
        if self._template is None:
            self._source = self._template_source()
            self._template = compile_template(self._source, meter)
        messages, extra = tool_prompt.prepare(self._source, *tool_prompt.unpack(payload))
        bos, eos = self._special_text(self.bos), self._special_text(self.L.llama_vocab_eos(self.vocab))
        if self._single_turn:
            return gotemplate.render_turns(lambda **values: render(self._template, meter, **values), messages)
        # as Ollama's templates see it: .System joins the system messages, .Messages keeps them all
        system = "\n\n".join(m.get("content") or "" for m in messages if m.get("role") == "system")
        return render(self._template, meter, messages=messages, add_generation_prompt=True, bos_token=bos,
                      eos_token=eos, system=system, **extra, **(variables or {}))

    def _template_source(self) -> str:
        """The Jinja source to render chats with: the manifest's Ollama template translated, else
        the GGUF's own; a RequestError saying why when there is neither."""
        problem = ""
        if self.ollama_template:
            try:
                source = gotemplate.to_jinja(self.ollama_template)
                self._single_turn = not gotemplate.is_multi_turn(self.ollama_template)
                return source
            except ValueError as exc:
                problem = f" (its Ollama template cannot be used: {exc})"
        raw = self.L.llama_model_chat_template(self.model, None)
        if not raw:
            raise RequestError("ValueError", f"this model has no chat template{problem}; use generate() "
                               "with a prompt you format yourself")
        return str(raw.decode("utf-8", "replace"))

    def _special_text(self, token: int) -> str:
        text = self.L.llama_vocab_get_text(self.vocab, token) if token >= 0 else None
        return text.decode("utf-8", "replace") if text else ""

    def prompt_tokens(self, kind: str, payload: Any, meter: Meter, *, limit: int | None = None,
                      check: Callable[[], None] | None = None, variables: dict[str, Any] | None = None) -> list[int]:
        """Tokens of a raw prompt or of rendered chat messages, with BOS once if the model wants
        it; more than ``limit`` raise PromptTooLong, found out as early as possible. ``variables``:
        more for the chat template (``enable_thinking``…)."""
        text = self.render(payload, meter, variables) if kind == "chat" else str(payload)
        if limit is not None:
            self.check_bytes(text, limit)
        tokens = self.tokenize(text, limit=limit, check=check)
        if self.add_bos and self.bos >= 0 and (not tokens or tokens[0] != self.bos):
            tokens.insert(0, self.bos)
        return tokens

    def fit(self, payload: list[Message] | dict[str, Any], meter: Meter, *, reserve: int, n_ctx: int,
            check: Callable[[], None] | None = None, variables: dict[str, Any] | None = None) -> tuple[list[int], int]:
        """Tokens of the conversation fitted by :func:`fit` (rendered and tokenized here, once
        per candidate, never in the kernel), and how many messages were dropped (tools stay)."""
        messages, tools = tool_prompt.unpack(payload)
        _, tokens, dropped = fit(messages, lambda m: self.prompt_tokens(
            "chat", tool_prompt.pack(m, tools), meter, limit=n_ctx - reserve, check=check, variables=variables),
            reserve=reserve, n_ctx=n_ctx)
        return tokens, dropped


def whole_tokens(L: Any, vocab: Any, text: str, add_special: bool, parse_special: bool) -> list[int]:
    """Token ids of ``text`` in one llama.cpp call (which cannot be interrupted)."""
    data = text.encode("utf-8")
    size = len(data) + 8
    while True:
        buf = (L.llama_token * size)()
        n = L.llama_tokenize(vocab, data, len(data), buf, size, add_special, parse_special)
        if n >= 0:
            return list(buf[:n])
        size = -n


def fit(messages: list[Message], tokens_of: Callable[[list[Message]], list[int]], *, reserve: int,
        n_ctx: int) -> tuple[list[Message], list[int], int]:
    """The one rule for a conversation that outgrows its context: drop the oldest turns until
    prompt + ``reserve`` answer tokens fit into ``n_ctx``. ``tokens_of`` may raise
    PromptTooLong for a candidate it knows to be too long without counting it all.

    Leading system messages and the last message always stay; turns go oldest first, a whole
    exchange at a time, so the history never starts with an assistant turn. Returns the
    messages kept, their tokens and how many messages were dropped. Raises a
    ContextOverflowError (with the numbers and the context to load instead) when the system
    prompt and the last message alone do not fit. The fewest drops that fit are found by
    bisection (dropping turns never lengthens a prompt): a few renders, not one per exchange.
    """
    head = 0
    while head < len(messages) - 1 and messages[head].get("role") == "system":
        head += 1
    history = messages[head:-1]
    cuts = sorted({min(n, len(history)) for n in range(0, len(history) + 2, 2)})  # messages dropped

    def attempt(i: int) -> tuple[list[Message], list[int] | None, int, str]:
        """The candidate without the ``cuts[i]`` oldest messages: its tokens if it fits, how many
        tokens it has (at least), and how that is known."""
        kept = [*messages[:head], *history[cuts[i]:], *messages[-1:]]
        try:
            tokens = tokens_of(kept)
        except PromptTooLong as exc:  # counting stopped once it could not fit
            return kept, None, exc.n_tokens, f"at least {exc.n_tokens} prompt tokens ({exc})"
        fits = len(tokens) + reserve <= n_ctx
        return kept, (tokens if fits else None), len(tokens), f"{len(tokens)} prompt tokens"

    fits, fewest = {0: attempt(0)}, 0
    if fits[0][1] is None:
        fewest = len(cuts) - 1
        fits[fewest] = attempt(fewest)
        _, tokens, n_tokens, counted = fits[fewest]
        if tokens is None:
            needed = n_tokens + reserve
            raise RequestError(
                "ContextOverflowError",
                f"this message needs {counted} + {reserve} for the answer, but the "
                f"context holds {n_ctx}; shorten the message, lower --max-tokens, or load the model "
                f"with a larger context (`%llm load MODEL --ctx {_next_ctx(needed)}`)",
                n_tokens=needed, n_ctx=n_ctx)
        low = 0  # cuts[low] does not fit, cuts[fewest] does
        while fewest - low > 1:
            mid = (low + fewest) // 2
            fits[mid] = attempt(mid)
            low, fewest = (low, mid) if fits[mid][1] is not None else (mid, fewest)
    kept, tokens, _, _ = fits[fewest]
    assert tokens is not None
    return kept, tokens, cuts[fewest]


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
        self.matched: str | None = None
        """The stop string that ended the text (the earliest in it; Anthropic's ``stop_sequence``)."""

    def feed(self, piece: bytes) -> tuple[str, bool]:
        """Add one token's bytes; returns (text ready to emit, whether a stop string matched)."""
        self._held += self._decoder.decode(piece)
        if not self._stop:
            out, self._held = self._held, ""
            return out, False
        hits = [(i, s) for s in self._stop if (i := self._held.find(s)) >= 0]
        if hits:
            at, self.matched = min(hits, key=lambda hit: hit[0])
            out, self._held = self._held[:at], ""
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

