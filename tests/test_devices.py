"""devices: host RAM from /proc/meminfo, NVIDIA GPUs via NVML, llama.cpp's devices via a subprocess."""

from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path
from typing import Any

import pytest

from jupyter_llm.memory.devices import Device, _merge_llama, host_memory, list_devices, llama_devices, nvidia_gpus


def proc_meminfo_kib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def test_host_ram_matches_proc_meminfo() -> None:
    cpu = list_devices()[0]
    assert (cpu.id, cpu.kind, cpu.backend) == ("CPU", "cpu", "CPU")
    assert cpu.total_bytes == proc_meminfo_kib("MemTotal") * 1024
    # MemAvailable moves while other processes run: equal within 256 MiB
    assert abs(cpu.free_bytes - proc_meminfo_kib("MemAvailable") * 1024) < 256 * 1024**2
    assert cpu.used_bytes == cpu.total_bytes - cpu.free_bytes


def test_each_call_reads_memory_afresh(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384 kB\nMemFree:  1024 kB\nMemAvailable:    8192 kB\n")
    first = host_memory(meminfo)
    assert (first.total_bytes, first.free_bytes, first.used_bytes) == (16 << 20, 8 << 20, 8 << 20)
    meminfo.write_text("MemTotal:       16384 kB\nMemFree:  1024 kB\nMemAvailable:    4096 kB\n")
    assert host_memory(meminfo).free_bytes == 4 << 20


def test_no_nvidia_driver_means_no_gpus_and_no_noise() -> None:
    if Path("/proc/driver/nvidia").exists():
        pytest.skip("this machine has an NVIDIA driver")
    # pynvml is installed (a dependency) but there is no driver: NVML init fails
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nvidia_gpus() == []
        assert [d.kind for d in list_devices()] == ["cpu"]


def test_without_pynvml_there_are_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert nvidia_gpus() == []


class FakeNVMLError(Exception):
    pass


def fake_pynvml(*, count: int, fail_at: str | None = None) -> tuple[types.ModuleType, list[str]]:
    """A stand-in for pynvml with ``count`` GPUs (NVML needs a real driver); records calls."""
    calls: list[str] = []
    mod = types.ModuleType("pynvml")

    def call(name: str, result: Any = None) -> Any:
        calls.append(name)
        if name == fail_at:
            raise FakeNVMLError(name)
        return result

    mem = types.SimpleNamespace(total=24 << 30, free=20 << 30, used=4 << 30)
    procs = [types.SimpleNamespace(pid=4242, usedGpuMemory=3 << 30),
             types.SimpleNamespace(pid=4343, usedGpuMemory=None)]
    mod.nvmlInit = lambda: call("init")  # type: ignore[attr-defined]
    mod.nvmlShutdown = lambda: call("shutdown")  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: call("count", count)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = lambda i: call("handle", i)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetName = lambda h: call("name", b"NVIDIA Test GPU")  # type: ignore[attr-defined]
    mod.nvmlDeviceGetMemoryInfo = lambda h: call("memory", mem)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetComputeRunningProcesses = lambda h: call("procs", procs)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetGraphicsRunningProcesses = lambda h: call("gprocs", [])  # type: ignore[attr-defined]
    return mod, calls


def test_nvml_gpus_with_their_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    mod, calls = fake_pynvml(count=2)
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    gpus = nvidia_gpus()
    assert [g.id for g in gpus] == ["GPU0", "GPU1"]
    assert gpus[0] == Device("GPU0", "gpu", "NVIDIA Test GPU", 24 << 30, 20 << 30, 4 << 30,
                             processes=[(4242, 3 << 30), (4343, 0)])
    assert calls[-1] == "shutdown"


def test_an_nvml_error_midway_gives_no_gpus_and_still_shuts_down(monkeypatch: pytest.MonkeyPatch) -> None:
    mod, calls = fake_pynvml(count=1, fail_at="memory")
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    assert nvidia_gpus() == []
    assert calls[0] == "init" and calls[-1] == "shutdown"


def test_llama_cpp_backend_devices_list_the_cpu() -> None:
    found = llama_devices()
    cpu = [d for d in found if d["type"] == "cpu"]
    assert len(cpu) == 1 and cpu[0]["name"] == "CPU"
    assert cpu[0]["total"] == proc_meminfo_kib("MemTotal") * 1024
    merged = list_devices(include_llama=True)
    assert merged[0].backend == "CPU"
    assert [d.kind for d in merged] == ["cpu"]


def test_llama_gpu_devices_are_matched_to_nvml_or_added() -> None:
    host = Device("CPU", "cpu", "host", 64 << 30, 32 << 30, 32 << 30)
    gpu0 = Device("GPU0", "gpu", "NVIDIA A", 24 << 30, 20 << 30, 4 << 30)
    devices = [host, gpu0]
    _merge_llama(devices, [
        {"name": "CPU", "description": "Xeon", "type": "cpu", "free": 1, "total": 1},
        {"name": "CUDA0", "description": "NVIDIA A", "type": "gpu", "free": 1, "total": 1},
        {"name": "Vulkan0", "description": "AMD B", "type": "gpu", "free": 6 << 30, "total": 8 << 30},
        {"name": "BLAS", "description": "OpenBLAS", "type": "accel", "free": 0, "total": 0},
    ])
    assert [(d.id, d.backend) for d in devices] == [("CPU", "CPU"), ("GPU0", "CUDA0"), ("GPU1", "Vulkan0")]
    assert devices[2].used_bytes == 2 << 30


def test_a_failing_llama_query_gives_no_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")  # the subprocess cannot start
    assert llama_devices() == []
    assert list_devices(include_llama=True)[0].kind == "cpu"
