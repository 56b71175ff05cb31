"""sources.local: a GGUF on disk is validated and registered in place, never copied or owned."""

from __future__ import annotations

from pathlib import Path

import pytest

from jupyter_llm import config
from jupyter_llm.errors import GGUFError, ModelNotFoundError, TruncatedGGUFError
from jupyter_llm.progress import ProgressFanout
from jupyter_llm.store.names import PathRef, canonical, parse
from jupyter_llm.store.sources import Pulled, local
from tests.ggufs import truncate, write_not_gguf, write_tiny_llama


def _pull(path: Path, name: str = "m") -> Pulled:
    return local.pull(PathRef(path), name=name, progress=ProgressFanout())


def test_gguf_is_used_in_place_and_owned_by_nobody(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf", dtype="q8_0")
    pulled = _pull(path)
    assert pulled.source == "local"
    assert pulled.files == [path.resolve()]
    assert pulled.owned == [] and pulled.sha256 is None
    assert pulled.details["file_type"] == "Q8_0" and pulled.details["architecture"] == "llama"
    assert not config.home().exists()  # nothing copied into our store


def test_the_default_model_registers_through_a_parsed_path(smollm2_path: Path) -> None:
    ref = parse(str(smollm2_path))
    assert isinstance(ref, PathRef)
    pulled = local.pull(ref, name=canonical(ref), progress=ProgressFanout())
    assert pulled.files == [smollm2_path.resolve()]
    assert pulled.details["file_type"] == "Q4_1"


def test_relative_symlinked_path_is_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = write_tiny_llama(tmp_path / "models" / "real.gguf")
    (tmp_path / "link.gguf").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    assert _pull(Path("link.gguf")).files == [real.resolve()]


def test_split_model_brings_every_part(tmp_path: Path) -> None:
    first = write_tiny_llama(tmp_path / "split.gguf", split_max_tensors=8)
    pulled = _pull(first)
    assert [p.name for p in pulled.files] == [f"split-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert pulled.details["parts"] == 3


def test_a_later_split_part_points_at_the_first(tmp_path: Path) -> None:
    write_tiny_llama(tmp_path / "split.gguf", split_max_tensors=8)
    with pytest.raises(GGUFError, match=r"part 2 of a split model; give its first part.*00001-of-00003"):
        _pull(tmp_path / "split-00002-of-00003.gguf")


def test_missing_split_part_is_named(tmp_path: Path) -> None:
    first = write_tiny_llama(tmp_path / "split.gguf", split_max_tensors=8)
    (tmp_path / "split-00003-of-00003.gguf").unlink()
    with pytest.raises(GGUFError, match=r"split-00003-of-00003\.gguf is missing"):
        _pull(first)


def test_renamed_split_part_is_refused(tmp_path: Path) -> None:
    first = write_tiny_llama(tmp_path / "split.gguf", split_max_tensors=8)
    renamed = first.rename(tmp_path / "renamed.gguf")
    with pytest.raises(GGUFError, match="does not follow the split naming"):
        _pull(renamed)


def test_truncated_file_says_to_re_pull(tmp_path: Path) -> None:
    path = truncate(write_tiny_llama(tmp_path / "tiny.gguf"), -10)
    with pytest.raises(TruncatedGGUFError, match="re-pull it: `%llm pull mine`"):
        _pull(path, name="mine")


def test_not_gguf_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="is not a GGUF file"):
        _pull(write_not_gguf(tmp_path / "x.gguf"))


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such file"):
        _pull(tmp_path / "absent.gguf")


def test_directory_lists_its_ggufs(tmp_path: Path) -> None:
    write_tiny_llama(tmp_path / "a.gguf")
    write_tiny_llama(tmp_path / "b.gguf")
    with pytest.raises(GGUFError, match=r"is a directory; it contains a\.gguf, b\.gguf"):
        _pull(tmp_path)
