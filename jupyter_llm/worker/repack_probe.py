"""``python -m jupyter_llm.worker.repack_probe TYPE --dir DIR``: is weight repacking safe and faster here?

llama.cpp's CPU "extra buffer types" repack quantized weights into layouts its faster kernels
read; on one Intel AMX CPU that path segfaults in the first multi-token decode, on an AMD EPYC
it makes Q4_0 faster and leaves Q8_0 as it is (docs/notes.md §2, §8, §11). So the kernel asks
this probe, once per machine, llama.cpp build and weight type, in a process of its own that may die.

In ``DIR`` (deleted afterwards) it writes a small random-weight llama model of ``TYPE``
(:func:`write_model`) and its F32 copy (:func:`write_reference`), and decodes a ``BATCH``-token
batch with all three: F32 (the exact product), unrepacked and repacked. If llama.cpp's log names
no repacked buffer (``CPU_REPACK``, ``AMX``…) the type is "not repacked" here; if the repacked
logits are further off the exact ones than ``SLACK`` × the unrepacked kernels' they "differ".
Otherwise a larger model (``LARGE``) is timed both ways: a prompt batch and single-token decode
steps, alternating, best of ``REPEATS``. One JSON line on stdout is the answer (``{"verdict": …}``
and the numbers); a crash shows as a signal exit, which the kernel
(:mod:`jupyter_llm.runtime.repack`) records as the verdict "crashed".

``--fault SIGSEGV`` (tests only) makes a real invalid read right before the repacked batch
decode, where llama.cpp crashes on the AMX machine, so the crash path is proven on any CPU.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import params


@dataclass(frozen=True)
class Shape:
    """A llama model's dimensions. Every one is a multiple of 256 (K-quant blocks) and of 8
    (repack.cpp interleaves weight rows in groups of 4 or 8)."""

    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int = 8
    n_head_kv: int = 4
    n_vocab: int = 512


SMALL = Shape(n_embd=256, n_ff=512, n_layer=2)
"""The compared model: small enough that an F32 copy (the exact reference) costs nothing."""
LARGE = Shape(n_embd=2048, n_ff=5632, n_layer=2)
"""The timed model (~95 M weights, 53 MB in Q4_0): larger than these machines' last-level cache
(32 MB), so the matrix products are memory-bound as a real model's are. Its layers share their
weights (the timing does not depend on the values), so it is written in seconds."""
BUSY = 2.0
"""Timings are not trusted while the 1-minute load average exceeds the CPUs plus this (the
probe's own threads): on 2 cores with a load of 12 a decode ran 4-60× slower and the speedups
measured swung from 1.6× to 4× (docs/notes.md §11)."""
BATCH = 32
"""Tokens of the compared batch (all with logits) and of the timed prompt batch."""
DECODE_STEPS, REPEATS = 8, 5
"""Single-token decode steps per timing, and timings per variant (the best counts)."""
SLACK, FLOOR = 1.5, 1e-3
"""Repacked logits may be off the exact (F32) ones by at most SLACK × what the unrepacked
kernels are off, plus FLOOR × the largest logit. Both kernels quantize the activations to 8
bits, so both are ~2-3 % off the exact product; repacking only reorders the sums (measured:
docs/notes.md §11). A wrong layout is off by the logits' own size."""
FASTER = 1.03
"""Repacked must be at least this much faster per decode step (and no slower on the prompt)
to be turned on: below that the gain is within a shared machine's noise."""
QUANTIZE_FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q4_K": 14,
                   "Q5_K": 16, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30}
"""The llama_ftype (llama.h) that makes a model of each weight type with ``pure`` quantization."""
_REPACKED_BUFFER = re.compile(r"\b(CPU_REPACK|AMX|KLEIDIAI|[A-Z_]*REPACK[A-Z_]*) model buffer size\s*=\s*([\d.]+) MiB")

_log: list[str] = []
_callback: Any = None  # referenced for the life of the process: a collected callback segfaults


def _install_log(L: Any) -> None:
    global _callback

    def on_log(_level: int, text: bytes | None, _user: Any) -> None:
        if text:
            _log.append(text.decode("utf-8", "replace"))

    _callback = L.llama_log_callback(on_log)
    L.llama_log_set(_callback, ctypes.c_void_p(0))


def _vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary llama.cpp accepts: control tokens, the 256 byte tokens,
    words to fill ``n_vocab``. The probe feeds token ids, so no text is ever tokenized."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # gguf TokenType: UNKNOWN, CONTROL, BYTE
    tokens += [f"\u2581w{i}" for i in range(n_vocab - len(tokens))]
    types += [1] * (n_vocab - len(types))  # NORMAL
    return tokens, [0.0 if t != 1 else -float(i) for i, t in enumerate(types)], types


def _tensors(shape: Shape) -> list[tuple[str, tuple[int, int] | int]]:
    """Names and (rows, columns) of the weights, or the length of a norm, in file order."""
    s, head_dim = shape, shape.n_embd // shape.n_head
    out: list[tuple[str, tuple[int, int] | int]] = [("token_embd.weight", (s.n_vocab, s.n_embd))]
    for i in range(s.n_layer):
        out += [(f"blk.{i}.attn_norm.weight", s.n_embd),
                (f"blk.{i}.attn_q.weight", (s.n_head * head_dim, s.n_embd)),
                (f"blk.{i}.attn_k.weight", (s.n_head_kv * head_dim, s.n_embd)),
                (f"blk.{i}.attn_v.weight", (s.n_head_kv * head_dim, s.n_embd)),
                (f"blk.{i}.attn_output.weight", (s.n_embd, s.n_head * head_dim)),
                (f"blk.{i}.ffn_norm.weight", s.n_embd),
                (f"blk.{i}.ffn_gate.weight", (s.n_ff, s.n_embd)),
                (f"blk.{i}.ffn_up.weight", (s.n_ff, s.n_embd)),
                (f"blk.{i}.ffn_down.weight", (s.n_embd, s.n_ff))]
    # untied: the output product is compared and timed too
    return [*out, ("output_norm.weight", s.n_embd), ("output.weight", (s.n_vocab, s.n_embd))]


def _writer(path: Path, shape: Shape, file_type: int) -> Any:
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("jupyter_llm repack probe")
    writer.add_block_count(shape.n_layer)
    writer.add_context_length(256)
    writer.add_embedding_length(shape.n_embd)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(shape.n_embd // shape.n_head)
    writer.add_file_type(file_type)
    tokens, scores, types = _vocab(shape.n_vocab)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    return writer


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_model(path: str | os.PathLike[str], quant: str, shape: Shape = SMALL, *,
                shared_layers: bool = False) -> Path:
    """Write a random-weight llama model with every 2-D weight of type ``quant`` (norms F32).

    The gguf package quantizes the types it implements (Q4_0, Q4_1, Q8_0…); for the others an F16
    model is written and llama.cpp requantizes it (``llama_model_quantize``, ``pure``), which
    loads llama.cpp into this process: call it only in a subprocess. ``shared_layers``: one
    random matrix per shape for all layers (fast to write; for timing only).
    """
    import gguf
    import numpy as np

    path = Path(path)
    qtype = gguf.GGMLQuantizationType[quant]
    try:
        gguf.quants.quantize(np.zeros((8, 256), dtype=np.float32), qtype)
        direct = True
    except (NotImplementedError, gguf.quants.QuantError):
        direct = False
    if not direct and quant not in QUANTIZE_FTYPES:
        raise ValueError(f"cannot make a {quant} model: neither gguf nor llama_model_quantize writes it")
    target = path if direct else path.with_suffix(".f16.gguf")
    rng = np.random.default_rng(0)
    writer = _writer(target, shape, QUANTIZE_FTYPES.get(quant, 1) if direct else 1)
    made: dict[tuple[int, int], Any] = {}
    for name, dims in _tensors(shape):
        if isinstance(dims, int):
            writer.add_tensor(name, np.ones(dims, dtype=np.float32))
            continue
        data = made.get(dims) if shared_layers else None
        if data is None:
            # scaled like a trained model's (std 1/sqrt(columns)): activations stay of order 1
            weights = rng.standard_normal(dims, dtype=np.float32) / np.float32(math.sqrt(dims[1]))
            data = gguf.quants.quantize(weights, qtype) if direct else weights.astype(np.float16)
            made[dims] = data
        if direct:
            writer.add_tensor(name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
    _finish(writer)
    if not direct:
        _requantize(target, path, QUANTIZE_FTYPES[quant])
        target.unlink()
    return path


def write_reference(quantized: str | os.PathLike[str], path: str | os.PathLike[str], shape: Shape = SMALL) -> Path:
    """The same model with its weights dequantized to F32: llama.cpp's exact product of them is
    what both kernels approximate."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(quantized)
    writer = _writer(Path(path), shape, 0)
    for t in reader.tensors:
        dims = tuple(reversed([int(d) for d in t.shape]))  # ggml ne order → numpy's
        raw = np.asarray(t.data)
        values = raw if t.tensor_type == gguf.GGMLQuantizationType.F32 else gguf.quants.dequantize(raw, t.tensor_type)
        writer.add_tensor(t.name, np.ascontiguousarray(values, dtype=np.float32).reshape(dims))
    _finish(writer)
    return Path(path)


def _requantize(source: Path, dest: Path, ftype: int) -> None:
    import llama_cpp as L

    _install_log(L)
    qp = L.llama_model_quantize_default_params()
    qp.ftype, qp.pure, qp.nthread = ftype, True, params.physical_cores()
    rc = L.llama_model_quantize(os.fsencode(source), os.fsencode(dest), ctypes.byref(qp))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}): {' '.join(_log[-2:]).strip()}")


class _Run:
    """One load of the probe model (with or without repacking) and its measurements."""

    def __init__(self, L: Any, path: Path, repack: bool, n_threads: int) -> None:
        self.L = L
        del _log[:]
        mp, _ = params.model_params(L, {"gpu_layers": 0}, extra_bufts=repack)
        self.model = L.llama_model_load_from_file(os.fsencode(path), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load the probe model: {' '.join(_log[-2:]).strip()}")
        cp = params.base_context_params(L, n_ctx=256, n_batch=BATCH, n_ubatch=BATCH, n_seq=1, n_threads=n_threads)
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create the probe context: {' '.join(_log[-2:]).strip()}")
        self.log = "".join(_log)
        self.n_vocab = int(L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model)))
        self.batch = L.llama_batch_init(BATCH, 0, 1)
        self.mem = L.llama_get_memory(self.ctx)

    def repacked_mib(self) -> float:
        """MiB of weights llama.cpp put in a repacked buffer (0: nothing was repacked)."""
        return sum(float(m.group(2)) for m in _REPACKED_BUFFER.finditer(self.log))

    def _decode(self, tokens: Sequence[int], start: int, all_logits: bool) -> None:
        b = self.batch
        for i, token in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i] = token, start + i, 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if all_logits or i == len(tokens) - 1 else 0
        b.n_tokens = len(tokens)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def batch_logits(self, tokens: Sequence[int]) -> list[list[float]]:
        """Logits of every position of one batch decode from an empty cache."""
        self.L.llama_memory_clear(self.mem, True)
        self._decode(tokens, 0, True)
        out = []
        for i in range(len(tokens)):
            row = self.L.llama_get_logits_ith(self.ctx, i)
            out.append([float(row[j]) for j in range(self.n_vocab)])
        return out

    def time_once(self, tokens: Sequence[int]) -> tuple[float, float]:
        """Seconds of a ``BATCH``-token prompt, and of one decode step (the mean of ``DECODE_STEPS``)."""
        self.L.llama_memory_clear(self.mem, True)
        t0 = time.perf_counter()
        self._decode(tokens, 0, False)
        t1 = time.perf_counter()
        for k in range(DECODE_STEPS):
            self._decode([tokens[k]], len(tokens) + k, False)
        return t1 - t0, (time.perf_counter() - t1) / DECODE_STEPS

    def free(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def _fault(spec: str | None) -> None:
    if spec == "SIGSEGV":
        sys.stdout.flush()
        ctypes.string_at(0)  # a real invalid read in native code, as llama.cpp's crash is


def _logits(L: Any, path: Path, repack: bool, tokens: Sequence[int], n_threads: int,
            fault: str | None = None) -> tuple[Any, float]:
    """The logits of one batch decode of ``tokens`` (a position × vocabulary array) and the MiB
    llama.cpp repacked."""
    import numpy as np

    run = _Run(L, path, repack, n_threads)
    try:
        if repack:
            _fault(fault)
        return np.array(run.batch_logits(tokens), dtype=np.float64), run.repacked_mib()
    finally:
        run.free()


def _timings(L: Any, path: Path, tokens: Sequence[int], n_threads: int) -> list[tuple[float, float]]:
    """Best (prompt, decode step) seconds without and with repacking. The two alternate, so that
    whatever else the machine runs meanwhile slows both alike."""
    runs = [_Run(L, path, False, n_threads)]
    try:
        runs.append(_Run(L, path, True, n_threads))
        best = [(math.inf, math.inf)] * 2
        for _ in range(REPEATS):
            for i, run in enumerate(runs):
                prompt, step = run.time_once(tokens)
                best[i] = (min(best[i][0], prompt), min(best[i][1], step))
        return best
    finally:
        for run in runs:
            run.free()


def _busy(answer: dict[str, Any]) -> bool:
    """Whether the machine is too busy to time on; if so, ``answer`` says so ("busy")."""
    load = os.getloadavg()[0]
    answer["load_avg"] = max(answer.get("load_avg", 0.0), round(load, 2))
    if load <= (os.cpu_count() or 1) + BUSY:
        return False
    answer["verdict"] = "busy"
    return True


def probe(quant: str, directory: str | os.PathLike[str], *, fault: str | None = None) -> dict[str, Any]:
    """Measure repacking for weights of type ``quant``; the answer's ``verdict`` is one of
    ``safe+faster``, ``slower``, ``differs``, ``not repacked``, ``busy`` (no timing possible now)."""
    import llama_cpp as L
    import numpy as np

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f"probe-{quant}-", dir=directory))
    answer: dict[str, Any] = {"quant": quant, "llama_cpp": L.__version__}
    try:
        small = write_model(work / "small.gguf", quant, SMALL)
        exact = write_reference(small, work / "small-f32.gguf", SMALL)
        _install_log(L)
        L.llama_backend_init()
        n_threads = params.physical_cores()
        tokens = [3 + (i * 37) % (SMALL.n_vocab - 3) for i in range(BATCH)]
        reference, _ = _logits(L, exact, False, tokens, n_threads)
        plain, _ = _logits(L, small, False, tokens, n_threads)
        # where the AMX machine segfaults (docs/notes.md §2): the first multi-token decode
        packed, repacked_mib = _logits(L, small, True, tokens, n_threads, fault)
        scale = float(np.abs(reference).max()) or 1.0
        err_plain = float(np.abs(plain - reference).max()) / scale
        err_packed = float(np.abs(packed - reference).max()) / scale
        answer.update(n_threads=n_threads, batch=BATCH, max_abs_logit=round(scale, 4),
                      rel_err_plain=round(err_plain, 5), rel_err_repacked=round(err_packed, 5),
                      rel_diff=round(float(np.abs(packed - plain).max()) / scale, 5),
                      argmax_agree=round(float((packed.argmax(1) == plain.argmax(1)).mean()), 3),
                      allowed=round(SLACK * err_plain + FLOOR, 5), repacked_mib=repacked_mib)
        if repacked_mib == 0:
            answer["verdict"] = "not repacked"
            return answer
        if err_packed > SLACK * err_plain + FLOOR:
            answer["verdict"] = "differs"
            return answer
        if _busy(answer):
            return answer
        large = write_model(work / "large.gguf", quant, LARGE, shared_layers=True)
        t_write = time.perf_counter() - t0
        plain_t, packed_t = _timings(L, large, tokens, n_threads)
        if _busy(answer):
            return answer
        decode_speedup, prompt_speedup = plain_t[1] / packed_t[1], plain_t[0] / packed_t[0]
        faster = decode_speedup >= FASTER and prompt_speedup >= 1.0
        answer.update(verdict="safe+faster" if faster else "slower", seconds_write=round(t_write, 2),
                      decode_tok_s={"plain": round(1 / plain_t[1], 1), "repacked": round(1 / packed_t[1], 1)},
                      prompt_ms={"plain": round(plain_t[0] * 1000, 1), "repacked": round(packed_t[0] * 1000, 1)},
                      decode_speedup=round(decode_speedup, 3), prompt_speedup=round(prompt_speedup, 3),
                      large_mib=round(large.stat().st_size / 2**20, 1))
        return answer
    finally:
        answer["seconds"] = round(time.perf_counter() - t0, 2)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: print one JSON line with the verdict and the measurements."""
    parser = argparse.ArgumentParser(prog="python -m jupyter_llm.worker.repack_probe",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("quant", help="weight type, e.g. Q4_0")
    parser.add_argument("--dir", required=True, help="where to write the probe model (deleted afterwards)")
    parser.add_argument("--fault", choices=["SIGSEGV"], help="tests only: crash before the repacked decode")
    args = parser.parse_args(argv)
    try:
        answer = probe(args.quant, args.dir, fault=args.fault)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        answer = {"verdict": "error", "quant": args.quant, "error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
