"""Every way llama.cpp can fail (docs/notes.md §2) ends in a clear error, never in a dead or hung kernel;
and after each, the real model loads and generates again. The crashes are made deterministic
(a fault injected at a chosen point, a header llama.cpp asserts on) so that they happen on any
CPU; the one crash that belongs to one kind of CPU is tested only there."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from jupyter_llm.errors import ModelLoadError, WorkerCrashedError
from jupyter_llm.options import LoadOptions, SamplingOptions
from jupyter_llm.runtime import Runtime
from tests import ggufs

SMALL = LoadOptions(gpu_layers=0, n_ctx=512)


def assert_real_model_works(smollm2_path: Path) -> None:
    """The recovery half of every test: load the real model afresh and generate."""
    with Runtime.start(smollm2_path, SMALL, name="smollm2") as rt:
        result = rt.generate("The capital of France is", SamplingOptions(temperature=0.0, max_tokens=4)).result
        assert result.completion_tokens > 0 and result.text.strip()


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


HAS_AMX = "amx_tile" in cpu_flags()


@pytest.mark.parametrize("at", ["load", "warm_up"])
def test_segfault_while_loading_is_survived(at: str, smollm2_path: Path) -> None:
    # A real invalid read in native code at the point where llama.cpp's own load crashes happen
    # (warm_up: the first multi-token decode, where weight repacking segfaults on AMX CPUs).
    with pytest.raises(WorkerCrashedError) as info:
        Runtime.start(smollm2_path, SMALL, name="smollm2", _fault={"at": at, "signal": "SIGSEGV"})
    err = info.value
    assert err.signal == signal.SIGSEGV
    assert "the worker running smollm2 was killed by SIGSEGV while loading" in str(err)
    assert "`%llm load smollm2`" in str(err) and "--ctx" in str(err)
    assert_real_model_works(smollm2_path)


def test_a_relaying_stream_ends_with_the_crash_too(smollm2_path: Path) -> None:
    # The API server's way of reading a stream (Stream.relay): the crash reaches it as well.
    rt = Runtime.start(smollm2_path, SMALL, name="smollm2", _fault={"at": "decode", "signal": "SIGKILL"})
    try:
        stream = rt.generate("Once upon a time", SamplingOptions(temperature=0.0, max_tokens=50))
        got: list[str] = []
        t0 = time.monotonic()
        stream.relay(lambda chunk: got.append(chunk.text))
        assert time.monotonic() - t0 < 10  # never hangs
        with pytest.raises(WorkerCrashedError) as info:
            stream.result  # noqa: B018
        assert info.value.signal == signal.SIGKILL
    finally:
        rt.close()


@pytest.mark.parametrize("sig", ["SIGSEGV", "SIGABRT", "SIGKILL"])
def test_worker_dying_mid_generation_ends_the_stream_with_the_signal(sig: str, smollm2_path: Path) -> None:
    rt = Runtime.start(smollm2_path, SMALL, name="smollm2", _fault={"at": "decode", "signal": sig})
    try:
        stream = rt.generate("Once upon a time", SamplingOptions(temperature=0.0, max_tokens=50))
        t0 = time.monotonic()
        with pytest.raises(WorkerCrashedError) as info:
            for _ in stream:
                pass
        assert time.monotonic() - t0 < 10  # never hangs
        assert info.value.signal == signal.Signals[sig]
        assert f"the worker running smollm2 was killed by {sig}" in str(info.value)
        assert "while loading" not in str(info.value)
        assert not rt.alive
        with pytest.raises(WorkerCrashedError):
            rt.count_tokens("hello")
    finally:
        rt.close()
    assert_real_model_works(smollm2_path)


def test_extra_buffer_types_forced_on_never_take_the_kernel_down(smollm2_path: Path) -> None:
    # What weight repacking does depends on the CPU (it segfaults on Intel AMX, works on AMD
    # Zen 4): either way the caller gets a working model or a WorkerCrashedError, never a dead
    # process of its own.
    try:
        with Runtime.start(smollm2_path, SMALL, name="smollm2", _extra_bufts=True) as rt:
            result = rt.generate("The capital of France is", SamplingOptions(temperature=0.0, max_tokens=4)).result
            assert result.completion_tokens > 0
    except WorkerCrashedError as err:
        assert err.signal is not None and "the worker running smollm2 was killed by SIG" in str(err)
    assert_real_model_works(smollm2_path)


@pytest.mark.skipif(not HAS_AMX, reason="the weight-repacking segfault happens on Intel AMX CPUs only; "
                    "this CPU has no amx_tile flag (the crash paths are covered by the fault tests)")
def test_extra_buffer_types_segfault_on_an_amx_cpu(smollm2_path: Path) -> None:
    with pytest.raises(WorkerCrashedError) as info:
        Runtime.start(smollm2_path, SMALL, name="smollm2", _extra_bufts=True)
    assert info.value.signal == signal.SIGSEGV
    assert "while loading" in str(info.value)
    assert_real_model_works(smollm2_path)


def test_absurd_block_count_aborts_the_worker_with_llama_cpps_assert(tmp_path: Path, smollm2_path: Path) -> None:
    path = ggufs.write_tiny_llama(tmp_path / "layers.gguf", block_count=1000)
    with pytest.raises(WorkerCrashedError) as info:
        Runtime.start(path, SMALL)
    assert info.value.signal == signal.SIGABRT
    assert "SIGABRT" in str(info.value)
    assert info.value.last_log and "GGML_ASSERT" in info.value.last_log and "n_layer" in info.value.last_log
    assert_real_model_works(smollm2_path)


def test_truncated_file_is_a_clean_load_error(tmp_path: Path, smollm2_path: Path) -> None:
    path = ggufs.truncate(ggufs.write_tiny_llama(tmp_path / "cut.gguf"), -1000)
    with pytest.raises(ModelLoadError) as info:
        Runtime.start(path, SMALL)
    assert "not within the file bounds" in str(info.value)  # llama.cpp's own words
    assert "pull it again" in str(info.value)
    assert_real_model_works(smollm2_path)


def test_non_gguf_file_is_a_clean_load_error(tmp_path: Path, smollm2_path: Path) -> None:
    path = ggufs.write_not_gguf(tmp_path / "page.gguf")
    with pytest.raises(ModelLoadError, match="invalid magic"):
        Runtime.start(path, SMALL)
    assert_real_model_works(smollm2_path)


def test_context_far_beyond_ram_is_a_clean_load_error(smollm2_path: Path) -> None:
    # 10M cells of SmolLM2 want a 220 GB KV buffer: malloc refuses it at once. (A KV cache just
    # *under* physical RAM would be zeroed page by page until the OOM killer strikes; and the tiny
    # model's 10M-cell KV, 2.5 GB, would be allocated before its 100 GB compute buffer fails.)
    with pytest.raises(ModelLoadError) as info:
        Runtime.start(smollm2_path, LoadOptions(gpu_layers=0, n_ctx=10_000_000), name="smollm2")
    message = str(info.value)
    assert "kv cache" in message and "insufficient memory" in message
    assert "smaller --ctx" in message
    assert_real_model_works(smollm2_path)


def test_worker_killed_mid_generation_raises_on_the_stream_and_later_calls(smollm2_path: Path) -> None:
    rt = Runtime.start(smollm2_path, SMALL, name="smollm2")
    try:
        stream = rt.generate("Once upon a time", SamplingOptions(temperature=0.0, max_tokens=400))
        next(iter(stream))
        os.kill(rt.pid, signal.SIGKILL)  # what the OOM killer does
        t0 = time.monotonic()
        with pytest.raises(WorkerCrashedError) as info:
            for _ in stream:
                pass
        assert time.monotonic() - t0 < 5  # never hangs
        assert info.value.signal == signal.SIGKILL
        assert "was killed by SIGKILL (often the out-of-memory killer)" in str(info.value)
        assert not rt.alive
        with pytest.raises(WorkerCrashedError):
            rt.generate("hello")
        with pytest.raises(WorkerCrashedError):
            rt.count_tokens("hello")
    finally:
        rt.close()
    assert_real_model_works(smollm2_path)
