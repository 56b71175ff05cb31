"""Log probabilities and several choices per prompt, through the official clients and the Python API.

The numbers come from the logits row each token was sampled from (the model's raw
distribution), so with temperature 0 the chosen token is the most likely one: it must be the
first of its top_logprobs, with the same logprob, for every token.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest

import jupyter_llm as llm
from jupyter_llm import manager as manager_module
from jupyter_llm.store.sources import Pulled
from tests.apiserver import MODEL, auth, openai_client, running_server, worker_stats

HI = [{"role": "user", "content": "Name three colours."}]
K = 4


@pytest.fixture(scope="module")
def served(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with running_server(smollm2_path, tmp_path_factory.mktemp("logprobs-api"), parallel=2) as pair:
        yield pair


@pytest.fixture
def client(served: Any) -> Iterator[openai.OpenAI]:
    with openai_client(served[1]) as c:
        yield c


@pytest.fixture
def oclient(served: Any) -> Iterator[ollama.Client]:
    _, server = served
    with ollama.Client(host=server.url, headers=auth(server)) as c:
        yield c


def check_greedy(entries: Sequence[Any], k: int, text: str) -> None:
    """Each entry (token, logprob, bytes, top) of a greedy answer: the token is its top choice,
    logprobs ≤ 0, the alternatives sorted and ``k`` of them; the bytes spell ``text``."""
    assert entries, "no logprobs"
    for token, logprob, raw, top in entries:
        assert logprob <= 0.0
        assert len(top) == k
        alternatives = [lp for _, lp, _ in top]
        assert all(lp <= 0.0 for lp in alternatives)
        assert alternatives == sorted(alternatives, reverse=True)
        assert math.isclose(logprob, max(alternatives), rel_tol=1e-6, abs_tol=1e-6), (token, top)
        assert top[0][0] == token or math.isclose(alternatives[0], alternatives[1], abs_tol=1e-6)
        assert bytes(raw).decode("utf-8", "replace") == token
    assert b"".join(bytes(raw) for _, _, raw, _ in entries).decode("utf-8", "replace") == text


def openai_entries(content: Sequence[Any]) -> list[Any]:
    return [(e.token, e.logprob, e.bytes, [(t.token, t.logprob, t.bytes) for t in e.top_logprobs]) for e in content]


def ollama_entries(items: Sequence[Any]) -> list[Any]:
    # read as the client's logprob examples do: .get() and [] on the entries (its types have no bytes)
    return [(e.get("token"), e.get("logprob"), e["token"].encode(), [(t["token"], t["logprob"], t["token"].encode())
                                                                    for t in e.get("top_logprobs", [])]) for e in items]


def test_openai_chat_logprobs_are_the_greedy_choice_with_sorted_alternatives(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, temperature=0,
                                           logprobs=True, top_logprobs=K)
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    check_greedy(openai_entries(choice.logprobs.content), K, choice.message.content or "")
    assert len(choice.logprobs.content) == reply.usage.completion_tokens
    plain = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == choice.message.content


def test_openai_streamed_logprobs_equal_the_whole_answers(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, temperature=0,
                                           logprobs=True, top_logprobs=2)
    streamed: list[Any] = []
    text = ""
    for chunk in client.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, temperature=0,
                                                logprobs=True, top_logprobs=2, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].logprobs is not None:
                streamed += chunk.choices[0].logprobs.content or []
    assert text == whole.choices[0].message.content
    assert openai_entries(streamed) == openai_entries(whole.choices[0].logprobs.content)


def test_openai_completions_give_the_legacy_logprobs_shape(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                      logprobs=3)
    lp = reply.choices[0].logprobs
    assert lp is not None and lp.tokens and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert "".join(lp.tokens) == reply.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and 1 <= len(top) <= 3  # (a dict: alternatives that read alike merge)
        assert math.isclose(logprob, max(top.values()), abs_tol=1e-6) and token in top


def test_ollama_chat_and_generate_logprobs_streamed_and_not(oclient: ollama.Client) -> None:
    reply = oclient.chat(model=MODEL, messages=HI, logprobs=True, top_logprobs=K,
                         options={"temperature": 0, "num_predict": 10})
    check_greedy(ollama_entries(reply.get("logprobs", [])), K, reply["message"]["content"])
    streamed, text = [], ""
    for part in oclient.chat(model=MODEL, messages=HI, logprobs=True, top_logprobs=K, stream=True,
                             options={"temperature": 0, "num_predict": 10}):
        text += part.message.content or ""
        streamed += part.logprobs or []
    assert text == reply.message.content
    assert ollama_entries(streamed) == ollama_entries(reply.logprobs or [])
    generated = oclient.generate(model=MODEL, prompt="hi! be concise.", logprobs=True, top_logprobs=2,
                                 options={"temperature": 0, "num_predict": 8})
    check_greedy(ollama_entries(generated.get("logprobs", [])), 2, generated["response"])
    top_only = oclient.generate(model=MODEL, prompt="hi! be concise.", logprobs=True,
                                options={"temperature": 0, "num_predict": 4})
    assert top_only.logprobs and all(not e.top_logprobs for e in top_only.logprobs)


def test_two_choices_share_one_prompt_evaluation(served: Any, client: openai.OpenAI) -> None:
    manager, _ = served
    messages = [{"role": "user", "content": "Write one sentence about the moon and the tides."}]
    client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)  # loaded, counters settled
    before = worker_stats(manager)
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=1.0, n=2,
                                           seed=3)
    after = worker_stats(manager)
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.message.content is not None for c in reply.choices)
    assert after["requests"] - before["requests"] == 1
    evaluated = (after["tokens_in"] - before["tokens_in"]) + (after["prompt_tokens_cached"]
                                                                - before["prompt_tokens_cached"])
    assert evaluated == reply.usage.prompt_tokens  # once, not once per choice
    greedy = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, n=2)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    single = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert greedy.choices[0].message.content == single.choices[0].message.content
    assert greedy.usage.completion_tokens == 2 * single.usage.completion_tokens
    assert greedy.usage.prompt_tokens == single.usage.prompt_tokens


def test_streamed_choices_carry_their_index(client: openai.OpenAI) -> None:
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, temperature=0, n=2,
                                                stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    whole = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, temperature=0)
    assert texts[0] == texts[1] == whole.choices[0].message.content
    assert set(finishes) == {0, 1}
    completions = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0.8,
                                            n=2, seed=5)
    assert [c.index for c in completions.choices] == [0, 1]


def test_more_choices_than_slots_is_a_400_that_says_how_to_get_them(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, n=3)
    assert "--parallel 3" in err.value.body["message"]


@pytest.fixture
def model(smollm2_path: Path) -> Iterator[llm.Model]:
    manager_module._manager = None  # a fresh manager pointing at this test's store
    manager = manager_module.get_manager()
    manager.store.put("smollm2", Pulled("pip", [smollm2_path], owned=[]))
    yield llm.load("smollm2", n_ctx=1024, gpu_layers=0, keep_alive=None)
    manager.close()
    manager_module._manager = None


def test_python_api_gives_logprobs_on_the_answer_and_its_pieces(model: llm.Model) -> None:
    answer = model.chat("Name three colours.", logprobs=3, temperature=0, max_tokens=10)
    assert isinstance(answer, str) and answer.logprobs is not None
    check_greedy([(lp.token, lp.logprob, lp.bytes, [(t.token, t.logprob, t.bytes) for t in lp.top])
                  for lp in answer.logprobs], 3, answer)
    pieces = list(model.generate("The capital of France is", logprobs=1, temperature=0, max_tokens=5, stream=True))
    assert "".join(pieces) == model.generate("The capital of France is", temperature=0, max_tokens=5)
    assert all(p.logprobs is not None for p in pieces) and 1 <= sum(len(p.logprobs) for p in pieces) <= 5
    assert model.chat("Say hi.", new=True, temperature=0, max_tokens=4).__class__ is str  # not asked: plain text


def test_cancelling_several_answers_ends_them_all_and_frees_their_slots(smollm2_path: Path) -> None:
    from jupyter_llm.options import LoadOptions, SamplingOptions
    from jupyter_llm.runtime import Extras, Runtime

    with Runtime.start(smollm2_path, LoadOptions(gpu_layers=0, n_ctx=1024, parallel=2)) as rt:
        story = [{"role": "user", "content": "Write a long story about a dragon and a city."}]
        sampling = SamplingOptions(temperature=0.8, max_tokens=400, seed=1)
        stream = rt.chat(story, sampling, extras=Extras(n=2, logprobs=0))
        first = next(iter(stream))
        assert first.index in (0, 1) and len(first.logprobs) >= 1
        stream.cancel()
        results = stream.results
        assert [r.index for r in results] == [0, 1]
        assert {r.finish_reason for r in results} == {"cancelled"}
        stats = rt.stats()
        assert stats["busy"] == 0 and stats["queued"] == 0
        after = rt.chat(HI, SamplingOptions(temperature=0, max_tokens=4)).result  # the slots work on
        assert after.finish_reason in ("stop", "length") and after.logprobs is None
