"""``python -m jupyter_llm.worker.probe``: llama.cpp's answers the kernel asks for, in a subprocess.

::

    python -m jupyter_llm.worker.probe devices
    python -m jupyter_llm.worker.probe estimate MODEL.gguf --json-options '[{"n_ctx": 4096, ...}]' [--real]

``devices`` lists llama.cpp's backend devices (``ggml_backend_dev_*``, exported by the shipped
ggml libraries but not declared in the bindings). ``estimate`` loads the model in llama.cpp's
dry-run mode (nothing is read or allocated, docs/notes.md §3) and creates one context per option
set, with the same parameters a load uses (:mod:`jupyter_llm.worker.params`); ``--real`` loads
and allocates for real (mmap), what tests compare the estimate against. Each prints one JSON
line on stdout with llama.cpp's log lines, which the kernel parses
(:mod:`jupyter_llm.memory.probe`); the log never reaches stdout or stderr.

Exit status 0 with ``{"error": …}`` when llama.cpp refused the model or a context; a crash
(SIGABRT from a broken file) shows as a signal exit, which the caller reports.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from .. import wire
from . import params
from .llama import ggml_libraries

_DEV_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}
_callback: Any = None  # the installed ctypes callback: a collected one would segfault llama.cpp
_lines: list[tuple[int, str]] = []  # the log of the current step
_problems: list[str] = []  # llama.cpp's warnings and errors, to explain a refusal


def _install_log() -> None:
    import llama_cpp

    global _callback

    def on_log(level: int, text: bytes | None, _user: Any) -> None:
        message = (text or b"").decode("utf-8", errors="replace")
        if message:
            _lines.append((level, message))
        if level in (3, wire.LOG_ERROR) and message.strip():  # ggml WARN, ERROR
            _problems.append(message.strip())
            del _problems[:-5]

    _callback = llama_cpp.llama_log_callback(on_log)
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


def _take_log() -> list[tuple[int, str]]:
    lines = list(_lines)
    _lines.clear()
    return lines


def backend_devices() -> list[dict[str, Any]]:
    """llama.cpp's backend devices: name, description, type, free and total bytes."""
    import llama_cpp

    _install_log()
    llama_cpp.llama_backend_init()
    ggml, base = ggml_libraries()
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_count.argtypes = []
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for fn in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(base, fn).restype = ctypes.c_char_p
        getattr(base, fn).argtypes = [ctypes.c_void_p]
    base.ggml_backend_dev_type.restype = ctypes.c_int
    base.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    base.ggml_backend_dev_memory.restype = None
    base.ggml_backend_dev_memory.argtypes = [
        ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t),
    ]
    out = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append({
            "name": (base.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
            "description": (base.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
            "type": _DEV_TYPES.get(base.ggml_backend_dev_type(dev), "unknown"),
            "free": free.value,
            "total": total.value,
        })
    return out


def run(path: str, option_sets: Sequence[dict[str, Any]], real: bool = False) -> dict[str, Any]:
    """Load ``path`` without allocating (``real``: for real) and create one context per option
    set, exactly as a load would; returns llama.cpp's log of each step.

    Option sets are :class:`~jupyter_llm.options.LoadOptions` dicts; the model is loaded once
    with the first set's ``gpu_layers`` and ``tensor_split``.
    """
    import llama_cpp

    t0 = time.perf_counter()
    first = option_sets[0] if option_sets else {}
    _install_log()
    llama_cpp.llama_backend_init()
    mparams, keep = params.model_params(llama_cpp, first, dry_run=not real)
    if real:
        mparams.load_mode = params.LOAD_MODE_MMAP
    model = llama_cpp.llama_model_load_from_file(os.fsencode(path), mparams)
    del keep  # llama.cpp has read the tensor split
    t_model = time.perf_counter() - t0
    model_log = _take_log()
    if not model:
        return {"error": f"llama.cpp could not read {path}: {' / '.join(_problems[-2:])}", "results": []}
    try:
        results = [_one_context(llama_cpp, model, options) for options in option_sets]
    finally:
        llama_cpp.llama_model_free(model)
    return {"model_log": model_log, "seconds_model": round(t_model, 4),
            "seconds_total": round(time.perf_counter() - t0, 4), "results": results}


def _one_context(llama_cpp: Any, model: Any, options: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    _take_log()
    del _problems[:]
    # one thread: a dry run computes nothing, and a real probe only allocates
    ctx = llama_cpp.llama_init_from_model(model, params.context_params(llama_cpp, options, n_threads=1))
    result: dict[str, Any] = {"options": dict(options)}
    if not ctx:
        result["error"] = f"llama.cpp refused this context: {' / '.join(_problems[-2:]) or 'no reason given'}"
    else:
        llama_cpp.llama_free(ctx)
    result["log"] = _take_log()
    result["seconds"] = round(time.perf_counter() - t0, 4)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: print one JSON line with the answer."""
    parser = argparse.ArgumentParser(prog="python -m jupyter_llm.worker.probe",
                                     description=(__doc__ or "").split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("devices", help="list llama.cpp's backend devices")
    est = sub.add_parser("estimate", help="dry-run load: exact KV and compute sizes per backend")
    est.add_argument("path")
    est.add_argument("--json-options", default="[]", help="a list of LoadOptions dicts (or one)")
    est.add_argument("--real", action="store_true", help="load and allocate for real (mmap)")
    args = parser.parse_args(argv)
    if args.command == "devices":
        answer: dict[str, Any] = {"devices": backend_devices()}
    else:
        parsed = json.loads(args.json_options)
        answer = run(args.path, parsed if isinstance(parsed, list) else [parsed], real=args.real)
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
