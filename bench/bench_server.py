"""Benchmark: concurrent streaming clients against our API, llama-cpp-python's server, and raw llama.cpp.

Three contenders, same model, same threads, same context per request, greedy decoding:

- **ours**: the jupyter_llm API (``jupyter_llm.server``) in its own process, standing in for the
  kernel, with the model loaded in ``--parallel`` slots (continuous batching in the worker);
- **llama-cpp-python**: ``python -m llama_cpp.server`` (its own process; one request at a time
  behind its lock). It needs ``fastapi sse-starlette starlette-context pydantic-settings`` in
  the venv. On Intel AMX CPUs its default model load crashes (docs/notes.md §2), so it is started
  through a two-line wrapper that turns llama.cpp's CPU extra buffer types off — as our worker
  does — and changes nothing else;
- **raw**: one llama.cpp decode loop in a process of its own (no HTTP, no IPC): the ceiling for
  a single stream.

1 and 4 clients stream ``/v1/chat/completions`` at once, each with its own prompt; aggregate
tok/s = all generated tokens (retokenized from the streamed text, the same way for both
servers) / wall time from the first request to the last byte. Rounds alternate the contenders
so that noise from other work on the machine hits all alike; medians are printed, then the
ratios and the targets (ours×4 ≥ 1.4 × ours×1, ours×4 ≥ 1.3 × llama-cpp-python×4).

    .venv/bin/python bench/bench_server.py [--model PATH] [--tokens 128] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
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
PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Describe, in detail, a day in the life of a medieval blacksmith.",
    "Explain how a steam engine works, step by step, for a curious child.",
    "Write a travel guide to an imaginary island with three towns.",
]
LLAMA_CPP_SERVER = """
import sys
import llama_cpp.llama_cpp as C
_default = C.llama_model_default_params
def _params():
    params = _default()
    params.use_extra_bufts = False  # docs/notes.md §2: the CPU extra buffer types crash quantized models here
    return params
C.llama_model_default_params = _params
from llama_cpp.server.__main__ import main
sys.argv = ["llama_cpp.server", *sys.argv[1:]]
main()
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["GGML_NO_BACKTRACE"] = "1"
    return env


# -- contenders ---------------------------------------------------------------------------------

def serve_ours(args: argparse.Namespace) -> None:
    """``--ours-server``: a stand-in kernel: manager, model loaded with N slots, the API on a free port."""
    from jupyter_llm import server
    from jupyter_llm.manager import ModelManager
    from jupyter_llm.options import LoadOptions
    from jupyter_llm.store.records import Store
    from jupyter_llm.store.sources import Pulled

    manager = ModelManager(Store(root=Path(tempfile.mkdtemp()) / "records"))
    manager.store.put("bench", Pulled("local", [Path(args.model)], owned=[]))
    manager.load("bench", LoadOptions(gpu_layers=0, n_ctx=args.ctx * args.parallel, parallel=args.parallel,
                                      threads=args.threads, keep_alive=None), pull=False)
    running = server.serve(manager, port=0, parallel=args.parallel)
    print(json.dumps({"url": running.url, "token": running.token, "model": "bench"}), flush=True)
    sys.stdin.read()  # serve until the parent closes our stdin
    server.stop(manager)
    manager.close()


def start_ours(args: argparse.Namespace) -> tuple[subprocess.Popen[str], dict[str, str]]:
    proc = subprocess.Popen([sys.executable, __file__, "--ours-server", "--model", args.model, "--threads",
                             str(args.threads), "--ctx", str(args.ctx), "--parallel", str(args.parallel)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout is not None
    info = json.loads(proc.stdout.readline())
    return proc, info


def start_llama_cpp(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], dict[str, str]]:

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(Path(tempfile.gettempdir()) / "bench_llama_cpp_server.log", "wb")  # noqa: SIM115 — lives with proc
    proc = subprocess.Popen([sys.executable, "-c", LLAMA_CPP_SERVER, "--model", args.model, "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", str(args.ctx), "--n_threads", str(args.threads),
                             "--n_threads_batch", str(args.threads), "--n_batch", "512", "--n_gpu_layers", "0",
                             "--interrupt_requests", "False", "--verbose", "False"], stdout=log, stderr=log, env=_env())
    url = f"http://127.0.0.1:{port}"
    wait_until_up(proc, f"{url}/v1/models", "llama_cpp.server", log.name)
    return proc, {"url": url, "token": "", "model": Path(args.model).name}


def wait_until_up(proc: subprocess.Popen[Any], probe: str, what: str, log: str, seconds: float = 120) -> None:
    """Wait until ``probe`` answers 200; SystemExit (naming the log) if the server dies or never does."""
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(probe, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{what} did not start; see {log}")


def raw_loop(args: argparse.Namespace) -> None:
    """``--raw``: one stream through llama.cpp's C API: prompt, then greedy decode of N tokens."""
    import llama_cpp as L

    quiet = L.llama_log_callback(lambda level, text, user: None)  # kept referenced: see docs/notes.md §2
    L.llama_log_set(quiet, None)
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.use_extra_bufts = False
    model = L.llama_model_load_from_file(args.model.encode(), mp)
    vocab = L.llama_model_get_vocab(model)
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = args.ctx, 512, 512, 1
    cp.n_threads = cp.n_threads_batch = args.threads
    cp.no_perf = True
    ctx = L.llama_init_from_model(model, cp)
    batch = L.llama_batch_init(512, 0, 1)
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
    text = f"<|im_start|>user\n{PROMPTS[0]}<|im_end|>\n<|im_start|>assistant\n".encode()
    buf = (L.llama_token * 1024)()
    n = L.llama_tokenize(vocab, text, len(text), buf, 1024, True, True)

    def put(i: int, tok: int, pos: int, logits: bool) -> None:
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = tok, pos, 1, 0, logits

    results = []
    for _ in range(2):  # the first run warms the page cache; the second is measured
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        t0 = time.perf_counter()
        for i in range(n):
            put(i, buf[i], i, i == n - 1)
        batch.n_tokens = n
        assert L.llama_decode(ctx, batch) == 0
        token = L.llama_sampler_sample(chain, ctx, n - 1)
        t_first = time.perf_counter()
        for k in range(args.tokens - 1):  # ignore end-of-turn: exactly N tokens
            put(0, token, n + k, True)
            batch.n_tokens = 1
            assert L.llama_decode(ctx, batch) == 0
            token = L.llama_sampler_sample(chain, ctx, 0)
        t_end = time.perf_counter()
        results.append({"tok_s": args.tokens / (t_end - t0), "decode_tok_s": (args.tokens - 1) / (t_end - t_first)})
    print(json.dumps(results[-1]), flush=True)


def run_raw(args: argparse.Namespace) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--raw", "--model", args.model, "--threads", str(args.threads),
                          "--ctx", str(args.ctx), "--tokens", str(args.tokens)],
                         capture_output=True, text=True, env=_env(), check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- clients ------------------------------------------------------------------------------------

class Tokenizer:
    """Counts tokens of streamed text the same way for every server (the model's own vocabulary)."""

    def __init__(self, model: str) -> None:
        import llama_cpp as L

        self.L = L
        self._quiet = L.llama_log_callback(lambda level, text, user: None)
        L.llama_log_set(self._quiet, None)
        mp = L.llama_model_default_params()
        mp.vocab_only = True
        self.model = L.llama_model_load_from_file(model.encode(), mp)
        self.vocab = L.llama_model_get_vocab(self.model)

    def count(self, text: str) -> int:
        data = text.encode()
        buf = (self.L.llama_token * (len(data) + 8))()
        return int(self.L.llama_tokenize(self.vocab, data, len(data), buf, len(data) + 8, False, False))


def stream_one(info: dict[str, str], prompt: str, tokens: int, out: list[Any]) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {info['token']}"} if info["token"] else {}
    body = {"model": info["model"], "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0, "stream": True}
    parts: list[str] = []
    t0 = time.perf_counter()
    first = None
    with httpx.Client(timeout=600) as client, \
            client.stream("POST", f"{info['url']}/v1/chat/completions", json=body, headers=headers) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            content = (choices[0].get("delta") or {}).get("content") if choices else None
            if content:
                if first is None:
                    first = time.perf_counter() - t0
                parts.append(content)
    out.append(("".join(parts), t0, time.perf_counter(), first))


def run_clients(info: dict[str, str], n: int, tokens: int, tokenizer: Tokenizer) -> dict[str, float]:
    out: list[Any] = []
    threads = [threading.Thread(target=stream_one, args=(info, PROMPTS[i % len(PROMPTS)], tokens, out))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if len(out) != n:
        raise SystemExit(f"only {len(out)} of {n} clients finished against {info['url']}")
    total = sum(tokenizer.count(text) for text, *_ in out)
    wall = max(end for _, _, end, _ in out) - min(start for _, start, _, _ in out)
    return {"tok_s": total / wall, "tokens": total, "ttft": statistics.median(f for *_, f in out if f is not None)}


# -- main ---------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a GGUF (default: the tests' SmolLM2 Q4_1, fetched if missing)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per client")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=2048, help="context per request")
    parser.add_argument("--parallel", type=int, default=4, help="our slots")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument("--ours-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from tests.model import default_model

    args.model = args.model or str(default_model())  # a fresh clone has none yet
    if args.ours_server:
        return serve_ours(args)
    if args.raw:
        return raw_loop(args)

    tokenizer = Tokenizer(args.model)
    print(f"model {Path(args.model).name}, {args.threads} threads, context {args.ctx} per request, "
          f"{args.tokens} tokens per client, our slots {args.parallel}, {args.rounds} rounds", flush=True)
    servers: dict[str, tuple[Any, dict[str, str]]] = {"ours": start_ours(args)}
    if not args.skip_llama_cpp:
        servers["llama-cpp-python"] = start_llama_cpp(args)
    results: dict[str, list[dict[str, float]]] = {}
    try:
        for _name, (_, info) in servers.items():  # warm-up: first request, page cache
            run_clients(info, 1, 8, tokenizer)
        for r in range(args.rounds):
            for name, (_, info) in servers.items():
                for n in (1, args.clients):
                    res = run_clients(info, n, args.tokens, tokenizer)
                    results.setdefault(f"{name} x{n}", []).append(res)
                    print(f"  round {r + 1}: {name:>16} x{n}: {res['tok_s']:6.1f} tok/s "
                          f"(ttft {res['ttft'] * 1000:.0f} ms)", flush=True)
            raw = run_raw(args)
            results.setdefault("raw x1", []).append(raw)
            print(f"  round {r + 1}: {'raw llama.cpp':>16} x1: {raw['tok_s']:6.1f} tok/s "
                  f"(decode only {raw['decode_tok_s']:.1f})", flush=True)
    finally:
        for proc, _ in servers.values():
            if proc.stdin is not None:
                proc.stdin.close()
            else:
                proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    med = {k: statistics.median(r["tok_s"] for r in v) for k, v in results.items()}
    print("\naggregate tok/s (median of rounds):")
    for k, v in med.items():
        print(f"  {k:>22}: {v:6.1f}")
    n = args.clients
    rows = [(f"ours x{n} / ours x1", med[f"ours x{n}"] / med["ours x1"], "target ≥ 1.4")]
    if f"llama-cpp-python x{n}" in med:
        rows += [(f"ours x{n} / llama-cpp-python x{n}", med[f"ours x{n}"] / med[f"llama-cpp-python x{n}"],
                  "target ≥ 1.3"),
                 (f"llama-cpp-python x{n} / x1", med[f"llama-cpp-python x{n}"] / med["llama-cpp-python x1"], ""),
                 ("llama-cpp-python x1 / raw", med["llama-cpp-python x1"] / med["raw x1"], "")]
    rows.append(("ours x1 / raw", med["ours x1"] / med["raw x1"], ""))
    print("\nratios:")
    for label, ratio, target in rows:
        print(f"  {label:>34} = {ratio:.2f}" + (f"  ({target})" if target else ""))

if __name__ == "__main__":
    main()
