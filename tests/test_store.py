"""The store: records, listing, copies that share files, removal that respects other names."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from jupyter_llm.errors import JupyterLLMError, ModelNotFoundError, StoreError
from jupyter_llm.store.records import Store
from jupyter_llm.store.sources import Pulled
from tests.ggufs import write_tiny_llama


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    return write_tiny_llama(tmp_path / "blobs" / "tiny.gguf", dtype="f16")


def test_put_records_header_summary(blob: Path) -> None:
    store = Store()
    record = store.put("tiny", Pulled("pip", [blob], sha256="ab" * 32, owned=[blob]))
    assert record.summary["architecture"] == "llama"
    assert record.summary["layers"] == 2
    assert record.summary["quantization"] == "F16"
    assert record.size == blob.stat().st_size
    assert store.get("tiny") == record
    assert [r.name for r in store.records()] == ["tiny"]


def test_get_accepts_latest_suffix(blob: Path) -> None:
    store = Store()
    store.put("tiny", Pulled("pip", [blob], owned=[blob]))
    assert store.get("tiny:latest").name == "tiny"


def test_unknown_name_suggests_close_matches(blob: Path) -> None:
    store = Store()
    store.put("smollm2", Pulled("pip", [blob], owned=[blob]))
    with pytest.raises(ModelNotFoundError) as info:
        store.require("smolm2")
    assert "smollm2" in str(info.value)
    assert info.value.suggestions == ["smollm2"]


def test_copy_shares_files_and_rm_keeps_them_until_last_name(blob: Path) -> None:
    store = Store()
    store.put("tiny", Pulled("pip", [blob], owned=[blob]))
    store.copy("tiny", "tiny-copy")
    assert store.get("tiny-copy").files == [str(blob)]
    assert store.remove("tiny") == []
    assert blob.exists(), "the copy still uses the blob"
    assert store.remove("tiny-copy") == [str(blob)]
    assert not blob.exists()
    assert store.records() == []


def test_copy_refuses_to_overwrite(blob: Path) -> None:
    store = Store()
    store.put("a", Pulled("pip", [blob], owned=[blob]))
    store.put("b", Pulled("pip", [blob], owned=[blob]))
    with pytest.raises(StoreError, match="already exists"):
        store.copy("a", "b")


def test_rm_never_deletes_files_it_does_not_own(blob: Path) -> None:
    store = Store()
    store.put("mine", Pulled("local", [blob], owned=[]))
    assert store.remove("mine") == []
    assert blob.exists()


def test_rm_drops_dangling_snapshot_links(tmp_path: Path, blob: Path) -> None:
    link = tmp_path / "snapshots" / "model.gguf"
    link.parent.mkdir()
    link.symlink_to(blob)
    store = Store()
    store.put("hf", Pulled("hf", [link], owned=[blob]))
    deleted = store.remove("hf")
    assert set(deleted) == {str(blob), str(link)}
    assert not link.is_symlink()


def test_a_corrupt_record_file_does_not_break_list(blob: Path) -> None:
    store = Store()
    store.put("good", Pulled("pip", [blob], owned=[blob]))
    (store.root / "broken.json").write_text("{not json")
    assert [r.name for r in store.records()] == ["good"]


def test_records_with_slashes_and_colons_round_trip(blob: Path) -> None:
    store = Store()
    name = "ollama://host:5000/ns/model:tag"
    store.put(name, Pulled("ollama", [blob], owned=[blob]))
    assert store.get(name).name == name
    assert [p.name for p in store.root.iterdir()] == ["ollama%3A%2F%2Fhost%3A5000%2Fns%2Fmodel%3Atag.json"]


@pytest.mark.parametrize(("destination", "problem"), [
    ("", "empty"), ("x" * 300, "too long"), ("bad\nname", "control"), ("smollm2", "alias"),
    ("SmolLM2:latest", "alias"), ("hf.co/team/Other-GGUF", "Hugging Face"),
])
def test_copy_refuses_a_name_the_store_cannot_hold_or_that_shadows_another_model(
    blob: Path, destination: str, problem: str
) -> None:
    store = Store()
    store.put("tiny", Pulled("pip", [blob], owned=[blob]))
    with pytest.raises(StoreError, match=problem):
        store.copy("tiny", destination)
    assert [r.name for r in store.records()] == ["tiny"]


def test_copy_over_an_alias_with_force_is_on_purpose(blob: Path) -> None:
    store = Store()
    store.put("tiny", Pulled("pip", [blob], owned=[blob]))
    assert store.copy("tiny", "smollm2", force=True).files == [str(blob)]


def test_looking_up_a_name_too_long_for_the_store_is_not_found(blob: Path) -> None:
    store = Store()
    store.put("tiny", Pulled("pip", [blob], owned=[blob]))  # the records directory exists
    assert store.get("x" * 300) is None
    with pytest.raises(ModelNotFoundError, match="not in the store"):
        store.require("x" * 300)
    with pytest.raises(ModelNotFoundError):
        store.remove("bad\x00name")


def test_no_name_makes_the_store_raise_anything_but_our_errors(blob: Path) -> None:
    store = Store()
    store.put("tiny", Pulled("pip", [blob], owned=[blob]))
    pieces = ["a", "Z", ":", "/", ".", "%", " ", "\0", "\n", "é", "\u200b", "\udcff", "x" * 120, "smollm2", ":latest"]
    rng = random.Random(16)
    for _ in range(500):
        name = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
        for operation in (store.get, store.require, store.remove, lambda n: store.copy("tiny", n)):
            try:
                operation(name)
            except JupyterLLMError:
                pass
    assert store.get("tiny") is not None
