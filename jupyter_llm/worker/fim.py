"""Fill-in-the-middle prompts: the text before and after a gap, in the model's FIM tokens.

The layout is llama-server's infill (prefix, suffix, middle: "PSM"): ``[BOS] <FIM_PRE> prefix
<FIM_SUF> suffix <FIM_MID>``, after which the model writes what goes into the gap. llama.cpp
finds the three tokens in the vocabulary (``tokenizer.ggml.fim_*_token_id`` or their usual
texts, ``<fim_prefix>``/``<|fim_prefix|>``…). A model without them cannot insert: the request
is refused naming the capability, as Ollama's ``/api/show`` calls it (``insert``). The user's
text is tokenized without parsing special tokens, so a ``<fim_middle>`` typed into code stays text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from . import RequestError

if TYPE_CHECKING:
    from .text import Vocab


def fim_tokens(vocab: Vocab, prefix: str, suffix: str, *, limit: int,
               check: Callable[[], None] | None = None) -> list[int]:
    """The infill prompt for the gap between ``prefix`` and ``suffix``; raises RequestError
    ("CapabilityError") for a model without FIM tokens, PromptTooLong beyond ``limit`` tokens."""
    L, v = vocab.L, vocab.vocab
    pre, suf, mid = L.llama_vocab_fim_pre(v), L.llama_vocab_fim_suf(v), L.llama_vocab_fim_mid(v)
    if min(pre, suf, mid) < 0:
        raise RequestError("CapabilityError", "this model cannot fill in the middle (it lacks the 'insert' "
                           "capability: its vocabulary has no FIM prefix/suffix/middle tokens); leave out 'suffix', "
                           "or use a code model made for infilling", capability="insert")
    vocab.check_bytes(prefix + suffix, limit)
    tokens = [vocab.bos] if vocab.add_bos and vocab.bos >= 0 else []
    tokens.append(pre)
    tokens += vocab.tokenize(prefix, parse_special=False, limit=limit, check=check)
    tokens.append(suf)
    tokens += vocab.tokenize(suffix, parse_special=False, limit=limit, check=check)
    tokens.append(mid)
    return tokens
