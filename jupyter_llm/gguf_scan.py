"""Fast, header-only GGUF scan: metadata, the tensor table and the shape facts derived from them.

``gguf.GGUFReader`` parses every element of every metadata array into numpy objects, which
takes seconds for a 49k-token vocabulary (and grows with it). Everything ``show``, the store
and the memory estimate need is in the header, so this module walks the header with ``struct``
over an ``mmap`` and *skips* the bodies of large arrays (tokens, merges, scores), recording only
their element type and count. Small arrays (per-layer head counts…) are kept as lists.

Corrupt input never causes a large allocation: every count and length is checked against the
bytes left in the file before it is used. The gguf package is used only for its constants
(quantization types and block sizes, file-type names).

GGUF layout (little endian unless the version field says otherwise)::

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv × (string key | u32 value type | value)
    n_tensors × (string name | u32 n_dims | n_dims × u64 ne | u32 ggml type | u64 offset)
    padding to general.alignment | tensor data
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GGUFError, TruncatedGGUFError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
SMALL_ARRAY = 1024
"""Arrays with at most this many elements are kept as lists; longer ones become ArrayInfo."""

# GGUF value types → struct format of one element (8 = string and 9 = array are special).
_STRING, _ARRAY = 8, 9
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_VALUE_TYPE_NAMES = {
    0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32",
    7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")
_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


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


def scan(path: str | os.PathLike[str], *, name: str | None = None) -> GGUFInfo:
    """Read a GGUF file's header (metadata and tensor table) without reading tensor data.

    ``name`` is the model's store name, used only to make error messages say what to re-pull.
    Raises :class:`GGUFError` for a non-GGUF or corrupt file, :class:`TruncatedGGUFError` when
    tensor data runs past the end of the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                head = f.read(size)
                if head[:4] != MAGIC:
                    raise _not_gguf(path, head)
                raise TruncatedGGUFError(
                    f"{path} ends after {size} bytes, inside the GGUF header; the download is "
                    f"incomplete: re-pull it with `%llm pull {name or '<name>'}`"
                )
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _Parser(path, mm, size, name).parse()
    except IsADirectoryError:
        raise GGUFError(f"{path} is a directory, not a GGUF file; give the .gguf file inside it") from None


_cache: dict[str, tuple[tuple[int, float], GGUFInfo]] = {}
_cache_lock = threading.Lock()


def scan_cached(path: str | os.PathLike[str]) -> GGUFInfo:
    """:func:`scan`, once per file version (size and mtime): loads, estimates and the picker's
    live re-pricing ask for the same header again and again."""
    key = os.fspath(path)
    st = os.stat(key)
    stamp = (st.st_size, st.st_mtime)
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    info = scan(key)
    with _cache_lock:
        _cache[key] = (stamp, info)
    return info


def scan_parts(paths: Iterable[str | os.PathLike[str]]) -> list[GGUFInfo]:
    """Scan every part of a split GGUF (in the given order)."""
    return [scan(p) for p in paths]


def total_weights_bytes(infos: Sequence[GGUFInfo]) -> int:
    """Tensor bytes over all parts of a (split) model."""
    return sum(i.weights_bytes for i in infos)


def split_parts(first: str | os.PathLike[str]) -> list[Path]:
    """All parts of a split GGUF named ``…-00001-of-0000N.gguf``, found next to the first.

    A file that is not named like a split part is returned alone. A missing part raises
    :class:`GGUFError` naming it.
    """
    first = Path(first)
    m = _SPLIT_RE.match(first.name)
    if not m:
        return [first]
    count = int(m.group("count"))
    stem = m.group("stem")
    parts = [first.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise GGUFError(
            f"split model {first.name} has {count} parts but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing from {first.parent}; "
            f"put every part in the same directory"
        )
    return parts


# ----------------------------------------------------------------------------------------------


def _scalar_max(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, list):
        return max((int(v) for v in value), default=None)
    return int(value)


def _not_gguf(path: Path, head: bytes) -> GGUFError:
    shown = head[:16]
    return GGUFError(
        f"{path} is not a GGUF file (starts with {shown!r}); pull a .gguf model, "
        f"e.g. `%llm pull smollm2`"
    )


class _Parser:
    """A cursor over the mapped header; every read is bounds-checked."""

    def __init__(self, path: Path, buf: mmap.mmap, size: int, name: str | None) -> None:
        self.path, self.buf, self.size, self.name = path, buf, size, name
        self.pos = 0
        self.e = "<"

    # -- errors --------------------------------------------------------------------------------
    def corrupt(self, what: str, at: int | None = None) -> GGUFError:
        where = self.pos if at is None else at
        return GGUFError(
            f"{self.path} has a corrupt GGUF header: {what} at offset {where}; the file is damaged: "
            f"delete it and pull the model again"
        )

    def truncated(self, what: str, need: int) -> TruncatedGGUFError:
        return TruncatedGGUFError(
            f"{self.path} is truncated: {what} needs the file to be at least {need:,} bytes but it "
            f"is {self.size:,}; re-pull it: `%llm pull {self.name or '<name>'}`"
        )

    # -- primitives ----------------------------------------------------------------------------
    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise self.truncated(f"{what} at offset {self.pos}", self.pos + n)

    def unpack(self, fmt: str, n: int, what: str) -> Any:
        self.need(n, what)
        (value,) = struct.unpack_from(self.e + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return int(self.unpack("I", 4, what))

    def u64(self, what: str) -> int:
        return int(self.unpack("Q", 8, what))

    def string(self, what: str) -> str:
        start = self.pos
        n = self.u64(f"length of {what}")
        if n > self.size - self.pos:
            raise self.corrupt(f"{what} claims {n:,} bytes, more than the {self.size - self.pos:,} left "
                               f"in the file", start)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    # -- values --------------------------------------------------------------------------------
    def value(self, vtype: int, key: str) -> Any:
        if vtype == _STRING:
            return self.string(f"string value of {key!r}")
        if vtype == _ARRAY:
            return self.array(key)
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is None:
            raise self.corrupt(f"unknown value type {vtype} for key {key!r}", self.pos - 4)
        return self.unpack(fmt, struct.calcsize(fmt), f"value of {key!r}")

    def array(self, key: str) -> list[Any] | ArrayInfo:
        start = self.pos
        etype = self.u32(f"array element type of {key!r}")
        count = self.u64(f"array length of {key!r}")
        fmt = _SCALAR_FORMATS.get(etype)
        if fmt is None and etype not in (_STRING, _ARRAY):
            raise self.corrupt(f"unknown array element type {etype} for key {key!r}", start)
        min_size = struct.calcsize(fmt) if fmt else (8 if etype == _STRING else 12)
        left = self.size - self.pos
        if count * min_size > left:
            raise self.corrupt(f"array {key!r} claims {count:,} elements, more than fit in the "
                               f"{left:,} bytes left", start + 4)
        if fmt is not None:
            n = count * struct.calcsize(fmt)
            if count <= SMALL_ARRAY:
                values = list(struct.unpack_from(f"{self.e}{count}{fmt}", self.buf, self.pos))
                self.pos += n
                return values
            self.pos += n
            return ArrayInfo(etype, count)
        if count <= SMALL_ARRAY:
            return [self.value(etype, f"{key}[{i}]") for i in range(count)]
        if etype == _STRING:
            self.skip_strings(count, key)
        else:  # arrays of arrays: walk them without keeping anything
            for i in range(count):
                self.array(f"{key}[{i}]")
        return ArrayInfo(etype, count)

    def skip_strings(self, count: int, key: str) -> None:
        # The hot loop of a scan (49k tokens + 49k merges for SmolLM2): keep it minimal and check
        # bounds once at the end; a wild length makes unpack_from fail or pos overshoot.
        unpack = struct.Struct(self.e + "Q").unpack_from
        buf, pos = self.buf, self.pos
        try:
            for _ in range(count):
                pos += 8 + unpack(buf, pos)[0]
        except struct.error:
            raise self.corrupt(f"string array {key!r} runs past the end of the file", pos) from None
        if pos > self.size:
            raise self.corrupt(f"string array {key!r} runs past the end of the file", self.pos)
        self.pos = pos

    # -- the header ----------------------------------------------------------------------------
    def parse(self) -> GGUFInfo:
        head = self.buf[:16]
        if head[:4] != MAGIC:
            raise _not_gguf(self.path, head)
        self.pos = 4
        version = self.u32("version")
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if version not in SUPPORTED_VERSIONS and swapped in SUPPORTED_VERSIONS:
            # A big-endian GGUF (made for s390x): the version reads byte-swapped.
            self.e, version = ">", swapped
        if version not in SUPPORTED_VERSIONS:
            raise GGUFError(
                f"{self.path} is GGUF version {version}, which jupyter_llm cannot read (it reads "
                f"versions {', '.join(map(str, SUPPORTED_VERSIONS))}); convert it with a current "
                f"llama.cpp or pull a newer file"
            )
        n_tensors = self.u64("tensor count")
        n_kv = self.u64("metadata count")
        # Each KV needs ≥ 13 bytes (key length, type, one byte); each tensor entry ≥ 24. A count
        # that real models reach means a cut-off file; a wild one means a damaged header.
        for count, min_size, sane, what, at in ((n_kv, 13, 1 << 16, "metadata count", 16),
                                                 (n_tensors, 24, 1 << 20, "tensor count", 8)):
            if count * min_size > self.size - self.pos:
                if count > sane:
                    raise self.corrupt(f"{what} {count:,} is impossible for a {self.size:,}-byte file", at)
                raise self.truncated(f"a header with {count:,} entries", self.pos + count * min_size)

        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = self.string(f"key of metadata entry {i}")
            vtype = self.u32(f"value type of {key!r}")
            metadata[key] = self.value(vtype, key)

        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise self.corrupt(f"general.alignment {alignment!r} is not a power of two", 0)

        raw_tensors = [self.tensor_entry(i) for i in range(n_tensors)]
        data_offset = -(-self.pos // alignment) * alignment
        tensors = self.resolve_tensors(raw_tensors, data_offset, alignment)
        return GGUFInfo(self.path, version, self.size, data_offset, alignment, metadata, tensors)

    def tensor_entry(self, i: int) -> tuple[str, tuple[int, ...], int, int, int]:
        start = self.pos
        name = self.string(f"name of tensor {i}")
        n_dims = self.u32(f"dimension count of tensor {name!r}")
        if n_dims == 0 or n_dims > MAX_DIMS:
            raise self.corrupt(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)",
                               self.pos - 4)
        self.need(8 * n_dims, f"shape of tensor {name!r}")
        shape = struct.unpack_from(f"{self.e}{n_dims}Q", self.buf, self.pos)
        self.pos += 8 * n_dims
        ggml_type = self.u32(f"type of tensor {name!r}")
        offset = self.u64(f"data offset of tensor {name!r}")
        return name, tuple(int(d) for d in shape), ggml_type, offset, start

    def resolve_tensors(self, raw: list[tuple[str, tuple[int, ...], int, int, int]],
                        data_offset: int, alignment: int) -> list[TensorInfo]:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # deferred: numpy

        tensors: list[TensorInfo] = []
        end_needed, end_tensor = data_offset, ""
        for name, shape, ggml_type, rel, start in raw:
            try:
                qtype = GGMLQuantizationType(ggml_type)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise self.corrupt(f"tensor {name!r} has unknown ggml type {ggml_type}", start) from None
            n_elements = 1
            for d in shape:
                n_elements *= d
            if shape[0] % block:
                raise self.corrupt(f"tensor {name!r} of type {qtype.name} has a first dimension of "
                                   f"{shape[0]}, not a multiple of its block size {block}", start)
            if n_elements > 1 << 50:
                raise self.corrupt(f"tensor {name!r} claims {n_elements:,} elements", start)
            if rel % alignment:
                raise self.corrupt(f"tensor {name!r} data offset {rel} is not aligned to {alignment}",
                                   start)
            n_bytes = n_elements // block * type_size
            offset = data_offset + rel
            tensors.append(TensorInfo(name, shape, ggml_type, qtype.name, offset, n_bytes))
            if offset + n_bytes > end_needed:
                end_needed, end_tensor = offset + n_bytes, name
        if end_needed > self.size:
            raise TruncatedGGUFError(
                f"{self.path} is truncated: tensor {end_tensor!r} ends at byte {end_needed:,} but the "
                f"file has {self.size:,} bytes ({end_needed - self.size:,} missing); the download is "
                f"incomplete: re-pull it: `%llm pull {self.name or '<name>'}`"
            )
        return tensors
