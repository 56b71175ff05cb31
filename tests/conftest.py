"""Shared fixtures: every test gets its own empty store, HF cache and Ollama store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

# huggingface_hub reads these at import time, so they are set before any test imports it.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("GGML_NO_BACKTRACE", "1")


@pytest.fixture(autouse=True)
def isolated_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point all of jupyter_llm's state (and the HF and Ollama caches) at a fresh temp dir."""
    root = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("JUPYTER_LLM_HOME", str(root / "home"))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hf" / "hub"))
    monkeypatch.setenv("OLLAMA_MODELS", str(root / "ollama"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(root / "runtime"))  # servers' token files
    # Every test has a fresh home, so "auto" would probe repacking again at each load of a type
    # this CPU may repack (on an AMX CPU the default model's Q4_1: a probe that crashes, ~2 s).
    # tests/test_repack.py sets "auto" itself and covers the product's default.
    monkeypatch.setenv("JUPYTER_LLM_REPACK", "off")
    for name in ("JUPYTER_LLM_HF_ENDPOINT", "HF_ENDPOINT", "JUPYTER_LLM_OLLAMA_REGISTRY", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return root


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real default model (SmolLM2-135M-Instruct Q4_1), fetched once per machine."""
    from tests.model import default_model

    return default_model()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A loopback fake Hugging Face hub, configured as the endpoint for this test."""
    from tests.fakehub import FakeHub

    with FakeHub(lifetime=120) as server:
        monkeypatch.setenv("JUPYTER_LLM_HF_ENDPOINT", server.endpoint)
        yield server


@pytest.fixture
def manager(smollm2_path: Path) -> Iterator[Any]:
    """A fresh ModelManager whose store holds the real default model as "smollm2"."""
    from jupyter_llm.manager import ModelManager
    from jupyter_llm.store.sources import Pulled

    manager = ModelManager()
    manager.store.put("smollm2", Pulled("pip", [smollm2_path], owned=[]))
    yield manager
    manager.close()
