"""Whether a load repacks its weights for the CPU: decided once per machine and weight type.

llama.cpp's CPU "extra buffer types" copy quantized weights into interleaved layouts its faster
kernels read. On one Intel AMX CPU that path segfaults in the first multi-token decode; on an
AMD EPYC it makes Q4_0 faster and changes nothing for Q8_0 (docs/notes.md §2, §8, §11). So no CPU
is trusted blindly: the first load whose dominant weight type this CPU may repack runs a probe
(``python -m jupyter_llm.worker.repack_probe TYPE``, a process that may die) which compares the
logits and speed of both paths, and the verdict is kept in ``$JUPYTER_LLM_HOME/repack.json``
under the CPU's model name, a hash of its flags, the llama.cpp build and the type:

=================  =================================================================
``safe+faster``    repacking on for loads of this type
``slower``         same logits, not faster (decode, or the prompt slower): off
``differs``        logits off the exact product by more than the unrepacked kernels: off
``not repacked``   llama.cpp repacks nothing of this type on this CPU: off
``crashed``        the probe died (signal): off, and the kernel never noticed
=================  =================================================================

A probe that cannot answer now (``busy``: the machine is too loaded to time on; a timeout; no
answer) turns repacking off for this kernel's life without being stored, so the next kernel
asks again. ``JUPYTER_LLM_REPACK=on|off`` overrides
(:func:`jupyter_llm.config.repack`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import config, wire

if TYPE_CHECKING:
    from ..options import LoadOptions
    from ..store.gguf_info import GGUFInfo
    from ..store.records import ModelRecord
    from .process import Runtime

PROBE_MODULE = "jupyter_llm.worker.repack_probe"
TIMEOUT = 60.0
"""Seconds a probe may take: ~2 s on 2 quiet cores (~7 s for a K-quant, requantized first), up to
a minute under a load average of 12 (docs/notes.md §11)."""
ON = "safe+faster"
CACHE_FILE = "repack.json"

# Types some CPU kernel of llama.cpp 0.3.36 repacks (ggml-cpu/repack.cpp, ggml-cpu/amx/common.h),
# by the CPU features that kernel needs. Only a type in this set is probed: a type left out
# merely stays unrepacked, and one put in wrongly gets the verdict "not repacked".
_X86_AVX2 = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"})
_X86_AVX512 = frozenset({"Q2_K"})
_X86_AMX = frozenset({"Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"})
_ARM = frozenset({"Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_NL", "MXFP4"})
_ANY = _X86_AVX2 | _X86_AVX512 | _X86_AMX | _ARM

_STORED = frozenset({ON, "slower", "differs", "not repacked", "crashed"})
_lock = threading.Lock()
_unstored: dict[str, dict[str, Any]] = {}
"""Verdicts of probes that failed without a crash (timeout…): kept for this kernel only."""


@dataclass(frozen=True)
class RepackChoice:
    """Whether a load repacks its weights, and why (shown with the load)."""

    use: bool
    quant: str | None
    """The model's dominant weight type, e.g. ``"Q4_0"``; None for a model without 2-D weights."""
    reason: str
    verdict: dict[str, Any] | None = None
    """The probe's answer this decision rests on (measured numbers), if any."""
    notice: bool = False
    """Whether the load tells the user (repacking on, or turned off by a crash)."""
    shown: bool = True
    """Whether the load table shows it (not for types no kernel repacks here)."""

    def describe(self) -> str:
        """E.g. ``repacked: yes (Q4_0, probe passed, 1.43× faster decode)``."""
        return f"repacked: {'yes' if self.use else 'no'} ({self.quant or 'no quantized weights'}, {self.reason})"


def weight_type(info: GGUFInfo) -> str | None:
    """The type holding most bytes of the model's matrix weights: what repacking would apply to.

    ``token_embd`` is left out: llama.cpp only gathers rows from it (also when the output is
    tied to it), and no repacked buffer supports that.
    """
    counts: Counter[str] = Counter()
    for t in info.tensors:
        if len(t.shape) >= 2 and t.name.endswith(".weight") and not t.name.startswith("token_embd"):
            counts[t.type_name.upper()] += t.n_bytes
    return counts.most_common(1)[0][0] if counts else None


def _cpuinfo() -> tuple[str, set[str]]:
    """The CPU's model name and its feature flags (Linux ``/proc/cpuinfo``; elsewhere the platform's)."""
    name, flags = "", set[str]()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model", "cpu") and not name:
                    name = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


def candidates() -> frozenset[str]:
    """Weight types a kernel of llama.cpp may repack on this CPU (the probe has the last word)."""
    machine = platform.machine().lower()
    _, flags = _cpuinfo()
    if machine in ("x86_64", "amd64", "i686", "i386"):
        found = set(_X86_AVX2) if "avx2" in flags else set()
        if "avx512f" in flags:
            found |= _X86_AVX512
        if "amx_int8" in flags or "amx_tile" in flags:
            found |= _X86_AMX
        return frozenset(found)
    if machine in ("aarch64", "arm64"):
        return _ARM
    return _ANY


def build_id() -> str:
    """llama-cpp-python's version and a hash of its shared libraries' sizes and times, found
    without importing it (a rebuild with other flags is another build, docs/notes.md §8)."""
    try:
        version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    digest = hashlib.sha256()
    spec = importlib.util.find_spec("llama_cpp")
    for location in (spec.submodule_search_locations or []) if spec else []:
        for lib in sorted((Path(location) / "lib").glob("lib*.so*")):
            st = lib.stat()
            digest.update(f"{lib.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return f"{version}+{digest.hexdigest()[:10]}"


def cache_key(quant: str, *, build: str | None = None, cpu: tuple[str, set[str]] | None = None) -> str:
    """The cache entry of ``quant`` on this machine: CPU model, flags hash, llama.cpp build, type."""
    name, flags = cpu if cpu is not None else _cpuinfo()
    flags_hash = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:12]
    return f"{name} | flags {flags_hash} | llama.cpp {build or build_id()} | {quant}"


def cache_path() -> Path:
    return config.home() / CACHE_FILE


def cached(quant: str) -> dict[str, Any] | None:
    """The stored verdict for ``quant`` on this machine and build, or None (never probed)."""
    key = cache_key(quant)
    with _lock:
        return _read().get(key) or _unstored.get(key)


def _read() -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    verdicts = data.get("verdicts") if isinstance(data, dict) else None
    return verdicts if isinstance(verdicts, dict) else {}


def _store(key: str, verdict: dict[str, Any]) -> None:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    verdicts = _read()
    verdicts[key] = verdict
    fd, tmp = tempfile.mkstemp(prefix=".repack-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump({"verdicts": verdicts}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # atomic: another kernel reads the old file or the new one


def verdict(quant: str, *, timeout: float = TIMEOUT, _fault: str | None = None) -> dict[str, Any]:
    """The verdict for ``quant``: the stored one, else a probe's (run now, stored).

    ``_fault="SIGSEGV"`` (tests only) makes the probe crash the way the AMX machine does.
    """
    key = cache_key(quant)
    with _lock:  # one probe at a time: two would time each other
        known = _read().get(key) or _unstored.get(key)
        if known is not None:
            return known
        answer = probe(quant, timeout=timeout, _fault=_fault)
        answer["key"] = key
        answer["measured"] = _now()
        if answer["verdict"] not in _STORED:
            _unstored[key] = answer
        else:
            _store(key, answer)
        return answer


def probe(quant: str, *, timeout: float = TIMEOUT, _fault: str | None = None) -> dict[str, Any]:
    """Run the probe subprocess for ``quant`` now (no cache); a signal exit is ``crashed``."""
    args = [sys.executable, "-m", PROBE_MODULE, quant, "--dir", str(config.home())]
    if _fault:
        args += ["--fault", _fault]
    config.home().mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=wire.worker_env(),
                              stdin=subprocess.DEVNULL, start_new_session=True)
    except subprocess.TimeoutExpired:
        return {"verdict": "timed out", "quant": quant, "error": f"the probe took more than {timeout:.0f} s"}
    except OSError as exc:
        return {"verdict": "error", "quant": quant, "error": f"could not start the probe: {exc}"}
    wall = round(time.monotonic() - t0, 2)
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        return {"verdict": "crashed", "quant": quant, "signal": name, "wall_s": wall,
                "stderr": proc.stderr.strip().splitlines()[-1:]}
    lines = proc.stdout.strip().splitlines()
    try:
        answer = dict(json.loads(lines[-1]))
    except (IndexError, ValueError):
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {"verdict": "error", "quant": quant, "error": f"the probe gave no answer: {tail[0]}", "wall_s": wall}
    answer["wall_s"] = wall
    return answer


def choose(info: GGUFInfo, *, on_probe: Callable[[str], None] | None = None) -> RepackChoice:
    """Whether to load the model ``info`` describes with repacking (``JUPYTER_LLM_REPACK``, else
    the verdict for its dominant weight type). A probe needed first is announced to ``on_probe``."""
    mode = config.repack()
    quant = weight_type(info)
    if mode != "auto":
        return RepackChoice(mode == "on", quant, f"JUPYTER_LLM_REPACK={mode}", notice=mode == "on")
    if quant is None or quant not in candidates():
        return RepackChoice(False, quant, "no kernel repacks it on this CPU", shown=False)
    found = cached(quant)
    if found is None:
        if on_probe is not None:
            on_probe(f"checking once whether repacking {quant} weights is safe and faster on this CPU "
                     f"(a probe, up to {TIMEOUT:.0f} s)")
        found = verdict(quant)
    use = found.get("verdict") == ON
    return RepackChoice(use, quant, _reason(found), found, notice=use)


def _reason(v: dict[str, Any]) -> str:
    kind = v.get("verdict")
    if kind == ON:
        return f"probe passed, {v.get('decode_speedup', '?')}× decode, {v.get('prompt_speedup', '?')}× prompt"
    if kind == "slower":
        return (f"probe: not faster ({v.get('decode_speedup', '?')}× decode, "
                f"{v.get('prompt_speedup', '?')}× prompt)")
    if kind == "differs":
        return f"probe: logits differ ({v.get('rel_err_repacked')} vs {v.get('rel_err_plain')} unrepacked)"
    if kind == "crashed":
        return f"probe crashed ({v.get('signal')}); set JUPYTER_LLM_REPACK=off to skip the probe"
    if kind == "not repacked":
        return "llama.cpp repacks nothing of it on this CPU"
    if kind == "busy":
        return f"the machine was too busy to time the probe (load {v.get('load_avg')}); asked again next kernel"
    return f"probe failed: {v.get('error', kind)}"


def start_worker(info: GGUFInfo, record: ModelRecord, options: LoadOptions, *, name: str,
                 notes: list[str] | None = None, on_probe: Callable[[str], None] | None = None
                 ) -> tuple[Runtime, RepackChoice]:
    """Start a worker for ``record`` (:meth:`Runtime.start`, with its Ollama template if any) and
    the repacking :func:`choose` picks; returns it and the choice, whose notice (if the user
    must see it) joins ``notes``.

    If a load with repacking chosen by a verdict dies (the probe's model passed, this one did
    not), the type is recorded as "crashed" and the load is made again without it; a load forced
    on by ``JUPYTER_LLM_REPACK=on`` fails as it is.
    """
    from ..errors import WorkerCrashedError
    from .process import Runtime

    def launch(use: bool) -> Runtime:
        return Runtime.start(record.path, options, name=name, ollama_template=record.ollama.get("template") or None,
                             _extra_bufts=use)

    choice = choose(info, on_probe=on_probe)
    try:
        runtime = launch(choice.use)
    except WorkerCrashedError as exc:
        if not choice.use or choice.verdict is None or choice.quant is None:
            raise
        with _lock:
            _store(cache_key(choice.quant), {"verdict": "crashed", "quant": choice.quant, "at": "a load",
                                             "error": str(exc)[:300], "measured": _now()})
        choice = RepackChoice(False, choice.quant, "a load with it crashed, so it was loaded without; "
                              "not repacked from now on", choice.verdict, notice=True)
        runtime = launch(False)
    if choice.notice and notes is not None:
        notes.append(choice.describe())
    return runtime, choice


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
