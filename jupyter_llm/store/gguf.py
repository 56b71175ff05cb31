"""Fast, header-only GGUF scan: metadata, the tensor table and the shape facts derived from them.

``gguf.GGUFReader`` parses every element of every metadata array into numpy objects, which
takes seconds for a 49k-token vocabulary (and grows with it). Everything ``show``, the store
and the memory estimate need is in the header, so this module walks the header with ``struct``
over an ``mmap`` and *skips* the bodies of large arrays (tokens, merges, scores), recording only
their element type and count. Small arrays (per-layer head counts…) are kept as lists.

Corrupt input never causes a large allocation: every count and length is checked against the
bytes left in the file before it is used. :func:`scan_prefix` parses the first bytes of a file
that is elsewhere (a remote GGUF read by ranges, :mod:`jupyter_llm.store.peek`) and raises
:class:`NeedMoreBytes` when the header continues past them. The gguf package is used only for its constants
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
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import GGUFError, TruncatedGGUFError
from .gguf_info import ArrayInfo, GGUFInfo, SplitInfo, TensorInfo

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
SMALL_ARRAY = 1024
"""Arrays with at most this many elements are kept as lists; longer ones become ArrayInfo."""

# GGUF value types → struct format of one element (8 = string and 9 = array are special).
_STRING, _ARRAY = 8, 9
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


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


class NeedMoreBytes(Exception):
    """The header continues past the bytes :func:`scan_prefix` was given: read at least ``need``."""

    def __init__(self, need: int) -> None:
        super().__init__(f"the GGUF header continues past the bytes read; at least {need:,} are needed")
        self.need = need


def scan_prefix(data: bytes, size: int, *, where: str, name: str | None = None) -> GGUFInfo:
    """:func:`scan` for a file known only by its first ``len(data)`` of ``size`` bytes.

    ``where`` names the file in messages and becomes the info's ``path``. Raises
    :class:`NeedMoreBytes` when the header (metadata and tensor table) runs past ``data``, and
    the errors of :func:`scan` for a header that is not GGUF, corrupt or longer than ``size``.
    """
    label = Path(where)
    if size < 24 or len(data) < min(size, 24):
        if len(data) >= 4 and data[:4] != MAGIC:
            raise _not_gguf(where, data)
        if size < 24:
            raise TruncatedGGUFError(f"{where} has only {size} bytes, less than a GGUF header; it is not a model")
        raise NeedMoreBytes(24)
    return _Parser(label, data, size, name, where=where).parse()


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


def _not_gguf(path: Path | str, head: bytes) -> GGUFError:
    shown = head[:16]
    return GGUFError(
        f"{path} is not a GGUF file (starts with {shown!r}); pull a .gguf model, "
        f"e.g. `%llm pull smollm2`"
    )


class _Parser:
    """A cursor over the mapped header; every read is bounds-checked."""

    def __init__(self, path: Path, buf: mmap.mmap | bytes, size: int, name: str | None,
                 where: str | None = None) -> None:
        self.path, self.buf, self.size, self.name = path, buf, size, name
        self.where = where or str(path)
        """The file as messages name it (a remote file's address)."""
        self.avail = min(len(buf), size)
        """Bytes of the file in ``buf``: all of them for a mapped file, a prefix for a remote one."""
        self.pos = 0
        self.e = "<"

    # -- errors --------------------------------------------------------------------------------
    def corrupt(self, what: str, at: int | None = None) -> GGUFError:
        where = self.pos if at is None else at
        return GGUFError(
            f"{self.where} has a corrupt GGUF header: {what} at offset {where}; the file is damaged: "
            f"delete it and pull the model again"
        )

    def truncated(self, what: str, need: int) -> TruncatedGGUFError:
        return TruncatedGGUFError(
            f"{self.where} is truncated: {what} needs the file to be at least {need:,} bytes but it "
            f"is {self.size:,}; re-pull it: `%llm pull {self.name or '<name>'}`"
        )

    # -- primitives ----------------------------------------------------------------------------
    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise self.truncated(f"{what} at offset {self.pos}", self.pos + n)
        if self.pos + n > self.avail:
            raise NeedMoreBytes(self.pos + n)

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
        if self.pos + n > self.avail:
            raise NeedMoreBytes(self.pos + n)
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
                self.need(n, f"values of {key!r}")
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
            if self.avail < self.size and pos + 8 <= self.size:
                raise NeedMoreBytes(pos + 8) from None  # only a prefix of the file is here
            raise self.corrupt(f"string array {key!r} runs past the end of the file", pos) from None
        if pos > self.size:
            raise self.corrupt(f"string array {key!r} runs past the end of the file", self.pos)
        if pos > self.avail:
            raise NeedMoreBytes(pos)
        self.pos = pos

    # -- the header ----------------------------------------------------------------------------
    def parse(self) -> GGUFInfo:
        head = self.buf[:16]
        if head[:4] != MAGIC:
            raise _not_gguf(self.where, head)
        self.pos = 4
        version = self.u32("version")
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if version not in SUPPORTED_VERSIONS and swapped in SUPPORTED_VERSIONS:
            # A big-endian GGUF (made for s390x): the version reads byte-swapped.
            self.e, version = ">", swapped
        if version not in SUPPORTED_VERSIONS:
            raise GGUFError(
                f"{self.where} is GGUF version {version}, which jupyter_llm cannot read (it reads "
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
                f"{self.where} is truncated: tensor {end_tensor!r} ends at byte {end_needed:,} but the "
                f"file has {self.size:,} bytes ({end_needed - self.size:,} missing); the download is "
                f"incomplete: re-pull it: `%llm pull {self.name or '<name>'}`"
            )
        return tensors


__all__ = ["ArrayInfo", "GGUFInfo", "NeedMoreBytes", "SplitInfo", "TensorInfo", "scan", "scan_cached", "scan_parts",
           "scan_prefix", "split_parts", "total_weights_bytes"]
