"""Ollama's environment variables mean here what they mean to Ollama; ours and explicit arguments win."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

import jupyter_llm
from jupyter_llm import config
from jupyter_llm import server as api
from jupyter_llm.errors import ServerError
from jupyter_llm.manager import ModelManager, close_manager
from jupyter_llm.options import LoadOptions
from jupyter_llm.store.records import Store
from jupyter_llm.store.sources import Pulled
from tests.apiserver import MODEL, auth


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def bare(tmp_path: Path) -> ModelManager:
    manager = ModelManager(Store(root=tmp_path / "records"))
    yield manager
    api.stop(manager)
    manager.close()


def test_serve_binds_the_address_in_ollama_host(monkeypatch: pytest.MonkeyPatch) -> None:
    port = _free_port()
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{port}")
    try:
        server = jupyter_llm.serve()
        assert server.port == port and server.host == "127.0.0.1"
        assert httpx.get(f"http://127.0.0.1:{port}/api/version", headers=auth(server)).status_code == 200
    finally:
        close_manager()


@pytest.mark.parametrize("value", ["http://127.0.0.1:{port}", ":{port}", "127.0.0.1:{port}"])
def test_ollama_host_takes_ollamas_forms(value: str, monkeypatch: pytest.MonkeyPatch, bare: ModelManager) -> None:
    port = _free_port()
    monkeypatch.setenv("OLLAMA_HOST", value.format(port=port))
    assert api.serve(bare).port == port


def test_our_host_variable_and_explicit_arguments_win_over_ollama_host(monkeypatch: pytest.MonkeyPatch,
                                                                      bare: ModelManager) -> None:
    ours, theirs = _free_port(), _free_port()
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{theirs}")
    monkeypatch.setenv("JUPYTER_LLM_HOST", f"127.0.0.1:{ours}")
    assert config.serve_address() == ("127.0.0.1", ours)
    server = api.serve(bare, port=0)
    assert server.port not in (ours, theirs)
    monkeypatch.setenv("JUPYTER_LLM_HOST", "no such host:port")
    with pytest.raises(ValueError, match="JUPYTER_LLM_HOST"):
        config.serve_address()


def test_ollama_num_parallel_and_origins_set_the_servers_defaults(monkeypatch: pytest.MonkeyPatch,
                                                                   bare: ModelManager) -> None:
    monkeypatch.setenv("OLLAMA_NUM_PARALLEL", "2")
    monkeypatch.setenv("OLLAMA_ORIGINS", "http://localhost:8888, http://127.0.0.1:8888")
    server = api.serve(bare, port=0)
    assert server.parallel == 2 and server.origins == ["http://localhost:8888", "http://127.0.0.1:8888"]
    assert "2 parallel slots" in server.instructions()
    api.stop(bare)
    server = api.serve(bare, port=0, parallel=3, origins=["http://example.test"])
    assert server.parallel == 3 and server.origins == ["http://example.test"]


def test_a_wildcard_in_ollama_origins_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch,
                                                                     bare: ModelManager) -> None:
    monkeypatch.setenv("OLLAMA_ORIGINS", "*")
    with pytest.raises(ServerError, match="OLLAMA_ORIGINS"):
        api.serve(bare, port=0)
    monkeypatch.setenv("OLLAMA_NUM_PARALLEL", "lots")
    with pytest.raises(ValueError, match="OLLAMA_NUM_PARALLEL"):
        config.num_parallel()


def test_ollama_load_defaults_become_the_load_options_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_KEEP_ALIVE", "-1")
    monkeypatch.setenv("OLLAMA_CONTEXT_LENGTH", "8192")
    monkeypatch.setenv("OLLAMA_FLASH_ATTENTION", "1")
    monkeypatch.setenv("OLLAMA_KV_CACHE_TYPE", "q8_0")
    options = LoadOptions()
    assert (options.keep_alive, options.n_ctx, options.flash_attn, options.kv_type) == (None, 8192, True, "q8_0")
    monkeypatch.setenv("JUPYTER_LLM_KEEP_ALIVE", "10m")
    assert LoadOptions().keep_alive == 600
    assert LoadOptions(keep_alive=5, n_ctx=1024).keep_alive == 5  # explicit arguments win
    monkeypatch.setenv("OLLAMA_KEEP_ALIVE", "soon")
    monkeypatch.delenv("JUPYTER_LLM_KEEP_ALIVE")
    with pytest.raises(ValueError, match="OLLAMA_KEEP_ALIVE"):
        LoadOptions()


def test_a_quantized_kv_cache_type_turns_flash_attention_on_unless_it_is_turned_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_KV_CACHE_TYPE", "q4_0")
    assert LoadOptions().flash_attn is True
    monkeypatch.setenv("OLLAMA_FLASH_ATTENTION", "false")
    with pytest.raises(ValueError, match="OLLAMA_FLASH_ATTENTION"):
        LoadOptions()
    monkeypatch.setenv("OLLAMA_KV_CACHE_TYPE", "q5_1")
    with pytest.raises(ValueError, match="OLLAMA_KV_CACHE_TYPE"):
        config.kv_cache_type()


def test_the_api_loads_on_demand_with_ollamas_context_length_and_cache_settings(
        smollm2_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_CONTEXT_LENGTH", "1024")
    monkeypatch.setenv("OLLAMA_FLASH_ATTENTION", "1")
    monkeypatch.setenv("OLLAMA_KV_CACHE_TYPE", "q8_0")
    monkeypatch.setenv("OLLAMA_KEEP_ALIVE", "1h")
    manager = ModelManager(Store(root=tmp_path / "records"))
    manager.store.put(MODEL, Pulled("pip", [smollm2_path], owned=[]))
    try:
        server = api.serve(manager, port=0, parallel=2)
        with httpx.Client(base_url=server.url, headers=auth(server), timeout=120) as client:
            client.post("/api/generate", json={"model": MODEL, "prompt": ""}).raise_for_status()
        options = manager.get(MODEL).options
        assert (options.n_ctx, options.parallel) == (2 * 1024, 2)  # the context length is per request
        assert (options.flash_attn, options.kv_type, options.keep_alive) == (True, "q8_0", 3600)
    finally:
        api.stop(manager)
        manager.close()
