"""The manager with real workers on tiny models: eviction, keep_alive, unload, refusal to load."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from jupyter_llm.errors import ModelNotFoundError, WontFitError
from jupyter_llm.manager import ModelManager
from jupyter_llm.notebook.display import human_bytes, ps_table
from jupyter_llm.options import LoadOptions, SamplingOptions
from jupyter_llm.store.sources import Pulled
from tests.ggufs import write_tiny_llama


@pytest.fixture
def manager(tmp_path: Path) -> ModelManager:
    m = ModelManager(max_loaded=2)
    for name in ("a", "b", "c"):
        path = write_tiny_llama(tmp_path / f"{name}.gguf", seed=ord(name))
        m.store.put(name, Pulled("local", [path], owned=[]))
    yield m
    m.close()


def _opts(**kw: object) -> LoadOptions:
    return LoadOptions(gpu_layers=0, n_ctx=256, threads=1, **kw)


def test_least_recently_used_model_is_evicted(manager: ModelManager) -> None:
    events: list[dict] = []
    manager.subscribe(events.append)
    a = manager.load("a", _opts(keep_alive=None))
    manager.load("b", _opts(keep_alive=None))
    with manager.using("a"):
        pass  # a is now more recently used than b
    manager.load("c", _opts(keep_alive=None))
    assert sorted(m.name for m in manager.ps()) == ["a", "c"]
    assert any(e["type"] == "unloaded" and e["name"] == "b" and "evicted" in e["reason"] for e in events)
    assert a.runtime.alive


def test_keep_alive_zero_unloads_right_after_use(manager: ModelManager) -> None:
    model = manager.load("a", _opts(keep_alive=0))
    pid = model.runtime.pid
    chunks = list(manager.stream_chat("a", [{"role": "user", "content": "hello"}], SamplingOptions(max_tokens=4)))
    assert chunks
    assert manager.ps() == []
    assert not Path(f"/proc/{pid}").exists()


def test_keep_alive_expiry(manager: ModelManager) -> None:
    manager.load("a", _opts(keep_alive=0.5))
    assert [m.name for m in manager.ps()] == ["a"]
    deadline = time.monotonic() + 10
    while manager.ps() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert manager.ps() == []


def test_a_busy_model_is_not_expired(manager: ModelManager) -> None:
    manager.load("a", _opts(keep_alive=0.01))
    with manager.using("a"):
        time.sleep(0.3)  # far past keep_alive, but a request is running
        assert manager.reap() == []
        assert [m.name for m in manager.ps()] == ["a"]
    deadline = time.monotonic() + 5
    while manager.ps() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert manager.ps() == [], "once idle, the expired model goes"


def test_unload_stops_the_worker_and_returns_its_memory(manager: ModelManager) -> None:
    model = manager.load("a", _opts(keep_alive=None))
    pid = model.runtime.pid
    assert model.runtime.rss_bytes() > 0
    measured = model.to_dict()["measured"]["CPU"]
    row = ps_table(manager.ps()).rows[0]
    assert row[2] == "CPU " + human_bytes(sum(measured[p] for p in ("weights", "kv", "compute", "output")))
    assert manager.unload("a") == ["a"]
    assert not Path(f"/proc/{pid}").exists()
    with pytest.raises(ModelNotFoundError, match="not loaded"):
        manager.get("a")


def test_loading_the_same_model_twice_reuses_the_worker(manager: ModelManager) -> None:
    first = manager.load("a", _opts(keep_alive=None))
    second = manager.load("a", _opts(keep_alive=60))
    assert first is second and second.options.keep_alive == 60


def test_a_load_that_will_not_fit_is_refused_before_starting(manager: ModelManager) -> None:
    with pytest.raises(WontFitError) as info:
        manager.load("a", LoadOptions(gpu_layers=0, n_ctx=200_000_000))
    assert info.value.estimate is not None and not info.value.estimate.fits
    assert manager.ps() == []


def test_a_dead_worker_is_dropped_from_ps(manager: ModelManager) -> None:
    model = manager.load("a", _opts(keep_alive=None))
    os.kill(model.runtime.pid, 9)
    deadline = time.monotonic() + 5
    while model.runtime.alive and time.monotonic() < deadline:
        time.sleep(0.05)
    assert manager.ps() == []
