"""The manager with real workers on tiny models: eviction, keep_alive, unload, refusal to load."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from jupyter_llm.errors import ModelNotFoundError, WontFitError
from jupyter_llm.manager import ModelManager
from jupyter_llm.memory.devices import Device
from jupyter_llm.memory.formulas import GiB, MiB
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
    return LoadOptions(**{"gpu_layers": 0, "n_ctx": 256, "threads": 1, **kw})  # type: ignore[arg-type]


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


# -- remembered options (a reload keeps what the user chose) --------------------------------------


def test_a_reload_uses_the_options_of_the_last_explicit_load_and_says_so(manager: ModelManager,
                                                                         tmp_path: Path) -> None:
    from jupyter_llm import chat

    # a quantized KV cache needs a head size that is a multiple of 32
    path = write_tiny_llama(tmp_path / "q.gguf", n_embd=128, n_head=4, n_head_kv=2, n_ff=256, ctx=1024)
    manager.store.put("a", Pulled("local", [path], owned=[]))
    chosen = LoadOptions(gpu_layers=0, n_ctx=512, kv_type="q8_0", flash_attn=True, keep_alive=3.0, threads=1)
    manager.load("a", chosen)
    manager.unload(all=True)
    events: list[dict] = []
    manager.subscribe(events.append)
    # what the next %%chat does: the model is not loaded, so it loads it by name alone
    turn = chat.session_turn(manager, manager.session("s"), "hello", SamplingOptions(max_tokens=2), model="a")
    "".join(chunk.text for chunk in turn)
    model = turn.model
    assert model.options == chosen
    assert model.report is not None and model.report.n_ctx == 512
    assert model.notices and all(part in model.notices[0] for part in ("ctx=512", "kv_type=q8_0", "flash_attn=on",
                                                                       "keep_alive=3s"))
    loaded = [e for e in events if e["type"] == "loaded"]
    assert len(loaded) == 1 and loaded[0]["reload"] is True and loaded[0]["notices"] == model.notices
    assert loaded[0]["model"]["notices"] == model.notices


def test_after_keep_alive_expiry_the_next_use_reloads_with_the_same_options(manager: ModelManager) -> None:
    chosen = _opts(n_ctx=512, keep_alive=0.2)
    manager.load("a", chosen)
    deadline = time.monotonic() + 10
    while manager.ps() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert manager.ps() == []
    again = manager.load("a")
    assert again.options == chosen and again.options.keep_alive == 0.2


def test_an_explicit_load_with_other_options_replaces_the_remembered_ones(manager: ModelManager) -> None:
    manager.load("a", _opts(n_ctx=512, keep_alive=None))
    replaced = manager.load("a", _opts(n_ctx=256, keep_alive=None))
    assert replaced.options.n_ctx == 256 and not replaced.notices
    manager.unload("a")
    assert manager.load("a").options.n_ctx == 256
    assert manager.estimate("a").options.n_ctx == 256, "an estimate by name prices what a load would do"


# -- eviction by memory ------------------------------------------------------------------------------


@pytest.fixture
def uncapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelManager:
    for name in ("JUPYTER_LLM_MAX_LOADED", "OLLAMA_MAX_LOADED_MODELS"):
        monkeypatch.delenv(name, raising=False)
    m = ModelManager()
    for name in ("a", "b", "c", "d"):
        path = write_tiny_llama(tmp_path / f"{name}.gguf", seed=ord(name))
        m.store.put(name, Pulled("local", [path], owned=[]))
    yield m
    m.close()


def test_small_models_that_fit_are_all_kept_loaded(uncapped: ModelManager) -> None:
    events: list[dict] = []
    uncapped.subscribe(events.append)
    host = Device("CPU", "cpu", "host", 64 * GiB, 22 * GiB, 42 * GiB)
    uncapped.devices = lambda **_: [host]  # type: ignore[method-assign]  # 22 GiB free, as in the report
    for name in ("a", "b", "c", "d"):
        assert not uncapped.load(name, _opts(keep_alive=None)).notices
    assert sorted(m.name for m in uncapped.ps()) == ["a", "b", "c", "d"]
    assert not [e for e in events if e["type"] == "unloaded"]


def test_a_model_that_fits_only_without_an_idle_one_evicts_it_and_says_so(uncapped: ModelManager) -> None:
    from jupyter_llm.eviction import held

    def devices(**_: object) -> list[Device]:
        # the host as the OS reports it: what our workers hold is no longer free
        used = sum(held(m).get("CPU", 0) for m in uncapped.ps())
        return [Device("CPU", "cpu", "host", 64 * GiB, free - used, 64 * GiB - free + used)]

    need = uncapped.estimate("a", _opts()).total
    first = uncapped.load("a", _opts(keep_alive=None))
    beside = sum(held(first).values())
    free = int((need + beside / 2) / 0.9)  # room for one model and its 10 % margin, not for two
    uncapped.devices = devices  # type: ignore[method-assign]
    events: list[dict] = []
    uncapped.subscribe(events.append)
    second = uncapped.load("b", _opts(keep_alive=None))
    assert [m.name for m in uncapped.ps()] == ["b"]
    assert second.notices == [f"evicted a to make room ({beside / MiB:.1f} MiB)"]
    unloaded = [e for e in events if e["type"] == "unloaded"]
    assert [(e["name"], e["freed"]) for e in unloaded] == [("a", beside)] and "evicted" in unloaded[0]["reason"]
    assert next(e for e in events if e["type"] == "loaded")["notices"] == second.notices


def test_a_busy_model_is_not_evicted_and_the_refusal_says_which(uncapped: ModelManager) -> None:
    from jupyter_llm.eviction import held

    need = uncapped.estimate("b", _opts()).total
    first = uncapped.load("a", _opts(keep_alive=None))  # (a load reads the devices afresh after it)
    free = int(need / 0.9) + 4096
    uncapped.devices = lambda **_: [  # type: ignore[method-assign]
        Device("CPU", "cpu", "host", 64 * GiB, free - held(first)["CPU"], 0)]
    with uncapped.using("a"), pytest.raises(WontFitError, match="busy: a"):
        uncapped.load("b", _opts(keep_alive=None))
    assert [m.name for m in uncapped.ps()] == ["a"]


@pytest.mark.parametrize("variable", ["JUPYTER_LLM_MAX_LOADED", "OLLAMA_MAX_LOADED_MODELS"])
def test_a_count_cap_from_the_environment_evicts_and_says_so(uncapped: ModelManager, variable: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(variable, "2")
    uncapped.load("a", _opts(keep_alive=None))
    uncapped.load("b", _opts(keep_alive=None))
    third = uncapped.load("c", _opts(keep_alive=None))
    assert sorted(m.name for m in uncapped.ps()) == ["b", "c"]
    assert len(third.notices) == 1 and third.notices[0].startswith("evicted a: at most 2 models stay loaded")


def test_a_bad_cap_says_what_to_write(monkeypatch: pytest.MonkeyPatch) -> None:
    from jupyter_llm import config

    monkeypatch.setenv("JUPYTER_LLM_MAX_LOADED", "three")
    with pytest.raises(ValueError, match=r"JUPYTER_LLM_MAX_LOADED='three'.*whole number"):
        config.max_loaded()
    monkeypatch.setenv("JUPYTER_LLM_MAX_LOADED", "0")
    monkeypatch.setenv("OLLAMA_MAX_LOADED_MODELS", "4")
    assert config.max_loaded() is None, "ours wins, and 0 means no cap"
    monkeypatch.delenv("JUPYTER_LLM_MAX_LOADED")
    assert config.max_loaded() == 4


# -- GPU layers without a GPU ------------------------------------------------------------------------


def test_gpu_layers_without_a_gpu_load_on_the_cpu_and_say_so(manager: ModelManager) -> None:
    host = Device("CPU", "cpu", "host", 64 * GiB, 22 * GiB, 42 * GiB)
    manager.devices = lambda **_: [host]  # type: ignore[method-assign]  # NVML and llama.cpp see no GPU
    model = manager.load("a", LoadOptions(gpu_layers=10, n_ctx=256, threads=1))
    assert model.options.gpu_layers == 0 and model.report is not None and model.report.n_gpu_layers == 0
    assert model.notices == ["no GPU found: gpu_layers=10 ignored, every layer runs on the CPU (as llama.cpp "
                             "does; --gpu-layers 0 or auto loads without this note)"]
    est = manager.estimate("a", LoadOptions(gpu_layers=10, n_ctx=256))
    assert est.options.gpu_layers == 0 and model.notices[0] in est.notes


# -- paths are used in place ---------------------------------------------------------------------------


def test_show_and_estimate_accept_a_gguf_path_without_registering_it(manager: ModelManager, tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "elsewhere" / "loose.gguf", n_layer=3)
    names = manager.store.names()
    shown = manager.show(str(path))
    assert shown["info"].block_count == 3 and shown["record"].path == path
    assert manager.estimate(str(path), _opts()).weights > 0
    assert manager.store.names() == names
    with pytest.raises(ModelNotFoundError, match="no such file"):
        manager.show(str(tmp_path / "missing.gguf"))
