"""The memory devices a model can be loaded onto: host RAM and GPUs, read fresh on every call.

- Host RAM comes from ``/proc/meminfo``: ``MemAvailable`` is what a new model can get (llama.cpp's
  own CPU device reports free = total, which is useless for a fit decision).
- NVIDIA GPUs come from NVML (pynvml), which is cheap and opens no CUDA context. Without a driver,
  a GPU or pynvml there are simply no GPUs: that is the normal case on many machines.
- llama.cpp's backend devices (``include_llama=True``) are asked in a subprocess
  (``python -m jupyter_llm.dryrun devices``): llama.cpp never runs in the kernel, and a CUDA
  memory query would open a CUDA context there (hundreds of MiB).

Nothing is cached: widgets poll :func:`list_devices`, which takes a few milliseconds without
``include_llama``.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

MEMINFO = Path("/proc/meminfo")
DEVICE_QUERY_TIMEOUT = 60.0
"""Seconds a llama.cpp device query may take (loading the backends; CUDA init can be slow)."""


@dataclass
class Device:
    """One place model memory can live. Sizes in bytes."""

    id: str
    """``"CPU"`` for host RAM, ``"GPU0"``, ``"GPU1"``… for GPUs (NVML order), llama.cpp's
    ``"RPC0[host:port]"`` for the devices of rpc-servers (:mod:`jupyter_llm.memory.rpc`)."""
    kind: Literal["cpu", "gpu"]
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    backend: str | None = None
    """llama.cpp's name for the device (``"CPU"``, ``"CUDA0"``…) when known."""
    processes: list[tuple[int, int]] = field(default_factory=list)
    """``(pid, used_bytes)`` of processes using the GPU, when the driver says."""
    host: str | None = None
    """``host:port`` of the rpc-server holding the device, None for local ones."""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "processes": [list(p) for p in self.processes]}


def list_devices(*, include_llama: bool = False) -> list[Device]:
    """Host RAM first, then NVIDIA GPUs; with ``include_llama`` also llama.cpp's view.

    ``include_llama`` starts a subprocess (~1 s): it fills in :attr:`Device.backend` and adds
    llama.cpp GPU devices NVML does not know (Vulkan, Metal…).
    """
    devices = [host_memory(), *nvidia_gpus()]
    if include_llama:
        _merge_llama(devices, llama_devices())
    return devices


def host_memory(meminfo: Path = MEMINFO) -> Device:
    """Host RAM from ``/proc/meminfo``: free is ``MemAvailable`` (what can be had without swap)."""
    values = read_meminfo(meminfo)
    total = values.get("MemTotal", 0)
    free = values.get("MemAvailable", values.get("MemFree", 0))
    return Device("CPU", "cpu", _cpu_name(), total, free, total - free, backend="CPU")


def read_meminfo(meminfo: Path = MEMINFO) -> dict[str, int]:
    """``/proc/meminfo`` as bytes per key."""
    out: dict[str, int] = {}
    try:
        text = meminfo.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            factor = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
            out[key.strip()] = int(parts[0]) * factor
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return "host memory"


def nvidia_gpus() -> list[Device]:
    """NVIDIA GPUs through NVML; an empty list when there is no pynvml, driver or GPU."""
    if "pynvml" not in sys.modules:
        # The "pynvml" distribution warns on import that it is deprecated in favour of
        # nvidia-ml-py; both provide the same module, and the warning means nothing to a user.
        # One filter for that message, not catch_warnings: this runs in the sidebar's thread,
        # and catch_warnings there restores the filters over whatever the user's thread set
        # meanwhile (tqdm.auto's import), leaving the kernel ignoring every later warning.
        warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded…: no GPUs, quietly
        return []
    try:
        return [_nvml_device(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _nvml_device(pynvml: Any, index: int) -> Device:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    name = pynvml.nvmlDeviceGetName(handle)
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
    processes: dict[int, int] = {}
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            for proc in getattr(pynvml, getter)(handle):
                used = proc.usedGpuMemory
                # NVML reports None (or a sentinel) when it may not say, e.g. inside containers
                if isinstance(used, int) and 0 <= used < 1 << 60:
                    processes[proc.pid] = max(processes.get(proc.pid, 0), used)
                else:
                    processes.setdefault(proc.pid, 0)
        except Exception:
            continue
    return Device(
        f"GPU{index}", "gpu", str(name), int(mem.total), int(mem.free), int(mem.used),
        processes=sorted(processes.items()),
    )


def llama_devices(timeout: float = DEVICE_QUERY_TIMEOUT) -> list[dict[str, Any]]:
    """llama.cpp's backend devices (name, description, type, free, total), asked in a subprocess.

    Returns ``[]`` when the query fails (llama-cpp-python missing or broken): callers still have
    /proc/meminfo and NVML.
    """
    from .probe import query

    return list(query(["devices"], timeout).get("devices", []))


def _merge_llama(devices: list[Device], found: list[dict[str, Any]]) -> None:
    gpus = [d for d in devices if d.kind == "gpu"]
    n_extra = len(gpus)
    cuda_index = 0
    for dev in found:
        kind = dev.get("type")
        if kind == "cpu":
            devices[0].backend = dev["name"]
            continue
        if kind not in ("gpu", "igpu"):
            continue  # accelerators (BLAS…) hold no model memory of their own
        if dev["name"].startswith("CUDA") and cuda_index < len(gpus):
            # CUDA and NVML number devices alike unless CUDA_DEVICE_ORDER says otherwise
            gpus[cuda_index].backend = dev["name"]
            cuda_index += 1
            continue
        total, free = int(dev.get("total", 0)), int(dev.get("free", 0))
        devices.append(Device(f"GPU{n_extra}", "gpu", dev.get("description") or dev["name"],
                              total, free, total - free, backend=dev["name"]))
        n_extra += 1


__all__ = ["Device", "host_memory", "list_devices", "llama_devices", "nvidia_gpus", "read_meminfo"]
