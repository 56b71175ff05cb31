"""The OpenAI API under /v1, driven by the official ``openai`` client against the real server and model."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.apiserver import MODEL, auth, openai_client, running_server

HI = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def served(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with running_server(smollm2_path, tmp_path_factory.mktemp("openai-api"), parallel=2) as pair:
        yield pair


@pytest.fixture
def client(served: Any) -> Iterator[openai.OpenAI]:
    with openai_client(served[1]) as c:
        yield c


def test_models_are_listed_and_retrieved(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_completion_returns_a_message_and_usage(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, temperature=0, seed=1)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5
    assert 0 < reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_equals_the_whole_answer_and_reports_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_the_event_stream_ends_with_done(served: Any) -> None:
    _, server = served
    body = {"model": MODEL, "messages": HI, "max_tokens": 4, "stream": True}
    # httpx's default 5 s read timeout is too short for a first token on a shared, busy machine
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=auth(server),
                      timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] is not None


def test_completions_continue_a_raw_prompt_and_echo_it(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text
    echoed = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5,
                                       temperature=0, echo=True)
    assert echoed.choices[0].text == "The capital of France is" + reply.choices[0].text
    default = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0)
    assert default.usage.completion_tokens <= 16  # OpenAI's default max_tokens for completions
    streamed = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text


def test_embeddings_in_float_and_base64_agree(client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model=MODEL, input=["red", "blue"], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1]
    assert len(floats.data[0].embedding) == 576
    assert floats.usage.prompt_tokens >= 2
    packed = client.embeddings.with_raw_response.create(
        model=MODEL, input="red", encoding_format="base64").http_response.json()
    raw = base64.b64decode(packed["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert max(abs(a - b) for a, b in zip(decoded, floats.data[0].embedding, strict=True)) < 1e-6


def test_json_schema_response_format_gives_matching_json(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Is water wet?"}], temperature=0, max_tokens=30,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert isinstance(json.loads(reply.choices[0].message.content)["ok"], bool)


def test_a_wrong_token_raises_the_clients_authentication_error(served: Any) -> None:
    _, server = served
    with (openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-the-token", max_retries=0) as bad_client,
          pytest.raises(openai.AuthenticationError) as err):
        bad_client.models.list()
    assert err.value.status_code == 401
    assert err.value.body["type"] == "authentication_error"
    assert "token" in err.value.body["message"]


def test_bad_parameters_are_400s_in_openais_error_shape(client: openai.OpenAI) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"n": 65}, "n"),
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
        ({"presence_penalty": 1.0}, "presence_penalty"),
        ({"response_format": {"type": "xml"}}, "response_format"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=HI, **extra)
        assert err.value.body["param"] == param, extra
        assert err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=HI)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long_prompt:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 3000}])
    assert long_prompt.value.body["code"] == "context_length_exceeded"


def test_text_content_parts_are_joined_and_images_refused(client: openai.OpenAI) -> None:
    parts = [{"type": "text", "text": "Say "}, {"type": "text", "text": "hello."}]
    joined = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}],
                                            max_tokens=8, temperature=0)
    plain = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, temperature=0)
    assert joined.choices[0].message.content == plain.choices[0].message.content
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": image}])


def test_metrics_count_requests_tokens_and_memory_per_device(client: openai.OpenAI, served: Any) -> None:
    _, server = served
    client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3)
    text = httpx.get(f"{server.url}/metrics", headers=auth(server)).text
    lines = text.splitlines()

    def value(prefix: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))

    assert value('jupyter_llm_http_requests_total{route="/v1/chat/completions",method="POST",status="200"}') >= 1
    assert value('jupyter_llm_http_requests_total{route="/v1/chat/completions",method="POST",status="400"}') >= 1
    assert value('jupyter_llm_tokens_total{model="smollm2",direction="out"}') >= 3
    assert value('jupyter_llm_tokens_total{model="smollm2",direction="in"}') > 0
    assert value('jupyter_llm_http_request_duration_seconds_count{route="/v1/chat/completions"}') >= 1
    assert any(line.startswith("jupyter_llm_time_to_first_token_seconds_bucket") for line in lines)
    assert value("jupyter_llm_models_loaded") == 1
    assert value('jupyter_llm_slots{model="smollm2"}') == 2
    assert 'jupyter_llm_slots_busy{model="smollm2"}' in text and 'jupyter_llm_queue_depth{model="smollm2"}' in text
    for kind in ("weights", "kv", "graph"):
        measured = value(f'jupyter_llm_memory_bytes{{model="smollm2",device="CPU",kind="{kind}",source="measured"}}')
        assert measured > 1_000_000, kind
    weights = value('jupyter_llm_memory_bytes{model="smollm2",device="CPU",kind="weights",source="measured"}')
    assert abs(weights - 96_576_768) / 96_576_768 < 0.01
