"""Estimating a model before pulling it: its GGUF header read by ranges from the loopback hub
and registry, compared with the estimate after the pull."""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_llm.errors import GGUFError, HostUnreachableError, RemoteError
from jupyter_llm.manager import ModelManager
from jupyter_llm.memory.devices import Device
from jupyter_llm.memory.estimate import MemoryEstimate, estimate
from jupyter_llm.options import LoadOptions
from jupyter_llm.store import peek
from jupyter_llm.store.gguf import NeedMoreBytes, scan, scan_prefix
from jupyter_llm.store.names import HF_PREFIX
from tests.fakehub import FakeHub, LoggedRequest
from tests.fakeollama import FakeOllamaRegistry, build_model
from tests.ggufs import write_tiny_llama
from tests.model import SIZE

MiB = 1 << 20
SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"  # the alias's repository (aliases.json)
OPTIONS = LoadOptions(gpu_layers=0, n_ctx=4096)


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    """Headers are cached per file for the process: each test reads its own."""
    peek.forget()
    yield
    peek.forget()


@pytest.fixture
def smollm2_bytes(smollm2_path: Path) -> bytes:
    data = smollm2_path.read_bytes()
    assert len(data) == SIZE
    return data


def _ranged(log: list[LoggedRequest]) -> list[LoggedRequest]:
    return [r for r in log if r.method == "GET" and r.key is not None]


def _same(remote: MemoryEstimate, local: MemoryEstimate) -> None:
    """Per-device totals and the breakdown agree within 0.1 %."""
    assert [d.device_id for d in remote.devices] == [d.device_id for d in local.devices]
    assert remote.n_ctx == local.n_ctx
    for r, ref in zip(remote.devices, local.devices, strict=True):
        for part in ("weights", "kv", "compute", "output", "total"):
            want = getattr(ref, part)
            assert abs(getattr(r, part) - want) <= want * 0.001, (r.device_id, part, getattr(r, part), want)
    assert abs(remote.total - local.total) <= local.total * 0.001


def _user_alias(name: str, repo: str, quant: str) -> None:
    path = Path(os.environ["JUPYTER_LLM_HOME"]) / "aliases.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = json.loads(path.read_text()) if path.exists() else {}
    table[name] = {"repo": repo, "quant": quant, "description": "a test model"}
    path.write_text(json.dumps(table))


# -- the real default model ----------------------------------------------------------------------


def test_the_default_model_is_priced_from_a_few_mib_of_its_header_like_after_the_pull(
        hub: FakeHub, smollm2_bytes: bytes) -> None:
    hub.add_repo(SMOLLM2_REPO, {"smollm2-135m-instruct-q8_0.gguf": smollm2_bytes})
    manager = ModelManager()
    try:
        assert manager.store.get("smollm2") is None
        remote = manager.estimate("smollm2", OPTIONS)
        sent = sum(r.sent for r in hub.log)
        ranged = _ranged(hub.log)
        print(f"\nsmollm2 from the hub: {sent:,} bytes sent in {len(hub.log)} requests "
              f"({len(ranged)} range requests: {[r.range for r in ranged]})")
        assert sent < 8 * MiB, f"{sent:,} bytes sent for a {SIZE:,}-byte model"
        assert ranged and all(r.range and r.status == 206 for r in ranged)
        assert any("not pulled" in note and "range request" in note for note in remote.notes)

        before = len(hub.log)
        again = manager.estimate("smollm2", OPTIONS.with_(n_ctx=8192))
        assert len(hub.log) == before, "re-estimating reads nothing: the header is cached"
        assert again.kv == 2 * remote.kv

        manager.pull("smollm2")
        local = manager.estimate("smollm2", OPTIONS)
        assert not any("not pulled" in note for note in local.notes)
        _same(remote, local)
        assert remote.header is not None and local.header is not None
        assert remote.header.tensors == local.header.tensors
        assert remote.header.metadata == local.header.metadata
    finally:
        manager.close()


def test_the_default_model_is_priced_from_its_header_through_the_ollama_registry(
        monkeypatch: pytest.MonkeyPatch, smollm2_bytes: bytes) -> None:
    with FakeOllamaRegistry(lifetime=120) as registry:
        monkeypatch.setenv("JUPYTER_LLM_OLLAMA_REGISTRY", registry.url)
        model = registry.add("library", "smollm2", "135m", build_model(smollm2_bytes))
        manager = ModelManager()
        try:
            remote = manager.estimate("ollama://smollm2:135m", OPTIONS)
            sent = sum(r.sent for r in registry.log)
            ranged = registry.blob_gets(model.model_digest)
            print(f"\nsmollm2 from the registry: {sent:,} bytes sent in {len(registry.log)} requests "
                  f"({len(ranged)} range requests)")
            assert sent < 8 * MiB
            assert ranged and all(r.range and r.status == 206 for r in ranged)
            assert all(r.host.startswith("localhost:") for r in ranged), "the registry's redirect is followed"

            manager.pull("ollama://smollm2:135m")
            _same(remote, manager.estimate("ollama://smollm2:135m", OPTIONS))
        finally:
            manager.close()


def test_a_server_that_ignores_range_is_read_only_as_far_as_the_header(
        hub: FakeHub, smollm2_bytes: bytes, smollm2_path: Path) -> None:
    hub.add_repo("team/Whole-GGUF", {"whole-q4_1.gguf": smollm2_bytes})
    hub.ignore_range()
    found = peek.peek(HF_PREFIX + "team/Whole-GGUF", ModelManager().store)
    blob = _ranged(hub.log)
    assert blob and all(r.status == 200 for r in blob), "the server answered every range with the whole file"
    header = scan(smollm2_path).data_offset
    assert found.received < 4 * header, f"{found.received:,} bytes received for a {header:,}-byte header"
    # What the server pushed into the socket before we closed it stays far below the file.
    assert sum(r.sent for r in blob) < SIZE // 3
    assert found.infos[0].tensors == scan(smollm2_path).tensors


# -- growing ranges, caps and dead hosts ------------------------------------------------------------


def test_a_header_longer_than_the_first_range_is_read_in_growing_ranges(
        hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_tiny_llama(tmp_path / "big-meta.gguf", n_vocab=3000, metadata={"general.description": "x" * 50_000})
    info = scan(path)
    assert info.data_offset > 64 * 1024
    hub.add_repo("team/Meta-GGUF", {"meta-f32.gguf": path.read_bytes()})
    monkeypatch.setattr(peek, "FIRST_RANGE", 4096)
    manager = ModelManager()
    remote = manager.estimate(HF_PREFIX + "team/Meta-GGUF", OPTIONS.with_(n_ctx=256))
    ranged = _ranged(hub.log)
    spans = [tuple(int(x) for x in re.fullmatch(r"bytes=(\d+)-(\d+)", r.range or "").groups()) for r in ranged]
    assert len(spans) >= 4 and spans[0] == (0, 4095)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start == end + 1, "each range continues where the last ended"
    for (_, end), (_, next_end) in itertools.pairwise(spans):
        assert next_end + 1 >= 2 * (end + 1), "each request at least doubles what was read"
    assert spans[-1][1] + 1 < 2 * info.data_offset + 4096, "not much beyond the header"
    _same(remote, manager.estimate(str(path), OPTIONS.with_(n_ctx=256)))


def test_a_header_past_the_cap_is_refused(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_tiny_llama(tmp_path / "huge-meta.gguf", metadata={"general.description": "x" * 200_000})
    hub.add_repo("team/Huge-GGUF", {"huge-f32.gguf": path.read_bytes()})
    monkeypatch.setattr(peek, "HEADER_CAP", 64 * 1024)
    with pytest.raises(GGUFError, match="goes on past"):
        ModelManager().estimate(HF_PREFIX + "team/Huge-GGUF", OPTIONS.with_(n_ctx=256))
    assert sum(r.sent for r in _ranged(hub.log)) <= 64 * 1024


def test_every_prefix_of_a_header_asks_for_more_or_parses_it_whole(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "t.gguf", n_vocab=600)
    data = path.read_bytes()
    whole = scan(path)
    lengths = sorted({*range(0, whole.data_offset, 53), whole.data_offset - 1, whole.data_offset})
    for n in lengths:
        try:
            info = scan_prefix(data[:n], len(data), where="remote/t.gguf")
        except NeedMoreBytes as more:
            assert more.need > n
            continue
        assert (info.metadata, info.tensors, info.data_offset) == (whole.metadata, whole.tensors, whole.data_offset)
        assert n >= whole.data_offset - whole.alignment
    assert scan_prefix(data[:whole.data_offset], len(data), where="x").tensors == whole.tensors


def test_an_unreachable_hub_fails_at_once_naming_its_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_LLM_HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port
    with pytest.raises(HostUnreachableError, match=r"127\.0\.0\.1:9"):
        ModelManager().estimate(HF_PREFIX + "team/Nowhere-GGUF:Q4_K_M", OPTIONS)
    with pytest.raises(HostUnreachableError, match=r"127\.0\.0\.1:9.*once pulled"):
        ModelManager().estimate("smollm2", OPTIONS)  # its package-index copy cannot be peeked


def test_an_unreachable_registry_fails_at_once_naming_its_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_LLM_OLLAMA_REGISTRY", "http://127.0.0.1:9")
    with pytest.raises(HostUnreachableError, match=r"127\.0\.0\.1:9"):
        ModelManager().estimate("ollama://tiny:latest", OPTIONS)


def test_estimating_never_goes_remote_when_asked_not_to(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("team/Tiny-GGUF", {"tiny-f32.gguf": write_tiny_llama(tmp_path / "t.gguf").read_bytes()})
    manager = ModelManager()
    name = HF_PREFIX + "team/Tiny-GGUF"
    for remote in (False, "cached"):
        with pytest.raises(LookupError):
            manager.estimate(name, OPTIONS.with_(n_ctx=256), remote=remote)
    assert hub.log == []
    manager.estimate(name, OPTIONS.with_(n_ctx=256))
    before = len(hub.log)
    assert manager.estimate(name, OPTIONS.with_(n_ctx=512), remote="cached").n_ctx == 512
    assert len(hub.log) == before


# -- the fits line -----------------------------------------------------------------------------------


def _cpu(free: int) -> Device:
    return Device("CPU", "cpu", "host", 64 << 30, free, (64 << 30) - free, backend="CPU")


def test_the_verdict_says_whether_it_fits_and_what_would(tmp_path: Path) -> None:
    info = scan(write_tiny_llama(tmp_path / "t.gguf", ctx=2048))
    roomy = estimate(info, LoadOptions(gpu_layers=0, n_ctx=256), [_cpu(8 << 30)])
    assert roomy.verdict().startswith("fits (")
    assert "the whole trained context, ctx 2048" in roomy.verdict() and "no GPU" in roomy.verdict()
    tight = estimate(info, LoadOptions(gpu_layers=0, n_ctx=2048), [_cpu(roomy.total * 3 // 2)])
    assert tight.verdict().startswith("does not fit: ") and "n_ctx=" in tight.verdict()


# -- the magics and the picker -----------------------------------------------------------------------


def test_llm_estimate_prints_the_table_and_the_fits_line_for_a_model_not_pulled(
        hub: FakeHub, tmp_path: Path) -> None:
    import IPython
    from IPython.testing.globalipapp import start_ipython

    hub.add_repo("team/Tiny-GGUF", {"tiny-q8_0.gguf": write_tiny_llama(tmp_path / "t.gguf").read_bytes()})
    ip = start_ipython() or IPython.get_ipython()
    ip.run_line_magic("load_ext", "jupyter_llm")
    table = ip.run_line_magic("llm", f"estimate {HF_PREFIX}team/Tiny-GGUF:Q8_0 --ctx 256 --gpu-layers 0")
    text = repr(table)
    assert table.rows[0][0] == "CPU" and table.columns[1] == "weights"
    assert "fits (" in text and "not pulled" in text and "range request" in text
    assert "team/Tiny-GGUF/tiny-q8_0.gguf" in text
    assert "not pulled" in table._repr_html_()


def test_the_picker_prices_a_model_not_pulled_on_demand(manager: ModelManager, hub: FakeHub, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from jupyter_llm.notebook import picker as picker_module

    path = write_tiny_llama(tmp_path / "t.gguf", n_layer=3, ctx=2048)
    hub.add_repo("team/Tiny-GGUF", {"tiny-f32.gguf": path.read_bytes()})
    _user_alias("tiny", "team/Tiny-GGUF", "F32")
    _user_alias("gone", "team/Gone-GGUF", "F32")
    picker = picker_module.picker(manager)
    try:
        picker.model.value = "tiny"
        assert picker.estimate is None and "press Estimate" in picker.estimate_view.value
        assert picker.estimate_button.layout.display is None, "the button shows for a model not pulled"
        assert hub.log == [], "selecting a model reads nothing"
        picker.estimate_remote().join(60)
        assert "not pulled" in picker.status.value, picker.status.value
        assert picker.estimate is not None and picker.estimate.weights == scan(path).weights_bytes
        assert picker.gpu_layers.max == 4 and picker.context.options[-1] == 2048
        assert picker.estimate_button.layout.display == "none"
        before = len(hub.log)
        picker.context.value = 1024
        assert picker.estimate.n_ctx == 1024 and len(hub.log) == before, "re-pricing reads nothing"

        monkeypatch.setenv("JUPYTER_LLM_HF_ENDPOINT", "http://127.0.0.1:9")
        picker.model.value = "gone"
        picker.estimate_remote().join(60)
        assert "127.0.0.1:9" in picker.status.value, picker.status.value
    finally:
        picker.close()


# -- what a pull honours: tokens, split models -------------------------------------------------------


def test_a_gated_repository_is_read_with_the_token_which_never_reaches_the_cdn(
        hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo("team/Gated-GGUF", {"gated-f32.gguf": write_tiny_llama(tmp_path / "t.gguf").read_bytes()},
                 gated=True)
    hub.tokens.add("hf_test_token")
    name = HF_PREFIX + "team/Gated-GGUF"
    with pytest.raises(RemoteError, match="gated"):
        ModelManager().estimate(name, OPTIONS.with_(n_ctx=256))
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert ModelManager().estimate(name, OPTIONS.with_(n_ctx=256)).weights > 0
    ranged = _ranged(hub.log)
    assert ranged and all(r.host.startswith("localhost:") for r in ranged)
    assert not any("authorization" in {k.lower() for k in r.headers} for r in ranged), "the CDN gets no token"


def test_a_split_model_is_priced_from_the_header_of_every_part(hub: FakeHub, tmp_path: Path) -> None:
    from tests.ggufs import split_paths

    first = write_tiny_llama(tmp_path / "split" / "tiny-f32.gguf", n_layer=4, split_max_tensors=8)
    parts = split_paths(tmp_path / "split" / "tiny-f32.gguf")
    assert first == parts[0] and len(parts) > 1
    hub.add_repo("team/Split-GGUF", {p.name: p.read_bytes() for p in parts})
    remote = ModelManager().estimate(HF_PREFIX + "team/Split-GGUF", OPTIONS.with_(n_ctx=256))
    assert remote.weights == sum(scan(p).weights_bytes for p in parts)
    assert {r.key for r in _ranged(hub.log)} == {hub.file("team/Split-GGUF", p.name).sha256 for p in parts}
    _same(remote, ModelManager().estimate(str(first), OPTIONS.with_(n_ctx=256)))


def test_a_remote_file_that_is_no_gguf_is_refused_after_its_first_range(hub: FakeHub) -> None:
    hub.add_repo("team/Fake-GGUF", {"fake-q4_0.gguf": b"<html>not a model</html>" * 200_000})
    with pytest.raises(GGUFError, match="is not a GGUF file"):
        ModelManager().estimate(HF_PREFIX + "team/Fake-GGUF", OPTIONS)
    assert len(_ranged(hub.log)) == 1
