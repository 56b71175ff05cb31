"""The worker's prompt cache: a slot keeps its KV, the next prompt reuses the common prefix, and
greedy outputs stay exactly those of a fresh evaluation. Real llama.cpp and the real default
model, compared against a worker with the cache switched off; the slot bookkeeping on its own
with a fake llama.cpp memory (the cases no small model here can produce)."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from jupyter_llm.errors import ContextOverflowError
from jupyter_llm.options import LoadOptions, SamplingOptions
from jupyter_llm.runtime import Completion, Runtime
from jupyter_llm.worker.prompt_cache import TILED, SlotCache, chunk_ends, chunk_size, common_prefix
from tests import ggufs

GREEDY = SamplingOptions(temperature=0.0, max_tokens=24)
OPTIONS = LoadOptions(gpu_layers=0, n_ctx=4096, parallel=2, flash_attn=False)  # 2 slots of 2048
"""Without flash attention (the chunk classes of flash attention: the tests after these)."""
TURNS = ["What is the capital of France?", "What is it famous for?", "Name one museum there."]


@pytest.fixture(scope="module")
def cached(smollm2_path: Path):
    """The real model with the prompt cache, settling while idle (``JUPYTER_LLM_IDLE_SETTLE=1``:
    the answer is re-evaluated while the user reads it, so the next turn reuses it too)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_LLM_IDLE_SETTLE", "1")
        runtime = Runtime.start(smollm2_path, OPTIONS, name="smollm2")
    with runtime:
        yield runtime


@pytest.fixture(scope="module")
def lazy(smollm2_path: Path):
    """The real model with the prompt cache as it is by default: nothing done while idle, the
    last answer evaluated again as part of the next prompt."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("JUPYTER_LLM_IDLE_SETTLE", raising=False)
        runtime = Runtime.start(smollm2_path, OPTIONS, name="smollm2-lazy")
    with runtime:
        yield runtime


@pytest.fixture(scope="module")
def plain(smollm2_path: Path):
    """The same model and options with the prompt cache off: every prompt evaluated afresh."""
    with Runtime.start(smollm2_path, OPTIONS, name="smollm2-plain", _prompt_cache=False) as runtime:
        yield runtime


def settled(rt: Runtime) -> dict[str, Any]:
    """Wait until the worker has re-evaluated its generated tokens (it does while idle, as when
    a user reads the answer); returns its stats."""
    deadline = time.monotonic() + 60
    while (stats := rt.stats())["unsettled_tokens"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stats["unsettled_tokens"] == 0
    return stats


def converse(rt: Runtime, turns: list[str], *, settle: bool, sampling: SamplingOptions = GREEDY,
             history: list[dict[str, str]] | None = None) -> list[Completion]:
    """A chat, turn by turn, each answer appended to the history as %%chat does."""
    messages, results = list(history or []), []
    for user in turns:
        messages.append({"role": "user", "content": user})
        result = rt.chat(messages, sampling).result
        if settle:
            settled(rt)
        messages.append({"role": "assistant", "content": result.text})
        results.append(result)
    return results


# -- reuse -----------------------------------------------------------------------------------------


def test_the_next_chat_turn_reuses_the_conversation_so_far(cached: Runtime) -> None:
    first = converse(cached, TURNS[:1], settle=True)[0]
    before = cached.stats()
    second = cached.chat([{"role": "user", "content": TURNS[0]}, {"role": "assistant", "content": first.text},
                          {"role": "user", "content": TURNS[1]}], GREEDY).result
    after = cached.stats()
    # the prompt, the answer (every generated token but the last, which was never decoded), no more
    decoded = first.prompt_tokens + first.completion_tokens - (first.finish_reason == "length")
    assert decoded - 2 <= second.prompt_tokens_cached <= decoded
    assert after["prompt_tokens_cached"] - before["prompt_tokens_cached"] == second.prompt_tokens_cached
    assert after["tokens_in"] - before["tokens_in"] == second.prompt_tokens - second.prompt_tokens_cached


def test_the_same_prompt_again_evaluates_only_its_last_two_tokens(cached: Runtime) -> None:
    prompt = "The three primary colours are"
    first = cached.generate(prompt, GREEDY).result
    again = cached.generate(prompt, GREEDY).result
    assert again.prompt_tokens_cached == again.prompt_tokens - 2  # the last one for its logits; never alone
    assert again.text == first.text


def test_a_prompt_sharing_nothing_is_evaluated_in_full(cached: Runtime) -> None:
    converse(cached, TURNS[:1], settle=False)
    before = cached.stats()
    result = cached.generate("Giraffes have long necks and", GREEDY).result
    after = cached.stats()
    assert result.prompt_tokens_cached == 0
    assert after["tokens_in"] - before["tokens_in"] == result.prompt_tokens
    assert after["prompt_tokens_cached"] == before["prompt_tokens_cached"]


def test_a_prompt_longer_than_a_slot_is_still_refused(cached: Runtime) -> None:
    converse(cached, TURNS[:1], settle=False)
    with pytest.raises(ContextOverflowError) as info:
        cached.generate("hello " * 2100, GREEDY).result  # noqa: B018
    assert info.value.n_ctx == 2048
    assert cached.generate("Zebras live in", SamplingOptions(temperature=0.0, max_tokens=2)).result.completion_tokens


# -- the same outputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("settle", [True, False], ids=["user-reads-the-answer", "next-turn-at-once"])
def test_greedy_answers_with_the_cache_equal_those_without(cached: Runtime, plain: Runtime, settle: bool) -> None:
    with_cache = converse(cached, TURNS, settle=settle)
    without = converse(plain, TURNS, settle=False)
    assert [r.text for r in with_cache] == [r.text for r in without]
    assert [r.prompt_tokens for r in with_cache] == [r.prompt_tokens for r in without]
    for before, after in itertools.pairwise(with_cache):  # the earlier prompts, and answers once settled
        decoded = before.prompt_tokens + before.completion_tokens - (before.finish_reason == "length")
        assert after.prompt_tokens_cached >= (decoded - 2 if settle else before.prompt_tokens)
    assert all(r.prompt_tokens_cached == 0 for r in without)
    assert plain.stats()["prompt_tokens_cached"] == 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (/proc/PID/stat)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_by_default_an_idle_model_costs_no_cpu_and_stays_exact(lazy: Runtime, plain: Runtime) -> None:
    long = SamplingOptions(temperature=0.0, max_tokens=64)
    first = converse(lazy, TURNS[:1], sampling=long, settle=False)[0]
    before, settled_before = cpu_seconds(lazy.pid), lazy.stats()["tokens_settled"]
    time.sleep(3)  # the user reads the answer
    idle = cpu_seconds(lazy.pid) - before
    stats = lazy.stats()
    assert stats["tokens_settled"] == settled_before  # no settling while idle...
    assert stats["unsettled_tokens"] > 0  # ...although the answer is not settled
    assert idle < 0.05, f"an idle worker used {idle:.2f} CPU-s in 3 s"
    history = [{"role": "user", "content": TURNS[0]}, {"role": "assistant", "content": first.text}]
    second = converse(lazy, TURNS[1:2], sampling=long, settle=False, history=history)[0]
    reference = converse(plain, TURNS[1:2], sampling=long, settle=False, history=history)[0]
    assert second.text == reference.text  # the answer evaluated again as a prompt chunk: exact
    assert first.prompt_tokens - 2 <= second.prompt_tokens_cached < first.prompt_tokens + first.completion_tokens


def test_settling_while_idle_is_what_the_setting_turns_on(cached: Runtime) -> None:
    before = cached.stats()["tokens_settled"]
    converse(cached, TURNS[:1], settle=True)
    assert cached.stats()["tokens_settled"] > before


def test_a_fresh_worker_answers_the_second_turn_as_the_continued_one(cached: Runtime, smollm2_path: Path) -> None:
    continued = converse(cached, TURNS[:2], settle=True)
    history = [{"role": "user", "content": TURNS[0]}, {"role": "assistant", "content": continued[0].text}]
    with Runtime.start(smollm2_path, OPTIONS, name="smollm2-fresh") as fresh:
        second = converse(fresh, TURNS[1:2], settle=False, history=history)[0]
    assert second.prompt_tokens_cached == 0
    assert continued[1].prompt_tokens_cached > 0
    assert second.text == continued[1].text


# -- cancellation ----------------------------------------------------------------------------------


def test_a_cancelled_prompt_keeps_what_was_evaluated_and_the_retry_matches(smollm2_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Small chunks so that a cancel lands in the middle of the prompt, with chunks done before it;
    # no host-memory copies, so that the prompt taken over is evaluated again (test_prompt_store).
    monkeypatch.setenv("JUPYTER_LLM_PROMPT_RAM", "0")
    options = LoadOptions(gpu_layers=0, n_ctx=2048, n_batch=32, n_ubatch=32)
    prompt = "Here is a list of animals: " + ", ".join(["cat", "dog", "horse", "cow", "sheep", "goat"] * 20) + "."
    with Runtime.start(smollm2_path, options, name="smollm2") as rt:
        reference = rt.generate(prompt, GREEDY).result
        other = rt.generate("Zebras live in Africa and", GREEDY).result  # takes the only slot over
        assert other.prompt_tokens_cached == 0
        stream = rt.generate(prompt, GREEDY)
        deadline = time.monotonic() + 60
        while rt.stats()["slot_tokens"][0] < 96 and time.monotonic() < deadline:
            time.sleep(0.01)
        stream.cancel()
        assert stream.result.finish_reason == "cancelled" and stream.result.completion_tokens == 0
        kept = rt.stats()["slot_tokens"][0]
        assert 96 <= kept < reference.prompt_tokens  # the chunks done, not the one the cancel aborted
        retry = rt.generate(prompt, GREEDY).result
        assert retry.prompt_tokens_cached == kept  # the bookkeeping matches the KV exactly
        assert retry.text == reference.text


def test_a_turn_stopped_mid_answer_then_continued_matches_an_uncached_worker(cached: Runtime, plain: Runtime) -> None:
    ask = [{"role": "user", "content": "Write a long story about a dragon."}]
    stream = cached.chat(ask, SamplingOptions(temperature=0.0, max_tokens=300))
    for n, _ in enumerate(stream, 1):
        if n == 5:
            stream.cancel()
    partial = stream.result
    assert partial.finish_reason == "cancelled" and 5 <= partial.completion_tokens < 300
    history = [*ask, {"role": "assistant", "content": partial.text}]
    again = converse(cached, ["Make it shorter."], settle=False, history=history)[0]
    reference = converse(plain, ["Make it shorter."], settle=False, history=history)[0]
    assert again.prompt_tokens_cached >= partial.prompt_tokens
    assert again.text == reference.text


# -- parallel slots --------------------------------------------------------------------------------


def test_two_conversations_in_parallel_each_reuse_their_own_slot(cached: Runtime, plain: Runtime) -> None:
    convs = [["Name a red fruit.", "And a yellow one?"], ["Count to five.", "Now count backwards."]]
    results: dict[int, list[Completion]] = {}

    def turn(k: int, history: list[dict[str, str]], user: str) -> None:
        messages = [*history, {"role": "user", "content": user}]
        results.setdefault(k, []).append(cached.chat(messages, GREEDY).result)

    def both(turn_index: int) -> None:
        threads = []
        for k, conv in enumerate(convs):
            history: list[dict[str, str]] = []
            for j in range(turn_index):
                history += [{"role": "user", "content": conv[j]}, {"role": "assistant", "content": results[k][j].text}]
            threads.append(threading.Thread(target=turn, args=(k, history, conv[turn_index])))
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    both(0)
    settled(cached)
    both(1)
    for k in range(2):
        first, second = results[k]
        decoded = first.prompt_tokens + first.completion_tokens - (first.finish_reason == "length")
        assert decoded - 2 <= second.prompt_tokens_cached <= decoded, k  # not evicted by the other one
    reference = [converse(plain, conv, settle=False) for conv in convs]
    assert [[r.text for r in results[k]] for k in range(2)] == [[r.text for r in ref] for ref in reference]


def test_a_new_conversation_takes_an_empty_slot_rather_than_evict_one(smollm2_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_LLM_IDLE_SETTLE", "1")
    with Runtime.start(smollm2_path, OPTIONS, name="smollm2") as rt:
        converse(rt, TURNS[:2], settle=True)
        holding = rt.stats()["slot_tokens"]
        system = len(rt.tokenize(rt.render([{"role": "user", "content": "x"}]).split("x")[0]))
        assert sorted(holding) == [0, max(holding)] and max(holding) > 2 * system
        new = converse(rt, ["Count to five."], settle=True)[0]  # shares the system prompt only
        after = rt.stats()["slot_tokens"]
    assert max(holding) in after and min(after) > 0  # the first conversation is still there
    assert new.prompt_tokens_cached == 0  # an empty slot, evaluated afresh


# -- flash attention ----------------------------------------------------------------------------


FA = LoadOptions(gpu_layers=0, n_ctx=4096, parallel=2, flash_attn=True)
LONG_TURNS = ["Write three sentences about the sea.", "Now three about mountains, please.", "And one about rivers."]


def test_with_flash_attention_on_the_cpu_cached_answers_equal_uncached_ones(smollm2_path: Path) -> None:
    # ggml's CPU flash attention computes chunks of 64+ rows (tiled) and shorter ones (vector)
    # differently: the cache reuses only tokens evaluated as a fresh prompt would evaluate them,
    # and the rest along a fresh evaluation's chunks. The turns' prompts grow across 64 tokens.
    sampling = SamplingOptions(temperature=0.0, max_tokens=40)
    with Runtime.start(smollm2_path, FA, name="smollm2-fa") as cached_fa, \
            Runtime.start(smollm2_path, FA, name="smollm2-fa-plain", _prompt_cache=False) as plain_fa:
        with_cache = converse(cached_fa, LONG_TURNS, settle=False, sampling=sampling)
        without = converse(plain_fa, LONG_TURNS, settle=False, sampling=sampling)
        assert [r.text for r in with_cache] == [r.text for r in without]
        assert with_cache[-1].prompt_tokens >= 64 + with_cache[-1].prompt_tokens_cached  # a tiled rest
        assert with_cache[-1].prompt_tokens_cached > 0  # and a reused prefix
        prompts = (LONG_PROMPT, LONG_PROMPT + " Briefly.")  # one tiled chunk fresh; then a reused prefix
        again = [cached_fa.generate(prompt, sampling).result for prompt in prompts]
        assert [r.text for r in again] == [plain_fa.generate(prompt, sampling).result.text for prompt in prompts]
        assert again[1].prompt_tokens_cached > 0
        assert cached_fa.stats()["tokens_settled"] == 0  # by default nothing is settled while idle


def test_with_flash_attention_settling_while_idle_tiles_the_answer_and_stays_exact(smollm2_path: Path) -> None:
    # JUPYTER_LLM_IDLE_SETTLE=1 with flash attention: the answer is evaluated again in tiled
    # chunks only, as the next (longer) prompt's fresh evaluation would; the next turn then
    # evaluates only its last tile. The first prompt (< 64 tokens, a small chunk) is tiled too.
    sampling = SamplingOptions(temperature=0.0, max_tokens=80)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_LLM_IDLE_SETTLE", "1")
        settling = Runtime.start(smollm2_path, FA, name="smollm2-fa-settle")
    with settling, Runtime.start(smollm2_path, FA, name="smollm2-fa-plain", _prompt_cache=False) as plain_fa:
        with_cache = converse(settling, LONG_TURNS, settle=True, sampling=sampling)
        without = converse(plain_fa, LONG_TURNS, settle=False, sampling=sampling)
        assert [r.text for r in with_cache] == [r.text for r in without]
        assert with_cache[0].prompt_tokens < 64 and settling.stats()["tokens_settled"] > 0
        for after in with_cache[1:]:  # all but one tile (the new message is shorter), answers included
            assert after.prompt_tokens - after.prompt_tokens_cached == 64


LONG_PROMPT = "Here is a list of colours: " + ", ".join(["red", "green", "blue", "yellow", "purple"] * 15) + "."


def test_with_a_quantized_kv_cache_flash_attention_reuses_the_answer_without_settling(tmp_path: Path) -> None:
    tiny = ggufs.write_tiny_llama(tmp_path / "tiny.gguf", ctx=1024, n_embd=128, n_head=4)  # heads of 32: q8_0's block
    options = LoadOptions(gpu_layers=0, n_ctx=1024, flash_attn=True, kv_type="q8_0")  # not measured: not exact
    with Runtime.start(tiny, options) as rt:
        first = rt.generate("hello world", SamplingOptions(temperature=0.0, max_tokens=8)).result
        stats = rt.stats()
        assert stats["unsettled_tokens"] == 0 and stats["tokens_settled"] == 0
        decoded = first.prompt_tokens + first.completion_tokens - (first.finish_reason == "length")
        assert stats["slot_tokens"][0] == decoded
        second = rt.generate("hello world" + first.text, SamplingOptions(temperature=0.0, max_tokens=4)).result
        assert second.prompt_tokens_cached > first.prompt_tokens  # into the answer, without settling


# -- the slot bookkeeping (unit, fake llama.cpp memory) --------------------------------------------


class FakeMemory:
    """llama.cpp's memory calls over per-sequence position sets, with the two refusals real
    models make: a recurrent state cannot be cut at a position; a sliding window keeps only
    its last ``window`` positions."""

    def __init__(self, *, recurrent: bool = False, window: int = 0) -> None:
        self.pos: dict[int, set[int]] = {}
        self.recurrent, self.window = recurrent, window

    def decode(self, seq: int, n: int) -> None:
        held = self.pos.setdefault(seq, set())
        start = max(held, default=-1) + 1
        held.update(range(start, start + n))
        if self.window:
            top = max(held)
            held.difference_update({p for p in held if p <= top - self.window})

    def llama_memory_seq_rm(self, _mem: Any, seq: int, p0: int, p1: int) -> bool:
        held = self.pos.setdefault(seq, set())
        if p0 < 0 and p1 < 0:
            held.clear()
            return True
        if self.recurrent and any(p >= p0 for p in held):
            return False
        held.difference_update({p for p in held if p >= p0})
        return True

    def llama_memory_seq_pos_min(self, _mem: Any, seq: int) -> int:
        return min(self.pos.get(seq) or {-1})

    def llama_memory_seq_pos_max(self, _mem: Any, seq: int) -> int:
        return max(self.pos.get(seq) or {-1})


def filled(memory: FakeMemory, cache: SlotCache, slot: int, tokens: list[int], chunk: int = 4) -> None:
    for i in range(0, len(tokens), chunk):
        part = tokens[i:i + chunk]
        memory.decode(slot, len(part))
        cache.decoded(slot, part)


def test_reuse_keeps_the_common_prefix_and_evaluates_at_least_two_tokens() -> None:
    memory = FakeMemory()
    cache = SlotCache(memory, None, 1, n_swa=0, enabled=True, exact=True)
    filled(memory, cache, 0, list(range(20)))
    assert cache.reuse(0, [*range(12), 99, 98]) == 12
    assert memory.pos[0] == set(range(12)) and cache.tokens[0] == list(range(12))
    assert cache.reuse(0, list(range(12))) == 10  # all cached: the last two again
    assert cache.reuse(0, [5, 6, 7]) == 0


def test_generated_tokens_are_reused_only_once_settled() -> None:
    memory = FakeMemory()
    cache = SlotCache(memory, None, 1, n_swa=0, enabled=True, exact=True)
    filled(memory, cache, 0, list(range(10)))
    for token in (10, 11, 12):  # generated one at a time
        memory.decode(0, 1)
        cache.decoded(0, [token])
    assert cache.unsettled == 3 and cache.reuse(0, list(range(20))) == 10
    for token in (10, 11, 12):
        memory.decode(0, 1)
        cache.decoded(0, [token])
    slot, part = cache.next_settle(64) or (None, [])
    assert (slot, part) == (0, [10, 11, 12]) and memory.pos[0] == set(range(10))
    memory.decode(0, 3)
    cache.decoded(0, part)
    assert cache.unsettled == 0 and cache.next_settle(64) is None
    assert cache.reuse(0, list(range(20))) == 13


def test_an_interrupted_settling_forgets_the_rest_exactly() -> None:
    memory = FakeMemory()
    cache = SlotCache(memory, None, 1, n_swa=0, enabled=True, exact=True)
    filled(memory, cache, 0, list(range(4)))
    for token in range(4, 14):
        memory.decode(0, 1)
        cache.decoded(0, [token])
    _, part = cache.next_settle(4) or (None, [])
    assert part == [4, 5, 6, 7]
    memory.decode(0, 4)
    cache.decoded(0, part)
    _, part = cache.next_settle(4) or (None, [])
    cache.interrupted(0)  # the engine removed the aborted chunk from the KV
    assert cache.tokens[0] == list(range(8)) and cache.unsettled == 0
    assert cache.reuse(0, list(range(14))) == 8


def test_a_recurrent_state_that_cannot_be_cut_empties_the_slot() -> None:
    memory = FakeMemory(recurrent=True)
    cache = SlotCache(memory, None, 1, n_swa=0, enabled=True, exact=True)
    filled(memory, cache, 0, list(range(10)))
    assert cache.reuse(0, [*range(5), 42, 43]) == 0
    assert not memory.pos[0] and cache.tokens[0] == []


def test_a_sliding_window_that_lost_the_prefix_empties_the_slot() -> None:
    memory = FakeMemory(window=12)  # the cache keeps a little more than the attention window
    cache = SlotCache(memory, None, 1, n_swa=8, enabled=True, exact=True)
    filled(memory, cache, 0, list(range(40)))
    assert cache.reuse(0, [*range(38), 7, 7]) == 38  # the window still covers what position 38 needs
    filled(memory, cache, 0, list(range(38, 60)))
    assert cache.reuse(0, [*range(20), 7, 7]) == 0  # positions 12…19 left the cache long ago


def test_slot_choice_prefers_the_holder_then_an_empty_slot_then_the_oldest() -> None:
    memory = FakeMemory()
    cache = SlotCache(memory, None, 3, n_swa=0, enabled=True, exact=True)
    system = list(range(100, 110))
    filled(memory, cache, 0, [*system, *range(30)])
    cache.touch(0)
    filled(memory, cache, 1, [*system, *range(50, 80)])
    cache.touch(1)
    assert cache.pick([*system, *range(30), 7, 7], [0, 1, 2]) == 0  # its own conversation
    assert cache.pick([*system, 1000, 1001], [0, 1, 2]) == 2  # a new one: the empty slot
    assert cache.pick([*system, 1000, 1001], [0, 1]) == 0  # no empty one: the least recently used
    assert cache.pick([*system, *range(50, 55)], [0, 1, 2]) == 1  # all of it held (a prompt run again)
    off = SlotCache(memory, None, 3, n_swa=0, enabled=False, exact=True)
    assert off.pick([*system, *range(30)], [1, 2]) in (1, 2) and off.reuse(1, system) == 0


def test_chunks_never_leave_a_lone_token() -> None:
    assert chunk_size(100, 32) == 32 and chunk_size(33, 32) == 31 and chunk_size(32, 32) == 32
    assert chunk_size(5, 512) == 5 and chunk_size(1, 512) == 1
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


def tiled(memory: FakeMemory, cache: SlotCache, slot: int, n_prompt: int, start: int = 0) -> list[int]:
    """Evaluate positions start…n_prompt-1 of a prompt (token i = i) as the engine does."""
    sizes = []
    while start < n_prompt:
        take = cache.next_chunk(n_prompt, start)
        memory.decode(slot, take)
        cache.decoded(slot, list(range(start, start + take)))
        sizes.append(take)
        start += take
    return sizes


def test_with_a_tile_only_tokens_evaluated_as_a_fresh_prompt_would_be_are_reused() -> None:
    memory = FakeMemory()
    cache = SlotCache(memory, None, 1, n_swa=0, enabled=True, exact=True, room=16, tile=4)
    assert list(chunk_ends(37, 16)) == [16, 32, 37] and list(chunk_ends(33, 16)) == [16, 31, 33]
    assert tiled(memory, cache, 0, 3) == [3]  # a short prompt: one small chunk
    assert cache.reuse(0, list(range(10))) == 0  # fresh, [0, 10) is one tiled chunk: [0, 3) was small
    assert tiled(memory, cache, 0, 10) == [10]
    assert cache.reuse(0, list(range(10))) == 6  # the same prompt: the last chunk again, a tile long
    assert tiled(memory, cache, 0, 10, 6) == [4]
    assert cache.reuse(0, list(range(40))) == 10  # [0, 16) is tiled fresh; the rest [10, 16) is 6 long
    assert tiled(memory, cache, 0, 40, 10) == [6, 16, 8]  # along a fresh evaluation's chunk ends
    for token in (40, 41):  # generated, one at a time
        memory.decode(0, 1)
        cache.decoded(0, [token])
    assert cache.unsettled == 4 and cache.idle_work == 0  # [38, 42) would be settled, as a tile; not by default
    assert cache.reuse(0, list(range(45))) == 40  # [32, 40) and [32, 45) are both tiled; not the answer
    assert tiled(memory, cache, 0, 45, 40) == [5]
    assert cache.reuse(0, list(range(33))) == 31  # fresh: [16, 31), then [31, 33) of two
    assert cache.classes[0] == bytearray([TILED]) * 31


def settle_all(memory: FakeMemory, cache: SlotCache, chunk: int) -> list[int]:
    """Settle as the idle engine does; returns the chunks' sizes."""
    sizes = []
    while job := cache.next_settle(chunk):
        slot, part = job
        memory.decode(slot, len(part))
        cache.decoded(slot, part)
        sizes.append(len(part))
    return sizes


def generated(memory: FakeMemory, cache: SlotCache, slot: int, tokens: range) -> None:
    for token in tokens:  # one at a time, as an answer's tokens
        memory.decode(slot, 1)
        cache.decoded(slot, [token])


def test_with_a_tile_settling_evaluates_tiled_chunks_a_longer_prompt_would_reuse() -> None:
    memory = FakeMemory()
    cache = SlotCache(memory, None, 1, n_swa=0, enabled=True, exact=True, settle_idle=True, room=16, tile=4)
    assert tiled(memory, cache, 0, 3) == [3]  # a small chunk: a longer prompt tiles these positions
    generated(memory, cache, 0, range(3, 10))
    assert cache.unsettled == 10 and settle_all(memory, cache, 16) == [10]  # from 0, one tiled chunk
    assert cache.classes[0] == bytearray([TILED]) * 10 and memory.pos[0] == set(range(10))
    assert cache.reuse(0, list(range(30))) == 10  # fresh: [0, 16) and [16, 30), both tiled
    assert tiled(memory, cache, 0, 30, 10) == [6, 14]
    generated(memory, cache, 0, range(30, 51))  # 51 tokens: the last window [48, 51) holds 3, under a tile
    assert cache.unsettled == 18 and settle_all(memory, cache, 16) == [14, 4]  # [30, 48); no chunk under a tile
    assert cache.idle_work == 0 and memory.pos[0] == set(range(48))
    assert cache.reuse(0, list(range(60))) == 48


def test_with_a_tile_a_last_window_shorter_than_the_tile_is_left_to_the_next_prompt() -> None:
    memory = FakeMemory()
    cache = SlotCache(memory, None, 1, n_swa=0, enabled=True, exact=True, settle_idle=True, room=16, tile=4)
    assert tiled(memory, cache, 0, 10) == [10]
    generated(memory, cache, 0, range(10, 18))  # 18 tokens: the window [16, 18) holds 2
    assert cache.unsettled == 6 and settle_all(memory, cache, 16) == [6]  # [10, 16) tiled; [16, 18) dropped
    assert cache.tokens[0] == list(range(16)) and memory.pos[0] == set(range(16))
    assert cache.unsettled == 0  # 18 tokens again: fresh, [16, 18) would be a small chunk
    generated(memory, cache, 0, range(16, 17))
    assert cache.unsettled == 0  # a window of one token: nothing to settle yet
    short = SlotCache(FakeMemory(), None, 1, n_swa=0, enabled=True, exact=True, settle_idle=True, room=6, tile=4)
    short.tokens[0], short.classes[0] = list(range(8)), bytearray(8)
    assert short.next_settle(6) is None  # no room for a tile and a rest
