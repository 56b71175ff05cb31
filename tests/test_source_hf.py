"""sources.hf: quant choice, and pulls through the real huggingface_hub against a loopback fake Hub."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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
from jupyter_llm.store.names import HF_PREFIX, HFRef, parse
from jupyter_llm.store.sources import Pulled, hf
from jupyter_llm.store.sources.hf import choose_files
from tests.fakehub import FakeHub

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20
REPO = "someone/Tiny-GGUF"


def _pull(reference: str | HFRef, events: list[PullProgress] | None = None) -> Pulled:
    ref = parse(reference) if isinstance(reference, str) else reference
    assert isinstance(ref, HFRef)
    return hf.pull(ref, name="test", progress=ProgressFanout([events.append] if events is not None else []))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- choosing files ---------------------------------------------------------------------------------

BARTOWSKI = ["Model-Q2_K.gguf", "Model-Q4_K_S.gguf", "Model-Q4_K_M.gguf", "Model-Q8_0.gguf", "README.md"]


def test_default_choice_is_q4_k_m() -> None:
    assert choose_files(BARTOWSKI) == ["Model-Q4_K_M.gguf"]


def test_default_choice_falls_back_to_another_q4_then_q8_then_the_smallest() -> None:
    assert choose_files(["m.Q8_0.gguf", "m.Q4_0.gguf", "m.Q5_K_M.gguf"]) == ["m.Q4_0.gguf"]
    assert choose_files(["m-iq4_xs.gguf", "m-q8_0.gguf"]) == ["m-iq4_xs.gguf"]
    assert choose_files(["m-q8_0.gguf", "m-f16.gguf"]) == ["m-q8_0.gguf"]
    sizes = {"m-f16.gguf": 300, "m-Q6_K.gguf": 100, "m-bf16.gguf": 300}
    assert choose_files(sizes, sizes=sizes) == ["m-Q6_K.gguf"]


def test_vision_projectors_are_never_the_default() -> None:
    files = ["mmproj-model-f16.gguf", "model-Q8_0.gguf"]
    assert choose_files(files) == ["model-Q8_0.gguf"]
    assert choose_files(files, "mmproj-model-f16.gguf") == ["mmproj-model-f16.gguf"]


@pytest.mark.parametrize("name", ["Model-Q5_K_M.gguf", "model.Q5_K_M.gguf", "model-q5_k_m.gguf"])
def test_quant_tag_matches_each_naming_style_case_insensitively(name: str) -> None:
    files = [name.replace("5", "4"), name, name.replace("Q5_K_M", "Q8_0").replace("q5_k_m", "q8_0")]
    assert choose_files(files, "q5_k_m") == [name]
    assert choose_files(files, "Q5_K_M") == [name]


def test_quant_tag_is_a_whole_token_not_a_prefix() -> None:
    with pytest.raises(ModelNotFoundError):
        choose_files(["Model-Q4_K_M.gguf"], "Q4_K")
    assert choose_files(["Model-Q4_K_M.gguf", "Model-Q4_K.gguf"], "Q4_K") == ["Model-Q4_K.gguf"]


def test_full_file_name_selects_that_file() -> None:
    assert choose_files(BARTOWSKI, "Model-Q2_K.gguf") == ["Model-Q2_K.gguf"]
    assert choose_files(BARTOWSKI, "model-q2_k.gguf") == ["Model-Q2_K.gguf"]


def test_several_models_for_one_tag_is_ambiguous_and_lists_them() -> None:
    files = ["alpha-Q4_K_M.gguf", "beta-Q4_K_M.gguf", "alpha-Q8_0.gguf"]
    with pytest.raises(AmbiguousModelError) as info:
        choose_files(files, "Q4_K_M", repo=REPO)
    assert info.value.candidates == ["alpha-Q4_K_M.gguf", "beta-Q4_K_M.gguf"]
    assert f"{HF_PREFIX}{REPO}:alpha-Q4_K_M.gguf" in str(info.value)
    with pytest.raises(AmbiguousModelError):
        choose_files(files)  # the default quant is just as ambiguous


def test_missing_quant_lists_the_available_quants() -> None:
    with pytest.raises(ModelNotFoundError) as info:
        choose_files(BARTOWSKI, "Q5_K_M", repo=REPO)
    message = str(info.value)
    assert "Q2_K, Q4_K_M, Q4_K_S, Q8_0" in message
    assert f"{HF_PREFIX}{REPO}:Q4_K_M" in info.value.suggestions


def test_split_gguf_is_one_candidate_with_all_parts_in_order() -> None:
    parts = [f"big/Model-Q4_K_M-0000{i}-of-00003.gguf" for i in (3, 1, 2)]
    assert choose_files([*parts, "Model-Q8_0.gguf"]) == sorted(parts)
    assert choose_files([*parts, "Model-Q8_0.gguf"], "q4_k_m") == sorted(parts)
    with pytest.raises(ModelNotFoundError, match="lacks part"):
        choose_files(parts[:2])


def test_a_repo_without_gguf_files_says_so() -> None:
    with pytest.raises(ModelNotFoundError, match=r"no \.gguf files"):
        choose_files(["model.safetensors", "config.json"], repo=REPO)


# -- pulling through huggingface_hub ----------------------------------------------------------------


@pytest.fixture
def repo(hub: FakeHub) -> dict[str, bytes]:
    files = {
        "Tiny-Q4_K_M.gguf": os.urandom(3 * MB + 11),
        "Tiny-Q8_0.gguf": os.urandom(2 * MB),
        "README.md": b"# Tiny\n",
    }
    hub.add_repo(REPO, files)
    return files


def test_pull_default_quant_lands_in_the_hf_cache_verified(hub: FakeHub, repo: dict[str, bytes]) -> None:
    events: list[PullProgress] = []
    pulled = _pull(f"{HF_PREFIX}{REPO}", events)
    data = repo["Tiny-Q4_K_M.gguf"]
    sha = _sha(data)
    (path,) = pulled.files
    commit = hub.repos[REPO].commit
    cache = config.hf_cache().resolve()
    assert path == cache / "models--someone--Tiny-GGUF" / "snapshots" / commit / "Tiny-Q4_K_M.gguf"
    assert path.is_symlink() and path.resolve() == cache / "models--someone--Tiny-GGUF" / "blobs" / sha
    assert path.read_bytes() == data
    assert pulled.source == "hf" and pulled.sha256 == sha
    assert pulled.details["commit"] == commit and pulled.details["quant"] == "Q4_K_M"
    assert path.resolve() in pulled.owned
    assert (cache / "models--someone--Tiny-GGUF" / "refs" / "main").read_text() == commit
    assert hub.bytes_sent(_sha(repo["Tiny-Q8_0.gguf"])) == 0  # only the chosen file moved
    statuses = [e.status for e in events]
    assert statuses[0] == "pulling manifest" and "downloading" in statuses
    assert statuses[-1] == "verifying sha256 digest"
    assert events[-2].completed == len(data)


def test_pull_explicit_tag_or_file_name_picks_that_file(hub: FakeHub, repo: dict[str, bytes]) -> None:
    assert _pull(f"{HF_PREFIX}{REPO}:q8_0").files[0].read_bytes() == repo["Tiny-Q8_0.gguf"]
    assert _pull(f"{HF_PREFIX}{REPO}:Tiny-Q8_0.gguf").files[0].read_bytes() == repo["Tiny-Q8_0.gguf"]


def test_pull_ambiguous_tag_lists_candidates_and_downloads_nothing(hub: FakeHub) -> None:
    hub.add_repo(REPO, {"a-Q4_K_M.gguf": b"a" * 100, "b-Q4_K_M.gguf": b"b" * 100})
    with pytest.raises(AmbiguousModelError) as info:
        _pull(f"{HF_PREFIX}{REPO}")
    assert info.value.candidates == ["a-Q4_K_M.gguf", "b-Q4_K_M.gguf"]
    assert not any("/cdn/" in r.path for r in hub.log)


def test_pull_missing_quant_lists_available(hub: FakeHub, repo: dict[str, bytes]) -> None:
    with pytest.raises(ModelNotFoundError, match="available quants: Q4_K_M, Q8_0"):
        _pull(f"{HF_PREFIX}{REPO}:Q6_K")


def test_pull_split_gguf_downloads_every_part_in_order(hub: FakeHub) -> None:
    parts = {f"Big-Q4_K_M-0000{i}-of-00003.gguf": os.urandom(MB + i) for i in (1, 2, 3)}
    hub.add_repo(REPO, {**parts, "Big-Q8_0.gguf": b"x" * 1000})
    pulled = _pull(f"{HF_PREFIX}{REPO}")
    assert [p.name for p in pulled.files] == sorted(parts)
    assert [p.read_bytes() for p in pulled.files] == [parts[n] for n in sorted(parts)]
    assert pulled.details["filenames"] == sorted(parts)


def test_pull_resumes_after_a_dropped_connection_without_resending(hub: FakeHub, repo: dict[str, bytes]) -> None:
    sha = _sha(repo["Tiny-Q4_K_M.gguf"])
    hub.drop_after(sha, 2 * MB + 7)
    pulled = _pull(f"{HF_PREFIX}{REPO}")
    assert pulled.files[0].read_bytes() == repo["Tiny-Q4_K_M.gguf"]
    assert [g.range for g in hub.blob_gets(sha)] == [None, f"bytes={2 * MB + 7}-"]
    assert hub.bytes_sent(sha) == len(repo["Tiny-Q4_K_M.gguf"])


def test_pull_resumes_after_the_process_is_killed(hub: FakeHub) -> None:
    data = os.urandom(24 * MB)
    sha = _sha(data)
    hub.add_repo(REPO, {"Big-Q4_K_M.gguf": data})
    hub.throttle(6 * MB)  # ~4 s for the whole file: the kill lands mid-file
    blob = config.hf_cache() / "models--someone--Tiny-GGUF" / "blobs" / sha
    partial = blob.with_name(blob.name + ".partial")
    code = (
        "from jupyter_llm.store.names import parse; from jupyter_llm.progress import ProgressFanout; "
        "from jupyter_llm.store.sources import hf; "
        f"hf.pull(parse({HF_PREFIX + REPO!r}), name='x', progress=ProgressFanout())"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size >= 4 * MB):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the subprocess never got 4 MB"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    kept = partial.stat().st_size
    assert 4 * MB <= kept < len(data) and not blob.exists()

    hub.throttle(None)
    pulled = _pull(f"{HF_PREFIX}{REPO}")
    assert pulled.files[0].read_bytes() == data
    first, second = hub.blob_gets(sha)
    assert second.range == f"bytes={kept}-"
    assert second.sent == len(data) - kept  # the second run re-sent none of the kept bytes
    assert first.sent >= kept


def test_pull_of_a_corrupted_file_raises_and_leaves_nothing(hub: FakeHub, repo: dict[str, bytes]) -> None:
    sha = _sha(repo["Tiny-Q4_K_M.gguf"])
    hub.corrupt(sha, MB + 5)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        _pull(f"{HF_PREFIX}{REPO}")
    storage = config.hf_cache() / "models--someone--Tiny-GGUF"
    assert list((storage / "blobs").iterdir()) == []
    assert not (storage / "snapshots").exists()


def test_plain_hf_hub_download_finds_our_pull_without_downloading(hub: FakeHub, repo: dict[str, bytes]) -> None:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    pulled = _pull(f"{HF_PREFIX}{REPO}")
    hub.log.clear()
    path = hf_hub_download(REPO, "Tiny-Q4_K_M.gguf", cache_dir=config.hf_cache(), endpoint=hub.endpoint)
    assert Path(path) == pulled.files[0]
    assert [r.method for r in hub.log] == ["HEAD"]  # metadata only: zero bytes downloaded
    assert try_to_load_from_cache(REPO, "Tiny-Q4_K_M.gguf", cache_dir=config.hf_cache()) == path


def test_second_pull_downloads_nothing(hub: FakeHub, repo: dict[str, bytes]) -> None:
    first = _pull(f"{HF_PREFIX}{REPO}")
    hub.log.clear()
    assert _pull(f"{HF_PREFIX}{REPO}").files == first.files
    assert not any(r.method == "GET" and "/cdn/" in r.path for r in hub.log)


def test_list_gguf_files_gives_sizes_and_lfs_sha256(hub: FakeHub, repo: dict[str, bytes]) -> None:
    files = {f.path: f for f in hf.list_gguf_files(REPO)}
    assert set(files) == {"Tiny-Q4_K_M.gguf", "Tiny-Q8_0.gguf"}
    assert files["Tiny-Q8_0.gguf"].size == 2 * MB
    assert files["Tiny-Q8_0.gguf"].sha256 == _sha(repo["Tiny-Q8_0.gguf"])


def test_fake_hub_tree_agrees_with_huggingface_hub_listing(hub: FakeHub, repo: dict[str, bytes]) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    tree = HfApi(endpoint=hub.endpoint).list_repo_tree(REPO, recursive=True)
    files = {f.path: (f.size, f.lfs.sha256 if f.lfs else None) for f in tree if isinstance(f, RepoFile)}
    assert files == {name: (len(data), _sha(data) if name.endswith(".gguf") else None)
                     for name, data in repo.items()}


@pytest.mark.parametrize("host", ["closed-port", "nonexistent.invalid"])
def test_pull_from_an_unreachable_endpoint_fails_fast(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if host == "closed-port":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        endpoint = f"http://127.0.0.1:{port}"
    else:
        endpoint = "http://nonexistent.invalid"
    monkeypatch.setenv("JUPYTER_LLM_HF_ENDPOINT", endpoint)
    began = time.monotonic()
    with pytest.raises(HostUnreachableError, match="cannot reach"):
        _pull(f"{HF_PREFIX}{REPO}")
    assert time.monotonic() - began < 5


def test_unknown_repo_revision_or_file_is_model_not_found(hub: FakeHub, repo: dict[str, bytes]) -> None:
    with pytest.raises(ModelNotFoundError, match="repository someone/Nope not found"):
        _pull(f"{HF_PREFIX}someone/Nope")
    with pytest.raises(ModelNotFoundError, match="revision 'v9' not found"):
        _pull(HFRef(REPO, revision="v9"))
    with pytest.raises(ModelNotFoundError, match=r"matches 'Gone\.gguf'"):
        _pull(HFRef(REPO, filename="Gone.gguf"))


def test_gated_repo_needs_a_token(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(100_000)
    hub.add_repo(REPO, {"Tiny-Q4_K_M.gguf": data}, gated=True)
    hub.tokens.add("hf_test_token")
    with pytest.raises(RemoteError, match=r"gated.*HF_TOKEN") as info:
        _pull(f"{HF_PREFIX}{REPO}")
    assert info.value.status == 401
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert _pull(f"{HF_PREFIX}{REPO}").files[0].read_bytes() == data
    cdn = [r for r in hub.log if "/cdn/" in r.path]
    assert cdn and all("authorization" not in {k.lower() for k in r.headers} for r in cdn)
