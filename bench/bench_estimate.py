"""Estimate vs llama.cpp, and how long things take: a table for humans, not a test.

    .venv/bin/python bench/bench_estimate.py [MODEL.gguf ...]

For each model (default: the SmolLM2 test model and a tiny GGUF written on the fly) it prints,
per context / KV type / flash attention / slots, the estimated and measured (llama.cpp dry run;
weights from a real load) sizes with the error in percent; then the time of a dry run, of
``estimate``/``fit`` and of ``list_devices``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jupyter_llm.memory.devices import Device, list_devices  # noqa: E402
from jupyter_llm.memory.estimate import estimate, fit  # noqa: E402
from jupyter_llm.memory.probe import measure  # noqa: E402
from jupyter_llm.options import AUTO, LoadOptions  # noqa: E402
from jupyter_llm.store.gguf import scan  # noqa: E402

MiB = 1024**2
CASES = [
    (512, "f16", False, 1), (4096, "f16", False, 1), (8192, "f16", False, 1), (8192, "f16", True, 1),
    (32768, "f16", False, 1), (32768, "f16", True, 1), (4096, "q8_0", True, 1), (8192, "q4_0", True, 1),
    (4096, "f16", False, 4), (2000, "f16", False, 3),
]
HOST = [Device("CPU", "cpu", "host", 1 << 40, 1 << 40, 0)]


def pct(est: int, meas: int) -> str:
    return f"{(est - meas) / meas * 100:+6.2f}%" if meas else "   n/a"


def bench(path: Path) -> None:
    info = scan(path)
    sets = [LoadOptions(gpu_layers=0, n_ctx=c, kv_type=k, flash_attn=f, parallel=p) for c, k, f, p in CASES]
    t0 = time.perf_counter()
    dry = measure(path, sets)
    wall = time.perf_counter() - t0
    real = measure(path, [sets[1]], real=True)
    w_meas = real["model"]["devices"]["CPU"]["weights"]
    w_est = estimate(info, sets[1], HOST).weights
    print(f"\n{path.name}: weights est {w_est / MiB:.2f} MiB, real load {w_meas / MiB:.2f} MiB "
          f"({pct(w_est, w_meas)})")
    print(f"{'ctx':>6} {'kv':>5} {'fa':>2} {'p':>2} | {'KV est':>9} {'meas':>9} {'err':>7} | "
          f"{'graph est':>9} {'meas':>9} {'err':>7} | {'out est':>7} {'meas':>7}")
    for (c, k, f, p), opts, r in zip(CASES, sets, dry["results"], strict=True):
        if r.get("error"):
            print(f"{c:6} {k:>5} {int(f):2} {p:2} | {r['error']}")
            continue
        e = estimate(info, opts, HOST).device("CPU")
        m = r["devices"]["CPU"]
        print(f"{c:6} {k:>5} {int(f):2} {p:2} | {e.kv / MiB:9.2f} {r['kv_size'] / MiB:9.2f} "
              f"{pct(e.kv, r['kv_size'])} | {e.compute / MiB:9.2f} {m['compute'] / MiB:9.2f} "
              f"{pct(e.compute, m['compute'])} | {e.output / MiB:7.3f} {m['output'] / MiB:7.3f}")
    per_ctx = [r["seconds"] for r in dry["results"]]
    print(f"dry run: subprocess wall {wall:.2f} s; model {dry['seconds_model'] * 1000:.0f} ms, "
          f"per context {min(per_ctx) * 1000:.0f}–{max(per_ctx) * 1000:.0f} ms")
    t0 = time.perf_counter()
    for _ in range(20):
        estimate(info, sets[1], HOST)
    t1 = time.perf_counter()
    for _ in range(20):
        fit(info, LoadOptions(gpu_layers=AUTO, n_ctx=AUTO), HOST)
    t2 = time.perf_counter()
    print(f"estimate {(t1 - t0) / 20 * 1000:.2f} ms, fit(auto, auto) {(t2 - t1) / 20 * 1000:.2f} ms")


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]]
    if not paths:
        from tests.ggufs import write_tiny_llama
        from tests.model import default_model

        tiny = write_tiny_llama(Path(tempfile.mkdtemp()) / "tiny.gguf", n_layer=4, n_embd=256, n_head=4,
                                n_head_kv=2, n_ff=768, ctx=8192, dtype="f16", tied=False)
        paths = [default_model(), tiny]
    for path in paths:
        bench(path)
    list_devices()
    t0 = time.perf_counter()
    for _ in range(50):
        list_devices()
    print(f"\nlist_devices() {(time.perf_counter() - t0) / 50 * 1000:.2f} ms per call (after the first)")
    t0 = time.perf_counter()
    list_devices(include_llama=True)
    print(f"list_devices(include_llama=True) {(time.perf_counter() - t0) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
