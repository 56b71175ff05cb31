"""The eviction plan's arithmetic on imaginary devices and models (the manager's tests run it with
real workers): only idle models, least recently used first, only those holding memory where it is
short, and none at all when even evicting every idle one would not be enough."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from jupyter_llm.eviction import held, plan
from jupyter_llm.memory.devices import Device
from jupyter_llm.memory.formulas import GiB

DEVICES = [Device("CPU", "cpu", "host", 64 * GiB, 10 * GiB, 54 * GiB),
           Device("GPU0", "gpu", "imaginary GPU", 8 * GiB, 1 * GiB, 7 * GiB)]


def model(name: str, last_used: float, active: int = 0, **on: int) -> Any:
    rows = [SimpleNamespace(device_id=dev, total=n, weights=0) for dev, n in on.items()]
    return SimpleNamespace(name=name, last_used=last_used, active=active, estimate=SimpleNamespace(devices=rows))


def needing(gpu: int) -> Any:
    """A price function: the new model needs ``gpu`` bytes free on GPU0."""
    def price(devices: list[Device]) -> Any:
        free = next(d.free_bytes for d in devices if d.id == "GPU0")
        row = SimpleNamespace(device_id="GPU0", fits=free >= gpu)
        return SimpleNamespace(fits=row.fits, devices=[row])
    return price


def test_only_a_model_holding_memory_where_it_is_short_is_evicted() -> None:
    cpu_only = model("cpu-only", last_used=1, CPU=2 * GiB)  # least recently used, but on the host
    on_gpu = model("on-gpu", last_used=2, GPU0=3 * GiB)
    evictions, estimate = plan(needing(3 * GiB), DEVICES, [cpu_only, on_gpu], cap=None)
    assert [e.model.name for e in evictions] == ["on-gpu"] and estimate.fits
    assert evictions[0].notice == "evicted on-gpu to make room (3072.0 MiB)"


def test_busy_models_stay_and_nothing_is_evicted_for_nothing() -> None:
    busy = model("busy", last_used=1, active=1, GPU0=4 * GiB)
    idle = model("idle", last_used=2, GPU0=1 * GiB)
    evictions, estimate = plan(needing(4 * GiB), DEVICES, [busy, idle], cap=None)
    assert evictions == [] and not estimate.fits, "evicting idle alone would not make room"


def test_a_cap_evicts_the_least_recently_used_beyond_it_even_when_memory_is_plenty() -> None:
    older, newer = model("older", 1, CPU=GiB), model("newer", 2, CPU=GiB)
    evictions, estimate = plan(needing(0), DEVICES, [newer, older], cap=2)
    assert [e.model.name for e in evictions] == ["older"] and estimate.fits
    assert evictions[0].reason("new") == "evicted for new: at most 2 models stay loaded"


def test_on_the_host_mapped_weights_are_not_counted_as_freed() -> None:
    m = model("m", 1)
    m.estimate.devices = [SimpleNamespace(device_id="CPU", total=5 * GiB, weights=3 * GiB),
                          SimpleNamespace(device_id="GPU0", total=2 * GiB, weights=2 * GiB)]
    assert held(m) == {"CPU": 2 * GiB, "GPU0": 2 * GiB}
