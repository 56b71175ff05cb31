"""The worker's short CPU time slice (worker/sched.py): asked for, inherited, switchable off."""

from __future__ import annotations

import os
import platform
import re
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from jupyter_llm import config
from jupyter_llm.options import LoadOptions, SamplingOptions
from jupyter_llm.runtime import Runtime, process
from jupyter_llm.worker import sched
from tests import ggufs


def _kernel() -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(found[1]), int(found[2])) if found else (0, 0)


# custom slices for SCHED_OTHER came with Linux 6.12; before, sched_runtime is ignored
needs_custom_slices = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "aarch64")
    or _kernel() < (6, 12), reason="custom time slices need Linux 6.12+ on x86_64 or aarch64")


def _in_thread(fn: Any) -> Any:
    """``fn()`` run in a new thread (a slice is per thread: the test process's own stays as it is)."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def _slices(pid: int) -> dict[str, int]:
    """``se.slice`` (ns) of every thread of ``pid``, by thread name, as /proc shows them."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "sched").read_text()
        name = (task / "comm").read_text().strip()
        found[f"{name}/{task.name}"] = int(re.search(r"se\.slice\s*:\s*(\d+)", text)[1])  # type: ignore[index]
    return found


@needs_custom_slices
def test_a_thread_gets_the_slice_and_threads_it_starts_inherit_it() -> None:
    default = _in_thread(sched.get_slice_ns)

    def ask() -> tuple[bool, int | None, int | None]:
        took = sched.shorten_slice(300)
        return took, sched.get_slice_ns(), _in_thread(sched.get_slice_ns)

    assert default and default != 300_000
    assert _in_thread(ask) == (True, 300_000, 300_000)
    assert sched.get_slice_ns() == default  # only the asking thread (and its children) changed


@needs_custom_slices
def test_zero_asks_for_nothing_and_an_idle_policy_is_left_alone() -> None:
    default = sched.get_slice_ns()
    assert _in_thread(lambda: (sched.shorten_slice(0), sched.get_slice_ns())) == (False, default)

    def idle() -> tuple[bool, int]:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only (Linux)
        return sched.shorten_slice(300), os.sched_getscheduler(0)

    assert _in_thread(idle) == (False, os.SCHED_IDLE)


def test_the_setting_defaults_to_300_us_and_says_what_it_wants(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUPYTER_LLM_WORKER_SLICE_US", raising=False)
    assert config.worker_slice_us() == 300
    for raw, value in (("0", 0), ("100", 100), ("2500", 2500), ("100000", 100_000)):
        monkeypatch.setenv("JUPYTER_LLM_WORKER_SLICE_US", raw)
        assert config.worker_slice_us() == value
    for raw in ("50", "200000", "-1"):
        monkeypatch.setenv("JUPYTER_LLM_WORKER_SLICE_US", raw)
        with pytest.raises(ValueError, match="100-100000 microseconds, 0 for the system's own"):
            config.worker_slice_us()
    monkeypatch.setenv("JUPYTER_LLM_WORKER_SLICE_US", "short")
    with pytest.raises(ValueError, match=r"not a number.*microseconds"):
        config.worker_slice_us()


def test_a_bad_setting_fails_in_the_cell_before_a_worker_starts(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = ggufs.write_tiny_llama(tmp_path / "tiny.gguf")
    started: list[Any] = []
    monkeypatch.setattr(process.subprocess, "Popen", lambda *a, **k: started.append(a))
    monkeypatch.setenv("JUPYTER_LLM_WORKER_SLICE_US", "5")
    with pytest.raises(ValueError, match="JUPYTER_LLM_WORKER_SLICE_US=5: give 100-100000"):
        Runtime.start(tiny, LoadOptions(gpu_layers=0, n_ctx=256))
    assert started == []


@needs_custom_slices
@pytest.mark.parametrize("setting", ["unset", "0", "1000"])
def test_every_thread_of_a_real_worker_runs_with_the_setting(setting: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    if setting == "unset":
        monkeypatch.delenv("JUPYTER_LLM_WORKER_SLICE_US", raising=False)
    else:
        monkeypatch.setenv("JUPYTER_LLM_WORKER_SLICE_US", setting)
    own = int(re.search(r"se\.slice\s*:\s*(\d+)", Path("/proc/thread-self/sched").read_text())[1])  # type: ignore[index]
    expected = {"unset": 300_000, "0": own, "1000": 1_000_000}[setting]  # 0: what the kernel's process has
    tiny = ggufs.write_tiny_llama(tmp_path / "tiny.gguf")
    runtime = Runtime.start(tiny, LoadOptions(gpu_layers=0, n_ctx=256, threads=2))
    try:
        # a decode has run (the warm-up and this one): llama.cpp's compute threads exist
        assert runtime.generate("hello", SamplingOptions(temperature=0, max_tokens=4)).result.completion_tokens
        slices = _slices(runtime.pid)
        assert len(slices) >= 3, slices  # control, loader's heirs: the engine, OpenMP's thread
        assert set(slices.values()) == {expected}, slices
    finally:
        runtime.close()
