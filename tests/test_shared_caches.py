"""Sharing caches with other tools: huggingface_hub's own cache tools, and one copy of identical
blobs whether a model came from Hugging Face or an Ollama registry."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_llm import config
from jupyter_llm.errors import ModelNotFoundError
from jupyter_llm.manager import ModelManager
from jupyter_llm.store.names import HF_PREFIX
from tests.fakehub import FakeHub
from tests.fakeollama import FakeOllamaRegistry, build_model
from tests.ggufs import write_tiny_llama

REPO = "someone/Tiny-GGUF"
NAME = f"{HF_PREFIX}{REPO}"
REMOVED = r"its files were removed from the Hugging Face cache; `%llm pull hf\.co/someone/Tiny-GGUF` fetches them"


@pytest.fixture
def tiny(tmp_path: Path) -> bytes:
    return write_tiny_llama(tmp_path / "t.gguf").read_bytes()


@pytest.fixture
def repo(hub: FakeHub, tiny: bytes) -> bytes:
    hub.add_repo(REPO, {"Tiny-Q4_K_M.gguf": tiny})
    return tiny


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOllamaRegistry]:
    with FakeOllamaRegistry(lifetime=120) as server:
        monkeypatch.setenv("JUPYTER_LLM_OLLAMA_REGISTRY", server.url)
        yield server


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hf_cache_rm() -> None:
    """What `hf cache rm` does: huggingface_hub's own scan and deletion of every revision."""
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(config.hf_cache())
    commits = [rev.commit_hash for repo in info.repos for rev in repo.revisions]
    info.delete_revisions(*commits).execute()


# -- huggingface_hub's cache tools beside ours ----------------------------------------------------------


@pytest.mark.parametrize("how", ["delete_revisions", "rmtree"])
def test_a_repo_removed_from_the_hf_cache_is_not_listed_and_show_and_load_say_pull_again(
        hub: FakeHub, repo: bytes, how: str) -> None:
    manager = ModelManager()
    try:
        record = manager.pull(NAME)
        assert [r.name for r in manager.models()] == [NAME]
        if how == "delete_revisions":
            _hf_cache_rm()
        else:
            shutil.rmtree(config.hf_cache() / "models--someone--Tiny-GGUF")
        assert not os.path.exists(record.files[0])
        assert manager.models() == []
        with pytest.raises(ModelNotFoundError, match=REMOVED):
            manager.show(NAME)
        with pytest.raises(ModelNotFoundError, match=REMOVED):
            manager.load(NAME, n_ctx=256, gpu_layers=0, threads=1)
        again = manager.pull(NAME)  # fetches them again
        assert Path(again.files[0]).read_bytes() == repo
        assert manager.show(NAME)["info"].architecture == "llama"
        _hf_cache_rm()
        assert manager.remove(NAME) == [] and manager.store.get(NAME) is None  # `rm` forgets it
    finally:
        manager.close()


def test_a_file_another_tool_cached_is_reused_and_never_deleted_by_rm(hub: FakeHub, repo: bytes) -> None:
    from huggingface_hub import hf_hub_download

    theirs = Path(hf_hub_download(REPO, "Tiny-Q4_K_M.gguf", cache_dir=config.hf_cache(), endpoint=hub.endpoint))
    sent = hub.bytes_sent(_sha(repo))
    manager = ModelManager()
    try:
        record = manager.pull(NAME)
        assert hub.bytes_sent(_sha(repo)) == sent, "reused, not downloaded again"
        assert Path(record.files[0]).resolve() == theirs.resolve()
        assert record.owned == [], "found in the cache, so not ours to delete"
        assert manager.remove(NAME) == []
    finally:
        manager.close()
    assert theirs.read_bytes() == repo
    assert hf_hub_download(REPO, "Tiny-Q4_K_M.gguf", cache_dir=config.hf_cache(), endpoint=hub.endpoint,
                           local_files_only=True) == str(theirs)


def test_a_second_name_for_a_file_we_downloaded_shares_its_ownership(hub: FakeHub, repo: bytes) -> None:
    manager = ModelManager()
    try:
        first = manager.pull(NAME)
        second = manager.pull(f"{NAME}:Q4_K_M")
        assert second.files == first.files
        blob = os.path.realpath(first.files[0])
        assert blob in second.owned, "found in the cache, but it was our own download"
        assert manager.remove(NAME) == []
        assert Path(second.files[0]).read_bytes() == repo, "still used by the second name"
        assert blob in manager.remove(f"{NAME}:Q4_K_M"), "the last of our names takes our download with it"
    finally:
        manager.close()
    assert not os.path.exists(blob)


# -- one copy of identical blobs ------------------------------------------------------------------------


def _assert_one_copy(a: str, b: str) -> None:
    assert os.path.samefile(a, b), f"{a} and {b} should be one file on disk"


def test_an_ollama_pull_of_a_model_already_pulled_from_hf_stores_its_bytes_once(
        hub: FakeHub, repo: bytes, registry: FakeOllamaRegistry) -> None:
    fake = registry.add("library", "tiny", "latest", build_model(repo))
    manager = ModelManager()
    try:
        from_hf = manager.pull(NAME)
        from_ollama = manager.pull("ollama://tiny")
        _assert_one_copy(from_hf.files[0], from_ollama.files[0])
        assert registry.bytes_sent(fake.model_digest) == 0, "the model blob was not downloaded again"
        manager.remove(NAME)
        assert Path(from_ollama.files[0]).read_bytes() == repo, "each name keeps its own link"
    finally:
        manager.close()


def test_an_hf_pull_of_a_model_already_pulled_from_ollama_stores_its_bytes_once(
        hub: FakeHub, repo: bytes, registry: FakeOllamaRegistry) -> None:
    registry.add("library", "tiny", "latest", build_model(repo))
    manager = ModelManager()
    try:
        from_ollama = manager.pull("ollama://tiny")
        from_hf = manager.pull(NAME)
        _assert_one_copy(from_hf.files[0], from_ollama.files[0])
        assert hub.bytes_sent(_sha(repo)) == 0
        manager.remove("ollama://tiny")
        assert Path(from_hf.files[0]).read_bytes() == repo
    finally:
        manager.close()
