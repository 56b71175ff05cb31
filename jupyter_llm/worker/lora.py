"""LoRA adapters on the worker's one context (a derived model's ADAPTER lines).

The adapters arrive in the load options (``lora``: (GGUF path, scale) pairs) and are set once,
before the warm-up decode, for the worker's lifetime: every slot and every cached prompt prefix
of this worker was computed with the same adapter set, so the prompt cache never reuses KV
across adapters (a model with other adapters is another name, hence another worker). The
adapter GGUF's keys and tensor shapes, and the calls: docs/notes.md §4.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any


def attach(L: Any, model: Any, ctx: Any, adapters: Sequence[Sequence[Any]]) -> tuple[list[Any], str | None]:
    """Load each adapter for ``model`` and set them all on ``ctx``; returns the adapter handles
    (freed with the model) and None, or what failed (llama.cpp's log says why in detail)."""
    handles: list[Any] = []
    if not adapters:
        return handles, None
    for path, _scale in adapters:
        handle = L.llama_adapter_lora_init(model, str(path).encode())
        if not handle:
            return handles, f"llama.cpp could not load the LoRA adapter {path} (made for another model?)"
        handles.append(handle)
    array = (L.llama_adapter_lora_p_ctypes * len(handles))(*handles)
    scales = (ctypes.c_float * len(handles))(*(float(scale) for _path, scale in adapters))
    rc = L.llama_set_adapters_lora(ctx, array, len(handles), scales)
    if rc != 0:
        return handles, f"llama.cpp could not set the LoRA adapters on the context ({rc})"
    return handles, None
