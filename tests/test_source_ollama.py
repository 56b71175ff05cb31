"""sources.ollama: registry pulls against a loopback fake registry, and a local Ollama store read in place."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from jupyter_llm import config
from jupyter_llm.errors import (
    AmbiguousModelError,
    HostUnreachableError,
    IntegrityError,
    ModelNotFoundError,
    RemoteError,
)
from jupyter_llm.progress import ProgressFanout, PullProgress
from jupyter_llm.store.gguf import scan
from jupyter_llm.store.names import OllamaRef, parse
from jupyter_llm.store.sources import Pulled, ollama
from tests.fakeollama import MANIFEST_MEDIA_TYPE, FakeModel, FakeOllamaRegistry, build_model, write_local_store
from tests.ggufs import write_tiny_llama

MB = 1 << 20


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOllamaRegistry]:
    with FakeOllamaRegistry(lifetime=120) as server:
        monkeypatch.setenv("JUPYTER_LLM_OLLAMA_REGISTRY", server.url)
        yield server


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> bytes:
    return write_tiny_llama(tmp_path / "tiny.gguf").read_bytes()


def _ref(reference: str) -> OllamaRef:
    ref = parse(reference)
    assert isinstance(ref, OllamaRef)
    return ref


def _pull(reference: str, events: list[PullProgress] | None = None) -> Pulled:
    listeners = [events.append] if events is not None else []
    return ollama.pull(_ref(reference), name=reference, progress=ProgressFanout(listeners))


# -- registry pulls -----------------------------------------------------------------------------------


def test_pull_by_name_verifies_blobs_and_stores_the_manifest_verbatim(registry: FakeOllamaRegistry,
                                                                       tiny_gguf: bytes) -> None:
    model = registry.add("library", "tiny", "latest", build_model(
        tiny_gguf, template="{{ .Prompt }}", system="Be brief.", params={"stop": ["<|im_end|>"]}, license="MIT"))
    events: list[PullProgress] = []
    pulled = _pull("ollama://tiny", events)

    host = urlsplit(registry.url).netloc
    home = config.home() / "ollama"
    manifest = home / "manifests" / host / "library" / "tiny" / "latest"
    assert manifest.read_bytes() == model.manifest
    (blob,) = pulled.files
    assert blob == home / "blobs" / f"sha256-{model.model_digest}"
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == model.model_digest == pulled.sha256
    assert scan(blob).architecture == "llama"  # the model blob is a plain GGUF
    assert set(pulled.owned) == {manifest, *(home / "blobs" / f"sha256-{d}" for d in model.blobs)}
    assert all(p.exists() for p in pulled.owned)
    details = pulled.details
    assert details["manifest_digest"] == model.manifest_digest
    assert details["digest"] == f"sha256:{model.model_digest}"
    assert (details["template"], details["system"], details["license"]) == ("{{ .Prompt }}", "Be brief.", "MIT")
    assert details["params"] == {"stop": ["<|im_end|>"]}
    assert details["config"]["model_format"] == "gguf"
    manifest_get = registry.log[0]
    assert manifest_get.path == "/v2/library/tiny/manifests/latest"
    assert manifest_get.headers.get("Accept") == MANIFEST_MEDIA_TYPE
    assert all(r.host.startswith("localhost:") for r in registry.log if r.key)  # blobs came from the CDN
    statuses = [e.status for e in events]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "writing manifest"
    assert statuses.count("verifying sha256 digest") == len(model.blobs)


def test_pull_resumes_a_blob_after_a_dropped_connection(registry: FakeOllamaRegistry) -> None:
    data = os.urandom(8 * MB)
    model = registry.add("library", "big", "7b", build_model(data))
    registry.drop_after(model.model_digest, 3 * MB + 1)
    pulled = _pull("ollama://big:7b")
    assert pulled.files[0].read_bytes() == data
    assert [g.range for g in registry.blob_gets(model.model_digest)] == [None, f"bytes={3 * MB + 1}-"]
    assert registry.bytes_sent(model.model_digest) == len(data)


def test_corrupt_blob_raises_and_writes_no_manifest(registry: FakeOllamaRegistry) -> None:
    model = registry.add("library", "tiny", "latest", build_model(os.urandom(2 * MB)))
    registry.corrupt(model.model_digest, 12345)
    with pytest.raises(IntegrityError):
        _pull("ollama://tiny")
    home = config.home() / "ollama"
    assert not (home / "manifests").exists()
    assert not (home / "blobs" / f"sha256-{model.model_digest}").exists()
    assert not list((home / "blobs").glob("*.partial"))


def test_second_pull_only_fetches_the_manifest(registry: FakeOllamaRegistry, tiny_gguf: bytes) -> None:
    registry.add("library", "tiny", "latest", build_model(tiny_gguf))
    first = _pull("ollama://tiny")
    registry.log.clear()
    assert _pull("ollama://tiny").files == first.files
    assert [r.path for r in registry.log] == ["/v2/library/tiny/manifests/latest"]


def test_registry_named_in_the_reference_is_used(registry: FakeOllamaRegistry, tiny_gguf: bytes,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUPYTER_LLM_OLLAMA_REGISTRY")
    model = registry.add("someone", "tiny", "q8", build_model(tiny_gguf))
    host = urlsplit(registry.url).netloc  # 127.0.0.1:PORT → plain http, as for any loopback registry
    pulled = _pull(f"ollama://{host}/someone/tiny:q8")
    assert pulled.sha256 == model.model_digest
    assert (config.home() / "ollama" / "manifests" / host / "someone" / "tiny" / "q8").exists()


def test_unknown_name_or_tag_is_model_not_found(registry: FakeOllamaRegistry, tiny_gguf: bytes) -> None:
    registry.add("library", "tiny", "latest", build_model(tiny_gguf))
    with pytest.raises(ModelNotFoundError, match=r"library/tiny:70b not found in the Ollama registry"):
        _pull("ollama://tiny:70b")
    with pytest.raises(ModelNotFoundError, match=r"library/nope:latest not found"):
        _pull("ollama://nope")


def test_no_configured_registry_says_what_to_set() -> None:
    with pytest.raises(ModelNotFoundError, match="JUPYTER_LLM_OLLAMA_REGISTRY"):
        _pull("ollama://tiny")


@pytest.mark.parametrize("host", ["closed-port", "nonexistent.invalid"])
def test_unreachable_registry_fails_fast(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if host == "closed-port":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}"
    else:
        url = "http://nonexistent.invalid"
    monkeypatch.setenv("JUPYTER_LLM_OLLAMA_REGISTRY", url)
    began = time.monotonic()
    with pytest.raises(HostUnreachableError, match="cannot reach"):
        _pull("ollama://tiny")
    assert time.monotonic() - began < 5


def test_a_blob_longer_than_its_manifest_says_is_stopped_there(registry: FakeOllamaRegistry,
                                                                 tiny_gguf: bytes) -> None:
    model = registry.add("library", "tiny", "latest", build_model(tiny_gguf))
    registry.overlong(model.model_digest, 100 * MB)  # a chunked body: no length of its own
    with pytest.raises(IntegrityError, match=f"more than the {len(tiny_gguf)} bytes"):
        _pull("ollama://tiny")
    blobs = config.home() / "ollama" / "blobs"
    assert not (blobs / f"sha256-{model.model_digest}").exists()
    assert [p.name for p in blobs.iterdir() if p.name.endswith(".partial")] == []
    assert registry.bytes_sent(model.model_digest) < len(tiny_gguf) + 32 * MB


def test_a_manifest_layer_without_a_size_is_refused_before_downloading(registry: FakeOllamaRegistry,
                                                                       tiny_gguf: bytes) -> None:
    model = build_model(tiny_gguf)
    manifest = json.loads(model.manifest)
    del manifest["layers"][0]["size"]
    registry.add("library", "tiny", "latest", FakeModel(json.dumps(manifest).encode(), model.blobs,
                                                         model.model_digest))
    with pytest.raises(RemoteError, match="size"):
        _pull("ollama://tiny")
    assert registry.blob_gets(model.model_digest) == []


@pytest.mark.parametrize(("registry", "scheme"), [
    ("127.evil.example", "https"), ("127.0.0.1.example", "https"), ("127.0.0.1:8080", "http"),
    ("127.1.2.3", "http"), ("localhost:11434", "http"), ("registry.example:5000", "https"),
])
def test_only_a_real_loopback_address_gets_plain_http(registry: str, scheme: str) -> None:
    url = ollama.registry_url(OllamaRef(registry, "library", "tiny", "latest"))
    assert url == f"{scheme}://{registry}"


# -- a local Ollama store -----------------------------------------------------------------------------


@pytest.fixture
def store(tiny_gguf: bytes) -> tuple[Path, FakeModel]:
    """An Ollama store in $OLLAMA_MODELS with one library model, one namespaced model, one broken."""
    root = config.ollama_store()
    model = build_model(tiny_gguf, system="You are tiny.", params={"temperature": 0.1})
    write_local_store(root, "registry.example", "library", "tiny", "latest", model)
    write_local_store(root, "registry.example", "someone", "tiny", "q8", model)
    broken = build_model(b"GGUF-not-downloaded")
    path = write_local_store(root, "registry.example", "library", "broken", "latest", broken)
    (root / "blobs" / f"sha256-{broken.model_digest}").unlink()  # manifest without its model blob
    assert path.exists()
    return root, model


def test_local_store_lists_complete_models_with_their_names(store: tuple[Path, FakeModel]) -> None:
    root, model = store
    listed = {m.name: m for m in ollama.list_local_store()}
    assert set(listed) == {"ollama://tiny:latest", "ollama://registry.example/someone/tiny:q8"}
    tiny = listed["ollama://tiny:latest"]
    assert tiny.pulled.source == "ollama-store" and tiny.pulled.owned == []
    assert tiny.pulled.files == [root / "blobs" / f"sha256-{model.model_digest}"]
    assert tiny.pulled.details["system"] == "You are tiny."
    assert tiny.pulled.details["params"] == {"temperature": 0.1}
    assert tiny.pulled.details["manifest_digest"] == model.manifest_digest


def test_resolve_local_uses_the_blob_in_place(store: tuple[Path, FakeModel]) -> None:
    root, model = store
    before = sorted(p for p in root.rglob("*"))
    pulled = ollama.resolve_local(_ref("ollama://tiny"))
    assert pulled is not None
    (path,) = pulled.files
    assert path.parent == root / "blobs" and path.name == f"sha256-{model.model_digest}"
    assert scan(path).architecture == "llama"  # loadable as it is: nothing was copied
    assert sorted(p for p in root.rglob("*")) == before
    assert not (config.home() / "ollama").exists()
    namespaced = ollama.resolve_local(_ref("ollama://registry.example/someone/tiny:q8"))
    assert namespaced is not None and namespaced.files == [path]
    assert ollama.resolve_local(_ref("ollama://broken")) is None
    assert ollama.resolve_local(_ref("ollama://tiny:70b")) is None


def test_pull_local_of_a_missing_model_lists_what_the_store_has(store: tuple[Path, FakeModel]) -> None:
    with pytest.raises(ModelNotFoundError, match=r"it has: ollama://tiny:latest"):
        ollama.pull_local(_ref("ollama://mistral"), name="ollama://mistral:latest", progress=ProgressFanout())


def test_same_model_under_two_registries_gets_full_names_and_is_ambiguous(store: tuple[Path, FakeModel]) -> None:
    root, model = store
    write_local_store(root, "other.example", "library", "tiny", "latest", model)
    names = {m.name for m in ollama.list_local_store()}
    assert {"ollama://registry.example/library/tiny:latest", "ollama://other.example/library/tiny:latest"} <= names
    with pytest.raises(AmbiguousModelError) as info:
        ollama.resolve_local(_ref("ollama://tiny"))
    assert len(info.value.candidates) == 2
    pinned = ollama.resolve_local(_ref("ollama://other.example/library/tiny"))
    assert pinned is not None and pinned.details["host"] == "other.example"


def test_store_names_are_short_only_for_the_default_namespace() -> None:
    assert ollama.store_name("h.example", "library", "m", "t") == "ollama://m:t"
    assert ollama.store_name("h.example", "ns", "m", "t") == "ollama://h.example/ns/m:t"
    assert ollama.store_name("h.example", "library", "m", "t", unique=False) == "ollama://h.example/library/m:t"


def test_unreadable_manifests_are_skipped(store: tuple[Path, FakeModel]) -> None:
    root, _model = store
    junk = root / "manifests" / "registry.example" / "library" / "junk" / "latest"
    junk.parent.mkdir(parents=True)
    junk.write_text(json.dumps({"not": "a manifest"}))
    assert "ollama://junk:latest" not in {m.name for m in ollama.list_local_store()}
