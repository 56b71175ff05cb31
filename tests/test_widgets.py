"""The picker and memory widgets follow the real manager with the real default model."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from jupyter_llm.manager import ModelManager
from jupyter_llm.notebook import picker as picker_module
from jupyter_llm.notebook import widgets


def _until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("the widget did not follow the manager in time")
        time.sleep(0.02)


def _widths(html: str) -> list[tuple[str, str]]:
    return re.findall(r'jp-LLM-seg-(\w+)" title="[^"]*" style="display:block;height:100%;width:([0-9.]+)%', html)


def test_picker_lists_cached_models_and_pullable_aliases(manager: ModelManager) -> None:
    picker = picker_module.picker(manager)
    try:
        values = [v for _, v in picker.model.options]
        assert values[0] == "smollm2"
        assert picker.model.value == "smollm2"  # the first cached model is selected
        assert picker.estimate is not None
        assert "mistral" in values
        assert picker.model.options[0][0].startswith("smollm2 — 93.8 MiB Q4_1")
        picker.model.value = "mistral"
        assert picker.estimate is None
        assert "is not cached" in picker.estimate_view.value
    finally:
        picker.close()


def test_picker_estimate_reprices_when_a_slider_moves(manager: ModelManager) -> None:
    picker = picker_module.picker(manager)
    try:
        picker.model.value = "smollm2"
        # 30 layers + the output layer; contexts up to the model's training context
        assert picker.gpu_layers.max == 31
        assert picker.context.options[-1] == 8192
        before = picker.estimate
        html_before = picker.estimate_view.value
        assert before.n_ctx == 4096

        picker.context.value = 8192
        after = picker.estimate
        assert after.n_ctx == 8192
        assert after.kv == 2 * before.kv
        assert after.weights == before.weights
        assert picker.estimate_view.value != html_before
        assert "180.0 MiB" in picker.estimate_view.value  # KV at 8192 (docs/notes.md §3)

        picker.kv_type.value = "q8_0"  # a quantized V cache needs flash attention: it is switched on
        assert picker.flash_attn.value is True
        assert picker.estimate.kv == pytest.approx(after.kv * 34 / 64, rel=0.01)

        picker.parallel.value = 4
        assert picker.estimate.options.parallel == 4
    finally:
        picker.close()


def test_picker_turns_red_when_the_load_would_not_fit(manager: ModelManager) -> None:
    picker = picker_module.picker(manager)
    try:
        picker.model.value = "smollm2"
        assert "jp-LLM-bar-over" not in picker.estimate_view.value
        # pretend a tiny host: the same arithmetic against 100 MiB free
        from jupyter_llm.memory.devices import Device

        small = Device("CPU", "cpu", "tiny host", 200 << 20, 100 << 20, 100 << 20)
        manager._devices_cache = (time.monotonic() + 3600, [small])  # the reading estimates use
        picker.context.value = 8192
        assert not picker.estimate.fits
        assert "jp-LLM-bar-over" in picker.estimate_view.value
        assert "will not fit" in picker.estimate_view.value
        assert [k for k, _ in _widths(picker.estimate_view.value)].count("over") == 1
    finally:
        picker.close()


def test_auto_shows_what_it_chose(manager: ModelManager) -> None:
    picker = picker_module.picker(manager)
    try:
        picker.model.value = "smollm2"
        picker.ctx_auto.value = True
        assert picker.context.disabled
        # host RAM is plenty for a 135M model: auto picks the training context
        assert picker.context.value == picker.estimate.options.n_ctx == 8192
        assert picker.gpu_layers.value == 0  # no GPU here
        assert picker.options().n_ctx == "auto"
    finally:
        picker.close()


@pytest.mark.slow
def test_memory_bars_change_on_load_and_unload(manager: ModelManager) -> None:
    mem = widgets.memory_widget(manager, period=0)
    picker = picker_module.picker(manager)
    try:
        idle = mem.html.value
        assert 'data-device="CPU"' in idle
        assert "No model is loaded" in idle
        assert [k for k, _ in _widths(idle)] == ["other", "free"]

        picker.model.value = "smollm2"
        picker.context.value = 2048
        picker.load().join(120)
        assert "loaded in worker pid" in picker.status.value, picker.status.value
        _until(lambda: 'data-model="smollm2"' in mem.html.value)
        loaded = mem.html.value
        kinds = [k for k, _ in _widths(loaded)]
        assert kinds[:3] == ["weights", "kv", "compute"]
        # predicted against measured, from llama.cpp's own accounting
        row = re.search(r'<tr data-model="smollm2">(.*?)</tr>', loaded).group(1)
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        assert cells[:3] == ["smollm2", "CPU", "92.1 MiB"]
        assert cells[3] == "45.0 MiB"  # KV at 2048, f16
        assert cells[5] != "—" and cells[6] != "—"
        _until(lambda: 'data-model="smollm2"' in picker.loaded_view.value)

        picker.unload().join(60)
        _until(lambda: 'data-model="smollm2"' not in mem.html.value)
        assert [k for k, _ in _widths(mem.html.value)] == ["other", "free"]
        _until(lambda: "No model is loaded" in picker.loaded_view.value)
    finally:
        picker.close()
        mem.close()


def test_picker_pull_shows_progress_and_selects_the_model(manager: ModelManager, smollm2_path: Path) -> None:
    picker = picker_module.picker(manager)
    try:
        picker.pull(str(smollm2_path)).join(60)
        assert "pulled" in picker.pull_status.value, picker.pull_status.value
        record = manager.store.get(picker.model.value)
        assert record is not None and record.path == smollm2_path
        assert picker.estimate is not None
        assert picker.pull_progress.layout.display == "none"
    finally:
        picker.close()


def test_picker_errors_are_shown_not_raised(manager: ModelManager) -> None:
    picker = picker_module.picker(manager)
    try:
        picker.pull("no-such-model-anywhere").join(30)
        assert "did you mean" in picker.pull_status.value or "not found" in picker.pull_status.value
    finally:
        picker.close()


def test_magics_return_the_widgets(manager: ModelManager, monkeypatch: pytest.MonkeyPatch) -> None:
    import IPython
    from IPython.testing.globalipapp import start_ipython

    from jupyter_llm import manager as manager_module

    monkeypatch.setattr(manager_module, "_manager", manager)
    ip = start_ipython() or IPython.get_ipython()
    ip.run_line_magic("load_ext", "jupyter_llm")
    picker = ip.run_line_magic("llm", "picker")
    mem = ip.run_line_magic("llm", "mem")
    try:
        assert isinstance(picker, picker_module.ModelPicker)
        assert isinstance(mem, widgets.MemoryWidget)
        assert picker.manager is manager and mem.manager is manager
    finally:
        picker.close()
        mem.close()


@pytest.mark.slow
def test_memory_widget_shows_what_remotes_report_without_waiting_for_them(
        manager: ModelManager, smollm2_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from jupyter_llm.notebook.display import human_bytes
    from jupyter_llm.options import LoadOptions
    from tests.apiserver import running_server
    from tests.llamacpp import free_port

    # a remote that takes the connection (the listen backlog) and never answers: its poll is open
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    with running_server(smollm2_path, tmp_path / "k2") as (other, server):
        other.load("smollm2", LoadOptions(n_ctx=512, gpu_layers=0, threads=1, keep_alive=None))
        measured = sum(s["total"] for s in other.ps()[0].to_dict()["measured"].values())
        monkeypatch.setenv("K2_TOKEN", str(server.token))
        manager.remotes.add("k2", server.url, api="ollama", token_env="K2_TOKEN")
        manager.remotes.add("dead", f"http://127.0.0.1:{free_port()}", api="openai")
        manager.remotes.add("silent", f"http://127.0.0.1:{silent.getsockname()[1]}", api="ollama")
        mem = widgets.memory_widget(manager, period=0)
        try:
            # drawn at once from the registry's last poll: the silent remote is still being asked
            assert 'data-remote="silent" data-state="checking"' in mem.html.value, mem.html.value
            assert "checking…" in mem.html.value
            # each poll that ends is an event: the widget redraws with what the remote reported
            _until(lambda: 'data-remote="k2" data-state="reachable"' in mem.html.value)
            _until(lambda: 'data-remote="dead" data-state="unreachable"' in mem.html.value)
            drawn = mem.html.value
            row = re.search(r'<tr data-remote-model="k2/smollm2">(.*?)</tr>', drawn)
            assert row is not None, drawn
            cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1))
            # Ollama's /api/ps: size = what the remote's llama.cpp measured, none of it in VRAM (CPU)
            assert cells == ["k2/smollm2", human_bytes(measured), human_bytes(0), "512", "?"], cells
            assert "1 model(s) loaded" in drawn
            dead = re.search(r'data-remote="dead" data-state="unreachable">(.*?)</div>', drawn)
            assert dead is not None and "127.0.0.1" in dead.group(1)
            # the silent remote's read times out: shown as such, never a wait in the widget
            _until(lambda: 'data-remote="silent" data-state="checking"' not in mem.html.value)
            assert re.search(r'data-remote="silent" data-state="(unreachable|error)"', mem.html.value)
        finally:
            mem.close()
            silent.close()


def test_what_a_remote_did_not_report_is_drawn_as_unknown() -> None:
    # llama-server's /props and /slots give a context and slots but no sizes (docs/notes.md §10)
    state = {"name": "big", "url": "http://127.0.0.1:8080", "api": "openai", "state": "reachable", "error": None,
             "running": [{"name": "big/smollm2", "model": "smollm2", "size": None, "size_vram": None,
                          "context_length": 2048, "slots": 4, "busy": 1}]}
    drawn = widgets.remotes_html([state])
    row = re.search(r'<tr data-remote-model="big/smollm2">(.*?)</tr>', drawn)
    assert row is not None, drawn
    assert re.findall(r"<td[^>]*>(.*?)</td>", row.group(1)) == ["big/smollm2", "?", "?", "2048", "1/4 busy"]
    assert widgets.remotes_html([]) == ""  # no remotes: nothing drawn
