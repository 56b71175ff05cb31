"""The Ollama API, driven by the official ``ollama`` client against the real server and model."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai as openai_module
import pytest

from jupyter_llm.store.names import HF_PREFIX
from tests.apiserver import MODEL, auth, running_server, wait_until
from tests.fakehub import FakeHub
from tests.ggufs import write_tiny_llama

GREEDY = {"temperature": 0, "seed": 7, "num_predict": 12}


@pytest.fixture(scope="module")
def served(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with running_server(smollm2_path, tmp_path_factory.mktemp("ollama-api"), parallel=2) as pair:
        yield pair


@pytest.fixture
def client(served: Any) -> Iterator[ollama.Client]:
    _, server = served
    with ollama.Client(host=server.url, headers=auth(server)) as c:
        yield c


def test_list_shows_the_stored_model_with_details(client: ollama.Client) -> None:
    models = {m.model: m for m in client.list().models}
    assert MODEL in models
    entry = models[MODEL]
    assert entry.size == 98_362_432
    assert entry.details.format == "gguf" and entry.details.family == "llama"
    assert entry.details.quantization_level == "Q4_1"
    assert entry.details.parameter_size.endswith("M")


def test_show_gives_the_chat_template_and_model_info(client: ollama.Client) -> None:
    shown = client.show(MODEL)
    assert "<|im_start|>" in shown.template
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.block_count"] == 30
    assert shown.modelinfo["tokenizer.ggml.tokens"] is None  # arrays only with verbose, as in Ollama
    assert shown.license == "apache-2.0"
    assert "completion" in shown.capabilities
    assert shown.modelfile.startswith("# Modelfile") and "FROM " in shown.modelfile


def test_generate_non_streaming_returns_text_and_nanosecond_durations(client: ollama.Client) -> None:
    reply = client.generate(MODEL, "Name a colour.", options=GREEDY)
    assert reply.done and reply.done_reason in ("stop", "length")
    assert reply.response.strip()
    assert 0 < reply.eval_count <= 12
    assert reply.prompt_eval_count > 5
    assert reply.total_duration > reply.eval_duration > 0  # nanoseconds: ≥ 1e6 for anything real
    assert reply.total_duration > 1_000_000


def test_generate_streaming_yields_pieces_then_a_final_record(client: ollama.Client) -> None:
    parts = list(client.generate(MODEL, "Name a colour.", options=GREEDY, stream=True))
    assert len(parts) >= 3
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    streamed = "".join(p.response for p in parts)
    assert streamed == client.generate(MODEL, "Name a colour.", options=GREEDY).response
    assert parts[-1].eval_count >= sum(1 for p in parts[:-1] if p.response)  # a piece is ≥ 1 token


def test_raw_generate_skips_the_chat_template(client: ollama.Client) -> None:
    raw = client.generate(MODEL, "The capital of France is", raw=True, options=GREEDY)
    templated = client.generate(MODEL, "The capital of France is", options=GREEDY)
    assert raw.prompt_eval_count < templated.prompt_eval_count  # no system/user framing


def test_chat_streaming_and_not_agree_under_greedy_sampling(client: ollama.Client) -> None:
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2?"}]
    whole = client.chat(MODEL, messages=messages, options=GREEDY)
    assert whole.message.role == "assistant" and whole.message.content
    pieces = list(client.chat(MODEL, messages=messages, options=GREEDY, stream=True))
    assert pieces[-1].done and pieces[-1].done_reason == whole.done_reason
    assert "".join(p.message.content for p in pieces) == whole.message.content


def test_chat_with_a_json_schema_format_returns_matching_json(client: ollama.Client) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"]}
    reply = client.chat(MODEL, messages=[{"role": "user", "content": "Is the sky blue?"}], format=schema,
                        options={"temperature": 0, "num_predict": 40})
    assert json.loads(reply.message.content)["answer"] in ("yes", "no")
    any_json = client.generate(MODEL, "Give me a JSON object.", format="json", options={"temperature": 0,
                                                                                         "num_predict": 60})
    if any_json.done_reason == "stop":  # within 60 tokens the grammar closed the object
        assert isinstance(json.loads(any_json.response), dict)
    else:
        assert any_json.response.lstrip().startswith("{")


def test_stop_strings_and_num_predict_are_applied(client: ollama.Client) -> None:
    reply = client.generate(MODEL, "Count from 1 to 20, separated by commas.",
                            options={"temperature": 0, "num_predict": 60, "stop": ["5"]})
    assert "5" not in reply.response and reply.done_reason == "stop"
    short = client.generate(MODEL, "Tell me a long story.", options={"temperature": 0, "num_predict": 3})
    assert short.eval_count == 3 and short.done_reason == "length"


def test_ps_shows_the_model_loaded_on_demand(client: ollama.Client, served: Any) -> None:
    client.generate(MODEL, "hi", options={"num_predict": 1})
    running = {m.model: m for m in client.ps().models}
    assert MODEL in running
    entry = running[MODEL]
    assert entry.context_length == 2048  # per request: the server's default, one slot of 2
    assert entry.size > 96_000_000  # weights + KV + graph, as measured
    assert entry.size_vram == 0  # CPU only here
    assert entry.expires_at is not None


def test_empty_prompt_loads_and_keep_alive_zero_unloads(client: ollama.Client, served: Any) -> None:
    manager, _ = served
    client.generate(MODEL, "", keep_alive=0)
    assert wait_until(lambda: not manager.ps())
    loaded = client.generate(MODEL, "")
    assert loaded.done and loaded.done_reason == "load"
    assert [m.name for m in manager.ps()] == [MODEL]
    unloaded = client.chat(MODEL, messages=[], keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert wait_until(lambda: not manager.ps())


def test_keep_alive_on_a_request_sets_the_expiry_and_zero_unloads_after_it(client: ollama.Client,
                                                                           served: Any) -> None:
    manager, _ = served
    client.generate(MODEL, "hi", options={"num_predict": 1}, keep_alive="-1m")
    assert manager.get(MODEL).expires_at is None  # forever
    client.generate(MODEL, "hi", options={"num_predict": 1}, keep_alive="90s")
    model = manager.get(MODEL)
    assert 80 < model.expires_at - model.last_used <= 90
    reply = client.generate(MODEL, "hi", options={"num_predict": 2}, keep_alive=0)
    assert reply.done and reply.response
    assert wait_until(lambda: not manager.ps())  # unloaded right after answering


def test_embed_returns_normalized_vectors_and_legacy_embeddings_raw_ones(client: ollama.Client) -> None:
    result = client.embed(MODEL, ["the cat sat", "a dog ran"])
    assert len(result.embeddings) == 2 and len(result.embeddings[0]) == 576
    norm = sum(v * v for v in result.embeddings[0]) ** 0.5
    assert abs(norm - 1.0) < 1e-3
    assert result.embeddings[0] != result.embeddings[1]
    legacy = client.embeddings(MODEL, "the cat sat")
    raw_norm = sum(v * v for v in legacy.embedding) ** 0.5
    scaled = [v / raw_norm for v in legacy.embedding]
    assert max(abs(a - b) for a, b in zip(scaled, result.embeddings[0], strict=True)) < 1e-3


def test_copy_then_delete_work_through_the_store(client: ollama.Client, served: Any) -> None:
    manager, _ = served
    client.copy(MODEL, "smol-copy")
    assert "smol-copy" in [m.model for m in client.list().models]
    assert manager.store.get("smol-copy").files == manager.store.get(MODEL).files
    client.delete("smol-copy")
    assert "smol-copy" not in [m.model for m in client.list().models]
    assert Path(manager.store.get(MODEL).files[0]).exists()  # the shared file is kept
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("smol-copy")
    assert err.value.status_code == 404


def test_pull_streams_progress_from_the_same_pull_code(client: ollama.Client, served: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    manager, _ = served
    tiny = write_tiny_llama(tmp_path / "tiny.gguf", dtype="f16").read_bytes()
    with FakeHub(lifetime=60) as hub:
        monkeypatch.setenv("JUPYTER_LLM_HF_ENDPOINT", hub.endpoint)
        hub.add_repo("team/Tiny-GGUF", {"Tiny-F16.gguf": tiny})
        name = f"{HF_PREFIX}team/Tiny-GGUF:F16"
        events = list(client.pull(name, stream=True))
    statuses = [e.status for e in events]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    downloading = [e for e in events if e.status.startswith("pulling ") and e.total]
    assert downloading and downloading[-1].completed == downloading[-1].total == len(tiny)
    assert downloading[-1].digest == "sha256:" + hashlib.sha256(tiny).hexdigest()
    record = manager.store.get(name)
    assert record is not None and record.sha256 == hashlib.sha256(tiny).hexdigest()
    assert client.pull(name).status == "success"  # already there: answered at once


def test_embed_caps_the_inputs_and_the_tokens_of_one_request(client: ollama.Client, served: Any,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _, server = served
    t0 = time.perf_counter()
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(MODEL, ["x"] * 2049)  # once: 10,000 inputs in 50 KB took 81 s and 700 MB
    assert err.value.status_code == 400 and "2048" in err.value.error
    monkeypatch.setenv("JUPYTER_LLM_EMBED_MAX_TOKENS", "300")
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(MODEL, ["the cat sat on the mat " * 20] * 3)  # ~370 tokens
    assert err.value.status_code == 400 and "300 tokens" in err.value.error and "several requests" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(MODEL, ["x" * 1_000_000] * 7)  # refused by its size alone, before any tokenizing
    assert err.value.status_code == 400 and "300 tokens" in err.value.error
    with pytest.raises(openai_module.BadRequestError) as bad:
        openai_module.OpenAI(base_url=f"{server.url}/v1", api_key=server.token).embeddings.create(
            model=MODEL, input=["the cat sat on the mat " * 20] * 3)
    assert "300 tokens" in str(bad.value)
    assert time.perf_counter() - t0 < 20
    ok = client.embed(MODEL, ["the cat sat on the mat " * 5] * 2)
    assert len(ok.embeddings) == 2 and 40 < ok.prompt_eval_count <= 300


def test_unknown_model_is_a_404_and_the_server_keeps_serving(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        client.generate("no-such-model", "hi")
    assert err.value.status_code == 404 and "no-such-model" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(MODEL, messages=[{"role": "user", "content": "hi"}], options={"temperature": "hot"})
    assert err.value.status_code == 400 and "temperature" in err.value.error
    assert client.generate(MODEL, "hi", options={"num_predict": 1}).done


def test_a_prompt_longer_than_the_context_is_a_400_with_the_numbers(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(MODEL, "word " * 3000)
    assert err.value.status_code == 400
    assert "2048" in err.value.error and "tokens" in err.value.error


def test_the_client_reads_the_token_from_OLLAMA_API_KEY(served: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _, server = served
    monkeypatch.setenv("OLLAMA_API_KEY", server.token)
    with ollama.Client(host=server.url) as client:
        assert MODEL in [m.model for m in client.list().models]
    monkeypatch.setenv("OLLAMA_API_KEY", "wrong")
    with ollama.Client(host=server.url) as client, pytest.raises(ollama.ResponseError) as err:
        client.list()
    assert err.value.status_code == 401


def test_root_and_version_answer_like_ollama(served: Any) -> None:
    _, server = served
    assert httpx.get(server.url + "/", headers=auth(server)).text == "Ollama is running"
    version = httpx.get(server.url + "/api/version", headers=auth(server)).json()["version"]
    assert tuple(int(x) for x in version.split(".")) >= (0, 5, 0)  # clients gate structured output on it
