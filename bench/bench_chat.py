"""Benchmark: `%%chat` streaming into a real kernel's cell and the Python API, against the raw
llama.cpp decode loop — same model, threads, context, prompt (the chat-templated one) and
number of greedy tokens.

Prints tok/s and time to first token for each, and the ratios. Targets (issue 3): `%%chat`
≥ 0.97× raw tok/s, time-to-first-token overhead ≤ 10 ms. Rounds alternate between the three
so that the shared machine's noise hits all alike; medians are reported.

    .venv/bin/python bench/bench_chat.py [--rounds 5] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

QUESTION = ("Write a long story about a lighthouse keeper who finds a message in a bottle. Describe the sea, "
            "the weather and the village in detail.")


def kernel_round(kernel: object, tokens: int) -> dict[str, float]:
    """One `%%chat` turn; times are taken where the user sees them (iopub arrival)."""
    seen: list[tuple[float, str]] = []

    def on_message(msg: dict) -> None:
        if msg["msg_type"] in ("display_data", "update_display_data"):
            seen.append((time.perf_counter(), msg["content"]["data"].get("text/markdown", "")))

    t0 = time.perf_counter()
    run = kernel.run(  # type: ignore[attr-defined]
        f"%%chat --new --temperature 0 --max-tokens {tokens} --seed 1\n{QUESTION}", on_message=on_message)
    assert run.status == "ok", run.error
    meta = run.updates()[-1]["content"]["metadata"]["jupyter_llm"]
    first = next(t for t, text in seen if text.replace("▌", "").strip())
    last = seen[-1][0]
    n = meta["completion_tokens"]
    return {"ttft_s": first - t0, "tok_per_s": (n - 1) / (last - first), "tokens": n}


def ttft_pairs(kernel: object, raw: Any, prompt: str, pairs: int) -> list[float]:
    """Alternating short runs (2 tokens) of the raw loop and `%%chat`: per-pair TTFT differences."""
    diffs = []
    for _ in range(pairs):
        r = raw.run(prompt, 2)["ttft_s"]
        c = kernel_round(kernel, 2)["ttft_s"]
        diffs.append(c - r)
    return diffs


def api_round(model: object, tokens: int) -> dict[str, float]:
    t0 = time.perf_counter()
    times = []
    for _piece in model.chat(QUESTION, stream=True, temperature=0, max_tokens=tokens, seed=1):  # type: ignore[attr-defined]
        times.append(time.perf_counter())
    span = times[-1] - times[0]
    return {"ttft_s": times[0] - t0, "tok_per_s": (len(times) - 1) / span if span else 0.0, "tokens": len(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a GGUF (default: the tests' SmolLM2 Q4_1, fetched if missing)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--prompt-cache", action="store_true", help="leave the workers' prompt cache on")
    p.add_argument("--ttft-pairs", type=int, default=15)
    args = p.parse_args()
    from tests.model import default_model

    args.model = args.model or str(default_model())  # a fresh clone has none yet
    threads = os.cpu_count() or 1

    from jupyter_llm.manager import get_manager
    from jupyter_llm.options import LoadOptions
    from jupyter_llm.store.sources import Pulled
    from tests.kernel import Kernel

    home = tempfile.mkdtemp(prefix="bench-chat-")
    os.environ["JUPYTER_LLM_HOME"] = home
    # The raw loop has no prompt cache: measure our overhead like for like (the cache's own gain
    # is measured by bench_runtime.py --chat-only).
    os.environ["JUPYTER_LLM_PROMPT_CACHE"] = "1" if args.prompt_cache else "0"
    manager = get_manager()
    manager.store.put("smollm2", Pulled("pip", [Path(args.model)], owned=[]))
    options = LoadOptions(gpu_layers=0, n_ctx=args.ctx, threads=threads, keep_alive=None)

    # The exact prompt all three evaluate: the chat template applied by the model's worker.
    loaded = manager.load("smollm2", options)
    prompt = loaded.runtime.render([{"role": "user", "content": QUESTION}])
    manager.unload("smollm2")

    kernel = Kernel({"JUPYTER_LLM_HOME": home})
    kernel.ok("%load_ext jupyter_llm")
    kernel.ok(f"%llm load smollm2 --ctx {args.ctx} --threads {threads} --keep-alive -1 --gpu-layers 0")
    kernel_round(kernel, 8)  # warm-up

    results: dict[str, list[dict[str, float]]] = {"raw": [], "chat": [], "api": []}
    import bench_runtime

    # The raw loop stays loaded in its own process (idle while the others run: OpenMP waits passively).
    raw = bench_runtime.RawProcess(argparse.Namespace(model=args.model, tokens=args.tokens, ctx=args.ctx,
                                                      threads=threads, batch=512))
    n_tokens = args.tokens
    try:
        for r in range(args.rounds):
            results["chat"].append(kernel_round(kernel, args.tokens))
            n_tokens = int(results["chat"][-1]["tokens"])
            kernel.ok("%llm unload --all")  # one model at a time on 2 cores
            results["raw"].append(raw.run(prompt, n_tokens))
            import jupyter_llm as llm

            model = llm.load("smollm2", **options.to_dict())
            api_round(model, 4)  # warm-up, as the kernel and the raw loop had
            results["api"].append(api_round(model, n_tokens))
            llm.unload(all=True)
            kernel.ok(f"%llm load smollm2 --ctx {args.ctx} --threads {threads} --keep-alive -1 --gpu-layers 0")
            print(f"round {r + 1}: " + ", ".join(
                f"{k} {v[-1]['tok_per_s']:.1f} tok/s ttft {v[-1]['ttft_s'] * 1000:.0f} ms" for k, v in results.items()),
                flush=True)
        # Time to first token, on its own: both models loaded, alternating 2-token runs, so that
        # the noise of this shared machine hits both alike.
        diffs = ttft_pairs(kernel, raw, prompt, args.ttft_pairs)
    finally:
        raw.close()
        kernel.close()
        manager.close()

    med = {k: {m: statistics.median(x[m] for x in v) for m in ("tok_per_s", "ttft_s")} for k, v in results.items()}
    print(f"\nmodel {Path(args.model).name}, {threads} threads, ctx {args.ctx}, {n_tokens} greedy tokens, "
          f"{args.rounds} rounds (medians)")
    for name, label in (("raw", "raw llama.cpp loop"), ("chat", "%%chat in a kernel"), ("api", "Python API")):
        print(f"  {label:22s} {med[name]['tok_per_s']:7.1f} tok/s   first token {med[name]['ttft_s'] * 1000:7.1f} ms")
    pairs = list(zip(results["chat"], results["raw"], strict=True))
    paired = statistics.median(c["tok_per_s"] / r["tok_per_s"] for c, r in pairs)
    paired_ttft = statistics.median(c["ttft_s"] - r["ttft_s"] for c, r in pairs)
    print(f"  %%chat / raw tok/s:      {med['chat']['tok_per_s'] / med['raw']['tok_per_s']:.3f}  (target ≥ 0.97); "
          f"median of per-round ratios {paired:.3f}")
    print(f"  API / raw tok/s:         {med['api']['tok_per_s'] / med['raw']['tok_per_s']:.3f}")
    print(f"  %%chat TTFT overhead:    {(med['chat']['ttft_s'] - med['raw']['ttft_s']) * 1000:+.1f} ms  (target ≤ 10); "
          f"median of per-round differences {paired_ttft * 1000:+.1f} ms")
    print(f"  API TTFT overhead:       {(med['api']['ttft_s'] - med['raw']['ttft_s']) * 1000:+.1f} ms")
    q1, _, q3 = statistics.quantiles(diffs, n=4)
    print(f"  %%chat TTFT overhead, {len(diffs)} alternating 2-token pairs: median "
          f"{statistics.median(diffs) * 1000:+.1f} ms (quartiles {q1 * 1000:+.1f} / {q3 * 1000:+.1f} ms; target ≤ 10)")
    print(json.dumps(med))


if __name__ == "__main__":
    main()
