"""Benchmark: streaming through the worker runtime vs a raw llama.cpp decode loop.

Both sides load the same model with the same context settings and threads, evaluate the same
prompt and decode greedily; the raw loop runs in its own process with the worker's environment
(``python bench/bench_runtime.py --raw …``, loaded once), the runtime side is a :class:`Runtime` whose stream
this process consumes. Rounds alternate so that noise from other load hits both alike; medians
are reported. Also measures how fast a long prompt evaluation stops after ``cancel()``.

    .venv/bin/python bench/bench_runtime.py [--model PATH] [--tokens 128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = ("Write a long story about a lighthouse keeper who finds a message in a bottle. "
          "Describe the sea, the weather, the keeper's daily routine and the people of the village "
          "in detail, and tell how the message changes his life.\n\nOnce upon a time,")


class RawLoop:
    """The baseline: llama.cpp's low-level API in one process, no IPC, greedy sampling."""

    def __init__(self, model: str, n_ctx: int, threads: int, n_batch: int) -> None:
        import llama_cpp as L

        self.L = L
        self._log = L.llama_log_callback(lambda level, text, user: None)  # silent, like the worker
        L.llama_log_set(self._log, None)
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.use_extra_bufts = False  # NOTES §2: required on this CPU
        self.model = L.llama_model_load_from_file(model.encode(), mp)
        self.vocab = L.llama_model_get_vocab(self.model)
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, 1
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified, cp.no_perf, cp.flash_attn_type = False, True, 0  # as the worker (flash_attn off)
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.n_batch = n_batch
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        self.chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        L.llama_sampler_chain_add(self.chain, L.llama_sampler_init_greedy())

    def _put(self, i: int, tok: int, pos: int, logits: bool) -> None:
        b = self.batch
        b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = tok, pos, 1, 0, logits

    def run(self, prompt: str, n_tokens: int) -> dict[str, object]:
        import ctypes

        L, batch = self.L, self.batch
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        t0 = time.perf_counter()
        data = prompt.encode()
        buf = (L.llama_token * (len(data) + 8))()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, True)
        tokens = list(buf[:n])
        if L.llama_vocab_get_add_bos(self.vocab):
            tokens.insert(0, L.llama_vocab_bos(self.vocab))
        pos = 0
        for start in range(0, len(tokens), self.n_batch):
            part = tokens[start:start + self.n_batch]
            for j, tok in enumerate(part):
                self._put(j, tok, pos + j, start + j == len(tokens) - 1)
            batch.n_tokens = len(part)
            L.llama_decode(self.ctx, batch)
            pos += len(part)
        idx = batch.n_tokens - 1
        piece = ctypes.create_string_buffer(64)
        out, t_first = [], 0.0
        for i in range(n_tokens):
            tok = L.llama_sampler_sample(self.chain, self.ctx, idx)
            size = L.llama_token_to_piece(self.vocab, tok, piece, len(piece), 0, False)
            out.append(piece.raw[:size])
            if i == 0:
                t_first = time.perf_counter()
            if i == n_tokens - 1:
                break
            self._put(0, tok, pos, True)
            batch.n_tokens = 1
            L.llama_decode(self.ctx, batch)
            pos += 1
            idx = 0
        t_end = time.perf_counter()
        return {"ttft_s": t_first - t0, "tok_per_s": (n_tokens - 1) / (t_end - t_first),
                "prompt_tokens": len(tokens), "text": b"".join(out).decode("utf-8", "replace")}


def raw_server(args: argparse.Namespace) -> None:
    """``--raw``: load once, then one generation per line read from stdin, JSON out."""
    loop = RawLoop(args.model, args.ctx, args.threads, args.batch)
    loop.run(PROMPT, 2)  # warm, like the runtime's worker after its first request
    for _ in sys.stdin:
        print(json.dumps(loop.run(PROMPT, args.tokens)), flush=True)


class RawProcess:
    """The raw loop in its own process with the worker's environment (OpenMP settings etc.)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from jupyter_llm.runtime import _worker_env

        cmd = [sys.executable, __file__, "--raw", "--model", args.model, "--tokens", str(args.tokens),
               "--ctx", str(args.ctx), "--threads", str(args.threads), "--batch", str(args.batch)]
        self.proc = subprocess.Popen(cmd, env=_worker_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)

    def run(self) -> dict[str, object]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


def run_runtime(rt: object, args: argparse.Namespace) -> dict[str, float]:
    from jupyter_llm.options import SamplingOptions

    sampling = SamplingOptions(temperature=0.0, max_tokens=args.tokens)
    t0 = time.perf_counter()
    stream = rt.generate(PROMPT, sampling)  # type: ignore[attr-defined]
    times, n = [], 0
    for chunk in stream:
        times.append(time.perf_counter())
        n += chunk.n_tokens
    result = stream.result
    if result.completion_tokens != args.tokens:
        raise SystemExit(f"the runtime stopped after {result.completion_tokens} tokens ({result.finish_reason})")
    # tokens after the first, over the time from the first chunk to the last
    worker_ttft = stream._stats["worker_ttft_s"]  # request received → first token sampled, in the worker
    return {"ttft_s": times[0] - t0, "tok_per_s": (n - 1) / (times[-1] - times[0]),
            "ipc_s": times[0] - t0 - worker_ttft, "prompt_tokens": result.prompt_tokens, "text": result.text}


def cancel_latency(rt: object, n_prompt: int) -> float:
    """Seconds from cancel() to the end of the stream, during a long prompt evaluation."""
    from jupyter_llm.options import SamplingOptions

    stream = rt.generate("hello " * n_prompt, SamplingOptions(temperature=0, max_tokens=4))  # type: ignore[attr-defined]
    time.sleep(0.5)  # well inside the prompt evaluation
    t0 = time.perf_counter()
    stream.cancel()
    result = stream.result
    assert result.finish_reason == "cancelled", result
    return time.perf_counter() - t0


def interrupt_latency(rt: object, n_prompt: int) -> float:
    """Seconds from a SIGINT (the notebook's stop button) during a long prompt evaluation to
    the KeyboardInterrupt re-raised by the stream, after the worker confirmed the cancel."""
    import os
    import signal
    import threading

    from jupyter_llm.options import SamplingOptions

    stream = rt.generate("hello " * n_prompt, SamplingOptions(temperature=0, max_tokens=4))  # type: ignore[attr-defined]
    sent: list[float] = []

    def fire() -> None:
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)

    threading.Timer(0.5, fire).start()
    try:
        for _ in stream:
            pass
    except KeyboardInterrupt:
        elapsed = time.perf_counter() - sent[0]
        assert stream.result.finish_reason == "cancelled"
        return elapsed
    raise AssertionError("the prompt finished before the interrupt")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0, help="0 = os.cpu_count()")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    import os

    args.threads = args.threads or os.cpu_count() or 1
    if args.raw:
        raw_server(args)
        return

    from jupyter_llm.options import LoadOptions
    from jupyter_llm.runtime import Runtime

    options = LoadOptions(gpu_layers=0, n_ctx=args.ctx, threads=args.threads, n_batch=args.batch,
                          n_ubatch=args.batch)
    raw, via = [], []
    raw_process = RawProcess(args)
    with Runtime.start(args.model, options) as rt:
        run_runtime(rt, args)  # warm, like the raw loop
        for i in range(args.rounds):
            raw.append(raw_process.run())
            via.append(run_runtime(rt, args))
            print(f"round {i + 1}: raw {raw[-1]['tok_per_s']:.1f} tok/s ttft {raw[-1]['ttft_s'] * 1000:.1f} ms | "
                  f"runtime {via[-1]['tok_per_s']:.1f} tok/s ttft {via[-1]['ttft_s'] * 1000:.1f} ms", flush=True)
        same = raw[0]["text"] == via[0]["text"]
        cancels = [cancel_latency(rt, 3000) for _ in range(3)]
        interrupts = [interrupt_latency(rt, 3000) for _ in range(3)]
    raw_process.close()

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    print(f"\nmodel {Path(args.model).name}, prompt {raw[0]['prompt_tokens']} tokens, {args.tokens} tokens "
          f"greedy, {args.threads} threads, {args.rounds} rounds (medians)")
    print(f"  raw loop : {med(raw, 'tok_per_s'):6.1f} tok/s   TTFT {med(raw, 'ttft_s') * 1000:7.1f} ms")
    print(f"  runtime  : {med(via, 'tok_per_s'):6.1f} tok/s   TTFT {med(via, 'ttft_s') * 1000:7.1f} ms")
    print(f"  ratio tok/s runtime/raw: {med(via, 'tok_per_s') / med(raw, 'tok_per_s'):.3f}   "
          f"TTFT overhead: {(med(via, 'ttft_s') - med(raw, 'ttft_s')) * 1000:+.1f} ms")
    print(f"  of the runtime's TTFT, outside the worker's own request→first-token time (IPC, client "
          f"threads): {med(via, 'ipc_s') * 1000:.2f} ms")
    print(f"  same greedy text: {same}")
    ms = lambda values: ", ".join(f"{v * 1000:.0f}" for v in values)  # noqa: E731
    print(f"  cancel() during a 3000-token prompt: stream ended {ms(cancels)} ms later")
    print(f"  SIGINT during a 3000-token prompt: KeyboardInterrupt re-raised (cancel confirmed) "
          f"{ms(interrupts)} ms later")


if __name__ == "__main__":
    main()
