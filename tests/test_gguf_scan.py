"""gguf_scan: header facts of the real default model and of tiny GGUFs; every broken-file error."""

from __future__ import annotations

import importlib.util
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest

from jupyter_llm.errors import GGUFError, TruncatedGGUFError
from jupyter_llm.store.gguf import ArrayInfo, scan, scan_parts, split_parts, total_weights_bytes
from tests.ggufs import corrupt, key_offset, split_paths, truncate, write_not_gguf, write_tiny_llama

DTYPES = ("f32", "f16", "q8_0")


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_llama(tmp_path / "tiny.gguf")


def _reader_table(path: Path) -> list[tuple[str, tuple[int, ...], int, int, int]]:
    import gguf

    reader = gguf.GGUFReader(path)
    return [(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset), int(t.n_bytes))
            for t in reader.tensors]


def _scan_table(path: Path) -> list[tuple[str, tuple[int, ...], int, int, int]]:
    return [(t.name, t.shape, t.ggml_type, t.offset, t.n_bytes) for t in scan(path).tensors]


# -- the real default model --------------------------------------------------------------------


def test_scan_reads_the_default_models_shape(smollm2_path: Path) -> None:
    info = scan(smollm2_path)
    assert info.version == 3
    assert info.architecture == "llama"
    assert info.block_count == 30
    assert info.embedding_length == 576
    assert (info.head_count, info.head_count_kv, info.head_dim) == (9, 3, 64)
    assert info.head_count_kv_per_layer() == [3] * 30
    assert info.vocab_size == 49_152
    assert info.context_length == 8192
    assert info.file_type == "Q4_1"
    assert info.license == "apache-2.0"
    assert "<|im_start|>" in (info.chat_template or "")
    assert info.weights_bytes == 96_576_768
    assert set(info.layer_bytes().values()) == {2_216_448}
    assert sorted(info.layer_bytes()) == list(range(30))
    embd = info.tensor("token_embd.weight")
    assert embd is not None and embd.type_name == "Q8_0" and embd.n_bytes == 30_081_024
    assert embd.shape == (576, 49_152)
    assert info.tied_embeddings
    assert {t.name for t in info.non_layer_tensors()} == {"token_embd.weight", "output_norm.weight"}
    assert info.split is None
    assert info.file_size == smollm2_path.stat().st_size


def test_scan_summarises_long_arrays_and_keeps_short_ones(smollm2_path: Path) -> None:
    info = scan(smollm2_path)
    tokens = info.metadata["tokenizer.ggml.tokens"]
    assert tokens == ArrayInfo(elem_type=8, count=49_152) and tokens.elem_type_name == "string"
    assert info.metadata["tokenizer.ggml.merges"].count == 48_900
    assert info.metadata["general.languages"] == ["en"]
    assert (info.bos_token_id, info.eos_token_id) == (1, 2)


@pytest.mark.slow
def test_scan_tensor_table_matches_gguf_reader_on_the_default_model(smollm2_path: Path) -> None:
    assert _scan_table(smollm2_path) == _reader_table(smollm2_path)


# -- tiny GGUFs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_scan_reads_tiny_models_of_each_dtype(tmp_path: Path, dtype: str) -> None:
    path = write_tiny_llama(tmp_path / f"tiny-{dtype}.gguf", dtype=dtype, tied=False)
    info = scan(path)
    assert _scan_table(path) == _reader_table(path)
    assert info.file_type == dtype.upper()
    assert (info.block_count, info.embedding_length, info.feed_forward_length) == (2, 64, 128)
    assert (info.head_count, info.head_count_kv, info.head_dim) == (4, 2, 16)
    assert info.context_length == 256
    assert not info.tied_embeddings
    assert sorted(info.layer_bytes()) == [0, 1]
    assert info.weights_bytes == sum(t.n_bytes for t in info.tensors)
    assert info.parameter_count == sum(t.n_elements for t in info.tensors)
    assert info.data_offset % info.alignment == 0


def test_file_type_falls_back_to_the_dominant_weight_type(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "t.gguf", dtype="f16")
    at = key_offset(path, "general.file_type") + 8 + len("general.file_type") + 4
    corrupt(path, at, struct.pack("<I", 1024))  # LlamaFileType.GUESSED says nothing
    assert scan(path).file_type == "F16"


def test_per_layer_head_counts_are_exposed(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "t.gguf", metadata={
        "llama.attention.head_count": [4, 4], "llama.attention.head_count_kv": [2, 0],
    })
    info = scan(path)
    assert info.head_count_per_layer() == [4, 4]
    assert info.head_count_kv_per_layer() == [2, 0]
    assert info.head_count_kv == 2
    assert info.head_dim == 16


def test_head_dim_prefers_key_length_and_vocab_size_counts_tokens(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "t.gguf", n_vocab=400, metadata={
        "llama.attention.key_length": 32, "llama.attention.value_length": 24,
        "llama.attention.sliding_window": 128,
    })
    info = scan(path)
    assert (info.head_dim, info.head_dim_v) == (32, 24)
    assert info.vocab_size == 400
    assert info.sliding_window == 128
    assert info.attention["key_length"] == 32


def test_block_count_comes_from_metadata_not_tensors(tmp_path: Path) -> None:
    info = scan(write_tiny_llama(tmp_path / "t.gguf", block_count=1000))
    assert info.block_count == 1000
    assert len(info.layer_bytes()) == 2


def test_big_endian_files_are_read(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "be.gguf", big_endian=True)
    info = scan(path)
    assert info.block_count == 2 and info.vocab_size == len(info.metadata["tokenizer.ggml.tokens"])
    assert info.tensors[0].shape == (64, info.vocab_size)


def test_split_model_parts_are_found_and_summed(tmp_path: Path) -> None:
    first = write_tiny_llama(tmp_path / "tiny.gguf", split_max_tensors=8)
    parts = split_parts(first)
    assert parts == split_paths(tmp_path / "tiny.gguf") and len(parts) == 3
    infos = scan_parts(parts)
    assert [i.split.no for i in infos if i.split] == [0, 1, 2]
    assert infos[0].split is not None and infos[0].split.count == 3
    assert infos[0].split.tensors_count == sum(len(i.tensors) for i in infos)
    assert infos[0].architecture == "llama"  # metadata lives in the first part
    whole = scan(write_tiny_llama(tmp_path / "whole.gguf"))
    assert total_weights_bytes(infos) == whole.weights_bytes
    parts[1].unlink()
    with pytest.raises(GGUFError, match=r"00002-of-00003\.gguf is missing"):
        split_parts(first)


def test_split_parts_of_a_plain_file_is_the_file(tiny: Path) -> None:
    assert split_parts(tiny) == [tiny]


# -- broken files --------------------------------------------------------------------------------


def test_not_a_gguf_file_says_what_it_starts_with(tmp_path: Path) -> None:
    path = write_not_gguf(tmp_path / "page.gguf")
    pattern = r"is not a GGUF file \(starts with b'<!DOCTYPE html>.*%llm pull"
    with pytest.raises(GGUFError, match=pattern) as e:
        scan(path)
    assert not isinstance(e.value, TruncatedGGUFError)


def test_empty_file_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(GGUFError, match="is not a GGUF file"):
        scan(path)


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="is a directory"):
        scan(tmp_path)


@pytest.mark.parametrize("version", [1, 4, 99])
def test_unsupported_version_is_refused(tiny: Path, version: int) -> None:
    corrupt(tiny, 4, struct.pack("<I", version))
    with pytest.raises(GGUFError, match=f"GGUF version {version}, which jupyter_llm cannot read"):
        scan(tiny)


def test_truncated_tensor_data_says_expected_and_actual_size(tiny: Path) -> None:
    full = tiny.stat().st_size
    truncate(tiny, -1000)
    with pytest.raises(TruncatedGGUFError) as e:
        scan(tiny, name="tiny")
    message = str(e.value)
    assert f"ends at byte {full:,}" in message and f"has {full - 1000:,} bytes" in message
    assert "re-pull it: `%llm pull tiny`" in message


def test_truncated_inside_the_header_is_truncated(tiny: Path) -> None:
    truncate(tiny, 200)
    with pytest.raises(TruncatedGGUFError, match="truncated"):
        scan(tiny)
    truncate(tiny, 10)
    with pytest.raises(TruncatedGGUFError, match="inside the GGUF header"):
        scan(tiny)


@pytest.mark.parametrize(("offset", "what"), [(8, "tensor count"), (16, "metadata count")])
def test_absurd_counts_are_corrupt_not_allocated(tiny: Path, offset: int, what: str) -> None:
    corrupt(tiny, offset, struct.pack("<Q", 1 << 60))
    with pytest.raises(GGUFError, match=f"{what} .* is impossible") as e:
        scan(tiny)
    assert not isinstance(e.value, TruncatedGGUFError)
    assert "offset" in str(e.value)


def test_string_length_beyond_the_file_is_corrupt(tiny: Path) -> None:
    corrupt(tiny, 24, struct.pack("<Q", 1 << 40))  # the first key's length
    with pytest.raises(GGUFError, match=r"key of metadata entry 0 claims .* bytes.*at offset 24"):
        scan(tiny)


def test_unknown_value_type_is_corrupt(tiny: Path) -> None:
    at = key_offset(tiny, "llama.block_count") + 8 + len("llama.block_count")
    corrupt(tiny, at, struct.pack("<I", 77))
    with pytest.raises(GGUFError, match=f"unknown value type 77 for key 'llama.block_count' at offset {at}"):
        scan(tiny)


def test_huge_array_count_is_refused_without_allocating(tiny: Path) -> None:
    at = key_offset(tiny, "tokenizer.ggml.tokens") + 8 + len("tokenizer.ggml.tokens") + 4 + 4
    corrupt(tiny, at, struct.pack("<Q", 1 << 61))
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError, match=r"array 'tokenizer\.ggml\.tokens' claims"):
            scan(tiny)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000


def test_too_many_tensor_dimensions_is_corrupt(tiny: Path) -> None:
    at = key_offset(tiny, "token_embd.weight") + 8 + len("token_embd.weight")
    corrupt(tiny, at, struct.pack("<I", 7))
    with pytest.raises(GGUFError, match=r"tensor 'token_embd\.weight' has 7 dimensions"):
        scan(tiny)


def test_unknown_ggml_type_is_corrupt(tiny: Path) -> None:
    at = key_offset(tiny, "output_norm.weight") + 8 + len("output_norm.weight") + 4 + 8
    corrupt(tiny, at, struct.pack("<I", 200))
    with pytest.raises(GGUFError, match=r"tensor 'output_norm\.weight' has unknown ggml type 200"):
        scan(tiny)


# -- the fixtures are real models ----------------------------------------------------------------

_GENERATE = textwrap.dedent("""
    import json, sys
    import llama_cpp
    from llama_cpp import llama_cpp as low

    # docs/notes.md §2: quantized weights crash on Intel AMX CPUs unless extra buffer types are off.
    default_params = low.llama_model_default_params
    def params():
        p = default_params()
        p.use_extra_bufts = False
        return p
    low.llama_model_default_params = params

    llm = llama_cpp.Llama(sys.argv[1], n_ctx=128, n_threads=1, verbose=False, seed=1)
    assert llm.model_params.use_extra_bufts is False
    out = llm.create_completion("hello world, the model is", max_tokens=6, temperature=0.0)
    chat = llm.create_chat_completion([{"role": "user", "content": "hello"}], max_tokens=4,
                                      temperature=0.0)
    print(json.dumps({"completion_tokens": out["usage"]["completion_tokens"],
                      "prompt_tokens": out["usage"]["prompt_tokens"],
                      "chat_prompt_tokens": chat["usage"]["prompt_tokens"],
                      "n_vocab": llm.n_vocab(), "n_ctx_train": llm._model.n_ctx_train(),
                      "text": out["choices"][0]["text"]}))
""")


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_llama_loads_and_generates_in_llama_cpp(tmp_path: Path, dtype: str) -> None:
    import json

    path = write_tiny_llama(tmp_path / f"tiny-{dtype}.gguf", dtype=dtype)
    # A subprocess: a llama.cpp crash must fail this test, not kill pytest.
    proc = subprocess.run([sys.executable, "-c", _GENERATE, str(path)], capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "GGML_NO_BACKTRACE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    info = scan(path)
    assert facts["n_vocab"] == info.vocab_size
    assert facts["n_ctx_train"] == info.context_length
    assert facts["completion_tokens"] == 6
    assert facts["prompt_tokens"] > 1 and facts["chat_prompt_tokens"] > 1
