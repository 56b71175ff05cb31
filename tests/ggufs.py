"""Tiny GGUF files for tests: real llama models of a few hundred KB, and broken variants.

``write_tiny_llama`` writes a llama-architecture model with a small SentencePiece-style
("llama") vocabulary — control tokens, the 256 byte tokens and a few words — and random weights
from a fixed seed. llama.cpp loads it and generates from it (gibberish, deterministically), so
tests can exercise the whole load → chat path in well under a second. The broken variants
(``truncate``, ``corrupt``, ``write_not_gguf``) exercise the error paths.

Remember (docs/notes.md §2): quantized models must be loaded with the model-params field
``use_extra_bufts = False`` (they segfault on Intel AMX CPUs), and any direct llama.cpp call
belongs in a subprocess.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The ChatML template SmolLM2 (and Qwen) ship, as a Jinja2 string."""

_WORDS = (
    "▁", "▁the", "▁a", "▁hello", "▁world", "▁is", "▁of", "▁and", "▁to", "▁in", "▁it", "▁you",
    "▁I", "▁model", "▁test", ".", ",", "!", "?",
)
_DTYPES = ("f32", "f16", "q8_0")


def tiny_vocab(n_vocab: int | None = None) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types of the tiny SPM vocabulary, padded to ``n_vocab``."""
    from gguf.constants import TokenType

    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    tokens += list(_WORDS) + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    types += [TokenType.NORMAL] * (len(_WORDS) + 26)
    if n_vocab is not None:
        if n_vocab < len(tokens):
            raise ValueError(f"n_vocab must be at least {len(tokens)}")
        extra = n_vocab - len(tokens)
        tokens += [f"▁w{i}" for i in range(extra)]
        types += [TokenType.NORMAL] * extra
    # SPM scores: higher merges first; control/byte tokens get 0.
    scores = [0.0 if t != TokenType.NORMAL else -float(i) for i, t in enumerate(types)]
    return tokens, scores, [int(t) for t in types]


def write_tiny_llama(
    path: str | os.PathLike[str],
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_vocab: int | None = None,
    ctx: int = 256,
    dtype: str = "f32",
    block_count: int | None = None,
    chat_template: str | None = CHATML,
    name: str = "Tiny Llama Test",
    tied: bool = True,
    seed: int = 0,
    metadata: dict[str, Any] | None = None,
    split_max_tensors: int = 0,
    big_endian: bool = False,
) -> Path:
    """Write a tiny llama GGUF that llama.cpp can load and generate from; returns its path.

    ``dtype`` is the type of the 2-D weights (norms stay F32): "f32", "f16" or "q8_0" (which
    needs ``n_embd`` and ``n_ff`` to be multiples of 32). ``block_count`` overrides the
    metadata's layer count without writing more layers (e.g. 1000, which llama.cpp aborts on).
    ``tied=False`` adds a separate ``output.weight``. ``metadata`` adds or overrides keys (a
    value is written with the writer's type inference: str, bool, int → int32/uint32, float,
    list). ``split_max_tensors`` > 0 writes a split model ``<stem>-0000N-of-0000M.gguf``
    instead; the first part's path is returned (see :func:`split_paths`). ``big_endian``
    writes the byte order made for s390x.
    """
    import gguf
    import numpy as np
    from gguf.constants import GGMLQuantizationType, LlamaFileType

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, scores, types = tiny_vocab(n_vocab)
    vocab = len(tokens)
    head_dim = n_embd // n_head
    rng = np.random.default_rng(seed)

    qtype = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16,
             "q8_0": GGMLQuantizationType.Q8_0}[dtype]
    ftype = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
             "q8_0": LlamaFileType.MOSTLY_Q8_0}[dtype]

    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    writer = gguf.GGUFWriter(path, "llama", split_max_tensors=split_max_tensors, endianess=endian)
    writer.add_name(name)
    writer.add_block_count(n_layer if block_count is None else block_count)
    writer.add_context_length(ctx)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(int(ftype))
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for key, value in (metadata or {}).items():
        _add_value(writer, key, value)

    def weight(name: str, rows: int, cols: int) -> None:
        # numpy shape is (rows, cols) = ggml ne (cols, rows)
        data = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
        if qtype == GGMLQuantizationType.F32:
            writer.add_tensor(name, data)
        elif qtype == GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(n_embd, dtype=np.float32))

    weight("token_embd.weight", vocab, n_embd)
    for i in range(n_layer):
        norm(f"blk.{i}.attn_norm.weight")
        weight(f"blk.{i}.attn_q.weight", n_head * head_dim, n_embd)
        weight(f"blk.{i}.attn_k.weight", n_head_kv * head_dim, n_embd)
        weight(f"blk.{i}.attn_v.weight", n_head_kv * head_dim, n_embd)
        weight(f"blk.{i}.attn_output.weight", n_embd, n_head * head_dim)
        norm(f"blk.{i}.ffn_norm.weight")
        weight(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        weight(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        weight(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    norm("output_norm.weight")
    if not tied:
        weight("output.weight", vocab, n_embd)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split_max_tensors:
        return split_paths(path)[0]
    return path


def split_paths(path: str | os.PathLike[str]) -> list[Path]:
    """The part files GGUFWriter wrote for a split model requested at ``path``."""
    path = Path(path)
    first = sorted(path.parent.glob(f"{path.stem}-00001-of-*.gguf"))
    if not first:
        return [path]
    count = int(first[0].stem.rsplit("-", 1)[1])
    return [path.with_name(f"{path.stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def _add_value(writer: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        (writer.add_uint32 if value >= 0 else writer.add_int32)(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise TypeError(f"cannot write {type(value).__name__} metadata for {key!r}")


def truncate(path: str | os.PathLike[str], n_bytes: int) -> Path:
    """Cut the file to ``n_bytes`` long; a negative value removes that many bytes from the end."""
    path = Path(path)
    size = path.stat().st_size
    new_size = size + n_bytes if n_bytes < 0 else n_bytes
    if not 0 <= new_size <= size:
        raise ValueError(f"cannot truncate a {size}-byte file to {new_size} bytes")
    os.truncate(path, new_size)
    return path


def corrupt(path: str | os.PathLike[str], offset: int, data: bytes) -> Path:
    """Overwrite the bytes at ``offset`` with ``data`` (the file keeps its size)."""
    path = Path(path)
    if offset < 0 or offset + len(data) > path.stat().st_size:
        raise ValueError("corrupt() writes inside the file only")
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return path


def key_offset(path: str | os.PathLike[str], key: str) -> int:
    """Offset of metadata ``key``'s length prefix; its value type follows the key text.

    So ``key_offset(p, k) + 8 + len(k)`` is the value type and ``+ 4`` more the value itself.
    """
    raw = Path(path).read_bytes()
    needle = len(key).to_bytes(8, "little") + key.encode()
    at = raw.find(needle)
    if at < 0:
        raise KeyError(key)
    return at


def write_not_gguf(path: str | os.PathLike[str]) -> Path:
    """Write what a failed download often leaves behind: an HTML error page."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("<!DOCTYPE html>\n<html><body><h1>404 Not Found</h1></body></html>\n")
    return path
