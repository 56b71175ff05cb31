"""llama_log: llama.cpp's memory lines, from a real captured load and from printf-exact lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jupyter_llm.memory.llama_log import LEVEL_CONT, MIB, BufferSizes, MemoryLog, device_of, mib_to_bytes

DATA = Path(__file__).parent / "data"


def real_log() -> list[tuple[int, str]]:
    """Messages of a real load of SmolLM2 at n_ctx 4096, as the log callback got them
    (captured with bench/capture_llama_log.py; llama.cpp's debug chatter left out)."""
    lines = (DATA / "smollm2_load_log.jsonl").read_text().splitlines()
    return [(m["level"], m["text"]) for m in map(json.loads, lines)]


def test_real_smollm2_load_gives_llama_cpp_numbers() -> None:
    log = MemoryLog()
    for level, text in real_log():
        log.feed(level, text)
    cpu = log.breakdown()["CPU"]
    assert list(log.breakdown()) == ["CPU"]
    assert cpu.weights == mib_to_bytes("92.10")  # CPU_Mapped
    assert cpu.kv == 90 * MIB
    assert mib_to_bytes(98.25) <= cpu.compute <= mib_to_bytes(99.38)
    assert cpu.output == mib_to_bytes("0.19")
    assert cpu.total == cpu.weights + cpu.kv + cpu.compute + cpu.output
    assert log.kv_size == 90 * MIB
    assert (log.n_ctx, log.n_ctx_per_seq) == (4096, 4096)
    cache = log.caches[0]
    assert (cache.cells, cache.layers, cache.seqs) == (4096, 30, 1)
    assert cache.parts == {"K": ("f16", 45 * MIB), "V": ("f16", 45 * MIB)}


def test_real_log_weights_agree_with_the_gguf_tensor_table(smollm2_path: Path) -> None:
    from jupyter_llm.store.gguf import scan

    log = MemoryLog()
    for level, text in real_log():
        log.feed(level, text)
    # the log prints %.2f MiB: equal to the tensor bytes within its rounding
    assert abs(log.breakdown()["CPU"].weights - scan(smollm2_path).weights_bytes) <= 0.005 * MIB


def test_the_debug_check_of_the_compute_buffer_is_not_counted_twice() -> None:
    log = MemoryLog()
    for level, text in real_log():
        log.feed(level, text)
    assert any("matches expectation" in text for _, text in real_log())
    assert [b.kind for b in log.buffers].count("compute") == 1


def test_continuation_pieces_join_into_one_line() -> None:
    log = MemoryLog()
    log.feed(2, "llama_kv_cache:        CPU KV buf")
    log.feed(LEVEL_CONT, "fer size =   ")
    log.feed(LEVEL_CONT, " 90.00 MiB\n")
    log.feed(2, "load_tensors: loading model tensors\n")
    for _ in range(3):  # the progress dots of a load arrive as continuations
        log.feed(LEVEL_CONT, ".")
    log.feed(LEVEL_CONT, "\n")
    assert log.breakdown() == {"CPU": BufferSizes(kv=90 * MIB)}


def test_a_last_line_without_newline_is_parsed_on_breakdown() -> None:
    log = MemoryLog()
    log.feed(2, "sched_reserve:        CPU compute buffer size =    98.25 MiB")
    assert log.breakdown()["CPU"].compute == mib_to_bytes(98.25)


def test_a_new_message_ends_an_unterminated_line() -> None:
    log = MemoryLog()
    log.feed(2, "load_tensors:   CPU_Mapped model buffer size =    92.10 MiB")
    log.feed(2, "llama_context:        CPU  output buffer size =     0.19 MiB\n")
    assert log.breakdown()["CPU"] == BufferSizes(weights=mib_to_bytes(92.10), output=mib_to_bytes(0.19))


@pytest.mark.parametrize(
    ("buffer", "device"),
    [("CPU", "CPU"), ("CPU_Mapped", "CPU"), ("CPU_REPACK", "CPU"), ("AMX", "CPU"), ("CUDA_Host", "CPU"),
     ("CUDA0", "CUDA0"), ("CUDA1", "CUDA1"), ("CUDA0_Split", "CUDA0"), ("Vulkan0", "Vulkan0"), ("Metal", "Metal")],
)
def test_buffer_names_map_to_devices(buffer: str, device: str) -> None:
    assert device_of(buffer) == device


def test_gpu_load_separates_devices_and_counts_host_copies_in_addition() -> None:
    # Lines in llama.cpp's exact printf formats ("%s: %12s model buffer size = %8.2f MiB", …)
    lines = [
        "load_tensors: offloaded 31/31 layers to GPU",
        f"load_tensors: {'CPU_Mapped':>12} model buffer size = {40.0:8.2f} MiB",
        f"load_tensors: {'CPU_REPACK':>12} model buffer size = {12.5:8.2f} MiB",
        f"load_tensors: {'CUDA0':>12} model buffer size = {3000.25:8.2f} MiB",
        f"llama_kv_cache: {'CUDA0':>10} KV buffer size = {512.0:8.2f} MiB",
        f"llama_context: {'CUDA_Host':>10}  output buffer size = {0.49:8.2f} MiB",
        f"sched_reserve: {'CUDA0':>10} compute buffer size = {300.5:8.2f} MiB",
        f"sched_reserve: {'CUDA_Host':>10} compute buffer size = {20.0:8.2f} MiB",
    ]
    log = MemoryLog()
    log.feed_text("\n".join(lines))
    assert log.breakdown() == {
        "CPU": BufferSizes(weights=mib_to_bytes(52.5), compute=20 * MIB, output=mib_to_bytes(0.49)),
        "CUDA0": BufferSizes(weights=mib_to_bytes(3000.25), kv=512 * MIB, compute=mib_to_bytes(300.5)),
    }
    assert log.layers_offloaded == (31, 31)


def test_recurrent_state_counts_as_kv() -> None:
    log = MemoryLog()
    log.feed_text(
        f"llama_memory_recurrent: {'CPU':>10} RS buffer size = {16.0:8.2f} MiB\n"
        "llama_memory_recurrent: size =   16.00 MiB (     1 cells,  24 layers,  1 seqs  0 rs_seq), "
        "R (f32):    1.00 MiB, S (f32):   15.00 MiB, P (f32):    0.00 MiB\n"
    )
    assert log.breakdown()["CPU"].kv == 16 * MIB
    assert log.kv_size == 16 * MIB
    assert log.caches[0].parts["S"] == ("f32", 15 * MIB)


def test_to_dict_is_json() -> None:
    log = MemoryLog()
    for level, text in real_log():
        log.feed(level, text)
    data = json.loads(json.dumps(log.to_dict()))
    assert data["devices"]["CPU"]["kv"] == 90 * MIB
    assert data["n_batch"] == 512
