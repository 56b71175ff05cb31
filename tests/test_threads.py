"""The default thread count: physical cores this process may use, a core's hyperthreads once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jupyter_llm.worker import params


def _sysfs(root: Path, siblings: dict[int, str]) -> str:
    for cpu, text in siblings.items():
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "thread_siblings_list").write_text(text + "\n")
    return str(root)


def test_hyperthreads_of_one_core_count_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    root = _sysfs(tmp_path, {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"})
    assert params.physical_cores(root) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2})  # pinned to one core's two threads
    assert params.physical_cores(root) == 1


def test_without_topology_every_usable_cpu_counts(tmp_path: Path) -> None:
    usable = len(os.sched_getaffinity(0))
    assert params.physical_cores(str(tmp_path / "absent")) == usable


def test_this_machine_and_the_option() -> None:
    cores = params.physical_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    assert params.threads({"threads": None}) == cores
    assert params.threads({"threads": 3}) == 3
