"""Fill in the middle (``suffix``): the prompt in the model's FIM tokens, and a 400 naming ``insert`` without them.

SmolLM2 has no FIM tokens, so the model that has them is a copy of it whose three unused
control tokens are renamed ``<fim_prefix>``/``<fim_suffix>``/``<fim_middle>`` (tests/variants.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest

from jupyter_llm.options import LoadOptions, SamplingOptions
from jupyter_llm.runtime import Runtime
from jupyter_llm.store.sources import Pulled
from tests.apiserver import MODEL, auth, running_server
from tests.ggufs import write_tiny_llama
from tests.variants import FIM_IDS, fim_model

PREFIX = "def add(a, b):\n    return"
SUFFIX = "\n\nprint(add(1, 2))\n"
FIM = "smollm2-fim"


@pytest.fixture(scope="session")
def fim_path(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fim_model(smollm2_path, tmp_path_factory.mktemp("fim-model"))


@pytest.fixture(scope="module")
def served(smollm2_path: Path, fim_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("fim-api")
    tiny = write_tiny_llama(root / "tiny.gguf")
    with running_server(smollm2_path, root, parallel=1) as (manager, server):
        manager.store.put(FIM, Pulled("pip", [fim_path], owned=[]))
        manager.store.put("tiny", Pulled("pip", [tiny], owned=[]))
        yield manager, server


@pytest.fixture(scope="module")
def fim_tokens(fim_path: Path) -> list[int]:
    with Runtime.start(fim_path, LoadOptions(gpu_layers=0, n_ctx=512)) as rt:
        tokens: list[int] = rt._call("fim", PREFIX, SUFFIX)
        assert rt.tokenize("<fim_prefix><fim_suffix><fim_middle>") == list(FIM_IDS)
        pre, suf, mid = FIM_IDS
        assert tokens == [pre, *rt.tokenize(PREFIX, parse_special=False), suf,
                          *rt.tokenize(SUFFIX, parse_special=False), mid]
        result = rt.infill(PREFIX, SUFFIX, SamplingOptions(temperature=0, max_tokens=8)).result
        assert result.prompt_tokens == len(tokens) and result.finish_reason in ("stop", "length")
    return tokens


def test_the_infill_prompt_is_prefix_suffix_middle_in_fim_tokens(fim_tokens: list[int]) -> None:
    pre, suf, mid = FIM_IDS
    assert fim_tokens[0] == pre and fim_tokens[-1] == mid and fim_tokens.count(suf) == 1


def test_ollama_generate_with_a_suffix_fills_the_middle(served: Any, fim_tokens: list[int]) -> None:
    _, server = served
    with ollama.Client(host=server.url, headers=auth(server)) as client:
        shown = client.show(FIM)
        assert "insert" in (shown.capabilities or [])
        reply = client.generate(model=FIM, prompt=PREFIX, suffix=SUFFIX, options={"temperature": 0, "num_predict": 8})
        assert reply.done and isinstance(reply.response, str)
        assert reply.prompt_eval_count == len(fim_tokens)  # the FIM prompt, not a chat
        streamed = "".join(part.response for part in client.generate(
            model=FIM, prompt=PREFIX, suffix=SUFFIX, stream=True, options={"temperature": 0, "num_predict": 8}))
        assert streamed == reply.response


def test_openai_completions_with_a_suffix_fill_the_middle(served: Any, fim_tokens: list[int]) -> None:
    _, server = served
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0) as client:
        reply = client.completions.create(model=FIM, prompt=PREFIX, suffix=SUFFIX, max_tokens=8, temperature=0)
    assert isinstance(reply.choices[0].text, str)
    assert reply.usage is not None and reply.usage.prompt_tokens == len(fim_tokens)


@pytest.mark.parametrize("name", ["tiny", MODEL])
def test_a_suffix_for_a_model_without_fim_tokens_is_a_400_naming_insert(served: Any, name: str) -> None:
    _, server = served
    with ollama.Client(host=server.url, headers=auth(server)) as client:
        assert "insert" not in (client.show(name).capabilities or [])
        with pytest.raises(ollama.ResponseError) as err:
            client.generate(model=name, prompt=PREFIX, suffix=SUFFIX, options={"num_predict": 4})
    assert err.value.status_code == 400 and "'insert'" in err.value.error
    with (openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0) as client,
          pytest.raises(openai.BadRequestError) as bad):
        client.completions.create(model=name, prompt=PREFIX, suffix=SUFFIX, max_tokens=4)
    assert "'insert'" in bad.value.body["message"]
