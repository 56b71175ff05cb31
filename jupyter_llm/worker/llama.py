"""Small ctypes helpers around llama.cpp and ggml, shared by the worker's modules."""

from __future__ import annotations

import ctypes
import re
from collections import deque
from pathlib import Path
from typing import Any


def llama_said(errors: deque[str], default: str) -> str:
    """llama.cpp's own explanation of a failure: its first and last ERROR lines (without the
    function names), or ``default`` when it logged none."""
    lines = [re.sub(r"^[\w:]+: ", "", line) for line in errors]
    if not lines:
        return default
    return lines[0] if len(lines) == 1 or lines[0] == lines[-1] else f"{lines[0]}; {lines[-1]}"


def model_meta(L: Any, model: Any, key: str) -> str | None:
    """A GGUF metadata value as text, None if absent."""
    buf = ctypes.create_string_buffer(4096)
    n = L.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", "replace") if n >= 0 else None


def ggml_libraries() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """``libggml.so.0`` and ``libggml-base.so.0`` from the llama_cpp package, as libllama uses them.

    The wheel also ships unversioned copies as separate files; loading those would create a
    second, separate ggml instance with its own (empty) device registry (docs/notes.md §3).
    """
    import llama_cpp  # deferred: only ever imported in a worker or probe process

    lib_dir = Path(llama_cpp.__file__).resolve().parent / "lib"
    base = ctypes.CDLL(str(_versioned(lib_dir, "libggml-base")))
    ggml = ctypes.CDLL(str(_versioned(lib_dir, "libggml")))
    return ggml, base


def _versioned(lib_dir: Path, stem: str) -> Path:
    exact = lib_dir / f"{stem}.so.0"
    if exact.exists():
        return exact
    found = sorted(lib_dir.glob(f"{stem}.so.*")) or sorted(lib_dir.glob(f"{stem}.*"))
    if not found:
        raise FileNotFoundError(f"{stem} not found in {lib_dir}; reinstall llama-cpp-python")
    return found[0]
