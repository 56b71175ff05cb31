"""What a worker actually loaded, measured: :class:`LoadReport`, made from its ``loaded`` message and
llama.cpp's log lines of the load (the memory per device is parsed from them)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LoadReport:
    """What the worker actually loaded, measured: sizes, context, memory per device."""

    name: str
    path: str
    pid: int
    n_ctx: int
    n_ctx_per_slot: int
    """Context of one slot: ``n_ctx / parallel`` (each request's prompt plus answer)."""
    n_ctx_train: int
    n_layer: int
    n_gpu_layers: int
    parallel: int
    n_batch: int
    n_threads: int
    load_s: float
    rss_bytes: int
    breakdown: dict[str, Any]
    """Bytes per device from llama.cpp's own log: ``{"CPU": BufferSizes(weights, kv, compute, output)}``."""
    metadata: dict[str, Any]
    system_info: str
    log: tuple[str, ...] = field(repr=False, default=())
    """llama.cpp's log lines of the load (the breakdown is parsed from them)."""

    @property
    def has_chat_template(self) -> bool:
        return bool(self.metadata.get("chat_template"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (without the raw log)."""
        out = {k: v for k, v in vars(self).items() if k not in ("log", "breakdown")}
        out["breakdown"] = {dev: sizes.to_dict() for dev, sizes in self.breakdown.items()}
        return out


def load_report(name: str, path: str | os.PathLike[str], r: dict[str, Any],
                lines: list[tuple[int, str]]) -> LoadReport:
    """The report of a load from the worker's ``loaded`` message ``r`` and the load's log lines."""
    from ..memory.llama_log import MemoryLog

    memory = MemoryLog()
    for level, text in lines:
        memory.feed(level, text)
    offloaded = memory.layers_offloaded
    return LoadReport(
        name=name, path=str(path), pid=r["pid"], n_ctx=r["n_ctx"], n_ctx_per_slot=r["n_ctx_per_slot"],
        n_ctx_train=r["n_ctx_train"], n_layer=r["n_layer"],
        n_gpu_layers=offloaded[0] if offloaded else r["n_gpu_layers"], parallel=r["parallel"],
        n_batch=r["n_batch"], n_threads=r["n_threads"], load_s=r["load_s"], rss_bytes=r["rss_bytes"],
        breakdown=memory.breakdown(), metadata=r["metadata"], system_info=r["system_info"],
        log=tuple("".join(t for _, t in lines).splitlines()),
    )


__all__ = ["LoadReport", "load_report"]
