"""ADAPTER: a LoRA adapter GGUF, written here for the real default model, changes its answers
in the derived model's own worker while the base model stays as it was."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ollama
import pytest

from jupyter_llm import chat, derived
from jupyter_llm.errors import GGUFError
from jupyter_llm.options import LoadOptions, SamplingOptions
from tests.apiserver import MODEL, auth, running_server
from tests.ggufs import write_tiny_llama

N_LAYER, N_EMBD = 30, 576
"""SmolLM2-135M's blocks and width (docs/notes.md §1); attn_output is N_EMBD × N_EMBD."""
GREEDY = SamplingOptions(temperature=0, seed=3, max_tokens=8)
ASK = [{"role": "user", "content": "What is the capital of France?"}]


def write_lora(path: Path, *, rank: int = 8, alpha: float = 8.0, magnitude: float = 0.2, seed: int = 0) -> Path:
    """A LoRA adapter GGUF for SmolLM2's ``blk.N.attn_output.weight`` (ggml ne [576, 576]):
    ``lora_a`` ne [576, rank], ``lora_b`` ne [rank, 576] (numpy shapes reversed), values large
    enough that every layer's output moves (alpha / rank = scale 1)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for i in range(N_LAYER):
        a = (rng.standard_normal((rank, N_EMBD)) * magnitude).astype(np.float32)
        b = (rng.standard_normal((N_EMBD, rank)) * magnitude).astype(np.float32)
        writer.add_tensor(f"blk.{i}.attn_output.weight.lora_a", a)
        writer.add_tensor(f"blk.{i}.attn_output.weight.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def lora_path(tmp_path: Path) -> Path:
    return write_lora(tmp_path / "smollm2-lora.gguf")


def _answer(manager: Any, name: str) -> str:
    model = manager.load(name, LoadOptions(n_ctx=512, gpu_layers=0))
    turn = chat.start(model, ASK, GREEDY)
    return "".join(c.text for c in turn)


def test_an_adapter_changes_greedy_output_and_the_base_stays_unchanged(manager: Any, lora_path: Path) -> None:
    before = _answer(manager, "smollm2")
    derived.create(manager, "smollm2-lora", derived.spec_of(f"FROM smollm2\nADAPTER {lora_path}\n"))
    adapted = _answer(manager, "smollm2-lora")
    loaded = manager.get("smollm2-lora")
    assert loaded.options.lora == ((str(lora_path), 1.0),)  # the adapter travelled in the load options
    assert manager.get("smollm2").options.lora == ()
    assert adapted != before
    assert _answer(manager, "smollm2") == before  # the base's own worker: no adapter, same greedy answer
    shown = manager.show("smollm2-lora")["record"].ollama
    assert f"ADAPTER {lora_path}" in shown["modelfile"]


def test_an_adapter_must_be_a_lora_gguf(manager: Any, tmp_path: Path) -> None:
    model_file = write_tiny_llama(tmp_path / "tiny.gguf")
    with pytest.raises(GGUFError, match="not a LoRA adapter"):
        derived.create(manager, "bad-lora", derived.spec_of(f"FROM smollm2\nADAPTER {model_file}\n"))
    assert manager.store.get("bad-lora") is None


def test_an_adapter_uploaded_through_the_ollama_client_changes_the_answer(
        smollm2_path: Path, lora_path: Path, tmp_path: Path) -> None:
    with running_server(smollm2_path, tmp_path / "server", parallel=1) as (manager, server), \
            ollama.Client(host=server.url, headers=auth(server)) as client:
        digest = client.create_blob(lora_path)
        assert client.create(model="pirate-lora", from_=MODEL, adapters={"lora.gguf": digest}).status == "success"
        options = {"temperature": 0, "seed": 3, "num_predict": 8}
        base = client.chat(MODEL, messages=ASK, options=options).message.content
        adapted = client.chat("pirate-lora", messages=ASK, options=options).message.content
        assert adapted != base
        blob = manager.store.require("pirate-lora").ollama["adapters"][0]["path"]
        assert Path(blob).read_bytes() == lora_path.read_bytes()
        assert "ADAPTER sha256-" in client.show("pirate-lora").modelfile  # the blob's name, not its path


def test_an_adapter_made_for_another_model_fails_the_load_saying_so(tmp_path: Path, lora_path: Path) -> None:
    from jupyter_llm.errors import ModelLoadError
    from jupyter_llm.manager import ModelManager
    from jupyter_llm.store.records import Store
    from jupyter_llm.store.sources import Pulled

    tiny = write_tiny_llama(tmp_path / "tiny.gguf")  # n_embd 64: SmolLM2's adapter does not fit it
    manager = ModelManager(Store(root=tmp_path / "records"))
    try:
        manager.store.put("tiny", Pulled("local", [tiny], owned=[]))
        derived.create(manager, "tiny-lora", derived.spec_of(from_="tiny", adapters=[lora_path]))
        with pytest.raises(ModelLoadError, match="LoRA adapter"):
            manager.load("tiny-lora", LoadOptions(n_ctx=128, gpu_layers=0))
        assert manager.load("tiny", LoadOptions(n_ctx=128, gpu_layers=0)).options.lora == ()
    finally:
        manager.close()


def test_a_derived_models_num_ctx_and_adapters_become_its_load_options() -> None:
    from jupyter_llm.loading import model_defaults
    from jupyter_llm.store.records import ModelRecord

    record = ModelRecord(name="x", source="derived", files=[], ollama={
        "params": {"num_ctx": 1024}, "adapters": [{"path": "/a.gguf", "scale": 0.5, "blob": False}]})
    options = model_defaults(record, LoadOptions(parallel=2))
    assert options.n_ctx == 2048 and options.lora == (("/a.gguf", 0.5),)  # num_ctx is per slot, as in Ollama
    assert model_defaults(record, LoadOptions(n_ctx=777)).n_ctx == 777  # a context asked for wins
    assert model_defaults(None, LoadOptions()) == LoadOptions()
