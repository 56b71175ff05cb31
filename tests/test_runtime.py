"""The worker runtime with real llama.cpp: the real default model, and tiny GGUF models."""

from __future__ import annotations

import _thread
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest

from jupyter_llm.errors import ContextOverflowError, JupyterLLMError
from jupyter_llm.options import LoadOptions, SamplingOptions
from jupyter_llm.runtime import Chunk, Completion, Runtime, Stream
from jupyter_llm.worker.text import TextOut
from tests import ggufs

GREEDY = SamplingOptions(temperature=0.0, max_tokens=24)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def rt(smollm2_path: Path):
    """One worker with the real model for the tests that leave it usable: 2 slots of 4096."""
    runtime = Runtime.start(smollm2_path, LoadOptions(gpu_layers=0, n_ctx=8192, parallel=2), name="smollm2")
    yield runtime
    runtime.close()


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return ggufs.write_tiny_llama(tmp_path / "tiny.gguf")


# -- loading ---------------------------------------------------------------------------------------


def test_load_report_describes_the_model_and_measured_memory(rt: Runtime) -> None:
    report = rt.report
    assert report is not None
    assert report.pid == rt.pid and rt.alive
    assert (report.n_ctx, report.n_ctx_per_slot, report.parallel) == (8192, 4096, 2)
    assert (report.n_ctx_train, report.n_layer, report.n_gpu_layers) == (8192, 30, 0)
    assert report.has_chat_template and report.metadata["architecture"] == "llama"
    cpu = report.breakdown["CPU"]
    assert abs(cpu.weights - 96_576_768) < 64 * 1024  # = the GGUF's tensor bytes (docs/notes.md §1)
    assert abs(cpu.kv - 180 * 1024 * 1024) < 64 * 1024  # 8192 cells × 30 layers × 3 × 64 × 2 × f16
    assert cpu.compute > 0 and cpu.output > 0
    assert any("KV buffer size" in line for line in report.log)
    assert report.rss_bytes > 50_000_000 and rt.rss_bytes() > 50_000_000
    assert "CPU" in report.system_info and report.load_s > 0


def test_llama_cpp_log_goes_to_the_runtime_not_the_kernels_stderr(
    tiny: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    seen: list[tuple[int, str]] = []
    options = LoadOptions(gpu_layers=0, n_ctx=256)
    with Runtime.start(tiny, options, on_log=lambda lvl, text: seen.append((lvl, text))) as runtime:
        runtime.generate("hello", SamplingOptions(temperature=0, max_tokens=4)).result  # noqa: B018
        kept = runtime.logs()
    out, err = capfd.readouterr()
    assert "llama" not in out + err
    assert any("model buffer size" in text for _, text in seen)
    assert any("model buffer size" in text for _, text in kept)


def test_auto_options_are_refused_before_starting_a_worker(tiny: Path) -> None:
    with pytest.raises(ValueError, match="estimate"):
        Runtime.start(tiny, LoadOptions(gpu_layers="auto", n_ctx=256))


# -- generation ------------------------------------------------------------------------------------


def test_greedy_generation_is_deterministic(rt: Runtime) -> None:
    first = rt.generate("The capital of France is", GREEDY).result
    second = rt.generate("The capital of France is", GREEDY).result
    assert first.text == second.text and first.text.strip()
    assert first.completion_tokens == second.completion_tokens > 0
    assert first.prompt_tokens == rt.count_tokens("The capital of France is")


def test_same_seed_gives_same_sample(rt: Runtime) -> None:
    sampling = SamplingOptions(temperature=1.0, seed=1234, max_tokens=16)
    a, b = rt.chat(QUESTION, sampling).result, rt.chat(QUESTION, sampling).result
    assert a.text == b.text and a.seed == b.seed == 1234


def test_chat_uses_the_chatml_template_and_streams_chunks(rt: Runtime) -> None:
    prompt = rt.render(QUESTION)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\n")  # SmolLM2's template adds its default system turn
    # the special tokens are parsed: <|im_start|> is one token, not a dozen
    assert rt.count_tokens(QUESTION) == len(rt.tokenize(prompt)) < len(prompt) // 2
    stream = rt.chat(QUESTION, SamplingOptions(temperature=0.0, max_tokens=30))
    chunks = list(stream)
    result = stream.result
    assert len(chunks) >= 3 and all(isinstance(c, Chunk) and c.text for c in chunks)
    assert "".join(c.text for c in chunks) == result.text
    assert "Paris" in result.text or result.completion_tokens > 0
    assert result.ttft_s is not None and 0 < result.ttft_s < result.total_s
    assert result.gen_tok_per_s > 0 and result.prompt_tok_per_s > 0


def test_stop_string_ends_generation_without_emitting_it(rt: Runtime) -> None:
    free = rt.generate("1, 2, 3, 4, 5,", SamplingOptions(temperature=0.0, max_tokens=20)).result
    assert " 8," in free.text  # the model counts on; stop at the 8
    stopped = rt.generate("1, 2, 3, 4, 5,", SamplingOptions(temperature=0.0, max_tokens=20, stop=(" 8",))).result
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(" 8")]


def test_max_tokens_finishes_with_length(rt: Runtime) -> None:
    result = rt.generate("Once upon a time", SamplingOptions(temperature=0.0, max_tokens=5)).result
    assert result.finish_reason == "length" and result.completion_tokens == 5


def test_json_schema_output_parses_and_matches_the_schema(rt: Runtime) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    ask = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]
    result = rt.chat(ask, SamplingOptions(temperature=0.0, max_tokens=80), json_schema=schema).result
    value = json.loads(result.text)
    assert set(value) == {"name", "age"}
    assert isinstance(value["name"], str) and isinstance(value["age"], int)
    any_json = rt.chat(ask, SamplingOptions(temperature=0.0, max_tokens=80), json_schema={}).result
    assert isinstance(json.loads(any_json.text), dict)


def test_a_grammar_the_model_would_not_follow_still_decides_every_token(rt: Runtime) -> None:
    # The sampler picks from the free logits and the grammar checks that one token; a rejected
    # token makes it mask every candidate and pick again (worker/sampler.py). Digits in a fixed
    # shape are nothing the model would answer to a greeting: nearly every token goes the long way.
    grammar = 'root ::= "Z" [0-9] [0-9] "-" [0-9] [0-9] [0-9]'
    for sampling in (SamplingOptions(temperature=0.0, max_tokens=20),
                     SamplingOptions(temperature=1.0, seed=7, max_tokens=20)):
        text = rt.chat([{"role": "user", "content": "Hello! How are you?"}], sampling, grammar=grammar).result.text
        assert re.fullmatch(r"Z\d\d-\d\d\d", text), text
    free = rt.chat([{"role": "user", "content": "Hello! How are you?"}], GREEDY).result.text
    assert not re.fullmatch(r"Z\d\d-\d\d\d", free)


def test_a_grammar_that_does_not_parse_is_a_value_error(rt: Runtime) -> None:
    with pytest.raises(ValueError, match="grammar"):
        rt.generate("x", GREEDY, grammar="root ::= (").result  # noqa: B018
    assert rt.generate("x", SamplingOptions(temperature=0.0, max_tokens=2)).result.completion_tokens


def test_a_prompt_longer_than_a_slot_is_a_context_overflow(rt: Runtime) -> None:
    with pytest.raises(ContextOverflowError) as info:
        rt.generate("hello " * 5000, GREEDY).result  # noqa: B018
    assert info.value.n_ctx == 4096 and info.value.n_tokens > 4096
    assert "--ctx" in str(info.value)


def test_tokenize_and_detokenize_round_trip(rt: Runtime) -> None:
    tokens = rt.tokenize("Hello, world! ünïcödé")
    assert tokens and rt.detokenize(tokens) == "Hello, world! ünïcödé"


# -- embeddings ------------------------------------------------------------------------------------


def test_embeddings_are_normalized_and_independent_of_batching(rt: Runtime) -> None:
    a, b = "The cat sat on the mat.", "Quantum chromodynamics describes the strong interaction."
    alone = rt.embed([a])[0]
    both = rt.embed([b, a])
    assert len(both) == 2 and len(alone) == 576
    assert abs(sum(x * x for x in alone) - 1.0) < 1e-5
    assert max(abs(x - y) for x, y in zip(alone, both[1], strict=True)) < 1e-4
    assert max(abs(x - y) for x, y in zip(both[0], both[1], strict=True)) > 1e-2  # different texts, different vectors
    raw = rt.embed([a], normalize=False)[0]
    assert abs(sum(x * x for x in raw) - 1.0) > 1e-3


# -- cancellation ----------------------------------------------------------------------------------


def test_cancel_during_a_long_prompt_stops_fast_and_the_model_stays_usable(rt: Runtime) -> None:
    before = rt.generate("The capital of France is", GREEDY).result.text
    stream = rt.generate("hello " * 3000, GREEDY)  # ~3000 tokens: tens of seconds to evaluate here
    time.sleep(0.4)
    t0 = time.perf_counter()
    stream.cancel()
    result = stream.result
    elapsed = time.perf_counter() - t0
    assert result.finish_reason == "cancelled" and result.completion_tokens == 0
    assert elapsed < 1.0  # fail-fast bound; the bench measures the real latency (~10 ms)
    # the aborted decode left nothing behind: the same greedy answer as before
    assert rt.generate("The capital of France is", GREEDY).result.text == before
    assert rt.stats()["busy"] == 0


def test_keyboard_interrupt_while_iterating_cancels_and_reraises(rt: Runtime) -> None:
    stream = rt.generate("Once upon a time", SamplingOptions(temperature=0.0, max_tokens=400))
    chunks = 0
    with pytest.raises(KeyboardInterrupt):
        for _ in stream:
            chunks += 1
            if chunks == 1:
                # what the notebook's stop button does to the thread running the cell
                threading.Timer(0.2, _thread.interrupt_main).start()
    assert stream.done and stream.result.finish_reason == "cancelled"
    assert stream.result.completion_tokens < 400
    assert rt.generate("The capital of France is", GREEDY).result.completion_tokens > 0


def test_dropping_an_unfinished_stream_cancels_it(rt: Runtime) -> None:
    stream = rt.generate("Once upon a time", SamplingOptions(temperature=0.0, max_tokens=400))
    next(iter(stream))
    del stream
    deadline = time.monotonic() + 5
    while rt.stats()["busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rt.stats()["busy"] == 0


# -- parallel slots --------------------------------------------------------------------------------


def test_two_slots_decode_together_and_match_sequential_greedy_runs(rt: Runtime) -> None:
    sampling = SamplingOptions(temperature=0.0, max_tokens=40)
    asks = [[{"role": "user", "content": "Write a poem about the sea."}],
            [{"role": "user", "content": "List three fruits and say why they are healthy."}]]
    sequential = [rt.chat(ask, sampling).result.text for ask in asks]
    first = rt.chat(asks[0], sampling)
    next(iter(first))  # the second request joins while the first one is generating
    second = rt.chat(asks[1], sampling)
    busy, deadline = 0, time.monotonic() + 1.0
    while busy < 2 and time.monotonic() < deadline:  # the engine takes it at its next step
        busy = rt.stats()["busy"]
    together = [first.result.text, second.result.text]
    assert together == sequential
    assert busy == 2  # both slots were in use at once
    # and from several client threads at the same time
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, rt.chat(asks[i], sampling).result.text))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[0], results[1]] == sequential


def test_arrived_waits_for_the_first_chunk_and_keeps_it_for_iteration(rt: Runtime) -> None:
    sampling = SamplingOptions(temperature=0.0, max_tokens=16)
    ask = [{"role": "user", "content": "Name a colour."}]
    expected = rt.chat(ask, sampling).result.text
    long = SamplingOptions(temperature=0.0, max_tokens=400)
    busy = [rt.chat([{"role": "user", "content": f"Tell story number {i}."}], long) for i in range(2)]
    for stream in busy:
        next(iter(stream))  # both slots generate: 400 tokens take far longer than 50 ms on a CPU
    waiting = rt.chat(ask, sampling)
    assert waiting.arrived(0.05) is False  # queued behind them: nothing yet, and nothing consumed
    for stream in busy:
        stream.cancel()
    assert waiting.arrived(60) is True
    assert waiting.arrived(0) is True  # the kept chunk is still there
    assert "".join(c.text for c in waiting) == expected == waiting.result.text


def test_relay_hands_the_chunks_to_a_callback_in_order_then_returns(rt: Runtime) -> None:
    sampling = SamplingOptions(temperature=0.0, max_tokens=30)
    ask = [{"role": "user", "content": "Name three birds."}]
    iterated = [c.text for c in rt.chat(ask, sampling)]
    stream = rt.chat(ask, sampling)
    got: list[tuple[str, str]] = []
    stream.relay(lambda chunk: got.append((chunk.text, threading.current_thread().name)))
    assert stream.done
    assert [text for text, _ in got] == iterated and "".join(iterated) == stream.result.text
    # handed on where the worker's messages are read, not in a thread woken per chunk
    assert any(name != threading.current_thread().name for _, name in got)


def test_every_holds_the_text_back_after_the_first_piece_and_loses_none(rt: Runtime) -> None:
    from jupyter_llm.runtime.stream import Extras

    ask = [{"role": "user", "content": "Name three birds and say why."}]
    sampling = SamplingOptions(temperature=0.0, max_tokens=40)
    each = list(rt.chat(ask, sampling))
    stream = rt.chat(ask, sampling, extras=Extras(every=60.0))
    held = list(stream)
    # the first text at once (its token counted), the rest in one message when the answer ended
    assert len(each) > 10 and len(held) == 2 and held[0] == each[0]
    assert "".join(c.text for c in held) == "".join(c.text for c in each) == stream.result.text
    assert sum(c.n_tokens for c in held) == sum(c.n_tokens for c in each) == stream.result.completion_tokens
    # at a short interval the pieces go together, several tokens to a message
    stream = rt.chat(ask, sampling, extras=Extras(every=0.03))
    grouped = list(stream)
    assert 2 < len(grouped) < len(each) and "".join(c.text for c in grouped) == stream.result.text


def test_text_held_back_by_every_is_sent_when_the_answer_is_cancelled(rt: Runtime) -> None:
    from jupyter_llm.runtime.stream import Extras

    ask = [{"role": "user", "content": "Tell a long story about the sea."}]
    stream = rt.chat(ask, SamplingOptions(temperature=0.0, max_tokens=400), extras=Extras(every=60.0))
    first = next(stream)
    time.sleep(0.5)  # tens of tokens generated and held
    stream.cancel()
    result = stream.result
    assert result.finish_reason == "cancelled" and result.completion_tokens > 5
    assert stream.text.startswith(first.text) and stream.text == result.text
    # every token generated reached the kernel: the same greedy answer cut at that many tokens
    cut = rt.chat(ask, SamplingOptions(temperature=0.0, max_tokens=result.completion_tokens)).result
    assert cut.completion_tokens == result.completion_tokens and cut.text == result.text


def test_stats_count_requests_and_tokens(rt: Runtime) -> None:
    before = rt.stats()
    result = rt.generate("Hello", SamplingOptions(temperature=0.0, max_tokens=3)).result
    after = rt.stats()
    assert after["slots"] == 2 and after["busy"] == 0 and after["queued"] == 0
    assert after["requests"] == before["requests"] + 1
    assert after["tokens_out"] - before["tokens_out"] == result.completion_tokens
    # every prompt token is either evaluated or reused from a slot's cache
    evaluated = after["tokens_in"] - before["tokens_in"]
    reused = after["prompt_tokens_cached"] - before["prompt_tokens_cached"]
    assert reused == result.prompt_tokens_cached and evaluated + reused == result.prompt_tokens
    assert len(after["slot_tokens"]) == 2 and after["unsettled_tokens"] >= 0


def test_a_repeated_prompt_reuses_the_cache_and_reports_it(rt: Runtime) -> None:
    prompt = "The tallest mountain on Earth is"
    first = rt.generate(prompt, GREEDY).result
    second = rt.generate(prompt, GREEDY).result
    assert second.prompt_tokens_cached == second.prompt_tokens - 2 and second.text == first.text


# -- lifecycle -------------------------------------------------------------------------------------


def test_close_ends_the_worker_process(tiny: Path) -> None:
    runtime = Runtime.start(tiny, LoadOptions(gpu_layers=0, n_ctx=256))
    pid = runtime.pid
    assert runtime.generate("hello", SamplingOptions(temperature=0, max_tokens=2)).result.completion_tokens
    runtime.close()
    assert not runtime.alive and runtime.rss_bytes() == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(JupyterLLMError, match="load it again"):
        runtime.generate("hello", GREEDY)
    runtime.close()  # idempotent


def test_close_during_a_long_prompt_aborts_it_and_ends_the_stream(smollm2_path: Path) -> None:
    runtime = Runtime.start(smollm2_path, LoadOptions(gpu_layers=0, n_ctx=4096), name="smollm2")
    stream = runtime.generate("hello " * 3000, GREEDY)
    time.sleep(0.3)
    t0 = time.monotonic()
    runtime.close()
    assert time.monotonic() - t0 < 5  # not the tens of seconds the prompt would take (nor a kill)
    assert runtime._proc.returncode == 0  # it exited by itself
    assert stream.result.finish_reason == "cancelled"


# -- the result types -----------------------------------------------------------------------------


def test_result_types_live_in_stream_and_are_reexported_by_runtime() -> None:
    from jupyter_llm.runtime import stream

    assert (Chunk, Completion, Stream) == (stream.Chunk, stream.Completion, stream.Stream)
    # made without the cache count (as code written before it did), it defaults to none reused
    done = Completion("hi", "stop", 3, 1, 0.1, 10.0, 30.0, 0.2, 42)
    assert done.prompt_tokens_cached == 0


# -- text assembly (unit) --------------------------------------------------------------------------


def test_text_out_never_splits_a_utf8_character() -> None:
    out = TextOut(())
    data = "é€😀".encode()
    pieces = [out.feed(data[i:i + 1])[0] for i in range(len(data))]
    assert "".join(pieces) == "é€😀"
    assert all(p == "" or p in ("é", "€", "😀") for p in pieces)


def test_text_out_holds_back_a_possible_stop_string_prefix() -> None:
    out = TextOut(("STOP",))
    assert out.feed(b"hello ST") == ("hello ", False)
    assert out.feed(b"O") == ("", False)
    assert out.feed(b"P and more") == ("", True) and out.matched == "STOP"
    out = TextOut(("and", "b"))
    assert out.feed(b"a b and") == ("a ", True) and out.matched == "b"  # the earliest in the text
    out = TextOut(("STOP",))
    assert out.feed(b"a ST") == ("a ", False)
    assert out.feed(b"ay") == ("STay", False)
    assert out.feed(b" ST") == (" ", False)
    assert out.flush() == "ST"  # at the end a held prefix is just text
    assert out.matched is None


def test_workers_run_with_openmps_default_wait_policy_unless_the_user_set_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # docs/notes.md §8: a PASSIVE policy made the decode loop 4-5x slower; the user's own wins.
    from jupyter_llm.wire import worker_env

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert "OMP_WAIT_POLICY" not in worker_env()
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert worker_env()["OMP_WAIT_POLICY"] == "ACTIVE"
    assert worker_env()["GGML_NO_BACKTRACE"] == "1"
