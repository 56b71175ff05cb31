"""Which loaded models to unload so that another one fits: by memory, as the estimate says, and
by count only when the user sets a cap (``JUPYTER_LLM_MAX_LOADED`` / ``OLLAMA_MAX_LOADED_MODELS``).

Free memory as the devices report it already leaves out what our workers hold, except on the
host their weights: a worker maps the GGUF file, and ``MemAvailable`` counts mapped file pages
as available (docs/notes.md §3). So unloading a model gives back :func:`held` per device, and
the new model fits when its estimate fits into the free memory plus what the chosen victims
give back. Only idle models are evicted, least recently used first, and only those that hold
memory where it is short; a generation in flight is never cut off.

The manager does the unloading; this module only decides (:func:`plan`), so the arithmetic
can be checked with imaginary devices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .errors import WontFitError
from .memory.formulas import MiB

if TYPE_CHECKING:
    from .loaded import LoadedModel
    from .memory.devices import Device
    from .memory.estimate import MemoryEstimate


@dataclass(frozen=True)
class Eviction:
    """One model to unload before a load, and why."""

    model: LoadedModel
    freed: int
    """Bytes it gives back over all devices (:func:`held`)."""
    cap: int | None = None
    """The count cap that evicts it; None when it makes room in memory."""

    def reason(self, name: str) -> str:
        """For the ``unloaded`` event, when loading ``name`` evicts it."""
        if self.cap is not None:
            return f"evicted for {name}: at most {self.cap} models stay loaded"
        return f"evicted to make room for {name}"

    @property
    def notice(self) -> str:
        """For the output of the cell whose load caused it."""
        if self.cap is not None:
            return (f"evicted {self.model.name}: at most {self.cap} models stay loaded "
                    "(JUPYTER_LLM_MAX_LOADED / OLLAMA_MAX_LOADED_MODELS)")
        return f"evicted {self.model.name} to make room ({self.freed / MiB:.1f} MiB)"


def held(model: LoadedModel) -> dict[str, int]:
    """Bytes per device that unloading ``model`` makes free, from its estimate: everything on a
    GPU; on the host everything but the mapped weights, which count as available already."""
    if model.estimate is None:
        return {}
    out = {}
    for row in model.estimate.devices:
        n = row.total - (row.weights if row.device_id == "CPU" else 0)
        if n > 0:
            out[row.device_id] = n
    return out


def plan(price: Callable[[list[Device]], MemoryEstimate], devices: Sequence[Device],
         others: Sequence[LoadedModel], cap: int | None) -> tuple[list[Eviction], MemoryEstimate]:
    """The evictions a load needs and its estimate once they are done.

    ``price(devices)`` estimates the new model against devices; ``others`` are the models
    loaded now (the one being loaded excluded). With ``cap``, the least recently used idle
    models beyond it go first. Then, while the estimate does not fit, the least recently used
    idle model holding memory on a device that is short goes too. When even that is not enough
    no model is evicted for memory (it would be for nothing) and the estimate says it does not fit.
    """
    idle = sorted((m for m in others if m.active == 0), key=lambda m: m.last_used)
    evictions: list[Eviction] = []
    while cap is not None and len(others) - len(evictions) >= cap and idle:
        model = idle.pop(0)
        evictions.append(Eviction(model, sum(held(model).values()), cap=cap))
    freed: dict[str, int] = {}
    for e in evictions:
        _add(freed, held(e.model))
    estimate = price(_with_freed(devices, freed))
    for_memory: list[Eviction] = []
    more = dict(freed)
    while not estimate.fits:
        short = {row.device_id for row in estimate.devices if not row.fits}
        victim = next((m for m in idle if short & set(held(m))), None)
        if victim is None:
            break
        idle.remove(victim)
        for_memory.append(Eviction(victim, sum(held(victim).values())))
        _add(more, held(victim))
        estimate = price(_with_freed(devices, more))
    if estimate.fits:
        return evictions + for_memory, estimate
    return evictions, price(_with_freed(devices, freed)) if for_memory else estimate


def refusal(name: str, estimate: MemoryEstimate, others: Sequence[LoadedModel]) -> WontFitError:
    """The error for a load that does not fit even after :func:`plan`: the estimate's suggestion,
    and the models in use that hold memory where it is short (they are never evicted)."""
    short = {row.device_id for row in estimate.devices if not row.fits}
    busy = [m.name for m in others if m.active > 0 and short & set(held(m))]
    held_by = f"; models in use hold memory there (busy: {', '.join(busy)})" if busy else ""
    return WontFitError(f"{name} will not fit: {estimate.suggestion()}{held_by} — or pass --force to try anyway",
                        estimate)


def _add(total: dict[str, int], more: dict[str, int]) -> None:
    for device, n in more.items():
        total[device] = total.get(device, 0) + n


def _with_freed(devices: Sequence[Device], freed: dict[str, int]) -> list[Device]:
    return [replace(d, free_bytes=d.free_bytes + freed.get(d.id, 0)) if d.id in freed else d for d in devices]
