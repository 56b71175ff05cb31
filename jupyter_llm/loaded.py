"""A model the manager has loaded: its worker, the options it was loaded with, the estimate
made before loading, what its load had to say, and how many requests use it now.

State of the manager (:mod:`jupyter_llm.manager` changes it under its lock); views read it
through :meth:`LoadedModel.to_dict`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .options import LoadOptions
from .store.records import ModelRecord

if TYPE_CHECKING:
    from .memory.devices import Device
    from .memory.estimate import MemoryEstimate
    from .runtime import LoadReport, Runtime
    from .runtime.repack import RepackChoice


@dataclass
class LoadedModel:
    """A model running in its own worker process."""

    name: str
    record: ModelRecord
    options: LoadOptions
    """The options actually used ("auto" resolved)."""
    estimate: MemoryEstimate | None
    runtime: Runtime
    loaded_at: float = field(default_factory=time.time)
    chosen_at: float = field(default_factory=time.time)
    """When the user last asked for this model by loading it (also when it was loaded already):
    ``%%chat`` without ``-m`` answers with the most recently chosen one."""
    last_used: float = field(default_factory=time.time)
    active: int = 0
    """Requests in flight; a model is never unloaded by keep_alive while one runs."""
    requested: LoadOptions | None = None
    """The options asked for ("auto" unresolved), which the manager remembers for reloads."""
    notices: list[str] = field(default_factory=list)
    """What its load must tell the user: remembered options reused, models evicted to make
    room, GPU layers ignored. The front end that caused the load shows them."""
    repack: RepackChoice | None = None
    """Whether its weights were repacked for the CPU, and why (:mod:`jupyter_llm.runtime.repack`)."""

    @property
    def report(self) -> LoadReport | None:
        return self.runtime.report

    @property
    def expires_at(self) -> float | None:
        keep = self.options.keep_alive
        if keep is None or keep < 0:
            return None
        return self.last_used + keep

    def to_dict(self, devices: list[Device] | None = None) -> dict[str, Any]:
        """JSON-able state; ``measured`` is keyed by the same device ids as ``estimate``
        ("CPU", "GPU0"…), translated here from llama.cpp's buffer names ("CUDA0"…) once for
        every view."""
        report = self.report
        return {
            "name": self.name,
            "size": self.record.size,
            "sha256": self.record.sha256,
            "options": self.options.to_dict(),
            "n_ctx": getattr(report, "n_ctx", None),
            "pid": self.runtime.pid,
            "loaded_at": self.loaded_at,
            "expires_at": self.expires_at,
            "active": self.active,
            "notices": list(self.notices),
            "estimate": self.estimate.to_dict() if self.estimate is not None else None,
            "measured": _measured(report, devices or []),
        }


class Use:
    """A request using a model (``with manager.using(name) as model``): the model is busy, so
    neither keep_alive nor an eviction unloads it; ``done(model)`` runs when the request ends."""

    def __init__(self, lock: threading.RLock, model: LoadedModel, done: Callable[[LoadedModel], None]) -> None:
        self.lock = lock
        self.model = model
        self.done = done

    def __enter__(self) -> LoadedModel:
        with self.lock:
            self.model.active += 1
            self.model.last_used = time.time()
        return self.model

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.model.active -= 1
            self.model.last_used = time.time()
        self.done(self.model)


def _measured(report: LoadReport | None, devices: list[Device]) -> dict[str, dict[str, int]]:
    from .memory.formulas import device_for_backend

    out: dict[str, dict[str, int]] = {}
    for backend, sizes in (report.breakdown if report is not None else {}).items():
        row = out.setdefault(device_for_backend(backend, devices), {})
        for key, value in sizes.to_dict().items():
            row[key] = row.get(key, 0) + int(value)
    return out


def describe(options: LoadOptions) -> str:
    """The options as one line for a notice, in the flags' terms: ``gpu_layers=0, ctx=1024, …``."""
    keep = options.keep_alive
    if keep is None:
        keep_text = "forever"
    elif keep == 0:
        keep_text = "0 (unload after use)"
    else:
        minutes, seconds = divmod(keep, 60)
        keep_text = f"{minutes:g}m" if minutes and not seconds else f"{keep:g}s"
    threads = "" if options.threads is None else f", threads={options.threads}"
    return (f"gpu_layers={options.gpu_layers}, ctx={options.n_ctx}, kv_type={options.kv_type}, "
            f"flash_attn={'on' if options.flash_attn else 'off'}, parallel={options.parallel}{threads}, "
            f"keep_alive={keep_text}")


def same_load(a: LoadOptions, b: LoadOptions) -> bool:
    """Same worker configuration; keep_alive is not part of it (it only changes expiry)."""
    return a.with_(keep_alive=None) == b.with_(keep_alive=None)
