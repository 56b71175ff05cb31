"""The Python API on the real default model: load, chat, generate, stream, JSON, embed, unload."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

import jupyter_llm as llm
from jupyter_llm import manager as manager_module
from jupyter_llm.store.sources import Pulled


@pytest.fixture
def model(smollm2_path: Path) -> Iterator[llm.Model]:
    manager_module._manager = None  # a fresh manager pointing at this test's store
    manager = manager_module.get_manager()
    manager.store.put("smollm2", Pulled("pip", [smollm2_path], owned=[]))
    yield llm.load("smollm2", n_ctx=1024, gpu_layers=0, keep_alive=None)
    manager.close()
    manager_module._manager = None


def test_chat_returns_text_and_streams_the_same_text(model: llm.Model) -> None:
    whole = model.chat("Name one colour.", temperature=0, max_tokens=12)
    pieces = list(model.chat("Name one colour.", temperature=0, max_tokens=12, stream=True))
    assert whole and len(pieces) > 1
    assert "".join(pieces) == whole


def test_generate_continues_raw_text(model: llm.Model) -> None:
    text = model.generate("The capital of France is", temperature=0, max_tokens=5)
    assert isinstance(text, str) and text.strip()


def test_json_schema_constrains_the_answer(model: llm.Model) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    answer = json.loads(model.chat("Invent a person.", json_schema=schema, temperature=0, max_tokens=60))
    assert isinstance(answer["name"], str) and isinstance(answer["age"], int)


def test_embeddings_are_pooled_and_normalised(model: llm.Model) -> None:
    single = model.embed("hello world")
    batch = model.embed(["something else entirely", "hello world"])
    assert len(single) == 576
    assert math.isclose(sum(x * x for x in single), 1.0, rel_tol=1e-3)
    assert max(abs(a - b) for a, b in zip(single, batch[1], strict=True)) < 1e-4


def test_a_handle_survives_unload_and_reloads(model: llm.Model) -> None:
    pid = manager_module.get_manager().get("smollm2").runtime.pid
    llm.unload("smollm2")
    assert not Path(f"/proc/{pid}").exists()
    assert model.chat("Say hi.", temperature=0, max_tokens=4)
    assert [m.name for m in llm.ps()] == ["smollm2"]
