"""A model the manager has loaded: its worker, the options it was loaded with, the estimate
made before loading, and how many requests use it now.

State of the manager (:mod:`jupyter_llm.manager` changes it under its lock); views read it
through :meth:`LoadedModel.to_dict`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .options import LoadOptions
from .store.records import ModelRecord

if TYPE_CHECKING:
    from .memory.devices import Device
    from .memory.estimate import MemoryEstimate
    from .runtime import LoadReport, Runtime


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
    last_used: float = field(default_factory=time.time)
    active: int = 0
    """Requests in flight; a model is never unloaded by keep_alive while one runs."""

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
            "estimate": self.estimate.to_dict() if self.estimate is not None else None,
            "measured": _measured(report, devices or []),
        }


def _measured(report: LoadReport | None, devices: list[Device]) -> dict[str, dict[str, int]]:
    from .memory.formulas import device_for_backend

    out: dict[str, dict[str, int]] = {}
    for backend, sizes in (report.breakdown if report is not None else {}).items():
        row = out.setdefault(device_for_backend(backend, devices), {})
        for key, value in sizes.to_dict().items():
            row[key] = row.get(key, 0) + int(value)
    return out


def same_load(a: LoadOptions, b: LoadOptions) -> bool:
    """Same worker configuration; keep_alive is not part of it (it only changes expiry)."""
    return a.with_(keep_alive=None) == b.with_(keep_alive=None)
