"""Remote engines against real ones on loopback: llama.cpp's own llama-server (OpenAI API), a
second real kernel running ``%llm serve`` (Ollama API, with a token), and a closed port."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import jupyter_llm
from jupyter_llm import server as api
from jupyter_llm.errors import ModelNotFoundError, RemoteEngineError
from jupyter_llm.manager import ModelManager
from jupyter_llm.notebook.remote_display import remote_models_table, remote_ps_table, remotes_table
from jupyter_llm.progress import PullProgress
from jupyter_llm.remote.client import HOP_HEADER
from jupyter_llm.remote.registry import FILE, Remotes
from jupyter_llm.store.records import Store
from tests.apiserver import wait_until
from tests.fakeollama import FakeOllamaRegistry, build_model
from tests.ggufs import write_tiny_llama
from tests.kernel import Kernel
from tests.llamacpp import free_port, tool_path

pytestmark = pytest.mark.slow

LS_TOKEN = "ls-secret-7f3a9c1e"
K2_TOKEN = "k2-secret-0b8d2e44"
GREEDY = {"temperature": 0.0, "seed": 7, "max_tokens": 16}


@pytest.fixture(scope="module")
def llama_server(smollm2_path: Path) -> Iterator[str]:
    """llama.cpp's llama-server with the default model as "smollm2", a token and its metrics."""
    port = free_port()
    proc = subprocess.Popen([str(tool_path("llama-server")), "-m", str(smollm2_path), "--host", "127.0.0.1",
                             "--port", str(port), "-t", "1", "-c", "2048", "-np", "1", "--alias", "smollm2",
                             "--api-key", LS_TOKEN, "--metrics"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not become healthy on {url} (exit {proc.poll()})")
            time.sleep(0.2)
        yield url
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeOllamaRegistry]:
    """A loopback Ollama registry with a tiny model, for pulls onto the second kernel."""
    tiny = build_model(write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf").read_bytes())
    with FakeOllamaRegistry(lifetime=600) as fake:
        fake.add("library", "tiny", "latest", tiny)
        yield fake


def _kernel_env(root: Path, **more: str) -> dict[str, str]:
    return {"JUPYTER_LLM_HOME": str(root / "home"), "HF_HOME": str(root / "hf"),
            "HF_HUB_CACHE": str(root / "hf" / "hub"), "OLLAMA_MODELS": str(root / "ollama"),
            "JUPYTER_LLM_HF_ENDPOINT": "http://127.0.0.1:9", "OMP_WAIT_POLICY": "PASSIVE", **more}


@pytest.fixture(scope="module")
def second_kernel(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path,
                  registry: FakeOllamaRegistry) -> Iterator[str]:
    """Another real kernel serving the default model over its API with a token: the Ollama remote."""
    port = free_port()
    k = Kernel(_kernel_env(tmp_path_factory.mktemp("k2"), JUPYTER_LLM_OLLAMA_REGISTRY=registry.url))
    try:
        k.ok("%load_ext jupyter_llm")
        k.ok(f"""
from pathlib import Path
from jupyter_llm.manager import get_manager
from jupyter_llm.store.sources import Pulled
get_manager().store.put("smollm2", Pulled("pip", [Path({str(smollm2_path)!r})], owned=[]))
""")
        k.ok(f"%llm serve --port {port} --token {K2_TOKEN} --parallel 1")
        yield f"http://127.0.0.1:{port}"
    finally:
        k.close()


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LS_TOKEN", LS_TOKEN)
    monkeypatch.setenv("K2_TOKEN", K2_TOKEN)


def _closed_port() -> str:
    return f"http://127.0.0.1:{free_port()}"  # bound and released: nothing listens there


def _no_token(*texts: str) -> None:
    for text in texts:
        assert LS_TOKEN not in text and K2_TOKEN not in text, text


# -- the list of remotes -------------------------------------------------------------------------


def test_remotes_are_persisted_atomically_without_their_token(tokens: None, tmp_path: Path) -> None:
    manager = ModelManager(Store(root=tmp_path / "records"))
    manager.remotes.add("big", "http://127.0.0.1:1234/v1/", api="openai", token_env="LS_TOKEN")
    manager.remotes.add("box", "http://127.0.0.1:1235", api="ollama")
    saved = (tmp_path / FILE).read_text()
    _no_token(saved)
    assert json.loads(saved)["remotes"][0] == {"name": "big", "url": "http://127.0.0.1:1234", "api": "openai",
                                               "token_env": "LS_TOKEN"}
    assert not list(tmp_path.glob(".remotes-*"))  # the temporary file was renamed into place

    again = ModelManager(Store(root=tmp_path / "records"))  # a new manager (a new kernel) reads them back
    assert [(r.name, r.url, r.api) for r in again.remotes.all()] == [
        ("big", "http://127.0.0.1:1234", "openai"), ("box", "http://127.0.0.1:1235", "ollama")]
    assert again.remotes.model("big/smollm2").name == "big/smollm2"
    assert again.remotes.model("hf.co/user/repo") is None and again.remotes.model("smollm2") is None
    again.remotes.remove("box")
    assert [r.name for r in ModelManager(Store(root=tmp_path / "records")).remotes.all()] == ["big"]
    with pytest.raises(ModelNotFoundError, match="remote add"):
        again.remotes.remove("box")
    _no_token(repr(again.remotes.all()), json.dumps(again.snapshot()["remotes"], default=str))


def test_a_broken_remotes_file_is_reported_and_never_stops_the_local_models(tmp_path: Path) -> None:
    manager = ModelManager(Store(root=tmp_path / "records"))
    (tmp_path / FILE).write_text("{not json")
    assert manager.remotes.model("big/smollm2") is None  # the name is looked up locally, as ever
    state = manager.remotes.states()[0]
    assert state["state"] == "error" and FILE in state["error"] and "delete it" in state["error"]
    assert "error" in repr(remote_models_table([state]))
    assert manager.snapshot()["remotes"][0]["state"] == "error"


def test_engine_metrics_are_parsed_as_far_as_they_go_and_the_rest_is_unknown() -> None:
    from jupyter_llm.remote.client import Client
    from jupyter_llm.remote.openai_engine import OpenAIEngine, parse_metrics
    from jupyter_llm.remote.registry import Remote

    text = """# HELP vllm:num_requests_running Number of requests running.
vllm:num_requests_running{model_name="m"} 2.0
vllm:num_requests_waiting{model_name="m"} 1.0
vllm:kv_cache_usage_perc{model_name="m",engine="0"} 0.25 1700000000
process_cpu_seconds_total 12.5
vllm:broken{model_name="m"} not-a-number
garbage line
"""
    metrics = parse_metrics(text)
    assert metrics == {"vllm:num_requests_running": 2.0, "vllm:num_requests_waiting": 1.0,
                       "vllm:kv_cache_usage_perc": 0.25}
    engine = OpenAIEngine(Client(Remote("v", "http://127.0.0.1:1", "openai")))
    rows = engine.running({"metrics": metrics}, ["m"])  # no /props, no /slots: a vLLM
    assert rows[0]["context_length"] is None and rows[0]["slots"] is None
    state = {"name": "v", "url": "http://127.0.0.1:1", "api": "openai", "state": "reachable", "error": None,
             "models": [{"name": "v/m", "model": "m", "size": None}],
             "running": [{"name": "v/m", **rows[0]}]}
    row = remote_ps_table([state]).rows[0]
    assert row[:5] == ["v/m", "?", "?", "?", "?"]  # unknown, not zero
    assert "num_requests_running=2" in row[5] and "kv_cache_usage_perc=0.25" in row[5]


@pytest.mark.parametrize(("name", "url", "api", "token_env", "says"), [
    ("a/b", "http://h:1", "openai", None, "remote name"),
    ("ok", "ftp://h:1", "openai", None, "remote address"),
    ("ok", "http://user:pw@h:1", "openai", None, "no user or password"),
    ("ok", "http://h:1", "grpc", None, "--api"),
    ("ok", "http://h:1", "openai", "sk-not a name", "never the token itself"),
])
def test_bad_remotes_are_refused_with_what_to_fix(tmp_path: Path, name: str, url: str, api: str,
                                                  token_env: str | None, says: str) -> None:
    remotes = Remotes(lambda: tmp_path, lambda *a, **k: None)
    with pytest.raises(ValueError, match=says):
        remotes.add(name, url, api=api, token_env=token_env)
    assert not (tmp_path / FILE).exists()


def test_an_unreachable_remote_fails_fast_naming_its_address_and_local_models_still_list(
        tmp_path: Path, smollm2_path: Path) -> None:
    from jupyter_llm.store.sources import Pulled

    manager = ModelManager(Store(root=tmp_path / "records"))
    manager.store.put("smollm2", Pulled("pip", [smollm2_path], owned=[]))
    dead = _closed_port()
    manager.remotes.add("dead", dead, api="ollama")
    t0 = time.monotonic()
    states = manager.remotes.states()
    table = remote_models_table(states)
    assert manager.models()[0].name == "smollm2"  # the local model is listed as ever
    assert states[0]["state"] == "unreachable" and dead in states[0]["error"]
    assert "dead/…" in repr(table) and "unreachable" in repr(table)
    model = manager.remotes.model("dead/smollm2")
    with pytest.raises(RemoteEngineError, match=dead.replace(".", r"\.")) as err:
        "".join(c.text for c in model.runtime.chat([{"role": "user", "content": "hi"}], jupyter_llm_sampling()))
    assert err.value.status is None and "%llm remote" in str(err.value)
    # A fail-fast bound (a refused connection fails at once), not a measurement.
    assert time.monotonic() - t0 < 30
    assert manager.snapshot()["remotes"][0]["state"] == "unreachable"


def test_what_a_remote_cannot_do_yet_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    from jupyter_llm import chat
    from jupyter_llm.errors import CapabilityError

    manager = ModelManager(Store(root=tmp_path / "records"))
    manager.remotes.add("dead", _closed_port(), api="openai")
    model = manager.remotes.model("dead/m")

    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    with pytest.raises(CapabilityError, match="tool calling with a remote model"):
        chat.start(model, [{"role": "user", "content": "1+2?"}], tools=[add])
    with pytest.raises(CapabilityError, match="embeddings"):
        model.runtime.embed(["x"])


def jupyter_llm_sampling() -> Any:
    from jupyter_llm.options import SamplingOptions

    return SamplingOptions(**GREEDY)


# -- llama-server as the OpenAI-compatible remote --------------------------------------------------


def test_llama_server_models_chat_and_state_through_the_python_api(llama_server: str, tokens: None) -> None:
    jupyter_llm.remote_add("big", llama_server + "/v1", api="openai", token_env="LS_TOKEN")
    listed = jupyter_llm.remote_list()
    assert listed[0]["state"] == "reachable", listed
    assert [m["name"] for m in listed[0]["models"]] == ["big/smollm2"]

    model = jupyter_llm.Model("big/smollm2")
    pieces = list(model.chat([{"role": "user", "content": "Name a colour."}], stream=True, **GREEDY))
    assert len(pieces) > 1 and "".join(pieces).strip()
    whole = model.chat([{"role": "user", "content": "Name a colour."}], **GREEDY)
    assert whole == "".join(pieces)  # greedy: the same answer streamed or not
    first = model.chat("Say one word.", **GREEDY)  # the handle's own conversation, kept here
    assert model.history == [{"role": "user", "content": "Say one word."}, {"role": "assistant", "content": first}]
    assert list(model.generate("Once upon a time", stream=True, **GREEDY))

    ps = remote_ps_table(jupyter_llm.remote_list())
    row = ps.rows[0]
    assert row[0] == "big/smollm2" and row[3] == "2048"  # the context llama-server reports (/props)
    assert row[4] == "0/1 busy"  # its one slot (/slots)
    assert "requests_processing" in row[5] or "tokens" in row[5]  # its /metrics
    _no_token(repr(ps), repr(remotes_table(jupyter_llm.remote_list())), repr(model))


def _predicted(url: str) -> float:
    """llama-server's count of tokens generated so far (its /metrics)."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {LS_TOKEN}"}).text
    return float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith("llamacpp:tokens_predicted_total")))


def _idle(url: str) -> bool:
    slots = httpx.get(f"{url}/slots", headers={"Authorization": f"Bearer {LS_TOKEN}"}).json()
    return not any(s["is_processing"] for s in slots)


def test_leaving_a_remote_stream_early_stops_the_generation_there(llama_server: str, tokens: None) -> None:
    jupyter_llm.remote_add("big", llama_server, api="openai", token_env="LS_TOKEN")
    before = _predicted(llama_server)
    pieces = jupyter_llm.Model("big/smollm2").generate("Once upon a time", stream=True, temperature=0,
                                                       max_tokens=1800)
    for i, _ in enumerate(pieces):
        if i == 3:
            break
    pieces.close()  # as leaving a for loop early does: the connection is closed
    assert wait_until(lambda: _idle(llama_server))
    assert _predicted(llama_server) - before < 200  # far fewer than the 1800 asked for: the engine stopped


def test_a_wrong_token_is_refused_naming_the_variable_never_the_token(llama_server: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LS_TOKEN", "wrong-" + LS_TOKEN)
    jupyter_llm.remote_add("big", llama_server, api="openai", token_env="LS_TOKEN")
    with pytest.raises(RemoteEngineError) as err:
        jupyter_llm.Model("big/smollm2").chat("hi", **GREEDY)
    assert err.value.status == 401 and "$LS_TOKEN" in str(err.value) and llama_server in str(err.value)
    _no_token(str(err.value))
    assert "wrong-" not in str(err.value)


def test_an_openai_remote_says_it_cannot_pull_and_unknown_models_are_not_found(llama_server: str,
                                                                               tokens: None) -> None:
    jupyter_llm.remote_add("big", llama_server, api="openai", token_env="LS_TOKEN")
    with pytest.raises(RemoteEngineError, match="cannot pull models"):
        jupyter_llm.pull("big/smollm2", progress=False)
    jupyter_llm.remote_rm("big")
    with pytest.raises(ModelNotFoundError, match="is not loaded"):  # no remote of that name any more
        jupyter_llm.Model("big/smollm2")


@pytest.fixture
def our_server(tmp_path: Path, smollm2_path: Path, llama_server: str, second_kernel: str,
               tokens: None) -> Iterator[tuple[ModelManager, Any]]:
    """This kernel's own API, with the llama-server and the second kernel as remotes."""
    manager = ModelManager(Store(root=tmp_path / "records"))
    manager.remotes.add("big", llama_server, api="openai", token_env="LS_TOKEN")
    manager.remotes.add("k2", second_kernel, api="ollama", token_env="K2_TOKEN")
    server = api.serve(manager, port=0)
    try:
        yield manager, server
    finally:
        api.stop(manager)
        manager.close()


def test_our_api_routes_remote_models_for_the_official_clients(our_server: tuple[ModelManager, Any],
                                                               request: pytest.FixtureRequest) -> None:
    import ollama
    import openai

    manager, server = our_server
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key=server.token)
    request.addfinalizer(oa.close)  # its pooled connection closed now, not by a later garbage collection
    ids = [m.id for m in oa.models.list()]
    assert "big/smollm2" in ids and "k2/smollm2" in ids
    for name in ("big/smollm2", "k2/smollm2"):
        messages: Any = [{"role": "user", "content": "Name a colour."}]
        whole = oa.chat.completions.create(model=name, messages=messages, temperature=0, seed=7, max_tokens=16)
        assert whole.choices[0].message.content and whole.usage.completion_tokens > 0
        stream = oa.chat.completions.create(model=name, messages=messages, temperature=0, seed=7, max_tokens=16,
                                            stream=True)
        parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert len([p for p in parts if p]) > 1 and "".join(parts) == whole.choices[0].message.content

    completion = oa.completions.create(model="k2/smollm2", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert completion.choices[0].text and completion.usage.completion_tokens > 0

    client = ollama.Client(host=server.url, headers={"Authorization": f"Bearer {server.token}"})
    request.addfinalizer(client.close)
    assert {"big/smollm2", "k2/smollm2"} <= {m.model for m in client.list().models}
    chunks = list(client.chat(model="k2/smollm2", messages=[{"role": "user", "content": "Hi"}], stream=True,
                              options={"temperature": 0, "seed": 7, "num_predict": 12}))
    assert len(chunks) > 2 and chunks[-1].done and chunks[-1].eval_count > 0
    answer = client.generate(model="big/smollm2", prompt="Say hi.", options={"temperature": 0, "num_predict": 8})
    assert answer.response and answer.done
    # a remote's poll gets only the server's own models: kernels that are each other's remotes never loop
    hop = httpx.get(f"{server.url}/api/tags", headers={"Authorization": f"Bearer {server.token}", HOP_HEADER: "1"})
    assert hop.status_code == 200 and hop.json()["models"] == []  # this server's store is empty
    manager.remotes.add("me", server.url, api="ollama", token_env="ME_TOKEN")
    os.environ["ME_TOKEN"] = server.token
    try:
        me = next(s for s in manager.remotes.states() if s["name"] == "me")
    finally:
        del os.environ["ME_TOKEN"]
    assert me["state"] == "reachable" and me["models"] == [], me
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="k2/no-such-model", messages=[{"role": "user", "content": "Hi"}])
    assert err.value.status_code == 404
    _no_token(err.value.error, json.dumps(manager.snapshot(), default=str))


def test_a_remote_answer_read_to_its_end_closes_its_connection(our_server: tuple[ModelManager, Any]) -> None:
    manager, _ = our_server
    stream = manager.remotes.model("k2/smollm2").runtime.chat([{"role": "user", "content": "Hi"}],
                                                                jupyter_llm_sampling())
    assert "".join(c.text for c in stream) and stream.done
    # the reader of the HTTP stream ran to its end (its `with` blocks closed the response and the
    # client), rather than waiting after its last piece for the garbage collector
    assert stream._pieces.gi_frame is None


def test_ps_shows_what_the_ollama_remote_reports(our_server: tuple[ModelManager, Any]) -> None:
    manager, _ = our_server
    jupyter_llm_model = manager.remotes.model("k2/smollm2")
    assert "".join(c.text for c in jupyter_llm_model.runtime.chat([{"role": "user", "content": "Hi"}],
                                                                    jupyter_llm_sampling()))
    manager.remotes.forget_state("k2")
    k2 = next(s for s in manager.remotes.states() if s["name"] == "k2")
    assert k2["state"] == "reachable"
    running = {r["name"]: r for r in k2["running"]}
    assert running["k2/smollm2"]["context_length"] and running["k2/smollm2"]["size"] > 0  # its /api/ps
    row = next(r for r in remote_ps_table([k2]).rows if r[0] == "k2/smollm2")
    assert row[1] != "?" and row[3] != "?"


def test_pull_onto_the_remote_kernel_streams_progress(our_server: tuple[ModelManager, Any]) -> None:
    manager, _ = our_server
    events: list[PullProgress] = []
    seen: list[dict[str, Any]] = []
    manager.subscribe(lambda e: seen.append(e) if e["type"] == "pull" else None)
    pulled = manager.remotes.pull("k2/ollama://tiny", listeners=[events.append])
    assert pulled["remote"] == "k2"
    downloads = [e for e in events if e.status == "downloading"]
    assert downloads and downloads[-1].total and downloads[-1].completed == downloads[-1].total
    assert events[-1].status == "success" and seen  # the views saw the same events
    models = next(s for s in manager.remotes.states() if s["name"] == "k2")["models"]
    assert any("tiny" in m["name"] for m in models), models
    with pytest.raises(RemoteEngineError, match="could not pull"):
        manager.remotes.pull("k2/ollama://no-such-model", listeners=[events.append])


# -- a real kernel using both remotes ----------------------------------------------------------------


def test_a_kernel_chats_with_remote_models_and_lists_them(tmp_path: Path, llama_server: str,
                                                         second_kernel: str) -> None:
    k = Kernel(_kernel_env(tmp_path, LS_TOKEN=LS_TOKEN, K2_TOKEN=K2_TOKEN))
    texts: list[str] = []
    try:
        k.ok("%load_ext jupyter_llm")
        dead = _closed_port()
        for line in (f"%llm remote add big {llama_server} --api openai --token-env LS_TOKEN",
                     f"%llm remote add k2 {second_kernel} --api ollama --token-env K2_TOKEN",
                     f"%llm remote add dead {dead} --api ollama"):
            texts += k.ok(line).texts()
        listed = "".join(k.ok("%llm remote list").texts())
        assert re.search(r"big +\S+ +openai +\$LS_TOKEN +1 +reachable", listed), listed
        assert re.search(r"k2 +\S+ +ollama +\$K2_TOKEN +\d +reachable", listed), listed
        assert re.search(rf"dead +{dead} +ollama .* unreachable: .*{dead}", listed), listed
        models = "".join(k.ok("%llm list").texts())
        assert "big/smollm2" in models and "k2/smollm2" in models and "dead/…" in models
        for name in ("big/smollm2", "k2/smollm2"):
            run = k.ok(f"%%chat -m {name} --temperature 0 --max-tokens 12\nName a colour.")
            answer = "".join(run.texts())
            assert answer.strip() and (run.updates() or len(run.messages) > 2), run.messages
            texts.append(answer)
        # the stop button during a remote answer: the cell stops, the engine stops, the kernel lives on
        before = _predicted(llama_server)
        shown = threading.Event()

        def on_message(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "update_display_data":
                shown.set()

        def interrupt_soon() -> None:
            if shown.wait(60):
                k.km.interrupt_kernel()

        threading.Thread(target=interrupt_soon, daemon=True).start()
        run = k.run("%%chat -m big/smollm2 --session stop --temperature 0 --max-tokens 1800\n"
                    "Count from 1 to 2000, one number per line.", on_message=on_message)
        assert run.status == "error" and run.reply["content"]["ename"] == "KeyboardInterrupt", run.texts()
        assert run.updates()[-1]["content"]["metadata"]["jupyter_llm"]["stopped"] is True
        assert wait_until(lambda: _idle(llama_server))
        assert _predicted(llama_server) - before < 1000  # far fewer than the 1800 it was asked for
        k.alive_check()
        pulled = "".join(k.ok("%llm pull k2/ollama://tiny").texts())
        assert "pulled onto remote k2" in pulled, pulled
        texts.append(pulled)
        history = "".join(k.ok("from jupyter_llm.manager import get_manager\n"
                               "[m['role'] for m in get_manager().session('default').messages]").texts())
        assert history.count("assistant") == 2  # one conversation, answered by each remote in turn
        ps = "".join(k.ok("%llm ps").texts())
        assert re.search(r"big/smollm2 +\? +\? +2048 +0/1 busy", ps), ps  # llama-server's /props and /slots
        assert re.search(r"k2/smollm2 +[\d.]+ MiB +[\d.]+ \S+ +2048 .*expires", ps), ps  # the kernel's /api/ps
        texts += [listed, models, ps]
        texts += k.ok("import json; print(json.dumps(get_manager().snapshot(), default=str))").texts()
        texts += k.ok("print(open(get_manager().store.root.parent / 'remotes.json').read())").texts()
        _no_token(*texts)
    finally:
        k.close()
