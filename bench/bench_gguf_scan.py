"""Header scan vs gguf.GGUFReader on the default model: prints both timings and the ratio.

Run: ``.venv/bin/python bench/bench_gguf_scan.py [path.gguf]`` (default: the test cache's
SmolLM2-135M-Instruct Q4_1). The scan should take tens of milliseconds where the reader takes
seconds, because the reader parses every tokenizer array element.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _best(fn, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    if not path.exists():
        from tests.model import default_model

        path = default_model()
    import gguf

    from jupyter_llm.store.gguf import scan

    scan(path)  # warm the page cache and the deferred imports
    scan_best, scan_median = _best(lambda: scan(path), 20)
    reader_best, reader_median = _best(lambda: gguf.GGUFReader(path), 2)
    info = scan(path)
    print(f"file: {path.name} ({info.file_size / 1e6:.1f} MB, {len(info.tensors)} tensors, "
          f"{len(info.metadata)} metadata keys)")
    print(f"gguf_scan.scan     best {scan_best * 1e3:8.1f} ms   median {scan_median * 1e3:8.1f} ms")
    print(f"gguf.GGUFReader    best {reader_best * 1e3:8.1f} ms   median {reader_median * 1e3:8.1f} ms")
    print(f"ratio (reader / scan, best): {reader_best / scan_best:.0f}x")


if __name__ == "__main__":
    main()
