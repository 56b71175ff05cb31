"""Capture llama.cpp's log of a real load of a model (weights read, KV and compute allocated).

Writes one JSON object per log message (``{"level": …, "text": …}``), exactly as the log callback
received them, pieces and continuations included. The fixture tests/data/smollm2_load_log.jsonl
was made with::

    .venv/bin/python bench/capture_llama_log.py .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        tests/data/smollm2_load_log.jsonl --n-ctx 4096

Run it as its own process: llama.cpp belongs in a subprocess, never in a kernel.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os

os.environ.setdefault("GGML_NO_BACKTRACE", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--flash-attn", action="store_true")
    args = parser.parse_args()

    import llama_cpp

    messages: list[dict[str, object]] = []

    def on_log(level: int, text: bytes | None, _user: object) -> None:
        messages.append({"level": level, "text": (text or b"").decode("utf-8", errors="replace")})

    callback = llama_cpp.llama_log_callback(on_log)  # kept referenced until the end
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.use_extra_bufts = False  # docs/notes.md §2
    model = llama_cpp.llama_model_load_from_file(args.model.encode(), mparams)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = args.n_ctx
    cparams.n_batch = cparams.n_ubatch = 512
    cparams.flash_attn_type = 1 if args.flash_attn else 0
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    with open(args.out, "w") as f:
        for message in messages:
            f.write(json.dumps(message) + "\n")
    print(f"{len(messages)} messages -> {args.out}")


if __name__ == "__main__":
    main()
