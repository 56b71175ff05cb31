"""An Ollama model's manifest layers (template, system, params, license) and header summary reach
the store record and ``%llm show``, whether pulled from a registry or found in a local store."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_llm.manager import ModelManager
from jupyter_llm.notebook.display import models_table, show_report
from jupyter_llm.store.records import Store
from tests.fakeollama import FakeOllamaRegistry, build_model, write_local_store
from tests.ggufs import write_tiny_llama

TEMPLATE = "{{ if .System }}<|system|>{{ .System }}{{ end }}<|user|>{{ .Prompt }}<|assistant|>"
LAYERS = {"template": TEMPLATE, "system": "You are a pirate.", "params": {"stop": ["<|user|>"], "temperature": 0.2},
          "license": "Apache-2.0"}


@pytest.fixture
def tiny(tmp_path: Path) -> bytes:
    return write_tiny_llama(tmp_path / "t.gguf").read_bytes()


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOllamaRegistry]:
    with FakeOllamaRegistry(lifetime=120) as server:
        monkeypatch.setenv("JUPYTER_LLM_OLLAMA_REGISTRY", server.url)
        yield server


def _local_store(tiny: bytes) -> None:
    write_local_store(Path(os.environ["OLLAMA_MODELS"]), "registry.example", "library", "tiny", "latest",
                      build_model(tiny, **LAYERS))


def test_a_registry_pull_records_the_manifest_layers(registry: FakeOllamaRegistry, tiny: bytes) -> None:
    registry.add("library", "tiny", "latest", build_model(tiny, **LAYERS))
    record = Store().put("ollama://tiny", _pulled("ollama://tiny"))
    assert record.ollama == LAYERS
    assert Store().require("ollama://tiny").ollama == LAYERS, "kept in the record file"


def test_a_local_store_model_has_its_layers_and_a_header_summary(tiny: bytes) -> None:
    _local_store(tiny)
    (record,) = Store().records()
    assert record.source == "ollama-store" and record.ollama == LAYERS
    assert record.summary["architecture"] == "llama" and record.summary["parameters"]
    assert record.summary["quantization"]
    row = models_table([record]).rows[0]
    assert "—" not in row[2:5], f"quant/params/arch are known from the header: {row}"


def test_show_reports_the_template_system_prompt_params_and_license(tiny: bytes) -> None:
    _local_store(tiny)
    manager = ModelManager()
    try:
        shown = manager.show("ollama://tiny:latest")
    finally:
        manager.close()
    rows = dict(show_report(shown["record"], shown["info"]).rows)
    assert rows["Ollama template"].startswith("{{ if .System }}")
    assert rows["Ollama system prompt"] == "You are a pirate."
    assert json.loads(rows["Ollama params"]) == LAYERS["params"]
    assert rows["license"] == "Apache-2.0"


def test_a_record_written_before_the_ollama_field_still_loads_with_its_layers(tiny: bytes, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(tiny)
    root = Store().root
    root.mkdir(parents=True)
    old = {"name": "old:latest", "source": "ollama", "files": [str(blob)], "sha256": None, "size": len(tiny),
           "owned": [], "details": {"template": TEMPLATE, "system": "Be brief.", "digest": "sha256:00"},
           "summary": {}, "created": 0.0}
    (root / "old%3Alatest.json").write_text(json.dumps(old))
    record = Store().require("old")
    assert record.ollama == {"template": TEMPLATE, "system": "Be brief."}


def _pulled(reference: str):  # type: ignore[no-untyped-def]
    from jupyter_llm.progress import ProgressFanout
    from jupyter_llm.store.names import OllamaRef, parse
    from jupyter_llm.store.sources import ollama

    ref = parse(reference)
    assert isinstance(ref, OllamaRef)
    return ollama.pull(ref, name=reference, progress=ProgressFanout([]))


def test_a_model_whose_template_is_only_in_its_manifest_chats_with_it_and_its_system(tmp_path: Path) -> None:
    from jupyter_llm import chat
    from jupyter_llm.options import LoadOptions, SamplingOptions

    bare = write_tiny_llama(tmp_path / "bare.gguf", chat_template=None).read_bytes()  # no template in the GGUF
    _local_store(bare)
    manager = ModelManager()
    try:
        model = manager.load("ollama://tiny:latest", LoadOptions(gpu_layers=0, n_ctx=256, keep_alive=None))
        # the manifest's Go template, translated: a single-turn template rendered per exchange
        asked = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
        assert model.runtime.render(asked) == "<|system|>Be brief.<|user|>hi<|assistant|>"
        turn = chat.start(model, [{"role": "user", "content": "hi"}], SamplingOptions(max_tokens=2, temperature=0))
        list(turn)
        with_system = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "hi"}]
        assert turn.stream.result.prompt_tokens == model.runtime.count_tokens(with_system), \
            "the manifest's SYSTEM is the default system prompt"
    finally:
        manager.close()


def test_manifest_params_are_defaults_under_what_the_caller_gives() -> None:
    from jupyter_llm.options import SamplingOptions

    params = {"stop": ["<|user|>"], "temperature": 0.2, "num_predict": 64, "top_k": "not a number"}
    merged = SamplingOptions().with_model_defaults(params)
    assert merged.stop == ("<|user|>",) and merged.temperature == 0.2 and merged.max_tokens == 64
    assert merged.top_k == SamplingOptions().top_k, "a value that does not validate is ignored"
    given = SamplingOptions(temperature=1.0, stop=("END",)).with_model_defaults({"stop": "<|user|>",
                                                                                  "temperature": 0.2})
    assert given.temperature == 1.0 and given.stop == ("END", "<|user|>")


@pytest.mark.parametrize(("template", "messages", "expected"), [
    ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
     [{"role": "user", "content": "hi"}], "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
    ("{{ if .System }}S:{{ .System }} {{ end }}{{ range $i, $m := .Messages }}{{ if eq $m.Role \"user\" }}U:"
     "{{ $m.Content }} {{ else if eq $m.Role \"assistant\" }}A:{{ $m.Content }} {{ end }}{{ end }}A:",
     [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
      {"role": "user", "content": "q2"}], "S:sys U:q A:a U:q2 A:"),
])
def test_ollama_go_templates_render_as_go_would(template: str, messages: list[dict[str, str]], expected: str) -> None:
    from jupyter_llm.worker import gotemplate
    from jupyter_llm.worker.template import Meter, compile_template, render

    meter = Meter(n_ctx=4096, bytes_per_token=64, seconds=10.0, cancelled=lambda: False)
    compiled = compile_template(gotemplate.to_jinja(template), meter)  # the worker's own renderer
    rendered = render(compiled, meter, messages=messages,  # as Ollama: .Messages keeps the system ones
                      system="\n\n".join(m["content"] for m in messages if m["role"] == "system"))
    assert rendered == expected


def test_an_ollama_template_beyond_the_subset_is_refused_naming_the_construct() -> None:
    from jupyter_llm.worker import gotemplate

    with pytest.raises(ValueError, match="len"):
        gotemplate.to_jinja("{{ range $i, $m := .Messages }}{{ if eq (len $.Messages) 1 }}x{{ end }}{{ end }}")
