"""The llama.cpp questions the kernel may ask, answered in a subprocess: never run it in the kernel.

::

    python -m jupyter_llm.dryrun devices
    python -m jupyter_llm.dryrun estimate MODEL.gguf --json-options '{"n_ctx": 4096, ...}' [--real]

The kernel side is :func:`measure` and :func:`query` (they start that subprocess).

``devices`` lists llama.cpp's backend devices (``ggml_backend_dev_*``, exported by the shipped
ggml libraries but not declared in the bindings). ``estimate`` loads the model in llama.cpp's
dry-run mode (model params ``no_alloc``, load mode NONE: nothing is read or allocated) and
creates one context per option set given (a JSON object or a list of them), capturing the log
into a :class:`~jupyter_llm.llama_log.MemoryLog`. ``--real`` loads and allocates for real
(mmap), which is what tests compare the estimate against. Each prints one JSON line on stdout; llama.cpp's
own log never reaches stdout or stderr (our callback swallows it after parsing).

Exit status 0 with ``{"error": …}`` in the JSON when llama.cpp refused the model or a context;
a crash (SIGABRT from a broken file) shows as a signal exit, which the caller reports.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .llama_log import BufferSizes, MemoryLog

_DEV_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}
_KV_TYPES = {"f16": 1, "q4_0": 2, "q8_0": 8}  # ggml_type values
_LOAD_MODE_NONE = 0
_LOAD_MODE_MMAP = 1
_FLASH_ATTN = {False: 0, True: 1}  # LLAMA_FLASH_ATTN_TYPE_DISABLED / _ENABLED
TIMEOUT = 120.0


# -- kernel side ---------------------------------------------------------------------------------


def query(args: Sequence[str], timeout: float = TIMEOUT) -> dict[str, Any]:
    """Run ``python -m jupyter_llm.dryrun ARGS`` and return its JSON answer.

    A failure (crash, timeout, no answer) becomes ``{"error": …}`` with the last stderr line.
    """
    try:
        proc = subprocess.run([sys.executable, "-m", "jupyter_llm.dryrun", *args],
                              capture_output=True, text=True, timeout=timeout, env=subprocess_env())
    except subprocess.TimeoutExpired:
        return {"error": f"llama.cpp took more than {timeout:.0f} s to answer"}
    except OSError as exc:
        return {"error": f"could not start the llama.cpp subprocess: {exc}"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {"error": f"llama.cpp subprocess failed: {tail[0]}"}
    try:
        return dict(json.loads(lines[-1]))
    except ValueError:
        return {"error": f"llama.cpp subprocess answered {lines[-1][:200]!r}"}


def measure(path: str | os.PathLike[str], option_sets: Sequence[Any], *, real: bool = False,
            timeout: float = TIMEOUT) -> dict[str, Any]:
    """llama.cpp's own buffer sizes for each option set (LoadOptions or dicts), in one subprocess.

    Dry run (default): nothing is read or allocated; ~0.2 s for the model, ~15 ms per context;
    KV and compute are exact, the per-buffer model and KV lines print 0. ``real=True`` loads
    and allocates (mmap), so the model buffer line is real too. Returns ``{"results": [...]}``
    with one entry per option set (``devices``, ``kv_size``, ``n_ctx``, ``error``…).
    """
    sets = []
    for o in option_sets:
        d = o.to_dict() if hasattr(o, "to_dict") else dict(o)
        d.pop("keep_alive", None)
        d["tensor_split"] = list(d.get("tensor_split") or ())
        sets.append(d)
    args = ["estimate", os.fspath(path), "--json-options", json.dumps(sets)]
    answer = query([*args, "--real"] if real else args, timeout)
    answer.setdefault("results", [])
    return answer


def breakdown(path: str | os.PathLike[str], options: Any = None) -> dict[str, BufferSizes]:
    """Per-device buffers llama.cpp would allocate, measured by a dry run (keyed by llama.cpp's
    device names: ``"CPU"``, ``"CUDA0"``…).

    KV and compute come from llama.cpp; weights (printed as 0 in dry-run mode) from the tensor
    table and the layer rule, with the KV total shared out the same way.
    """
    from .errors import ModelLoadError
    from .estimate import fit, layer_devices, weights_per_device
    from .gguf_scan import scan
    from .options import AUTO, LoadOptions

    options = options or LoadOptions(gpu_layers=0)
    info = scan(path)
    if options.n_ctx == AUTO or options.gpu_layers == AUTO:
        options = fit(info, options)
    raw = measure(path, [options])
    result = (raw.get("results") or [{}])[0]
    if raw.get("error") or result.get("error"):
        raise ModelLoadError(f"{path}: {raw.get('error') or result.get('error')}")
    n_layer = int(info.block_count or 0)
    placement = layer_devices(n_layer, int(options.gpu_layers), [], options.tensor_split)
    weights = weights_per_device(info, placement)
    out: dict[str, BufferSizes] = {dev: BufferSizes(weights=w) for dev, w in weights.items()}
    for dev, sizes in result.get("devices", {}).items():
        row = out.setdefault(dev, BufferSizes())
        row.compute += int(sizes["compute"])
        row.output += int(sizes["output"])
        row.kv += int(sizes["kv"])
    if not any(row.kv for row in out.values()):
        out.setdefault("CPU", BufferSizes()).kv = int(result.get("kv_size", 0))
    return out


def subprocess_env() -> dict[str, str]:
    """Environment for a llama.cpp subprocess: no gdb on abort, our package importable."""
    env = dict(os.environ)
    env.setdefault("GGML_NO_BACKTRACE", "1")  # otherwise ggml forks gdb on abort (NOTES §2)
    here = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


# -- subprocess side --------------------------------------------------------------------------------


def ggml_libraries() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """``libggml.so.0`` and ``libggml-base.so.0`` from the llama_cpp package, as libllama uses them.

    The wheel also ships unversioned copies as separate files; loading those would create a
    second, separate ggml instance with its own (empty) device registry.
    """
    import llama_cpp  # deferred: only ever imported in this subprocess

    lib_dir = Path(llama_cpp.__file__).resolve().parent / "lib"
    base = ctypes.CDLL(str(_versioned(lib_dir, "libggml-base")))
    ggml = ctypes.CDLL(str(_versioned(lib_dir, "libggml")))
    return ggml, base


def _versioned(lib_dir: Path, stem: str) -> Path:
    exact = lib_dir / f"{stem}.so.0"
    if exact.exists():
        return exact
    found = sorted(lib_dir.glob(f"{stem}.so.*")) or sorted(lib_dir.glob(f"{stem}.*"))
    if not found:
        raise FileNotFoundError(f"{stem} not found in {lib_dir}; reinstall llama-cpp-python")
    return found[0]


def backend_devices() -> list[dict[str, Any]]:
    """llama.cpp's backend devices: name, description, type, free and total bytes."""
    import llama_cpp

    _quiet_log()
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


_callback: Any = None  # the installed ctypes callback: a collected one would segfault llama.cpp
_problems: list[str] = []  # llama.cpp's warnings and errors, to explain a refusal


def _install_log(log: MemoryLog | None) -> None:
    import llama_cpp

    global _callback

    def on_log(level: int, text: bytes | None, _user: Any) -> None:
        message = (text or b"").decode("utf-8", errors="replace")
        if log is not None and message:
            log.feed(level, message)
        if level in (3, 4) and message.strip():  # ggml WARN, ERROR
            _problems.append(message.strip())
            del _problems[:-5]

    _callback = llama_cpp.llama_log_callback(on_log)
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


def _quiet_log() -> None:
    _install_log(None)


def run(path: str, option_sets: Sequence[dict[str, Any]], real: bool = False) -> dict[str, Any]:
    """Load ``path`` without allocating (``real``: for real) and create one context per option
    set, the way the worker does; sizes from the log.

    Option keys follow :class:`~jupyter_llm.options.LoadOptions` (``gpu_layers``, ``n_ctx``,
    ``kv_type``, ``flash_attn``, ``parallel``, ``n_batch``, ``n_ubatch``, ``tensor_split``); the
    model is loaded once with the first set's ``gpu_layers`` and ``tensor_split``.
    """
    import llama_cpp

    t0 = time.perf_counter()
    first = option_sets[0] if option_sets else {}
    model_log = MemoryLog()
    _install_log(model_log)
    llama_cpp.llama_backend_init()

    mparams = llama_cpp.llama_model_default_params()
    mparams.no_alloc = not real
    mparams.load_mode = _LOAD_MODE_MMAP if real else _LOAD_MODE_NONE
    mparams.use_extra_bufts = False  # NOTES §2: the AMX repack crashes quantized models here
    ngl = first.get("gpu_layers", 0)
    mparams.n_gpu_layers = 0 if ngl in (None, "auto") else int(ngl)
    split = [float(x) for x in first.get("tensor_split") or ()]
    if split:
        n_max = llama_cpp.llama_max_devices()
        split_arr = (ctypes.c_float * n_max)(*(split + [0.0] * n_max)[:n_max])
        mparams.tensor_split = split_arr  # split_arr stays referenced until the load returns
    model = llama_cpp.llama_model_load_from_file(os.fsencode(path), mparams)
    t_model = time.perf_counter() - t0
    if not model:
        return {"error": f"llama.cpp could not read {path}: {' / '.join(_problems[-2:])}", "results": []}
    try:
        results = [_one_context(llama_cpp, model, options) for options in option_sets]
    finally:
        llama_cpp.llama_model_free(model)
    return {
        "model": model_log.to_dict(),
        "seconds_model": round(t_model, 4),
        "seconds_total": round(time.perf_counter() - t0, 4),
        "results": results,
    }


def _one_context(llama_cpp: Any, model: Any, options: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    log = MemoryLog()
    _install_log(log)
    del _problems[:]
    parallel = int(options.get("parallel", 1))
    n_ctx = options.get("n_ctx", 4096)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = 0 if n_ctx in (None, "auto") else int(n_ctx)
    # as the worker does: a batch holds at least one token per slot
    cparams.n_batch = max(int(options.get("n_batch", 512)), parallel)
    cparams.n_ubatch = min(int(options.get("n_ubatch", 512)), cparams.n_batch)
    cparams.n_seq_max = parallel
    cparams.kv_unified = False
    cparams.n_threads = cparams.n_threads_batch = 1
    cparams.flash_attn_type = _FLASH_ATTN[bool(options.get("flash_attn", False))]
    cparams.type_k = cparams.type_v = _KV_TYPES[options.get("kv_type", "f16")]
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    result: dict[str, Any] = {"options": dict(options)}
    if not ctx:
        result["error"] = f"llama.cpp refused this context: {' / '.join(_problems[-2:]) or 'no reason given'}"
    else:
        llama_cpp.llama_free(ctx)
    result.update(log.to_dict())
    result["seconds"] = round(time.perf_counter() - t0, 4)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: print one JSON line with the answer."""
    parser = argparse.ArgumentParser(prog="python -m jupyter_llm.dryrun", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("devices", help="list llama.cpp's backend devices")
    est = sub.add_parser("estimate", help="dry-run load: exact KV and compute sizes per backend")
    est.add_argument("path")
    est.add_argument("--json-options", default="{}", help="a LoadOptions dict, or a list of them")
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
