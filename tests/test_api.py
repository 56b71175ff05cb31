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
    pieces = list(model.chat("Name one colour.", new=True, temperature=0, max_tokens=12, stream=True))
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


def test_a_string_continues_the_handles_own_conversation(model: llm.Model) -> None:
    first = model.chat("My name is Ada.", temperature=0, max_tokens=8)
    streamed = "".join(model.chat("And what is my name?", stream=True, temperature=0, max_tokens=8))
    assert [m["role"] for m in model.history] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in model.history] == ["My name is Ada.", first, "And what is my name?", streamed]
    model.chat("Hello again.", new=True, temperature=0, max_tokens=4)
    assert len(model.history) == 2 and model.history[0]["content"] == "Hello again.", "new=True starts over"
    model.reset()
    assert model.history == []


def test_a_list_of_messages_is_answered_as_given_without_history(model: llm.Model) -> None:
    messages = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hello Ada."},
                {"role": "user", "content": "What is my name?"}]
    assert model.chat(messages, temperature=0, max_tokens=8)
    assert model.history == [], "the caller keeps the history of a list (as Ollama's and OpenAI's APIs)"
    assert len(messages) == 3, "the caller's list is not changed"


def test_a_long_conversation_drops_its_oldest_turns_with_a_warning(model: llm.Model) -> None:
    filler = "The quick brown fox jumps over the lazy dog. " * 20  # ~200 tokens; the context is 1024
    with pytest.warns(UserWarning, match="dropped the .* oldest message.*model.reset"):
        for _ in range(6):
            model.chat(f"Summarise: {filler}", temperature=0, max_tokens=16)
    assert model.history[-2]["content"] == f"Summarise: {filler}"
    assert len(model.history) < 12, "the dropped turns are gone from the handle's history too"


def test_a_system_prompt_starts_the_conversation(model: llm.Model) -> None:
    model.chat("Hi.", system="Answer in one word.", temperature=0, max_tokens=4)
    model.chat("Again.", temperature=0, max_tokens=4)
    assert len(model.history) == 4, "the same (or no) system prompt continues"
    model.chat("Hi.", system="Answer in French.", temperature=0, max_tokens=4)
    assert len(model.history) == 2, "a different system prompt starts a new conversation"


def test_the_readmes_python_example_runs_as_it_reads(smollm2_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    example = readme.split("## From Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    manager_module._manager = None
    manager = manager_module.get_manager()
    manager.store.put("smollm2", Pulled("pip", [smollm2_path], owned=[]))
    namespace: dict[str, object] = {}
    try:
        exec(compile(example, "README.md", "exec"), namespace)
        model = namespace["model"]
        assert isinstance(model, llm.Model)
        # after reset(), the list was not remembered and the JSON question was
        assert [m["content"] for m in model.history if m["role"] == "user"] == ["Give me a person."]
        assert llm.ps() == [], "the example ends by unloading"
    finally:
        manager.close()
        manager_module._manager = None
