"""What a model can do, from its GGUF header alone (no load): Ollama's capability names.

- ``completion``: it generates text (every model that is not an embedding model);
- ``tools``: its chat template (the GGUF's, or its Ollama manifest's) takes a list of tools
  (Jinja ``tools``, Go ``.Tools``). Tool calling works with any chat model here (a template
  without tools gets them in the system prompt, see ``worker/tool_prompt.py``), but only these
  templates were trained for it, and clients treat the name as that promise;
- ``embedding``: an embedding model, as Ollama decides it: the header declares a pooling type
  (``{arch}.pooling_type``) or the architecture is an encoder (BERT and kin). Such a model is
  listed without ``completion``. ``/api/embed`` and ``/v1/embeddings`` embed with any model
  (llama.cpp pools a decoder's last hidden states too), but a chat model's vectors are poor for
  retrieval, so it is not advertised: a client that insists on the capability (``llm embed``
  with an Ollama model) is told the truth;
- ``insert``: fill-in-the-middle (``suffix``): the vocabulary has FIM tokens (the header's
  ``tokenizer.ggml.fim_pre_token_id``, or tokens such as ``<fim_prefix>``, ``<|fim_prefix|>``,
  ``<|fim▁begin|>``, ``▁<PRE>``, ``[PREFIX]``);
- ``thinking``: the template writes or strips reasoning (``<think>``, ``enable_thinking``,
  ``reasoning_content``, Go ``.Thinking``/``.IsThinkSet``).

The header scan skips the bodies of long arrays (the vocabulary), so FIM tokens are looked up
as the exact bytes of a GGUF string (length, then text) in the header's region of the file, one
bounded ``find`` per token name.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .store.gguf_info import GGUFInfo

ENCODERS = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert",
                      "neo-bert", "t5encoder", "roberta", "xlm-roberta", "eurobert"})
"""Architectures llama.cpp runs as encoders (embedding models)."""
FIM_KEYS = ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id")
FIM_TOKENS = ("<fim_prefix>", "<|fim_prefix|>", "<fim-prefix>", "<|fim▁begin|>", "<|fim_begin|>", "▁<PRE>",
              "<PRE>", "[PREFIX]")
_TOOLS = re.compile(r"\btools\b|\.Tools\b")
_THINKING = re.compile(r"<think>|</think>|\benable_thinking\b|\breasoning_content\b|\.Thinking\b|\.IsThinkSet\b"
                       r"|<\|channel\|>analysis")
MAX_HEADER_SEARCH = 256 << 20
"""The most bytes of a header searched for FIM tokens (vocabularies take a few MB)."""


def capabilities(info: GGUFInfo, *, ollama_template: str | None = None) -> list[str]:
    """The capabilities of the model whose (first) GGUF header is ``info``, in Ollama's order;
    ``ollama_template`` is its manifest's Go template, if any."""
    arch = info.architecture or ""
    if info.get(f"{arch}.pooling_type") is not None or arch in ENCODERS:
        return ["embedding"]
    templates = [t for t in (info.chat_template, ollama_template) if isinstance(t, str) and t]
    found = ["completion"]
    if any(_TOOLS.search(t) for t in templates):
        found.append("tools")
    if has_fim(info):
        found.append("insert")
    if any(_THINKING.search(t) for t in templates):
        found.append("thinking")
    return found


def of_record(record: Any) -> list[str]:
    """:func:`capabilities` of a stored model (its header scanned once per file version); []
    when its file cannot be read (a removed blob: the store's own listing says so)."""
    from .errors import JupyterLLMError
    from .store.gguf import scan_cached

    try:
        info = scan_cached(record.path)
    except (OSError, JupyterLLMError):
        return []
    return capabilities(info, ollama_template=(getattr(record, "ollama", None) or {}).get("template") or None)


def has_fim(info: GGUFInfo) -> bool:
    """Whether the vocabulary has fill-in-the-middle tokens (see the module docstring)."""
    if any(info.get(key) is not None for key in FIM_KEYS):
        return True
    try:
        with open(info.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            end = min(int(info.data_offset or size), size, MAX_HEADER_SEARCH)
            if end <= 0:
                return False
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                for token in FIM_TOKENS:
                    data = token.encode()
                    if mm.find(struct.pack("<Q", len(data)) + data, 0, end) >= 0:
                        return True
    except (OSError, ValueError):  # a file gone or unreadable: no evidence of FIM
        return False
    return False


__all__ = ["capabilities", "has_fim", "of_record"]
