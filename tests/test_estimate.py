"""estimate: the formulas against llama.cpp's own numbers (dry runs and real loads in a subprocess),
the layer rule on imaginary GPUs, auto GPU layers and context, and what it says when nothing fits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from jupyter_llm.memory.devices import Device, list_devices
from jupyter_llm.memory.estimate import MemoryEstimate, dry_run, estimate, fit
from jupyter_llm.memory.formulas import (
    AUTO_CTX_CEILING,
    GiB,
    MiB,
    context_cells,
    default_margin,
    is_formula_exact,
    layer_devices,
)
from jupyter_llm.memory.llama_log import mib_to_bytes
from jupyter_llm.memory.probe import measure
from jupyter_llm.options import AUTO, LoadOptions
from jupyter_llm.store.gguf import GGUFInfo, scan
from tests.ggufs import write_tiny_llama

# (n_ctx, kv_type, flash_attn, parallel): contexts and KV types the issue asks for, plus slots
CASES = [
    (512, "f16", False, 1), (4096, "f16", False, 1), (8192, "f16", False, 1), (8192, "f16", True, 1),
    (32768, "f16", True, 1), (4096, "q8_0", True, 1), (8192, "q4_0", True, 1), (2000, "f16", False, 3),
]
LOG_ROUNDING = 0.005 * MiB  # llama.cpp prints sizes as %.2f MiB


def host(free: int = 64 * GiB) -> Device:
    return Device("CPU", "cpu", "host", 128 * GiB, free, 128 * GiB - free, backend="CPU")


def gpu(index: int, free: int = 8 * GiB) -> Device:
    return Device(f"GPU{index}", "gpu", "imaginary GPU", 16 * GiB, free, 16 * GiB - free)


def options(n_ctx: int, kv_type: str = "f16", flash_attn: bool = False, parallel: int = 1,
            gpu_layers: int = 0) -> LoadOptions:
    return LoadOptions(gpu_layers=gpu_layers, n_ctx=n_ctx, kv_type=kv_type, flash_attn=flash_attn,
                       parallel=parallel)


def assert_close(estimated: int, measured: int, rel: float, what: str) -> None:
    error = abs(estimated - measured)
    assert error <= max(rel * measured, LOG_ROUNDING), (
        f"{what}: estimated {estimated / MiB:.3f} MiB, llama.cpp {measured / MiB:.3f} MiB "
        f"({(estimated - measured) / max(measured, 1) * 100:+.2f} %)")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama with realistic proportions (n_ff = 3 n_embd, GQA), untied output."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", n_layer=4, n_embd=256,
                            n_head=4, n_head_kv=2, n_ff=768, ctx=8192, dtype="f16", tied=False)


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> GGUFInfo:
    return scan(smollm2_path)


@pytest.fixture(scope="module")
def dry_runs(smollm2_path: Path, tiny_path: Path) -> dict[str, list[dict[str, Any]]]:
    """llama.cpp's numbers for every case, one dry-run subprocess per model."""
    out = {}
    for key, path in (("smollm2", smollm2_path), ("tiny", tiny_path)):
        answer = measure(path, [options(*case) for case in CASES])
        assert "error" not in answer, answer
        out[key] = answer["results"]
    return out


@pytest.mark.parametrize("model", ["smollm2", "tiny"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"ctx{c[0]}-{c[1]}-fa{int(c[2])}-p{c[3]}")
def test_estimate_matches_llama_cpp_dry_run(model: str, case: tuple[Any, ...], request: pytest.FixtureRequest,
                                            dry_runs: dict[str, list[dict[str, Any]]]) -> None:
    path = request.getfixturevalue("smollm2_path" if model == "smollm2" else "tiny_path")
    measured = dry_runs[model][CASES.index(case)]
    assert "error" not in measured, measured
    est = estimate(scan(path), options(*case), [host()])
    cpu = est.device("CPU")
    assert est.n_ctx == measured["n_ctx"]
    assert_close(cpu.kv, measured["kv_size"], 0.01, "KV cache")
    assert_close(cpu.compute, measured["devices"]["CPU"]["compute"], 0.10, "compute graph")
    assert_close(cpu.output, measured["devices"]["CPU"]["output"], 0.01, "output buffer")
    assert est.fits and est.exact and est.suggestion() is None


@pytest.mark.parametrize("model", ["smollm2", "tiny"])
def test_estimate_matches_a_real_load(model: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue("smollm2_path" if model == "smollm2" else "tiny_path")
    opts = options(4096)
    answer = measure(path, [opts], real=True)  # loads and allocates for real, in a subprocess
    assert "error" not in answer, answer
    weights = answer["model"]["devices"]["CPU"]["weights"]
    result = answer["results"][0]["devices"]["CPU"]
    cpu = estimate(scan(path), opts, [host()]).device("CPU")
    assert_close(cpu.weights, weights, 0.01, "weights")
    assert_close(cpu.kv, result["kv"], 0.01, "KV cache")
    assert_close(cpu.compute, result["compute"], 0.10, "compute graph")


def test_smollm2_numbers_from_the_notes(smollm2: GGUFInfo) -> None:
    est = estimate(smollm2, options(4096), [host()])
    assert est.weights == 96_576_768  # = llama_model_size, 92.10 MiB
    assert est.kv == 90 * MiB
    assert est.output == mib_to_bytes(0.1875) == 49152 * 4
    assert est.total == est.weights + est.kv + est.compute + est.output


def test_dry_run_gives_per_device_buffers(smollm2_path: Path, smollm2: GGUFInfo) -> None:
    sizes = dry_run(smollm2_path, options(4096))
    assert list(sizes) == ["CPU"]
    assert sizes["CPU"].weights == smollm2.weights_bytes
    assert sizes["CPU"].kv == 90 * MiB
    assert mib_to_bytes(98.25) <= sizes["CPU"].compute <= mib_to_bytes(99.38)


def test_refine_replaces_kv_and_graph_with_llama_cpp_numbers(smollm2_path: Path, smollm2: GGUFInfo) -> None:
    formula = estimate(smollm2, options(4096), [host()])
    refined = estimate(smollm2, options(4096), [host()], refine="always")
    assert (formula.source, refined.source) == ("formula", "dry-run")
    assert refined.device("CPU").compute == mib_to_bytes(99.38)  # what llama.cpp printed
    assert refined.kv == formula.kv and refined.weights == formula.weights


def test_sliding_window_models_are_refined_by_a_dry_run(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "swa.gguf", n_embd=256, n_head=4, n_ff=768, ctx=4096,
                            metadata={"llama.attention.sliding_window": 128})
    info = scan(path)
    assert not is_formula_exact(info)
    assert not estimate(info, options(1024), [host()]).exact
    refined = estimate(info, options(1024), [host()], refine=True)
    assert refined.source == "dry-run" and refined.exact
    assert refined.device("CPU").compute > 0


@pytest.mark.parametrize(("asked", "parallel", "cells", "per_slot"),
                         [(300, 1, 512, 512), (300, 2, 512, 256), (2000, 3, 2304, 768), (4096, 4, 4096, 1024)])
def test_context_is_padded_like_llama_cpp(asked: int, parallel: int, cells: int, per_slot: int) -> None:
    assert context_cells(asked, parallel) == (cells, per_slot)


# -- the layer rule, on imaginary GPUs (pure functions) ------------------------------------------------


def rows(est: MemoryEstimate) -> dict[str, tuple[int, int]]:
    return {d.device_id: (d.weights, d.kv) for d in est.devices}


def test_layer_rule_moves_the_output_layer_first() -> None:
    gpus = [gpu(0)]
    assert layer_devices(3, 0, gpus) == ["CPU"] * 4
    assert layer_devices(3, 1, gpus) == ["CPU", "CPU", "CPU", "GPU0"]
    assert layer_devices(3, 3, gpus) == ["CPU", "GPU0", "GPU0", "GPU0"]
    assert layer_devices(3, 4, gpus) == ["GPU0"] * 4
    assert layer_devices(3, 99, gpus) == ["GPU0"] * 4
    assert layer_devices(3, 4, []) == ["CPU"] * 4  # no GPU: everything stays on the host


@pytest.mark.parametrize("tied", [True, False])
def test_weights_and_kv_follow_the_layers(tmp_path: Path, tied: bool) -> None:
    n_layer = 4
    info = scan(write_tiny_llama(tmp_path / "m.gguf", n_layer=n_layer, tied=tied))
    layer = info.layer_bytes()[0]
    embd = info.tensor("token_embd.weight").n_bytes  # type: ignore[union-attr]
    head = sum(t.n_bytes for t in info.tensors if t.name.startswith("output"))  # norm (+ output)
    kv_layer = context_cells(1024)[0] * 2 * 2 * 16 * 2  # cells × K,V × kv heads × head_dim × f16
    devices = [host(), gpu(0)]

    def at(ngl: int) -> dict[str, tuple[int, int]]:
        return rows(estimate(info, options(1024, gpu_layers=ngl), devices))

    assert at(0) == {"CPU": (info.weights_bytes, n_layer * kv_layer), "GPU0": (0, 0)}
    dup = embd if tied else 0  # tied embeddings: the output layer's device gets its own copy
    assert at(1) == {"CPU": (info.weights_bytes - head, n_layer * kv_layer), "GPU0": (head + dup, 0)}
    assert at(n_layer) == {"CPU": (embd + layer, kv_layer),
                           "GPU0": (head + dup + (n_layer - 1) * layer, (n_layer - 1) * kv_layer)}
    assert at(n_layer + 1) == {"CPU": (embd, 0), "GPU0": (head + dup + n_layer * layer, n_layer * kv_layer)}


def test_gpu_layers_split_by_tensor_split_or_free_memory() -> None:
    two = [gpu(0, free=4 * GiB), gpu(1, free=12 * GiB)]
    assert layer_devices(7, 8, two, (1.0, 1.0)) == ["GPU0"] * 4 + ["GPU1"] * 4
    assert layer_devices(7, 8, two) == ["GPU0"] * 2 + ["GPU1"] * 6  # 1 : 3 by free memory
    assert layer_devices(7, 4, two, (3.0, 1.0)) == ["CPU"] * 4 + ["GPU0"] * 3 + ["GPU1"]


def test_graph_runs_where_the_layers_are(smollm2: GGUFInfo) -> None:
    full = estimate(smollm2, options(4096, gpu_layers=31), [host(), gpu(0)])
    cpu_only = estimate(smollm2, options(4096), [host(), gpu(0)])
    assert full.device("GPU0").compute == cpu_only.device("CPU").compute
    assert full.device("CPU").compute < full.device("GPU0").compute / 10  # host only stages inputs
    assert full.device("CPU").output == cpu_only.device("CPU").output  # logits come back to the host


# -- fit: auto GPU layers and context -------------------------------------------------------------------


def test_auto_layers_are_zero_without_a_gpu(smollm2: GGUFInfo) -> None:
    assert fit(smollm2, LoadOptions(), [host()]).gpu_layers == 0
    if any(d.kind == "gpu" for d in list_devices()):
        pytest.skip("this machine has a GPU")
    assert fit(smollm2, LoadOptions()).gpu_layers == 0  # this machine's real devices
    assert estimate(smollm2, LoadOptions()).options.gpu_layers == 0


def test_auto_layers_fill_a_gpu_as_far_as_it_goes(smollm2: GGUFInfo) -> None:
    devices = [host(), gpu(0, free=250 * MiB)]
    ngl = fit(smollm2, LoadOptions(n_ctx=4096), devices).gpu_layers
    assert 0 < ngl < 31
    assert estimate(smollm2, options(4096, gpu_layers=ngl), devices).fits
    assert not estimate(smollm2, options(4096, gpu_layers=ngl + 1), devices).fits
    assert fit(smollm2, LoadOptions(n_ctx=4096), [host(), gpu(0, free=8 * GiB)]).gpu_layers == 31


def test_auto_context_is_capped_at_the_training_context(smollm2: GGUFInfo) -> None:
    assert fit(smollm2, LoadOptions(gpu_layers=0, n_ctx=AUTO), [host()]).n_ctx == 8192


def test_auto_context_stops_at_a_ceiling_for_a_huge_training_context(tmp_path: Path) -> None:
    # A GGUF claiming 2**27 tokens of training context once got ctx 2,102,272 (21.1 of 22 GiB).
    huge = scan(write_tiny_llama(tmp_path / "huge.gguf", ctx=2**27))
    devices = [host(free=22 * GiB)]
    picked = fit(huge, LoadOptions(gpu_layers=0, n_ctx=AUTO), devices).n_ctx
    assert picked == AUTO_CTX_CEILING == 32768
    est = estimate(huge, LoadOptions(gpu_layers=0, n_ctx=AUTO), devices)
    assert est.n_ctx == AUTO_CTX_CEILING and est.total < GiB


def test_auto_context_keeps_the_margin_free_on_every_device(smollm2: GGUFInfo) -> None:
    for free in (300 * MiB, 700 * MiB, 12 * GiB):
        devices = [host(free=free)]
        n_ctx = fit(smollm2, LoadOptions(gpu_layers=0, n_ctx=AUTO), devices).n_ctx
        row = estimate(smollm2, options(int(n_ctx)), devices).device("CPU")
        assert row.total + default_margin(free) <= free, f"{free / MiB:.0f} MiB free"


def test_auto_context_shrinks_when_free_memory_is_small(smollm2: GGUFInfo) -> None:
    small = [host(free=300 * MiB)]
    n_ctx = fit(smollm2, LoadOptions(gpu_layers=0, n_ctx=AUTO), small).n_ctx
    assert isinstance(n_ctx, int) and 256 <= n_ctx < 8192 and n_ctx % 256 == 0
    assert estimate(smollm2, options(n_ctx), small).fits
    assert not estimate(smollm2, options(n_ctx + 256), small).fits
    smaller = fit(smollm2, LoadOptions(gpu_layers=0, n_ctx=AUTO), [host(free=250 * MiB)]).n_ctx
    assert smaller < n_ctx  # type: ignore[operator]


def test_host_margin_is_ten_percent_or_one_gib() -> None:
    assert default_margin(4 * GiB) == 4 * GiB // 10
    assert default_margin(100 * GiB) == GiB


def test_a_model_that_cannot_fit_says_so_with_the_numbers(smollm2: GGUFInfo) -> None:
    est = estimate(smollm2, options(8192), [host(free=60 * MiB)])
    assert not est.fits and not est.device("CPU").fits
    text = est.suggestion()
    assert text is not None
    assert "CPU needs 438.7 MiB" in text and "60.0 MiB free" in text
    assert "weights 92.1 MiB" in text and "smaller quantization" in text


def test_a_tight_fit_suggests_a_smaller_context_and_a_quantized_cache(smollm2: GGUFInfo) -> None:
    est = estimate(smollm2, options(8192), [host(free=300 * MiB)])
    assert not est.fits
    text = est.suggestion() or ""
    n_ctx = fit(smollm2, LoadOptions(gpu_layers=0, n_ctx=AUTO), [host(free=300 * MiB)]).n_ctx
    at_ctx = estimate(smollm2, options(int(n_ctx)), [host(free=300 * MiB)])
    # every tip quotes the whole total it would need, not only the part that shrinks
    assert f"n_ctx={n_ctx} (--ctx {n_ctx}; {at_ctx.total / MiB:.1f} MiB in all instead of 438.7 MiB" in text
    fa = estimate(smollm2, options(8192, flash_attn=True), [host(free=300 * MiB)]).total / MiB
    q8 = estimate(smollm2, options(8192, "q8_0", flash_attn=True), [host(free=300 * MiB)]).total / MiB
    assert f"--kv-type q8_0 --flash-attn; {q8:.1f} MiB in all instead of 438.7 MiB (KV 95.6 MiB instead of " \
           "180.0 MiB)" in text
    assert f"--flash-attn; {fa:.1f} MiB in all instead of 438.7 MiB (graph 98.2 MiB instead of 166.4 MiB)" in text


def test_gpu_layers_without_a_gpu_mean_the_cpu_and_the_estimate_says_so(smollm2: GGUFInfo) -> None:
    est = estimate(smollm2, options(4096, gpu_layers=10), [host()])
    assert est.options.gpu_layers == 0
    assert any(n.startswith("no GPU found: gpu_layers=10 ignored") for n in est.notes)
    assert not estimate(smollm2, options(4096, gpu_layers=10), [host(), gpu(0)]).notes


def test_too_many_gpu_layers_suggest_fewer(smollm2: GGUFInfo) -> None:
    devices = [host(), gpu(0, free=250 * MiB)]
    est = estimate(smollm2, options(4096, gpu_layers=31), devices)
    assert not est.device("GPU0").fits and est.device("CPU").fits
    ngl = fit(smollm2, LoadOptions(n_ctx=4096), devices).gpu_layers
    assert f"gpu_layers={ngl} (--gpu-layers {ngl})" in (est.suggestion() or "")


def test_estimate_is_json(smollm2: GGUFInfo) -> None:
    data = json.loads(json.dumps(estimate(smollm2, options(4096), [host(), gpu(0)]).to_dict()))
    assert data["fits"] is True and data["options"]["n_ctx"] == 4096
    assert [d["device_id"] for d in data["devices"]] == ["CPU", "GPU0"]
