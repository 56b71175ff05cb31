"""Benchmark: streaming through the worker runtime vs a raw llama.cpp decode loop.

Both sides load the same model with the same context settings and threads, evaluate the same
prompt and decode greedily; the raw loop runs in its own process with the worker's environment
(``python bench/bench_runtime.py --raw …``, loaded once), the runtime side is a :class:`Runtime` whose stream
this process consumes. Rounds alternate so that noise from other load hits both alike; medians
are reported. Also measures how fast a long prompt evaluation stops after ``cancel()``, and
what the prompt cache does for a chat: the time to the first token of a second turn after a
~1,500-token first turn, with the cache and without (a worker started with it off).

    .venv/bin/python bench/bench_runtime.py [--model PATH] [--tokens 128] [--rounds 5] [--chat-rounds 3]
    .venv/bin/python bench/bench_runtime.py --chat-only     # just the prompt-cache measurement
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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
        mp.use_extra_bufts = False  # docs/notes.md §2: required on Intel AMX CPUs
        self.model = L.llama_model_load_from_file(model.encode(), mp)
        self.vocab = L.llama_model_get_vocab(self.model)
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, 1
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified, cp.no_perf = False, True  # flash attention: llama.cpp's default (auto: on for the CPU)
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
    """``--raw``: load once, then one generation per stdin line (JSON: prompt, tokens), JSON out."""
    loop = RawLoop(args.model, args.ctx, args.threads, args.batch)
    loop.run(PROMPT, 2)  # warm, like the runtime's worker after its first request
    for line in sys.stdin:
        job = json.loads(line)
        print(json.dumps(loop.run(job["prompt"], job["tokens"])), flush=True)


class RawProcess:
    """The raw loop in its own process: with the worker's environment (OpenMP settings etc.), or
    with ``env`` (bench_speed.py gives llama.cpp's default one)."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str] | None = None) -> None:
        from jupyter_llm.wire import worker_env as _worker_env

        self.tokens = int(args.tokens)
        cmd = [sys.executable, __file__, "--raw", "--model", args.model, "--tokens", str(args.tokens),
               "--ctx", str(args.ctx), "--threads", str(args.threads), "--batch", str(args.batch)]
        self.proc = subprocess.Popen(cmd, env=_worker_env() if env is None else env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def run(self, prompt: str = PROMPT, tokens: int | None = None) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"prompt": prompt, "tokens": tokens or self.tokens}) + "\n")
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


def long_document(rt: object, n_tokens: int, round_no: int) -> str:
    """A first chat message of about ``n_tokens`` tokens: this repository's architecture notes,
    repeated, opened by a line that differs per round (so no round reuses another's prefix)."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    doc = f"Document number {round_no}.\n"
    while rt.count_tokens(doc) < n_tokens:  # type: ignore[attr-defined]
        doc += text
    while rt.count_tokens(doc) > n_tokens:  # type: ignore[attr-defined]
        doc = doc[: int(len(doc) * 0.97)]
    return doc + "\n\nIn two sentences: what is this document about?"


def timed_turn(rt: object, messages: list[dict[str, str]], sampling: object) -> tuple[float, object]:
    """Seconds to the first streamed text, and the completion."""
    t0 = time.perf_counter()
    stream = rt.chat(messages, sampling)  # type: ignore[attr-defined]
    ttft = None
    for _ in stream:
        if ttft is None:
            ttft = time.perf_counter() - t0
    return (ttft if ttft is not None else time.perf_counter() - t0), stream.result


def wait_settled(rt: object) -> None:
    """Until the worker has re-evaluated its answer's tokens (as while a user reads them)."""
    while rt.stats()["unsettled_tokens"]:  # type: ignore[attr-defined]
        time.sleep(0.02)


def chat_cache(args: argparse.Namespace) -> None:
    """Second-turn TTFT after a ~1,500-token first turn: prompt cache on vs off."""
    from jupyter_llm.options import LoadOptions, SamplingOptions
    from jupyter_llm.runtime import Runtime

    options = LoadOptions(gpu_layers=0, n_ctx=args.ctx, threads=args.threads)
    sampling = SamplingOptions(temperature=0.0, max_tokens=64)
    rows = []
    with Runtime.start(args.model, options) as cached, \
            Runtime.start(args.model, options, _prompt_cache=False) as plain:
        for i in range(args.chat_rounds):
            first = [{"role": "user", "content": long_document(cached, 1500, i)}]
            turn1 = cached.chat(first, sampling).result
            wait_settled(cached)
            second = [*first, {"role": "assistant", "content": turn1.text},
                      {"role": "user", "content": "Which module runs llama.cpp?"}]
            ttft_on, on = timed_turn(cached, second, sampling)
            ttft_off, off = timed_turn(plain, second, sampling)  # the same greedy first answer
            rows.append((ttft_on, ttft_off, on, off))
            print(f"chat round {i + 1}: turn 1 {turn1.prompt_tokens} prompt + {turn1.completion_tokens} answer "
                  f"tokens; turn 2 ({on.prompt_tokens} tokens, {on.prompt_tokens_cached} cached) TTFT "
                  f"{ttft_on * 1000:.0f} ms with the cache, {ttft_off * 1000:.0f} ms without; same text: "
                  f"{on.text == off.text}", flush=True)
        # the next turn sent at once, before the worker re-evaluated the answer it just gave
        first = [{"role": "user", "content": long_document(cached, 1500, 99)}]
        turn1 = cached.chat(first, sampling).result
        second = [*first, {"role": "assistant", "content": turn1.text},
                  {"role": "user", "content": "Which module runs llama.cpp?"}]
        ttft_now, now = timed_turn(cached, second, sampling)
    on_med = statistics.median(r[0] for r in rows)
    off_med = statistics.median(r[1] for r in rows)
    print(f"\nprompt cache, second chat turn after a ~1,500-token first turn ({args.chat_rounds} rounds, medians)")
    reused = statistics.median(r[2].prompt_tokens_cached for r in rows)
    print(f"  TTFT with the cache   : {on_med * 1000:8.0f} ms  ({reused:.0f} of "
          f"{statistics.median(r[2].prompt_tokens for r in rows):.0f} prompt tokens reused)")
    print(f"  TTFT without          : {off_med * 1000:8.0f} ms")
    print(f"  ratio without/with    : {off_med / on_med:8.1f}x")
    print(f"  same greedy answers   : {all(r[2].text == r[3].text for r in rows)}")
    print(f"  next turn sent at once (answer not yet re-evaluated): TTFT {ttft_now * 1000:.0f} ms, "
          f"{now.prompt_tokens_cached} of {now.prompt_tokens} tokens reused")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a GGUF (default: the tests' SmolLM2 Q4_1, fetched if missing)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0, help="0 = os.cpu_count()")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--chat-rounds", type=int, default=3)
    p.add_argument("--chat-only", action="store_true", help="only the prompt-cache measurement")
    p.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    from tests.model import default_model

    args.model = args.model or str(default_model())  # a fresh clone has none yet
    import os

    args.threads = args.threads or os.cpu_count() or 1
    if args.raw:
        raw_server(args)
        return
    if args.chat_only:
        chat_cache(args)
        return

    from jupyter_llm.options import LoadOptions
    from jupyter_llm.runtime import Runtime

    options = LoadOptions(gpu_layers=0, n_ctx=args.ctx, threads=args.threads, n_batch=args.batch,
                          n_ubatch=args.batch)
    raw, via = [], []
    raw_process = RawProcess(args)
    # The raw loop evaluates the whole prompt every round: so does the runtime here (no prompt
    # cache), to compare like with like; chat_cache() measures the cache.
    with Runtime.start(args.model, options, _prompt_cache=False) as rt:
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
          f"{ms(interrupts)} ms later\n")
    chat_cache(args)


if __name__ == "__main__":
    main()
