"""Capabilities from the GGUF header alone: each detector on tiny GGUFs that have (and lack) the
fact it reads, and the default model's list through /api/show, /v1/models and ``%llm show``,
expected from its header as read by the ``gguf`` package (not hard-coded)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import IPython
import pytest
from IPython.testing.globalipapp import start_ipython

from jupyter_llm.capabilities import capabilities, has_fim
from jupyter_llm.store.gguf import scan
from jupyter_llm.store.sources import Pulled
from tests.apiserver import MODEL, auth, running_server
from tests.ggufs import write_tiny_llama

TOOLS_TEMPLATE = ("{% if tools %}{% for t in tools %}{{ t | tojson }}{% endfor %}{% endif %}"
                  "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
THINK_TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}<think>\n"


def caps(path: Path, **kwargs: Any) -> list[str]:
    return capabilities(scan(path), **kwargs)


def test_a_plain_chat_model_only_completes(tmp_path: Path) -> None:
    assert caps(write_tiny_llama(tmp_path / "plain.gguf")) == ["completion"]


def test_a_template_with_tools_or_thinking_says_so(tmp_path: Path) -> None:
    assert caps(write_tiny_llama(tmp_path / "t.gguf", chat_template=TOOLS_TEMPLATE)) == ["completion", "tools"]
    assert caps(write_tiny_llama(tmp_path / "k.gguf", chat_template=THINK_TEMPLATE)) == ["completion", "thinking"]
    go = '{{ if .Tools }}{{ range .Tools }}{{ . }}{{ end }}{{ end }}{{ .Prompt }}'
    assert caps(write_tiny_llama(tmp_path / "o.gguf"), ollama_template=go) == ["completion", "tools"]


def test_fim_tokens_mean_insert(tmp_path: Path) -> None:
    keyed = write_tiny_llama(tmp_path / "fim-key.gguf", metadata={"tokenizer.ggml.fim_pre_token_id": 3})
    assert caps(keyed) == ["completion", "insert"]
    vocab = _header_only(tmp_path / "fim-vocab.gguf", ["<s>", "</s>", "<|fim_prefix|>", "<|fim_suffix|>", "a"])
    plain = _header_only(tmp_path / "no-fim.gguf", ["<s>", "</s>", "fim_prefix", "a"])
    assert has_fim(scan(vocab)) and not has_fim(scan(plain))


def test_a_pooling_model_is_an_embedding_model(tmp_path: Path) -> None:
    pooled = write_tiny_llama(tmp_path / "embed.gguf", metadata={"llama.pooling_type": 1}, chat_template=None)
    assert caps(pooled) == ["embedding"]


def _header_only(path: Path, tokens: list[str]) -> Path:
    """A GGUF with a vocabulary of more than SMALL_ARRAY tokens (so the scan skips its body) and no tensors."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens + [f"w{i}" for i in range(2000)])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def expected_from_header(path: Path) -> list[str]:
    """The default model's capabilities as its header says, read independently (gguf's reader)."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = reader.fields
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    key = "tokenizer.chat_template"
    template = bytes(fields[key].parts[-1]).decode() if key in fields else ""
    tokens_field = fields["tokenizer.ggml.tokens"]
    tokens = {bytes(tokens_field.parts[i]).decode("utf-8", "replace") for i in tokens_field.data}
    if f"{arch}.pooling_type" in fields:
        return ["embedding"]
    out = ["completion"]
    if "tools" in template:
        out.append("tools")
    if "tokenizer.ggml.fim_pre_token_id" in fields or tokens & {"<fim_prefix>", "<|fim_prefix|>", "<|fim▁begin|>"}:
        out.append("insert")
    if "<think>" in template or "enable_thinking" in template:
        out.append("thinking")
    return out


@pytest.fixture(scope="module")
def served(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with running_server(smollm2_path, tmp_path_factory.mktemp("caps-api")) as pair:
        yield pair


def test_the_default_model_lists_its_capabilities_in_api_show_and_models(served: Any, smollm2_path: Path) -> None:
    _, server = served
    expected = expected_from_header(smollm2_path)
    assert expected[0] == "completion"
    with httpx.Client(base_url=server.url, headers=auth(server), timeout=60) as client:
        shown = client.post("/api/show", json={"model": MODEL}).json()
        assert shown["capabilities"] == expected
        models = client.get("/v1/models").json()["data"]
        assert next(m for m in models if m["id"] == MODEL)["capabilities"] == expected


def test_llm_show_lists_the_capabilities(smollm2_path: Path) -> None:
    from jupyter_llm.manager import get_manager

    ip = start_ipython() or IPython.get_ipython()
    ip.run_line_magic("load_ext", "jupyter_llm")
    get_manager().store.put("smollm2", Pulled("pip", [smollm2_path], owned=[]))
    shown = ip.magics_manager.registry["LLMMagics"].llm("show smollm2")
    assert ["capabilities", ", ".join(expected_from_header(smollm2_path))] in shown.rows
