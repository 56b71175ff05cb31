"""Benchmark: our speed against llama.cpp itself, each contender alone on the machine.

Baselines that are not ours (docs/notes.md §8): llama.cpp's own ``llama-server`` built from the
llama.cpp that the pinned llama-cpp-python vendors (``scripts/build-llama-cpp.sh``), and a plain
decode loop through the ctypes bindings, both in llama.cpp's default environment (no OpenMP or
ggml variable of ours). One contender is alive at a time; rounds alternate; every round's
numbers are printed, then medians and the ratios against the targets:

=====================================================  ==============================
Python API and ``%%chat`` tok/s vs the plain loop      ≥ 0.95×
their time to first token vs the plain loop            ≤ plain loop + 10 ms
our API, 1 client, vs ``llama-server -np 4``           ≥ 0.95×
our API, 4 clients, vs ``llama-server -np 4``          ≥ 1.0×
TTFT of a request arriving while 3 others generate      ≤ llama-server's
a kernel cell (``sum(range(10**7))``) while generating  ≤ 2× its idle time
worker CPU seconds in the 10 s after an answer         < 0.05 s (also with the prompt cache on)
=====================================================  ==============================

Servers run as their users have them: both keep prompts for reuse (llama-server's
``cache_prompt`` and our prompt cache are on by default); the single streams compare against
the plain loop with our cache off, since the plain loop evaluates every prompt. The ratios
come from alternating runs (``--stream-pairs`` of the plain loop and ours one after the other,
each ratio and first-token difference taken within the pair; ``--pairs`` of the two servers,
both up, used in turn; every other pair runs ours first, so that neither side always follows
the other), so that the machine's drift hits both sides alike; the rounds' own medians (each
contender alone on the machine) are shown too.

It also shows the plain loop under ``OMP_WAIT_POLICY=PASSIVE`` (the wait policy is chosen by this
measurement), the second turn's first token with the prompt cache settling while idle (the
old behaviour) and without (the default), and what a long prompt (``--long-prompt`` tokens)
arriving while 3 requests generate costs: its first token, and the longest pause the
generating streams see (continuous batching: ours evaluates it in ``n_ubatch`` chunks between
their tokens).

    .venv/bin/python bench/bench_speed.py [--rounds 3] [--tokens 128] [--threads N] [--stream-pairs 48] [--pairs 12]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
QUESTION = ("Write a long story about a lighthouse keeper who finds a message in a bottle. Describe the sea, "
            "the weather and the village in detail.")
PROMPTS = [f"Request {i}: {p}" for i, p in enumerate((
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Describe, in detail, a day in the life of a medieval blacksmith.",
    "Explain how a steam engine works, step by step, for a curious child.",
    "Write a travel guide to an imaginary island with three towns."))]


def physical_cores() -> int:
    from jupyter_llm.worker.params import physical_cores as cores

    return cores()


def clean_env() -> dict[str, str]:
    """llama.cpp's default environment: ours without any OpenMP or ggml setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_", "GGML_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "bench"), env.get("PYTHONPATH")) if p)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- single-stream contenders ------------------------------------------------------------------------

class PlainLoop:
    """The ctypes decode loop of bench_runtime.py (its RawProcess), in llama.cpp's environment
    (or with ``OMP_WAIT_POLICY=wait_policy``, to show what that setting does). Loaded once; one
    generation per :meth:`run`."""

    def __init__(self, args: argparse.Namespace, *, wait_policy: str | None = None) -> None:
        from bench_runtime import RawProcess

        env = clean_env()
        if wait_policy:
            env["OMP_WAIT_POLICY"] = wait_policy
        self.raw = RawProcess(argparse.Namespace(**{**vars(args), "batch": 512}), env=env)

    def run(self, prompt: str, tokens: int) -> dict[str, float]:
        out = self.raw.run(prompt, tokens)
        return {"tok_s": out["tok_per_s"], "ttft_s": out["ttft_s"]}

    def close(self) -> None:
        self.raw.close()


def plain_loop(args: argparse.Namespace, prompt: str, *, wait_policy: str | None = None) -> dict[str, float]:
    """One measured generation of the plain loop, after a warm-up one, its process alive only meanwhile."""
    loop = PlainLoop(args, wait_policy=wait_policy)
    try:
        loop.run(prompt, 8)  # warm, as the others are
        return loop.run(prompt, args.tokens)
    finally:
        loop.close()


def python_api(args: argparse.Namespace) -> dict[str, float]:
    import jupyter_llm as llm

    model = llm.load(args.model, n_ctx=args.ctx, threads=args.threads, gpu_layers=0, keep_alive=None)
    try:
        messages = [{"role": "user", "content": QUESTION}]  # a list: no conversation kept between calls
        list(model.chat(messages, stream=True, temperature=0, max_tokens=8))  # warm-up
        t0 = time.perf_counter()
        times = [time.perf_counter() for _ in model.chat(messages, stream=True, temperature=0,
                                                         max_tokens=args.tokens, seed=1)]
    finally:
        llm.unload(all=True)
    span = times[-1] - times[0]
    return {"tok_s": (len(times) - 1) / span if span else 0.0, "ttft_s": times[0] - t0}


def chat_cell(args: argparse.Namespace, kernel: Any) -> dict[str, float]:
    """``%%chat`` in a real kernel, the kernel's responsiveness while it generates, and the
    worker's CPU time once the answer has ended."""
    from bench_chat import kernel_round

    kernel.ok(f"%llm load {args.model} --ctx {args.ctx} --threads {args.threads} --keep-alive -1 --gpu-layers 0")
    try:
        kernel_round(kernel, 8)  # warm-up
        chat = kernel_round(kernel, args.tokens)
        pid = int(kernel.ok("from jupyter_llm.manager import get_manager\n"
                            "print(get_manager().ps()[0].runtime.pid)").texts()[-1])
        before = cpu_seconds(pid)
        time.sleep(10)
        idle_cpu = cpu_seconds(pid) - before
        timing = ("import time\nt = time.perf_counter(); sum(range(10**7)); print(time.perf_counter() - t)")
        idle = float(kernel.ok(timing).texts()[-1])
        kernel.ok("import threading, jupyter_llm as _llm\n"
                  "_m = _llm.Model(_llm.ps()[0].name)\n"
                  "_bg = threading.Thread(target=lambda: _m.chat('Tell a long story.', temperature=0, "
                  "max_tokens=400))\n_bg.start(); time.sleep(0.5)")
        busy = float(kernel.ok(timing).texts()[-1])
        kernel.ok("_bg.join()")
    finally:
        kernel.ok("%llm unload --all")
    return {"tok_s": chat["tok_per_s"], "ttft_s": chat["ttft_s"], "idle_cpu_s": idle_cpu,
            "cell_busy_over_idle": busy / idle}


def paired(args: argparse.Namespace, prompt: str, kernel: Any) -> dict[str, list[dict[str, float]]]:
    """Alternating runs of ``args.tokens`` tokens: plain loop, Python API, plain loop, ``%%chat``,
    … (``args.stream_pairs`` times; every other pair ours first); each of ours against the plain
    run of its pair: the ratio of tok/s and the difference of first-token times. The three are
    loaded together but only one computes at a time (a pause between runs lets OpenMP's spinning
    threads go to sleep), so the machine's drift hits both sides of a pair alike."""
    from bench_chat import kernel_round

    import jupyter_llm as llm

    plain = PlainLoop(args)
    model = llm.load(args.model, n_ctx=args.ctx, threads=args.threads, gpu_layers=0, keep_alive=None)
    kernel.ok(f"%llm load {args.model} --ctx {args.ctx} --threads {args.threads} --keep-alive -1 --gpu-layers 0")
    messages = [{"role": "user", "content": QUESTION}]

    def api(tokens: int) -> dict[str, float]:
        t0 = time.perf_counter()
        times = [time.perf_counter() for _ in model.chat(messages, stream=True, temperature=0, max_tokens=tokens,
                                                         seed=1)]
        span = times[-1] - times[0]
        return {"tok_s": (len(times) - 1) / span if span else 0.0, "ttft_s": times[0] - t0}

    def chat(tokens: int) -> dict[str, float]:
        got = kernel_round(kernel, tokens)
        return {"tok_s": got["tok_per_s"], "ttft_s": got["ttft_s"]}

    out: dict[str, list[dict[str, float]]] = {"Python API": [], "%%chat": []}
    try:
        plain.run(prompt, 8), api(8), chat(8)  # warm-up
        for k in range(args.stream_pairs):
            for name, ours in (("Python API", api), ("%%chat", chat)):
                got: dict[str, dict[str, float]] = {}
                for side in ("ours", "plain")[::1 if k % 2 else -1]:  # every other pair ours first
                    time.sleep(0.3)
                    got[side] = ours(args.tokens) if side == "ours" else plain.run(prompt, args.tokens)
                base, mine = got["plain"], got["ours"]
                out[name].append({"ratio": mine["tok_s"] / base["tok_s"], "plain_tok_s": base["tok_s"],
                                  "tok_s": mine["tok_s"], "ttft_ms": (mine["ttft_s"] - base["ttft_s"]) * 1000})
    finally:
        plain.close()
        llm.unload(all=True)
        kernel.ok("%llm unload --all")
    return out


# -- servers -------------------------------------------------------------------------------------------

SECOND_TURN = (("default", False, True, "< 0.05"), ("settling while idle", True, True, "(shown)"),
               ("flash attention off", False, False, "< 0.05"),
               ("FA off, settling while idle (before)", True, False, "(was 1.9)"))
"""The loads of :func:`idle_and_second_turn`: name, settling while idle, flash attention, and the
target of the idle CPU seconds."""


def idle_and_second_turn(args: argparse.Namespace, settle_idle: bool, flash_attn: bool) -> dict[str, float]:
    """The prompt cache as users have it (on): a 256-token answer, the worker's CPU seconds in
    the 10 s after it, then the second turn's time to first token. ``settle_idle``: the worker
    re-evaluates the answer while idle (``JUPYTER_LLM_IDLE_SETTLE=1``; the behaviour before
    was that with flash attention off, as loads were then, so it is measured that way too)."""
    from jupyter_llm.options import LoadOptions, SamplingOptions
    from jupyter_llm.runtime import Runtime

    saved = {k: os.environ.get(k) for k in ("JUPYTER_LLM_PROMPT_CACHE", "JUPYTER_LLM_IDLE_SETTLE")}
    os.environ["JUPYTER_LLM_PROMPT_CACHE"] = "1"
    os.environ["JUPYTER_LLM_IDLE_SETTLE"] = "1" if settle_idle else "0"
    try:
        rt = Runtime.start(Path(args.model), LoadOptions(gpu_layers=0, n_ctx=args.ctx, threads=args.threads,
                                                             flash_attn=flash_attn))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    with rt:
        messages = [{"role": "user", "content": QUESTION}]
        first = rt.chat(messages, SamplingOptions(temperature=0, max_tokens=256, seed=1)).result
        before = cpu_seconds(rt.pid)
        time.sleep(10)
        idle_cpu = cpu_seconds(rt.pid) - before
        messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Now make it shorter."}]
        second = rt.chat(messages, SamplingOptions(temperature=0, max_tokens=16, seed=1)).result
    return {"idle_cpu_s": idle_cpu, "second_ttft_s": second.ttft_s or 0.0,
            "second_cached": float(second.prompt_tokens_cached), "second_prompt": float(second.prompt_tokens)}


def start_llama_server(args: argparse.Namespace, binary: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    import bench_server

    port = free_port()
    log = open(Path(tempfile.gettempdir()) / "bench_llama_server.log", "wb")  # noqa: SIM115 — lives with proc
    proc = subprocess.Popen([str(binary), "-m", args.model, "--host", "127.0.0.1", "--port", str(port),
                             "-t", str(args.threads), "-np", str(args.parallel), "-c", str(args.ctx * args.parallel),
                             "-ngl", "0"], stdout=log, stderr=log, env=clean_env())
    url = f"http://127.0.0.1:{port}"
    bench_server.wait_until_up(proc, f"{url}/health", "llama-server", log.name)
    return proc, {"url": url, "token": "", "model": Path(args.model).name}


def start_ours(args: argparse.Namespace) -> tuple[subprocess.Popen[str], dict[str, str]]:
    import bench_server

    # Each server as its users have it: llama-server keeps prompts (cache_prompt) by default, and
    # so do we; only the single-stream comparisons with the plain loop switch our cache off.
    saved = os.environ.pop("JUPYTER_LLM_PROMPT_CACHE", None)
    try:
        return bench_server.start_ours(args)
    finally:
        if saved is not None:
            os.environ["JUPYTER_LLM_PROMPT_CACHE"] = saved


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.stdin is not None:
        proc.stdin.close()
    else:
        proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stream_times(info: dict[str, str], prompt: str, tokens: int, out: list[list[float]]) -> None:
    """One streamed chat request; appends [start, time of each content chunk …]."""
    import httpx

    headers = {"Authorization": f"Bearer {info['token']}"} if info["token"] else {}
    body = {"model": info["model"], "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0, "stream": True}
    times = [time.perf_counter()]
    with httpx.Client(timeout=600) as client, \
            client.stream("POST", f"{info['url']}/v1/chat/completions", json=body, headers=headers) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:]).get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    times.append(time.perf_counter())
    out.append(times)


def long_prompt(tokenizer: Any, n_tokens: int) -> str:
    """A prompt of about ``n_tokens`` tokens that no cache holds (it starts with a fresh nonce)."""
    words = [f"item{i % 97}" for i in range(n_tokens)]
    per_word = tokenizer.count(" ".join(words)) / len(words)
    words = words[:int(n_tokens / per_word)]
    return f"{os.urandom(6).hex()}: summarise this list in one sentence: {' '.join(words)}"


def under_load(info: dict[str, str], args: argparse.Namespace, late_prompt: str, late_tokens: int) -> dict[str, float]:
    """``parallel - 1`` requests generating, then one more arrives: its first token, and the
    longest pause the generating ones saw from its arrival until its first token (+0.5 s)."""
    background: list[list[float]] = []
    others = [threading.Thread(target=stream_times, args=(info, PROMPTS[i], args.tokens * 4, background))
              for i in range(args.parallel - 1)]
    for t in others:
        t.start()
    time.sleep(1.0)  # they are generating now
    late: list[list[float]] = []
    stream_times(info, late_prompt, late_tokens, late)
    for t in others:
        t.join()
    start, first = late[0][0], late[0][1]
    gaps = [b - a for times in background for a, b in itertools.pairwise(times[1:])
            if b > start and a < first + 0.5]
    return {"ttft_s": first - start, "stall_s": max(gaps, default=0.0)}


def server_round(info: dict[str, str], args: argparse.Namespace, tokenizer: Any) -> dict[str, float]:
    """1 client, 4 clients, the first token of a request that arrives while 3 others generate,
    and what a long prompt arriving then costs those generating (the longest pause)."""
    from bench_server import run_clients

    run_clients(info, 1, 8, tokenizer)  # warm-up
    one = run_clients(info, 1, args.tokens, tokenizer)
    four = run_clients(info, args.parallel, args.tokens, tokenizer)
    late = under_load(info, args, PROMPTS[-1] + " (late)", 16)
    long = under_load(info, args, long_prompt(tokenizer, args.long_prompt), 8)
    return {"x1": one["tok_s"], f"x{args.parallel}": four["tok_s"], "ttft_under_load_s": late["ttft_s"],
            "long_ttft_s": long["ttft_s"], "long_stall_s": long["stall_s"]}


def server_pairs(args: argparse.Namespace, tokenizer: Any, llama_server: Path) -> list[dict[str, float]]:
    """Both servers up, used in turn (``args.pairs`` times): 1 client, 4 clients, and the first
    token of a request arriving while 3 others generate, each ours / llama-server's from adjacent
    runs. An idle server costs nothing (measured: ours 0.004 CPU-s/s), so the one not measured
    does not compete; the machine's drift hits both sides of a ratio alike."""
    from bench_server import run_clients

    proc, info = start_ours(args)
    proc_l, info_l = start_llama_server(args, llama_server)
    n = f"x{args.parallel}"
    out: list[dict[str, float]] = []
    try:
        for server in (info, info_l):
            run_clients(server, 1, 8, tokenizer)  # warm-up
        for k in range(args.pairs):
            got = {}
            order = (("ours", info), ("llama-server", info_l))
            for name, server in order[::-1] if k % 2 else order:  # every other pair llama-server first
                time.sleep(0.3)
                one = run_clients(server, 1, args.tokens, tokenizer)["tok_s"]
                four = run_clients(server, args.parallel, args.tokens, tokenizer)["tok_s"]
                late = under_load(server, args, PROMPTS[-1] + " (late)", 16)["ttft_s"]
                got[name] = {"x1": one, n: four, "ttft": late}
            out.append({"x1": got["ours"]["x1"] / got["llama-server"]["x1"],
                        n: got["ours"][n] / got["llama-server"][n],
                        "ttft": got["ours"]["ttft"] / got["llama-server"]["ttft"],
                        **{f"{k} {name}": v for name, res in got.items() for k, v in res.items()}})
    finally:
        stop(proc)
        stop(proc_l)
    return out


# -- main ----------------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a GGUF (default: the tests' SmolLM2 Q4_1, fetched if missing)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=physical_cores(), help="default: physical cores, as ours")
    p.add_argument("--ctx", type=int, default=2048, help="context per request (and of the single streams)")
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--long-prompt", type=int, default=1500, help="tokens of the long prompt arriving under load")
    # Single pairs of 128 tokens swing by ±15 % on this shared machine (a run's %%chat pairs read
    # 0.85-1.18) and their first tokens by ±40 ms (the prompt's evaluation), so the median of 12
    # moved by 0.04 and by 10 ms between runs: the single streams, ~6.5 s a pair, get 48; the
    # servers' pairs (~25 s each) vary less between runs.
    p.add_argument("--stream-pairs", type=int, default=48, help="alternating runs against the plain loop")
    p.add_argument("--pairs", type=int, default=12, help="alternating runs of the two servers")
    args = p.parse_args()
    from tests.model import default_model

    args.model = args.model or str(default_model())  # a fresh clone has none yet

    build = subprocess.run(["bash", str(ROOT / "scripts" / "build-llama-cpp.sh")], capture_output=True, text=True)
    if build.returncode != 0:
        raise SystemExit(f"could not build llama.cpp's tools: {build.stderr.strip()[-500:]}")
    llama_server = Path(build.stdout.strip().splitlines()[-1]) / "llama-server"

    import bench_server

    from jupyter_llm.manager import get_manager
    from jupyter_llm.options import LoadOptions
    from tests.kernel import Kernel

    home = tempfile.mkdtemp(prefix="bench-speed-")
    os.environ["JUPYTER_LLM_HOME"] = home
    # The plain loop evaluates its prompt every time: ours must too, or the first token compares
    # a cached prompt with a fresh one (the workers, the kernel and the API server inherit this).
    os.environ["JUPYTER_LLM_PROMPT_CACHE"] = "0"
    manager = get_manager()
    loaded = manager.load(args.model, LoadOptions(gpu_layers=0, n_ctx=args.ctx, threads=args.threads))
    prompt = loaded.runtime.render([{"role": "user", "content": QUESTION}])  # the same prompt for all
    manager.unload(all=True)
    tokenizer = bench_server.Tokenizer(args.model)
    kernel = Kernel({"JUPYTER_LLM_HOME": home})
    kernel.ok("%load_ext jupyter_llm")

    print(f"model {Path(args.model).name}, {args.threads} threads, ctx {args.ctx} per stream, {args.tokens} "
          f"greedy tokens, {args.parallel} slots, {args.rounds} rounds; CPU: {_cpu()}", flush=True)
    rows: dict[str, list[dict[str, float]]] = {}
    try:
        for r in range(args.rounds):
            got = {"plain loop": plain_loop(args, prompt),
                   "plain PASSIVE": plain_loop(args, prompt, wait_policy="PASSIVE"), "Python API": python_api(args),
                   "%%chat": chat_cell(args, kernel)}
            proc, info = start_ours(args)
            try:
                got["our API"] = server_round(info, args, tokenizer)
            finally:
                stop(proc)
            proc_l, info_l = start_llama_server(args, llama_server)
            try:
                got["llama-server"] = server_round(info_l, args, tokenizer)
            finally:
                stop(proc_l)
            for name, res in got.items():
                rows.setdefault(name, []).append(res)
                print(f"round {r + 1}: {name:>13}: " + ", ".join(f"{k} {v:.4g}" for k, v in res.items()), flush=True)
        cache = {mode: idle_and_second_turn(args, settle, fa)  # once each: 10 s + 256 tokens
                 for mode, settle, fa, _ in SECOND_TURN}
        for mode, res in cache.items():
            print(f"prompt cache on, {mode:>36}: " + ", ".join(f"{k} {v:.4g}" for k, v in res.items()), flush=True)
        pairs = paired(args, prompt, kernel)
        for name, runs in pairs.items():
            for k, run in enumerate(runs):
                print(f"pair {k + 1}: {name:>10}: plain {run['plain_tok_s']:.1f} tok/s, ours {run['tok_s']:.1f} "
                      f"(ratio {run['ratio']:.3f}), first token ours − plain {run['ttft_ms']:.1f} ms", flush=True)
        servers = server_pairs(args, tokenizer, llama_server)
        for k, run in enumerate(servers):
            print(f"pair {k + 1}: servers: " + ", ".join(f"{key} {v:.4g}" for key, v in run.items()), flush=True)
    finally:
        kernel.close()
        manager.close()

    med = {name: {k: statistics.median(x[k] for x in v) for k in v[0]} for name, v in rows.items()}
    plain, api, chat, ours, base = (med[n] for n in ("plain loop", "Python API", "%%chat", "our API", "llama-server"))
    n = f"x{args.parallel}"
    def pair_median(name: str, key: str) -> float:
        return statistics.median(run[key] for run in pairs[name])

    table = [
        ("Python API / plain loop tok/s, pairs", pair_median("Python API", "ratio"), "≥ 0.95"),
        ("%%chat / plain loop tok/s, pairs", pair_median("%%chat", "ratio"), "≥ 0.95"),
        ("Python API TTFT − plain loop (ms), pairs", pair_median("Python API", "ttft_ms"), "≤ 10"),
        ("%%chat TTFT − plain loop (ms), pairs", pair_median("%%chat", "ttft_ms"), "≤ 10"),
        ("  the same from the rounds: Python API tok/s", api["tok_s"] / plain["tok_s"], "(shown)"),
        ("  %%chat tok/s", chat["tok_s"] / plain["tok_s"], "(shown)"),
        ("  Python API TTFT − plain (ms)", (api["ttft_s"] - plain["ttft_s"]) * 1000, "(shown)"),
        ("  %%chat TTFT − plain (ms)", (chat["ttft_s"] - plain["ttft_s"]) * 1000, "(shown)"),
        ("our API x1 / llama-server x1, pairs", statistics.median(r["x1"] for r in servers), "≥ 0.95"),
        (f"our API {n} / llama-server {n}, pairs", statistics.median(r[n] for r in servers), "≥ 1.0"),
        ("TTFT under load: ours / llama-server, pairs", statistics.median(r["ttft"] for r in servers), "≤ 1.0"),
        ("  the same from the rounds: x1", ours["x1"] / base["x1"], "(shown)"),
        (f"  {n}", ours[n] / base[n], "(shown)"),
        ("  TTFT under load", ours["ttft_under_load_s"] / base["ttft_under_load_s"], "(shown)"),
        (f"{args.long_prompt}-token arrival, TTFT ours / llama-server", ours["long_ttft_s"] / base["long_ttft_s"],
         "(shown)"),
        ("  longest pause of those generating, ours / l-s", ours["long_stall_s"] / base["long_stall_s"], "(≤ 1)"),
        ("  the same, ours in ms", ours["long_stall_s"] * 1000, "(shown)"),
        ("kernel cell while generating / idle", chat["cell_busy_over_idle"], "≤ 2"),
        ("worker CPU s in 10 s after an answer", chat["idle_cpu_s"], "< 0.05"),
        *((row, value, target) for mode, _, _, idle_target in SECOND_TURN for row, value, target in (
            (f"second turn, prompt cache on, {mode}: TTFT ms", cache[mode]["second_ttft_s"] * 1000, "(shown)"),
            ("  its prompt tokens reused", cache[mode]["second_cached"], f"(of {cache[mode]['second_prompt']:.0f})"),
            ("  worker CPU s in the 10 s before it", cache[mode]["idle_cpu_s"], idle_target))),
        ("plain loop OMP default / PASSIVE tok/s", plain["tok_s"] / med["plain PASSIVE"]["tok_s"], "(> 1: default)"),
    ]
    print("\nmedians: " + json.dumps(med))
    print("\nresult (medians of rounds):")
    for label, value, target in table:
        print(f"  {label:>40}: {value:8.3f}   target {target}")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
