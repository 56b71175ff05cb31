"""The greedy fast path of ``worker/sampler.py``: numpy's argmax of a row instead of llama.cpp's
greedy sampler chain, which must pick the very same token every time.

The real test runs both on the real model and on a tiny random one, four sequences decoding in
one batch (rows other than 0), and feeds the chain's token back so the two meet many different
rows. The tie rule (the first of equal logits, as llama.cpp's greedy loop keeps it) is checked on
a crafted row, since real logits rarely tie.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from collections import deque
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from jupyter_llm.worker.sampler import Sampler, sampler_chain
from tests import ggufs

BOTH = r"""
import json, sys
from collections import deque
import llama_cpp as L
from jupyter_llm.worker.sampler import sampler_chain

keep = L.llama_log_callback(lambda *a: None)
L.llama_log_set(keep, None)
L.llama_backend_init()
mp = L.llama_model_default_params()
mp.use_extra_bufts = False
model = L.llama_model_load_from_file(sys.argv[1].encode(), mp)
vocab = L.llama_model_get_vocab(model)
cp = L.llama_context_default_params()
cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max, cp.kv_unified = 2048, 256, 256, 4, False
cp.n_threads = cp.n_threads_batch = 2
ctx = L.llama_init_from_model(model, cp)
batch = L.llama_batch_init(256, 0, 1)
greedy = dict(temperature=0.0, repeat_penalty=1.0, top_k=40, top_p=0.9, min_p=0.05)
fast = [sampler_chain(L, vocab, greedy, None, 0, deque()) for _ in range(4)]
chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())

def put(i, tok, pos, seq, logits):
    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = tok, pos, 1, seq, logits

prompts = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]
last, pos, n = [], [], 0
for seq, text in enumerate(prompts):
    buf = (L.llama_token * 64)()
    k = L.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, 64, True, True)
    for j in range(k):
        put(n + j, buf[j], j, seq, j == k - 1)
    n += k
    last.append(n - 1)
    pos.append(k)
batch.n_tokens = n
assert L.llama_decode(ctx, batch) == 0
same = rows = 0
picked = set()
for step in range(48):
    tokens = []
    for seq, row in enumerate(last):
        mine, theirs = fast[seq].sample(ctx, row), int(L.llama_sampler_sample(chain, ctx, row))
        same += mine == theirs
        rows += 1
        picked.add(theirs)
        tokens.append(theirs)
    for seq, tok in enumerate(tokens):
        put(seq, tok, pos[seq], seq, True)
        pos[seq] += 1
    last = list(range(4))
    batch.n_tokens = 4
    assert L.llama_decode(ctx, batch) == 0
print(json.dumps({"same": same, "rows": rows, "distinct": len(picked), "fast": [f._np is not None for f in fast]}))
"""


@pytest.mark.parametrize("which", ["smollm2", "tiny"])
def test_the_fast_greedy_path_picks_what_llama_cpp_greedy_picks(which: str, smollm2_path: Path,
                                                                tmp_path: Path) -> None:
    path = smollm2_path if which == "smollm2" else ggufs.write_tiny_llama(tmp_path / "tiny.gguf")
    out = subprocess.run([sys.executable, "-c", BOTH, str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["fast"] == [True] * 4
    assert result["rows"] == 4 * 48
    assert result["same"] == result["rows"], result
    # many different rows and tokens, not one repeated answer (the tiny random model repeats more)
    assert result["distinct"] > (4 if which == "smollm2" else 1), result


class _Fake:
    """Just enough of llama_cpp for :func:`sampler_chain` to choose a path, and one crafted row."""

    llama_token_data = ctypes.c_float * 3  # (its size is all the constructor needs)

    def __init__(self, row: list[float]) -> None:
        self.row = (ctypes.c_float * len(row))(*row)
        self.freed = 0

    def __getattr__(self, name: str) -> Any:
        return lambda *a: SimpleNamespace(no_perf=False) if name.endswith("default_params") else name

    def llama_vocab_n_tokens(self, _vocab: Any) -> int:
        return len(self.row)

    def llama_get_logits_ith(self, _ctx: Any, idx: int) -> Any:
        return ctypes.cast(self.row, ctypes.POINTER(ctypes.c_float)) if idx == 0 else None


SAMPLING = dict(temperature=0.0, repeat_penalty=1.0, top_k=40, top_p=0.9, min_p=0.05)


def test_ties_go_to_the_first_token_as_in_llama_cpp_greedy_loop() -> None:
    L = _Fake([1.0, 3.0, -2.0, 3.0, 3.0])
    s = sampler_chain(L, None, SAMPLING, None, 0, deque())
    assert s.sample(None, 0) == 1


def test_a_missing_row_is_an_error_not_a_crash() -> None:
    from jupyter_llm.worker import RequestError

    s = sampler_chain(_Fake([0.0, 1.0]), None, SAMPLING, None, 0, deque())
    with pytest.raises(RequestError, match="no logits for batch row 3"):
        s.sample(None, 3)


@pytest.mark.parametrize("change", [{"repeat_penalty": 1.1}, {"temperature": 0.7}, "grammar"])
def test_only_a_chain_of_greedy_alone_takes_the_fast_path(change: Any) -> None:
    L = _Fake([0.0, 1.0])
    sampling = SAMPLING if change == "grammar" else {**SAMPLING, **change}
    s: Sampler = sampler_chain(L, None, sampling, 'root ::= "a"' if change == "grammar" else None, 0, deque())
    assert s._np is None
    assert sampler_chain(L, None, SAMPLING, None, 0, deque())._np is not None
