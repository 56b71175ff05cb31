"""What a GGUF header says: metadata, the tensor table, and the shape facts derived from them.

Made by :func:`jupyter_llm.store.gguf.scan`; read by the store (``%llm show``), the memory
estimate and the picker.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_VALUE_TYPE_NAMES = {
    0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32",
    7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class ArrayInfo:
    """Summary of a metadata array too long to keep (e.g. a tokenizer's tokens)."""

    elem_type: int
    count: int

    @property
    def elem_type_name(self) -> str:
        return _VALUE_TYPE_NAMES.get(self.elem_type, str(self.elem_type))

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table. ``shape`` is in GGUF (ggml ``ne``) order: innermost first."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    type_name: str
    offset: int
    """Absolute byte offset of the tensor's data in the file."""
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class SplitInfo:
    """Where a file sits in a split GGUF (``split.no`` is 0-based)."""

    no: int
    count: int
    tensors_count: int | None


class _Meta:
    """A read-only attribute backed by one metadata key; None when the file lacks it."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __get__(self, obj: GGUFInfo | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        arch = obj.metadata.get("general.architecture")
        return obj.metadata.get(self.key.replace("{arch}", str(arch)))


@dataclass
class GGUFInfo:
    """Everything in a GGUF header, plus the facts the rest of jupyter_llm derives from it."""

    path: Path
    version: int
    file_size: int
    data_offset: int
    alignment: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo] = field(default_factory=list)

    # -- generic access ------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value by full key."""
        return self.metadata.get(key, default)

    def arch_get(self, key: str, default: Any = None) -> Any:
        """A metadata value under the architecture prefix, e.g. ``arch_get("block_count")``."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def tensor(self, name: str) -> TensorInfo | None:
        """The tensor table entry called ``name``, or None."""
        for t in self.tensors:
            if t.name == name:
                return t
        return None

    # -- identity and shape: plain metadata values ({arch} = the architecture prefix) ------------
    architecture = _Meta("general.architecture")
    model_name = _Meta("general.name")
    license = _Meta("general.license")
    chat_template = _Meta("tokenizer.chat_template")
    bos_token_id = _Meta("tokenizer.ggml.bos_token_id")
    eos_token_id = _Meta("tokenizer.ggml.eos_token_id")
    block_count = _Meta("{arch}.block_count")
    context_length = _Meta("{arch}.context_length")
    embedding_length = _Meta("{arch}.embedding_length")
    feed_forward_length = _Meta("{arch}.feed_forward_length")
    """An int, or a per-layer list for models whose layers differ."""
    sliding_window = _Meta("{arch}.attention.sliding_window")

    @property
    def head_count(self) -> int | None:
        """Attention heads; for per-layer counts the largest (see :meth:`head_count_per_layer`)."""
        return _scalar_max(self.arch_get("attention.head_count"))

    @property
    def head_count_kv(self) -> int | None:
        """KV heads (equal to ``head_count`` when the file does not say); largest if per layer."""
        value = self.arch_get("attention.head_count_kv")
        return _scalar_max(value) if value is not None else self.head_count

    def head_count_per_layer(self) -> list[int]:
        """Attention heads of every layer (one value repeated when the file has a scalar)."""
        return self._per_layer(self.arch_get("attention.head_count"))

    def head_count_kv_per_layer(self) -> list[int]:
        """KV heads of every layer; 0 marks a layer without attention (hybrid models)."""
        value = self.arch_get("attention.head_count_kv")
        return self._per_layer(value) if value is not None else self.head_count_per_layer()

    def _per_layer(self, value: Any) -> list[int]:
        if value is None:
            return []
        if isinstance(value, list):
            return [int(v) for v in value]
        return [int(value)] * int(self.block_count or 0)

    @property
    def head_dim(self) -> int | None:
        """Per-head key size: ``attention.key_length`` if present, else n_embd / n_head."""
        key_length = self.arch_get("attention.key_length")
        if key_length is not None:
            return int(key_length)
        n_embd, n_head = self.embedding_length, self.head_count
        return n_embd // n_head if n_embd and n_head else None

    @property
    def head_dim_v(self) -> int | None:
        """Per-head value size: ``attention.value_length`` if present, else :attr:`head_dim`."""
        value_length = self.arch_get("attention.value_length")
        return int(value_length) if value_length is not None else self.head_dim

    @property
    def vocab_size(self) -> int | None:
        """Tokenizer size, else ``<arch>.vocab_size``, else the token embedding's second dim."""
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if tokens is not None:
            return len(tokens)
        explicit = self.arch_get("vocab_size")
        if explicit is not None:
            return int(explicit)
        embd = self.tensor("token_embd.weight")
        return embd.shape[1] if embd is not None and len(embd.shape) > 1 else None

    @property
    def attention(self) -> dict[str, Any]:
        """Every ``<arch>.attention.*`` key, without the prefix (SWA, MLA, norms…)."""
        prefix = f"{self.architecture}.attention."
        return {k[len(prefix):]: v for k, v in self.metadata.items() if k.startswith(prefix)}

    # -- weights -------------------------------------------------------------------------------
    @property
    def file_type(self) -> str | None:
        """Quantization label, e.g. ``"Q4_1"``: from ``general.file_type``, else the dominant type."""
        raw = self.metadata.get("general.file_type")
        if isinstance(raw, int):
            from gguf.constants import LlamaFileType  # deferred: gguf imports numpy

            try:
                name = LlamaFileType(raw).name
            except ValueError:
                name = None
            if name and name != "GUESSED":
                return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        counts: Counter[str] = Counter()
        for t in self.tensors:
            if len(t.shape) == 2 and t.name.endswith(".weight"):
                counts[t.type_name] += t.n_elements
        return counts.most_common(1)[0][0] if counts else None

    @property
    def parameter_count(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def weights_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    def layer_bytes(self) -> dict[int, int]:
        """Tensor bytes per repeating layer ``blk.N``."""
        out: dict[int, int] = {}
        for t in self.tensors:
            m = _LAYER_RE.match(t.name)
            if m:
                i = int(m.group(1))
                out[i] = out.get(i, 0) + t.n_bytes
        return dict(sorted(out.items()))

    def non_layer_tensors(self) -> list[TensorInfo]:
        """Tensors outside ``blk.N`` (token embedding, output norm, output head…)."""
        return [t for t in self.tensors if not _LAYER_RE.match(t.name)]

    @property
    def tied_embeddings(self) -> bool:
        """True when there is no ``output.weight``: the output head reuses ``token_embd``."""
        return self.tensor("output.weight") is None

    @property
    def split(self) -> SplitInfo | None:
        count = self.metadata.get("split.count")
        if count is None:
            return None
        return SplitInfo(int(self.metadata.get("split.no", 0)), int(count),
                         self.metadata.get("split.tensors.count"))


def _scalar_max(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, list):
        return max((int(v) for v in value), default=None)
    return int(value)
