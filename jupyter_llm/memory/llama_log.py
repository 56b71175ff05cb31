"""Turn llama.cpp's log into the memory it really allocated, per device.

llama.cpp reports every buffer it allocates through its log callback, one line each, and this
is the only place those numbers leave the library (its C++ breakdown API returns a std::map and
cannot be called through ctypes). The lines parsed here, as the vendored llama.cpp prints them::

    load_tensors:   CPU_Mapped model buffer size =    92.10 MiB
    llama_kv_cache:        CPU KV buffer size =    90.00 MiB
    llama_kv_cache: size =   90.00 MiB (  4096 cells,  30 layers,  1/1 seqs), K (f16): …, V (f16): …
    llama_context:        CPU  output buffer size =     0.19 MiB
    sched_reserve:        CPU compute buffer size =    98.25 MiB
    llama_context: n_ctx                 = 4096

Buffer names map to devices like this (``device_of``):

- ``CPU``, ``CPU_Mapped`` (the mmapped file), ``CPU_REPACK``/``AMX``/… (repacked weight copies,
  allocated *in addition* to the mapped file, so they add to the host's weights), and every
  ``*_Host`` buffer (pinned host memory such as ``CUDA_Host``) count as host memory: ``"CPU"``.
- Device buffers keep their name: ``CUDA0``, ``Vulkan1``, ``ROCm0``, ``Metal``… A row-split
  buffer (``CUDA0_Split``) counts on its device.

Memory of recurrent models (``RS buffer``) is counted as KV. In a dry run (``no_alloc``) the
per-buffer model and KV lines print 0; the KV total still comes from the ``size =`` line
(:attr:`MemoryLog.kv_size`) and the compute lines are exact.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

LEVEL_CONT = 5
"""ggml's level for a continuation of the previous message (real levels: 1 DEBUG … 4 ERROR)."""

MIB = 1024 * 1024

_KIND = {"model": "weights", "KV": "kv", "RS": "kv", "compute": "compute", "output": "output"}

_BUFFER = re.compile(
    r"^(?P<func>[\w:]+):\s+(?P<buffer>\S+)\s+(?P<kind>model|KV|RS|compute|output)"
    r" buffer size\s*=\s*(?P<mib>[0-9.]+) MiB"
)
_CACHE = re.compile(
    r"^(?P<func>[\w:]+): size =\s*(?P<mib>[0-9.]+) MiB \(\s*(?P<cells>\d+) cells,\s*(?P<layers>\d+) layers,"
    r"\s*(?P<seqs>\d+)(?:/(?P<seqs_max>\d+))? seqs"
)
_PART = re.compile(r"(?P<name>[A-Z]) \((?P<type>\w+)\):\s*(?P<mib>[0-9.]+) MiB")
_SETTING = re.compile(r"^llama_context: (?P<key>\w+)\s+= (?P<value>.*)$")
_OFFLOADED = re.compile(r"offloaded (?P<n>\d+)/(?P<total>\d+) layers to GPU")


@dataclass
class BufferSizes:
    """Bytes one device holds for a model, by purpose."""

    weights: int = 0
    kv: int = 0
    compute: int = 0
    output: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.output

    def __add__(self, other: BufferSizes) -> BufferSizes:
        return BufferSizes(
            self.weights + other.weights, self.kv + other.kv,
            self.compute + other.compute, self.output + other.output,
        )

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class Buffer:
    """One ``… buffer size = X MiB`` line: which function, buffer name, purpose and bytes."""

    func: str
    name: str
    kind: str
    """``weights``, ``kv``, ``compute`` or ``output``."""
    bytes: int

    @property
    def device(self) -> str:
        return device_of(self.name)


@dataclass(frozen=True)
class CacheSize:
    """One ``llama_kv_cache: size = …`` (or recurrent-state) summary line."""

    func: str
    bytes: int
    cells: int
    layers: int
    seqs: int
    parts: dict[str, tuple[str, int]] = field(default_factory=dict)
    """``{"K": ("f16", bytes), "V": (…)}`` (recurrent caches: R, S, P)."""


def device_of(buffer_name: str) -> str:
    """The device a llama.cpp buffer lives on: ``"CPU"`` for every kind of host memory."""
    name = buffer_name.strip()
    if name.endswith("_Split"):
        name = name[: -len("_Split")]
    if name.upper().startswith("CPU") or name.endswith("_Host") or name in ("AMX", "KLEIDIAI"):
        return "CPU"
    return name


def mib_to_bytes(mib: str | float) -> int:
    """llama.cpp prints sizes as ``%.2f`` MiB: back to bytes (good to ±5 KiB)."""
    return round(float(mib) * MIB)


class MemoryLog:
    """Accumulates llama.cpp log messages and parses the memory lines among them.

    Feed it every message the log callback receives, in order: ``feed(level, text)``. Messages
    may arrive in pieces (a message without its newline, then level-5 continuations); a line
    is parsed once it is complete (or at :meth:`breakdown`, for a last line without newline).
    """

    def __init__(self) -> None:
        self.buffers: list[Buffer] = []
        self.caches: list[CacheSize] = []
        self.settings: dict[str, str] = {}
        """``key = value`` lines of the context (n_ctx, n_ctx_seq, n_batch, flash_attn…)."""
        self.layers_offloaded: tuple[int, int] | None = None
        self._pending = ""

    def feed(self, level: int, text: str) -> None:
        """Take one message from llama.cpp's log callback (``level`` as ggml gives it)."""
        if level != LEVEL_CONT and self._pending:
            # a new message begins a new line even if the previous one lacked its newline
            self._line(self._pending)
            self._pending = ""
        self._pending += text
        if "\n" in self._pending:
            *lines, self._pending = self._pending.split("\n")
            for line in lines:
                self._line(line)

    def feed_text(self, text: str) -> None:
        """Take a whole captured log (e.g. a saved stderr), line by line."""
        for line in text.splitlines():
            self.feed(2, line + "\n")

    def flush(self) -> None:
        """Parse a last line that arrived without its newline."""
        if self._pending:
            self._line(self._pending)
            self._pending = ""

    def breakdown(self) -> dict[str, BufferSizes]:
        """Bytes per device (``"CPU"``, ``"CUDA0"``…) by purpose, from the buffer lines so far."""
        self.flush()
        result: dict[str, BufferSizes] = {}
        for buf in self.buffers:
            sizes = result.setdefault(buf.device, BufferSizes())
            setattr(sizes, buf.kind, getattr(sizes, buf.kind) + buf.bytes)
        return result

    @property
    def kv_size(self) -> int:
        """Total KV (and recurrent state) bytes from the ``size =`` summary lines; 0 if none."""
        self.flush()
        return sum(cache.bytes for cache in self.caches)

    @property
    def n_ctx(self) -> int | None:
        """The context size llama.cpp actually used (it rounds up to a multiple of 256)."""
        return self._int("n_ctx")

    @property
    def n_ctx_per_seq(self) -> int | None:
        """Context available to each sequence (``n_ctx_seq``; ``n_ctx_per_seq`` in older builds)."""
        return self._int("n_ctx_seq") or self._int("n_ctx_per_seq")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary: per-device breakdown, KV total, context settings."""
        return {
            "devices": {dev: sizes.to_dict() for dev, sizes in self.breakdown().items()},
            "kv_size": self.kv_size,
            "n_ctx": self.n_ctx,
            "n_ctx_per_seq": self.n_ctx_per_seq,
            "n_batch": self._int("n_batch"),
            "n_ubatch": self._int("n_ubatch"),
            "layers_offloaded": list(self.layers_offloaded) if self.layers_offloaded else None,
        }

    def _int(self, key: str) -> int | None:
        self.flush()
        value = self.settings.get(key)
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None

    def _line(self, line: str) -> None:
        line = line.strip()
        if not line or ("=" not in line and "offloaded" not in line):
            return  # cheap exit: most lines (progress dots, tensor listings) carry no number
        if m := _BUFFER.match(line):
            self.buffers.append(
                Buffer(m["func"], m["buffer"], _KIND[m["kind"]], mib_to_bytes(m["mib"]))
            )
        elif m := _CACHE.match(line):
            parts = {
                p["name"]: (p["type"], mib_to_bytes(p["mib"])) for p in _PART.finditer(line[m.end():])
            }
            self.caches.append(
                CacheSize(m["func"], mib_to_bytes(m["mib"]), int(m["cells"]), int(m["layers"]),
                          int(m["seqs_max"] or m["seqs"]), parts)
            )
        elif m := _SETTING.match(line):
            self.settings[m["key"]] = m["value"].strip()
        elif m := _OFFLOADED.search(line):
            self.layers_offloaded = (int(m["n"]), int(m["total"]))


__all__ = ["LEVEL_CONT", "Buffer", "BufferSizes", "CacheSize", "MemoryLog", "device_of", "mib_to_bytes"]
