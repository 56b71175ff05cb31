"""Thinking: reasoning split off the answer, for a template with reasoning markers; a 400 without them.

The reasoning model is the default model with a chat template that opens ``<think>`` in its
generation prompt, as DeepSeek-R1's does, unless ``enable_thinking`` is false, as in Qwen3's
(tests/variants.py). A 135M model rarely closes the block by itself, so the tests that need
an answer after the reasoning force one with a grammar: real output, split for real.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import IPython
import ollama
import openai
import pytest
from IPython.testing.globalipapp import start_ipython

import jupyter_llm as llm
from jupyter_llm import chat
from jupyter_llm import manager as manager_module
from jupyter_llm.errors import CapabilityError
from jupyter_llm.manager import ModelManager
from jupyter_llm.notebook.chatcell import Renderer, run_chat_cell
from jupyter_llm.options import LoadOptions, SamplingOptions
from jupyter_llm.store.records import Store
from jupyter_llm.store.sources import Pulled
from jupyter_llm.thinking import ThinkingSplitter
from tests.apiserver import MODEL, auth, running_server
from tests.variants import thinking_model

THINKER = "smollm2-think"
ASK = [{"role": "user", "content": "Why is the sky blue?"}]
FORCED = 'root ::= "Blue light" " scatters" "</think>" "\\n\\n" "The sky is blue."'
"""A grammar for an answer that reasons, closes the block and answers (the prompt opened it)."""


# -- the splitter ---------------------------------------------------------------------------------

def split(pieces: list[str], markers: tuple[str, str] = ("<think>", "</think>")) -> tuple[str, str]:
    splitter = ThinkingSplitter(markers)
    thinking, content = "", ""
    for piece in pieces:
        t, c = splitter.feed(piece)
        thinking, content = thinking + t, content + c
    t, c = splitter.finish()
    assert (thinking + t, content + c) == (splitter.thinking, splitter.content)
    return thinking + t, content + c


def cuts(text: str, n: int) -> Iterator[list[str]]:
    """``text`` cut into ``n + 1`` pieces in every way (empty pieces included)."""
    for points in itertools.combinations_with_replacement(range(len(text) + 1), n):
        bounds = [0, *points, len(text)]
        yield [text[a:b] for a, b in itertools.pairwise(bounds)]


def test_the_splitter_finds_markers_split_anywhere() -> None:
    text = "\n<think>\nblue light scatters</think>\n\nThe sky is blue."
    for pieces in [*cuts(text, 1), *cuts(text, 2), list(text)]:
        assert split(pieces) == ("blue light scatters", "The sky is blue."), pieces


def test_the_splitter_leaves_text_without_an_opening_marker_as_content() -> None:
    for text in ("The sky is blue.", "<thinking about it> no", "<thi", "a </think> b"):
        for pieces in cuts(text, 1):
            assert split(pieces) == ("", text.strip()), pieces


def test_an_unclosed_block_is_all_reasoning_and_a_partial_close_is_held() -> None:
    splitter = ThinkingSplitter()
    assert splitter.feed("<think>step one </thi") == ("step one ", "")
    assert splitter.feed("s is still thinking") == ("</this is still thinking", "")
    assert splitter.finish() == ("", "")
    assert split(["<think>never closed"]) == ("never closed", "")
    assert split(["◁think▷a◁/think▷b"], ("◁think▷", "◁/think▷")) == ("a", "b")


def test_the_chat_cell_draws_reasoning_collapsed_above_the_answer() -> None:
    renderer = Renderer("markdown")
    renderer.thinking = "step <one>"
    drawn = renderer.render("The answer.", final=True, stats="stats")
    assert drawn.markdown is not None
    assert drawn.markdown.startswith("<details><summary>Thinking</summary>") and "</details>" in drawn.markdown
    assert "step &lt;one&gt;" in drawn.markdown and drawn.markdown.index("</details>") < drawn.markdown.index(
        "The answer.")
    assert "step <one>" in drawn.plain and drawn.plain.rstrip().endswith("[stats]")
    assert Renderer("markdown").render("x", final=True).markdown == "x"


# -- the real model ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def thinker_path(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return thinking_model(smollm2_path, tmp_path_factory.mktemp("thinking-model"))


@pytest.fixture(scope="module")
def served(smollm2_path: Path, thinker_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with running_server(smollm2_path, tmp_path_factory.mktemp("thinking-api"), parallel=1) as (manager, server):
        manager.store.put(THINKER, Pulled("pip", [thinker_path], owned=[]))
        yield manager, server


def test_a_chat_turn_splits_real_reasoning_from_the_answer(served: Any) -> None:
    manager, _ = served
    model = manager.load(THINKER, LoadOptions(gpu_layers=0, n_ctx=1024))
    turn = chat.start(model, ASK, SamplingOptions(temperature=0, max_tokens=40), grammar=FORCED, think=True)
    chunks = list(turn)
    result = turn.result
    assert result is not None
    assert (result.thinking, result.text) == ("Blue light scatters", "The sky is blue.")
    assert "".join(c.thinking for c in chunks) == result.thinking and "".join(c.text for c in chunks) == result.text
    # think=False reaches the template: it writes an empty block itself, and nothing is split
    off = chat.start(model, ASK, SamplingOptions(temperature=0, max_tokens=4), think=False).stream.result
    on = chat.start(model, ASK, SamplingOptions(temperature=0, max_tokens=4), think=True).stream.result
    assert off.thinking is None and on.thinking is not None
    assert off.prompt_tokens > on.prompt_tokens  # "<think>\n\n</think>\n\n" against "<think>\n"


def test_ollama_think_returns_thinking_apart_from_the_content(served: Any) -> None:
    _, server = served
    options = {"temperature": 0, "num_predict": 10}
    with ollama.Client(host=server.url, headers=auth(server)) as client:
        assert "thinking" in (client.show(THINKER).capabilities or [])
        reply = client.chat(model=THINKER, messages=ASK, think=True, options=options)
        thinking = reply.message.thinking
        assert thinking and "<think>" not in thinking and "<think>" not in reply.message.content
        assert thinking not in reply.message.content
        parts = list(client.chat(model=THINKER, messages=ASK, think=True, stream=True, options=options))
        assert "".join(p.message.thinking or "" for p in parts) == thinking
        assert "".join(p.message.content or "" for p in parts) == reply.message.content
        generated = client.generate(model=THINKER, prompt="Why is the sky blue?", think="high", options=options)
        assert generated.thinking and "<think>" not in generated.thinking
        plain = client.chat(model=THINKER, messages=ASK, options=options)  # not asked: nothing split
        assert plain.message.thinking is None


def test_openai_reasoning_effort_gives_reasoning_content(served: Any) -> None:
    _, server = served
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0) as client:
        reply = client.chat.completions.create(model=THINKER, messages=ASK, max_tokens=10, temperature=0,
                                               reasoning_effort="low")
        message = reply.choices[0].message
        reasoning = (message.model_extra or {}).get("reasoning_content")
        assert reasoning and "<think>" not in reasoning and "<think>" not in (message.content or "")
        streamed_reasoning, streamed_content = "", ""
        for chunk in client.chat.completions.create(model=THINKER, messages=ASK, max_tokens=10, temperature=0,
                                                    reasoning_effort="low", stream=True):
            if chunk.choices:
                delta = chunk.choices[0].delta
                streamed_reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
                streamed_content += delta.content or ""
        assert (streamed_reasoning, streamed_content) == (reasoning, message.content or "")


def test_thinking_on_a_model_without_markers_is_a_400_that_says_so(served: Any) -> None:
    _, server = served
    with ollama.Client(host=server.url, headers=auth(server)) as client:
        with pytest.raises(ollama.ResponseError) as err:
            client.chat(model=MODEL, messages=ASK, think=True, options={"num_predict": 2})
        assert err.value.status_code == 400 and "thinking" in err.value.error
        assert client.chat(model=MODEL, messages=ASK, think=False, options={"num_predict": 2}).done
    with (openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0) as oai,
          pytest.raises(openai.BadRequestError) as bad):
        oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, reasoning_effort="high")
    assert "thinking" in bad.value.body["message"]


@pytest.fixture
def api_manager(smollm2_path: Path, thinker_path: Path) -> Iterator[ModelManager]:
    manager_module._manager = None  # a fresh manager pointing at this test's store
    manager = manager_module.get_manager()
    manager.store.put(MODEL, Pulled("pip", [smollm2_path], owned=[]))
    manager.store.put(THINKER, Pulled("pip", [thinker_path], owned=[]))
    yield manager
    manager.close()
    manager_module._manager = None


def test_the_python_api_answer_has_thinking_and_a_clear_error_without(api_manager: ModelManager) -> None:
    thinker = llm.load(THINKER, n_ctx=1024, gpu_layers=0, keep_alive=None)
    answer = thinker.chat("Why is the sky blue?", think=True, temperature=0, max_tokens=8)
    assert isinstance(answer, str) and answer.thinking and "<think>" not in answer.thinking
    pieces = list(thinker.chat(ASK, think=True, temperature=0, max_tokens=8, stream=True))
    assert "".join(p.thinking or "" for p in pieces) == answer.thinking
    plain = llm.load(MODEL, n_ctx=1024, gpu_layers=0, keep_alive=None)
    with pytest.raises(CapabilityError, match="does not support thinking") as err:
        plain.chat("Why is the sky blue?", think=True, max_tokens=4)
    assert err.value.capability == "thinking"


def test_a_chat_cell_with_think_draws_the_reasoning(thinker_path: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    shell = start_ipython() or IPython.get_ipython()
    manager = ModelManager(Store(root=tmp_path / "records"))
    manager.store.put(THINKER, Pulled("pip", [thinker_path], owned=[]))
    kernel = getattr(shell, "kernel", None)
    shell.kernel = object()  # draw as in a notebook (displays print their plain text here)
    try:
        run_chat_cell(shell, manager, f"-m {THINKER} --think --temperature 0 --max-tokens 6 --new",
                      "Why is the sky blue?")
    finally:
        shell.kernel = kernel
        manager.close()
    out = capsys.readouterr().out
    assert "[thinking]" in out and "[/thinking]" in out
