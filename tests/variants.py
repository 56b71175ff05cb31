"""Copies of the real default model with a changed header, written with the gguf package.

:func:`derive` copies every metadata key and tensor of a GGUF (the tensors byte for byte) into
a new file, with some keys replaced and some vocabulary entries renamed. Two variants of
SmolLM2 serve the tests:

- :func:`thinking_model`: a chat template that opens a ``<think>`` block in the generation
  prompt (as DeepSeek-R1's does) and honours ``enable_thinking`` (as Qwen3's does);
- :func:`fim_model`: three of its unused control tokens (``<jupyter_start>``…) renamed to
  StarCoder's ``<fim_prefix>``, ``<fim_suffix>``, ``<fim_middle>`` and named in the header's
  ``tokenizer.ggml.fim_*_token_id`` keys, so llama.cpp finds FIM tokens (SmolLM2 itself has none).

Reading the 49k-token vocabulary with ``gguf.GGUFReader`` takes seconds (docs/notes.md §4):
make each variant once per test session (a session-scoped fixture).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

THINKING_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% else %}{{ '<think>\\n' }}{% endif %}{% endif %}"
)
"""ChatML whose generation prompt opens the reasoning block unless ``enable_thinking`` is false."""
FIM_IDS = {11: "<fim_prefix>", 12: "<fim_suffix>", 13: "<fim_middle>"}
"""SmolLM2 control tokens (``<jupyter_start>``, ``<jupyter_text>``, ``<jupyter_code>``) renamed."""


def derive(src: Path, dst: Path, *, strings: dict[str, str] | None = None, uints: dict[str, int] | None = None,
           tokens: dict[int, str] | None = None) -> Path:
    """``src`` copied to ``dst`` with the string keys ``strings`` and uint32 keys ``uints`` set,
    and the vocabulary entries ``tokens`` (id → text) renamed."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    tmp = dst.with_suffix(".tmp")
    writer = gguf.GGUFWriter(tmp, arch, endianess=reader.endianess)
    strings, uints, tokens = dict(strings or {}), dict(uints or {}), dict(tokens or {})
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value: Any = field.contents()
        if field.name in strings:
            value = strings.pop(field.name)
        elif field.name in uints:
            value = uints.pop(field.name)
        elif field.name == gguf.Keys.Tokenizer.LIST and tokens:
            value = [tokens.get(i, text) for i, text in enumerate(value)]
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    for key, text in strings.items():
        writer.add_string(key, text)
    for key, number in uints.items():
        writer.add_uint32(key, number)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    tmp.replace(dst)
    return dst


def thinking_model(src: Path, directory: Path) -> Path:
    """The default model with :data:`THINKING_TEMPLATE` as its chat template."""
    return derive(src, directory / "smollm2-thinking.gguf", strings={"tokenizer.chat_template": THINKING_TEMPLATE})


def fim_model(src: Path, directory: Path) -> Path:
    """The default model with FIM tokens (:data:`FIM_IDS`)."""
    ids = dict(zip(("pre", "suf", "mid"), FIM_IDS, strict=True))
    return derive(src, directory / "smollm2-fim.gguf", tokens=FIM_IDS,
                  uints={f"tokenizer.ggml.fim_{k}_token_id": v for k, v in ids.items()})
