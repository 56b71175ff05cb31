"""Load options → llama.cpp's model and context parameters: the one mapping.

The worker loads with it and the probe (:mod:`jupyter_llm.worker.probe`) measures with it, so
an estimate's dry run creates exactly the context a load will. The options arrive as the dict
of :class:`jupyter_llm.options.LoadOptions` (its field names; every key present).
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

KV_TYPES = {"f16": 1, "q4_0": 2, "q8_0": 8}
"""ggml_type ids of the KV cache element types the options allow."""
FLASH_ATTN = {False: 0, True: 1}
"""LLAMA_FLASH_ATTN_TYPE_DISABLED / _ENABLED (llama.cpp's "auto" changes greedy output)."""
FA_TILE_ROWS = 64
"""ggml's CPU flash attention (GGML_FA_TILE_Q): a chunk of this many rows or more of one sequence
goes through its tiled kernel, a smaller one through the vector kernel; the two differ in the
last bits (docs/notes.md §14)."""
LOAD_MODE_NONE = 0
LOAD_MODE_MMAP = 1


def threads(opts: dict[str, Any]) -> int:
    """CPU threads for both phases: the option, else the number of physical cores we may run on
    (llama.cpp's own default: a second hyperthread of a core adds contention, not speed)."""
    return int(opts.get("threads") or physical_cores())


def physical_cores(sysfs: str = "/sys/devices/system/cpu") -> int:
    """Cores among the CPUs this process may use, counting a core's hyperthreads once.

    Read from each CPU's ``topology/thread_siblings_list`` (the same id for all threads of one
    core); without that (containers hiding sysfs, other systems) every usable CPU counts.
    """
    try:
        usable = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = list(range(os.cpu_count() or 1))
    cores: set[str] = set()
    for cpu in usable:
        try:
            with open(f"{sysfs}/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(f"cpu{cpu}")
    return max(1, len(cores))


def model_params(L: Any, opts: dict[str, Any], *, extra_bufts: bool = False, dry_run: bool = False,
                 devices: Any = None) -> tuple[Any, Any]:
    """``llama_model_params`` for ``opts`` and an object to keep referenced until the load
    returns (the tensor-split array llama.cpp reads from).

    ``extra_bufts``: llama.cpp's CPU extra buffer types (weight repacking), off by default
    because they segfault quantized models on Intel AMX CPUs (docs/notes.md §2, §8); the kernel
    turns them on where a probe (:mod:`jupyter_llm.worker.repack_probe`) found them safe and faster.
    ``dry_run``: read and allocate nothing (no_alloc, load mode NONE); the log still gives the
    exact KV and compute sizes of every context made from the model (docs/notes.md §3).
    ``devices``: the NULL-ended device array to offload to (with ``rpc``, from
    :func:`jupyter_llm.worker.rpc.devices`); None lets llama.cpp take every local GPU.
    """
    mp = L.llama_model_default_params()
    ngl = opts.get("gpu_layers", 0)
    mp.n_gpu_layers = 0 if ngl in (None, "auto") else int(ngl)
    mp.use_extra_bufts = bool(extra_bufts)
    if dry_run:
        mp.no_alloc = True
        mp.load_mode = LOAD_MODE_NONE
    if devices is not None:
        mp.devices = ctypes.cast(devices, ctypes.c_void_p)
    keep = None
    split = [float(x) for x in opts.get("tensor_split") or ()]
    if split:
        n_max = L.llama_max_devices()
        keep = (ctypes.c_float * n_max)(*(split + [0.0] * n_max)[:n_max])
        mp.tensor_split = keep
    return mp, keep


def context_params(L: Any, opts: dict[str, Any], *, n_threads: int) -> Any:
    """``llama_context_params`` for ``opts``: ``parallel`` slots, each its own KV stream of
    ``n_ctx / parallel`` cells; a batch holds at least one token per slot."""
    parallel = int(opts["parallel"])
    n_batch = max(int(opts["n_batch"]), parallel)
    n_ctx = 0 if opts["n_ctx"] in (None, "auto") else int(opts["n_ctx"])  # 0: the training context
    cp = base_context_params(L, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=int(opts["n_ubatch"]),
                             n_seq=parallel, n_threads=n_threads)
    cp.flash_attn_type = FLASH_ATTN[bool(opts["flash_attn"])]
    cp.type_k = cp.type_v = KV_TYPES[opts["kv_type"]]
    cp.kv_unified = False
    return cp


def base_context_params(L: Any, *, n_ctx: int, n_batch: int, n_ubatch: int, n_seq: int, n_threads: int) -> Any:
    """llama_context_params with our fixed choices: no perf counters, the same threads for
    prompt and generation, n_ubatch never above n_batch."""
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, min(n_ubatch, n_batch), n_seq
    cp.n_threads = cp.n_threads_batch = n_threads
    cp.no_perf = True
    return cp


def prompt_exactness(opts: dict[str, Any], n_gpu_layers: int) -> tuple[bool, int]:
    """Whether a prompt chunk's KV is computed the same whatever the chunk (the prompt cache's
    exact mode), and the chunk length from which it is computed differently (0: none).

    Measured on the CPU (docs/notes.md §14): without flash attention every chunk of two or more
    tokens is alike; with it and an f16 KV cache, chunks shorter than :data:`FA_TILE_ROWS` and
    chunks of at least that many are each alike. Flash attention on a GPU or RPC device, or with
    a quantized KV cache, is not measured: not exact (reused as llama-server does)."""
    if not opts.get("flash_attn"):
        return True, 0
    on_cpu = n_gpu_layers == 0 and not opts.get("rpc")
    return (True, FA_TILE_ROWS) if on_cpu and opts.get("kv_type", "f16") == "f16" else (False, 0)
