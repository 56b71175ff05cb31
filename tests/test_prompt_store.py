"""The prompt cache's second tier: when another prompt takes a conversation's slot, the slot's KV
is copied to host memory and restored when the conversation comes back, with answers exactly
those of a fresh evaluation. Real llama.cpp and the real default model (one slot, so that every
other prompt takes it), against a worker with the cache off; the store's bookkeeping (budget,
superseded copies, a refused restore) on its own with a fake llama.cpp."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from jupyter_llm.options import LoadOptions, SamplingOptions
from jupyter_llm.runtime import Completion, Runtime
from jupyter_llm.worker.prompt_cache import SlotCache
from jupyter_llm.worker.prompt_store import PromptStore

GREEDY = SamplingOptions(temperature=0.0, max_tokens=8)
"""Short answers: the second turn's prompt stays under flash attention's 64-row tile, so that
with it too a fresh evaluation would evaluate it as the first one was (reusable)."""
CONVERSATION = ["What is the capital of France?", "What is it famous for?", "Name one museum there."]
OTHER = "Write a haiku about autumn leaves falling into a quiet river."


def chat(rt: Runtime, history: list[dict[str, str]], user: str) -> Completion:
    history.append({"role": "user", "content": user})
    result = rt.chat(history, GREEDY).result
    history.append({"role": "assistant", "content": result.text})
    return result


def interleaved(rt: Runtime) -> list[Completion]:
    """The conversation's turns, each after an unrelated prompt that takes the only slot."""
    history: list[dict[str, str]] = []
    results = []
    for user in CONVERSATION:
        results.append(chat(rt, history, user))
        results.append(chat(rt, [], f"{OTHER} ({user[:4]})"))
    return results


@pytest.mark.parametrize("flash_attn", [False, True], ids=["plain-attention", "flash-attention"])
def test_a_conversation_whose_slot_another_prompt_took_comes_back_from_host_memory_exactly(
        smollm2_path: Path, flash_attn: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # One slot with the store, against the cache off (the answers) and against the conversation
    # alone in its slot, no copies (the reuse: a restored turn reuses what it would have).
    options = LoadOptions(gpu_layers=0, n_ctx=2048, parallel=1, flash_attn=flash_attn)
    with Runtime.start(smollm2_path, options, name="smollm2-store") as cached:
        results, stats = interleaved(cached), cached.stats()
    with Runtime.start(smollm2_path, options, name="smollm2-store-plain", _prompt_cache=False) as plain:
        reference, plain_stats = interleaved(plain), plain.stats()
    monkeypatch.setenv("JUPYTER_LLM_PROMPT_RAM", "0")
    with Runtime.start(smollm2_path, options, name="smollm2-alone") as alone:
        history: list[dict[str, str]] = []
        undisturbed = [chat(alone, history, user) for user in CONVERSATION]
    assert [r.text for r in results] == [r.text for r in reference]
    assert [r.prompt_tokens_cached for r in results[::2]] == [r.prompt_tokens_cached for r in undisturbed]
    assert results[2].prompt_tokens_cached >= results[0].prompt_tokens - 2  # its first prompt came back
    assert stats["prompt_tokens_restored"] >= results[2].prompt_tokens_cached
    assert stats["ram_prompts"] > 0 and 0 < stats["ram_bytes"] <= 1024 * 2**20
    assert plain_stats["ram_prompts"] == plain_stats["prompt_tokens_restored"] == 0  # the cache off: no copies


def test_with_no_host_memory_for_copies_a_taken_slot_is_evaluated_again(smollm2_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_LLM_PROMPT_RAM", "0")
    options = LoadOptions(gpu_layers=0, n_ctx=2048, parallel=1, flash_attn=False)
    with Runtime.start(smollm2_path, options, name="smollm2-nostore") as rt:
        history: list[dict[str, str]] = []
        first = chat(rt, history, CONVERSATION[0])
        chat(rt, [], OTHER)
        second = chat(rt, history, CONVERSATION[1])
        stats = rt.stats()
    assert second.prompt_tokens_cached < first.prompt_tokens - 2  # only the system prompt it shares with OTHER
    assert stats["prompt_tokens_restored"] == 0 and stats["ram_prompts"] == 0


def test_a_bad_prompt_ram_setting_says_what_to_give(monkeypatch: pytest.MonkeyPatch) -> None:
    from jupyter_llm import config

    monkeypatch.setenv("JUPYTER_LLM_PROMPT_RAM", "lots")
    with pytest.raises(ValueError, match="give MiB"):
        config.prompt_ram()
    monkeypatch.setenv("JUPYTER_LLM_PROMPT_RAM", "1.5")
    assert config.prompt_ram() == 3 * 2**19
    monkeypatch.setenv("JUPYTER_LLM_PROMPT_CACHE", "0")
    assert config.prompt_ram() == 0  # no prompt cache, no copies


# -- the bookkeeping (unit, fake llama.cpp) ----------------------------------------------------------


class FakeLlama:
    """llama.cpp's memory and per-sequence state calls: a sequence is a list of tokens; its
    state is those tokens as bytes (``per_token`` bytes each); ``refuse`` fails every restore."""

    def __init__(self, per_token: int = 10, refuse: bool = False) -> None:
        self.seqs: dict[int, list[int]] = {}
        self.per_token, self.refuse = per_token, refuse

    def decode(self, seq: int, tokens: list[int]) -> None:
        self.seqs.setdefault(seq, []).extend(tokens)

    def llama_memory_seq_rm(self, _mem: Any, seq: int, p0: int, p1: int) -> bool:
        held = self.seqs.setdefault(seq, [])
        del held[max(p0, 0):]
        return True

    def llama_memory_seq_pos_min(self, _mem: Any, seq: int) -> int:
        return 0 if self.seqs.get(seq) else -1

    def llama_memory_seq_pos_max(self, _mem: Any, seq: int) -> int:
        return len(self.seqs.get(seq, [])) - 1

    def llama_state_seq_get_size(self, _ctx: Any, seq: int) -> int:
        return len(self.seqs.get(seq, [])) * self.per_token

    def llama_state_seq_get_data(self, _ctx: Any, dst: Any, size: int, seq: int) -> int:
        data = b"".join(t.to_bytes(self.per_token, "little") for t in self.seqs.get(seq, []))
        dst[:len(data)] = data
        return len(data)

    def llama_state_seq_set_data(self, _ctx: Any, src: Any, size: int, seq: int) -> int:
        if self.refuse:
            return 0
        raw = bytes(src)
        self.seqs[seq] = [int.from_bytes(raw[i:i + self.per_token], "little") for i in range(0, size, self.per_token)]
        return size


def filled(llama: FakeLlama, cache: SlotCache, slot: int, tokens: list[int]) -> None:
    for i in range(0, len(tokens), 4):
        llama.decode(slot, tokens[i:i + 4])
        cache.decoded(slot, tokens[i:i + 4])


def test_a_slot_taken_over_is_copied_and_comes_back_with_its_kv() -> None:
    llama = FakeLlama()
    store = PromptStore(llama, None, budget=10_000)
    cache = SlotCache(llama, None, 1, n_swa=0, enabled=True, exact=True, store=store)
    conversation = list(range(100, 140))
    filled(llama, cache, 0, conversation)
    assert cache.reuse(0, [100, 101, *range(500, 540)]) == 2  # another prompt: the slot is copied first
    assert len(store.saved) == 1 and store.bytes == 400
    filled(llama, cache, 0, list(range(500, 540)))
    assert cache.reuse(0, [*conversation, 7, 7]) == 40  # back: restored, and the other one copied
    assert llama.seqs[0] == conversation and cache.tokens[0] == conversation and cache.restored == 40
    assert [s.tokens[2:4] for s in store.saved] == [[500, 501]]  # the restored copy lives in the slot now


def test_copies_stay_within_the_budget_the_oldest_dropped_and_extended_ones_replaced() -> None:
    llama = FakeLlama()
    store = PromptStore(llama, None, budget=1000)
    for k in range(3):  # 40 tokens, 400 bytes each: two fit
        llama.seqs[0] = list(range(1000 * k, 1000 * k + 40))
        assert store.save(0, llama.seqs[0], 40, bytearray())
    assert [s.tokens[0] for s in store.saved] == [1000, 2000] and store.bytes == 800
    assert not store.save(0, llama.seqs[0][:30], 30, bytearray())  # a copy holds all of it already
    llama.seqs[0] = [*range(2000, 2040), 1, 2, 3]
    assert store.save(0, llama.seqs[0], 43, bytearray())  # extends the newest: replaces it
    assert [len(s.tokens) for s in store.saved] == [40, 43] and store.bytes == 830
    llama.seqs[0] = list(range(200))
    assert not store.save(0, llama.seqs[0], 200, bytearray())  # larger than the whole budget


def test_a_copy_llama_cpp_refuses_leaves_the_slot_empty_and_evaluated_afresh() -> None:
    llama = FakeLlama(refuse=True)
    cache = SlotCache(llama, None, 1, n_swa=0, enabled=True, exact=True, store=PromptStore(llama, None, 10_000))
    filled(llama, cache, 0, list(range(100, 140)))
    assert cache.reuse(0, list(range(500, 540))) == 0
    filled(llama, cache, 0, list(range(500, 540)))
    assert cache.reuse(0, [*range(100, 140), 7, 7]) == 0
    assert cache.tokens[0] == [] and llama.seqs[0] == [] and cache.restored == 0


def test_a_restored_state_that_cannot_be_cut_counts_nothing_restored() -> None:
    memory = FakeLlama()
    cache = SlotCache(memory, None, 1, n_swa=0, enabled=True, exact=False, store=PromptStore(memory, None, 10_000))
    filled(memory, cache, 0, list(range(100, 140)))
    cache.reuse(0, list(range(500, 540)))
    filled(memory, cache, 0, list(range(500, 540)))
    # now as a recurrent state: emptied whole, never cut at a position
    memory.llama_memory_seq_rm = lambda _mem, seq, p0, p1: p0 < 0 and not memory.seqs[seq].clear()  # type: ignore
    assert cache.reuse(0, [*range(100, 130), 7, 7]) == 0  # restored, then the cut at 30 refused
    assert cache.restored == 0 and cache.tokens[0] == []


def test_only_settled_tokens_count_as_worth_a_copy() -> None:
    llama = FakeLlama()
    store = PromptStore(llama, None, budget=10_000)
    cache = SlotCache(llama, None, 1, n_swa=0, enabled=True, exact=True, store=store)
    filled(llama, cache, 0, list(range(100, 104)))  # a short prompt
    for token in range(200, 260):  # a long answer, generated one token at a time: not settled
        llama.decode(0, [token])
        cache.decoded(0, [token])
    assert cache.reuse(0, list(range(500, 540))) == 0
    assert store.saved == []  # a copy could give back only 4 tokens: not worth it
