"""Continuous batching in the worker: requests generating together get one decode per step and
one message per step, and each answer is exactly what it is alone. Real llama.cpp, the real
default model, the real worker; the kernel's reader is watched to see what the worker sent."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from jupyter_llm import wire
from jupyter_llm.options import LoadOptions, SamplingOptions
from jupyter_llm.runtime import Runtime
from jupyter_llm.worker.prompt_cache import chunk_ends

GREEDY = SamplingOptions(temperature=0.0, max_tokens=40)
QUESTIONS = ["Name three rivers of Europe.", "What is a prime number?", "Describe a cat in one sentence."]


@pytest.fixture(scope="module")
def runtime(smollm2_path: Path):
    with Runtime.start(smollm2_path, LoadOptions(gpu_layers=0, n_ctx=3 * 1024, parallel=3), name="smollm2-batch",
                       _prompt_cache=False) as rt:
        yield rt


@pytest.fixture
def received(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Every message the kernel's readers take off a worker's socket while the test runs."""
    seen: list[tuple[Any, ...]] = []
    recv = wire.Pipe.recv

    def recording(self: wire.Pipe) -> Any:
        msg = recv(self)
        seen.append(msg)
        return msg

    monkeypatch.setattr(wire.Pipe, "recv", recording)
    return seen


def alone(rt: Runtime, question: str) -> str:
    return rt.chat([{"role": "user", "content": question}], GREEDY).result.text


def together(rt: Runtime, questions: list[str]) -> list[str]:
    answers: dict[int, str] = {}
    start = threading.Barrier(len(questions))

    def ask(i: int) -> None:
        start.wait()
        answers[i] = rt.chat([{"role": "user", "content": questions[i]}], GREEDY).result.text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return [answers[i] for i in range(len(questions))]


def test_answers_generated_together_equal_each_alone_and_share_step_messages(
        runtime: Runtime, received: list[tuple[Any, ...]]) -> None:
    solo = [alone(runtime, q) for q in QUESTIONS]
    assert all(solo), solo
    assert not any(m[0] == wire.STEP for m in received)  # one request at a time: plain messages
    received.clear()
    greedy_steps = runtime.stats()["greedy_steps"]
    assert together(runtime, QUESTIONS) == solo
    assert runtime.stats()["greedy_steps"] > greedy_steps  # their steps sampled by one argmax
    steps = [m for m in received if m[0] == wire.STEP]
    assert steps, "three requests generating together sent no step message"
    for step in steps:  # each part is a message of its own kind, for a request of this turn
        assert len(step[1]) >= 2
        assert {part[0] for part in step[1]} <= {wire.TOKEN, wire.DONE, wire.ERROR}
    rids = {part[1] for step in steps for part in step[1]}
    assert len(rids) >= 2


def test_a_greedy_answer_generated_beside_a_sampled_one_is_as_alone(runtime: Runtime) -> None:
    expected = alone(runtime, QUESTIONS[0])
    hot = SamplingOptions(temperature=0.9, seed=7, max_tokens=200)
    before = runtime.stats()["greedy_steps"]
    other = runtime.chat([{"role": "user", "content": QUESTIONS[1]}], hot)
    assert next(iter(other)).text is not None  # generating now
    assert runtime.chat([{"role": "user", "content": QUESTIONS[0]}], GREEDY).result.text == expected
    assert runtime.stats()["greedy_steps"] == before  # a step with a sampled answer: each row its own chain
    other.cancel()


def test_a_request_arriving_while_others_generate_gets_its_own_answer(runtime: Runtime) -> None:
    expected = alone(runtime, QUESTIONS[2])
    long = SamplingOptions(temperature=0.0, max_tokens=200)
    streams = [runtime.chat([{"role": "user", "content": q}], long) for q in QUESTIONS[:2]]
    first = [next(iter(s)) for s in streams]  # both are generating now
    assert all(c.text is not None for c in first)
    late = runtime.chat([{"role": "user", "content": QUESTIONS[2]}], GREEDY).result
    assert late.text == expected
    for s in streams:
        s.cancel()


@pytest.fixture(scope="module")
def cached(smollm2_path: Path):
    """Four slots with the prompt cache and flash attention on (the defaults)."""
    with Runtime.start(smollm2_path, LoadOptions(gpu_layers=0, n_ctx=4 * 1024, parallel=4), name="smollm2-group") as rt:
        yield rt


def test_cached_prompts_arriving_together_share_one_decode_and_answer_as_alone(cached: Runtime) -> None:
    solo = [alone(cached, q) for q in QUESTIONS]  # each question's slot holds it now
    assert all(solo), solo
    # A long fresh prompt first (it takes the empty fourth slot); while its chunk is evaluated the
    # questions arrive again, each with only its last two tokens to evaluate: one decode for all.
    blocker = cached.generate("Summarise: " + " ".join(f"item{i}" for i in range(150)),
                              SamplingOptions(temperature=0.0, max_tokens=4))
    deadline = time.monotonic() + 60
    while cached.stats()["busy"] == 0 and time.monotonic() < deadline:
        time.sleep(0.002)
    before = cached.stats()
    streams = [cached.chat([{"role": "user", "content": q}], GREEDY) for q in QUESTIONS]
    results = [s.result for s in streams]
    first = blocker.result
    after = cached.stats()
    assert [r.text for r in results] == solo  # bit-identical to each evaluated alone, afresh
    assert [r.prompt_tokens - r.prompt_tokens_cached for r in results] == [2, 2, 2]
    assert first.prompt_tokens_cached == 0 and first.prompt_tokens < 512
    decodes = after["prompt_decodes"] - before["prompt_decodes"]
    assert decodes == len(list(chunk_ends(first.prompt_tokens, 512))) + 1, (decodes, first.prompt_tokens)
