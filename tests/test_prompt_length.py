"""Long prompts: refused before tokenizing when they cannot fit, tokenized in chunks otherwise, and
never in the way of other requests.

llama.cpp's tokenizer is quadratic in the number of special tokens in one call (200,000
``<|im_start|>`` took 70 s) and cannot be interrupted, so the worker bounds the bytes first and
tokenizes in pieces split where llama.cpp itself splits the text (at special tokens). The last
test proves the pieces give exactly the tokens of one call.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_llm.errors import ContextOverflowError
from jupyter_llm.options import LoadOptions, SamplingOptions
from jupyter_llm.runtime import Runtime
from tests import ggufs

GREEDY = SamplingOptions(temperature=0.0, max_tokens=4)
FLOOD = "<|im_start|>" * 200_000
"""The reported attack: 2.4 MB of one special token."""


@pytest.fixture(scope="module")
def rt(smollm2_path: Path) -> Iterator[Runtime]:
    runtime = Runtime.start(smollm2_path, LoadOptions(gpu_layers=0, n_ctx=4096, parallel=2), name="smollm2")
    yield runtime
    runtime.close()


def test_a_prompt_far_beyond_the_context_is_refused_at_once(rt: Runtime) -> None:
    t0 = time.monotonic()
    with pytest.raises(ContextOverflowError) as info:
        rt.generate(FLOOD, GREEDY).result  # noqa: B018
    assert time.monotonic() - t0 < 5  # was 70.7 s: the whole text was tokenized first
    assert info.value.n_ctx == 2048 and info.value.n_tokens is not None and info.value.n_tokens > 2048
    assert "--ctx" in str(info.value)
    with pytest.raises(ContextOverflowError):
        rt.chat([{"role": "user", "content": FLOOD}], GREEDY).result  # noqa: B018


def test_a_prompt_just_over_the_context_is_refused_after_a_few_chunks(rt: Runtime) -> None:
    # Passes the byte bound (a token can stand for many bytes), so it is tokenized, but only
    # until it has more tokens than the slot holds.
    prompt = "<|im_start|>" * 3000 + "hi " * 10_000
    assert len(prompt.encode()) < 100_000  # within the byte bound (2048 tokens × 81 bytes)
    t0 = time.monotonic()
    with pytest.raises(ContextOverflowError):
        rt.generate(prompt, GREEDY).result  # noqa: B018
    assert time.monotonic() - t0 < 5


def test_a_small_chat_does_not_wait_behind_a_long_prompt(rt: Runtime) -> None:
    first_token: dict[str, float] = {}
    big = rt.generate(FLOOD, GREEDY)

    def small() -> None:
        stream = rt.chat([{"role": "user", "content": "Say hi."}], GREEDY)
        t0 = time.monotonic()
        next(iter(stream))
        first_token["s"] = time.monotonic() - t0
        stream.result  # noqa: B018

    thread = threading.Thread(target=small)
    thread.start()
    thread.join(60)
    assert "s" in first_token and first_token["s"] < 10  # was 69.8 s behind the flood
    with pytest.raises(ContextOverflowError):
        big.result  # noqa: B018


def test_a_prompt_that_fits_is_tokenized_exactly_as_before(rt: Runtime) -> None:
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 20} for i in range(40)]
    prompt = rt.render(turns)
    assert len(prompt.encode()) > 8192  # several chunks
    assert rt.count_tokens(turns) == rt.count_tokens(prompt) >= len(rt.tokenize(prompt)) > 1000


EQUIVALENCE = r"""
import json, random, sys
import llama_cpp as L
from jupyter_llm.worker.text import Vocab, whole_tokens

keep = L.llama_log_callback(lambda *a: None)
L.llama_log_set(keep, None)
params = L.llama_model_default_params()
params.vocab_only = True
model = L.llama_model_load_from_file(sys.argv[1].encode(), params)
vocab = Vocab(L, model, chunk_bytes=64)  # tiny chunks: many splits
rng = random.Random(0)
pieces = ["<|im_start|>", "<|im_end|>", "<s>", "</s>", "<|endoftext|>", " ", "  ", "\n", "\n\n", "\t", "hello",
          " world", "ünï", "😀", "<", "|", ">", "<|im", "start|>", "a", "the", ".", "1234", "<unk>"]
bad, split = [], 0
for trial in range(400):
    text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 120)))
    for special in (True, False):
        chunked = vocab.tokenize(text, parse_special=special)
        whole = whole_tokens(L, vocab.vocab, text, False, special)
        if chunked != whole:
            bad.append([text, special])
    split += len(list(vocab._chunks(text, True))) > 1

# Between two chunks the caller may stop the work (a cancel), and it stops at the context bound.
seen = []

def check():
    seen.append(1)
    if len(seen) == 3:
        raise KeyboardInterrupt

stopped = False
try:
    vocab.tokenize("<|im_start|>" * 100_000, check=check)
except KeyboardInterrupt:
    stopped = True
over = None
try:
    vocab.tokenize("<|im_start|>" * 100_000, limit=100)
except Exception as exc:
    over = type(exc).__name__
print(json.dumps({"bad": bad[:5], "n_bad": len(bad), "split": split, "stopped": stopped, "chunks": len(seen),
                  "over": over}))
"""


@pytest.mark.parametrize("which", ["smollm2-bpe", "tiny-spm"])
def test_chunked_tokenization_equals_one_call(which: str, smollm2_path: Path, tmp_path: Path) -> None:
    path = smollm2_path if which == "smollm2-bpe" else ggufs.write_tiny_llama(tmp_path / "tiny.gguf")
    out = subprocess.run([sys.executable, "-c", EQUIVALENCE, str(path)], capture_output=True, text=True,
                         timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n_bad"] == 0, result["bad"]
    assert result["split"] > 100  # the texts were really cut into chunks
    assert result["stopped"] and result["chunks"] == 3
    assert result["over"] == "PromptTooLong"
