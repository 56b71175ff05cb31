"""Anthropic's Messages API (/v1/messages), driven by the official ``anthropic`` client against the real
server and model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.apiserver import MODEL, auth, running_server

HI = [{"role": "user", "content": "Say hello."}]
T0 = {"temperature": 0}
"""Greedy sampling; the current client has no sampling arguments (newer models take none), older ones send them."""
WEATHER = {
    "name": "get_weather", "description": "The current weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def served(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with running_server(smollm2_path, tmp_path_factory.mktemp("anthropic-api"), parallel=2) as pair:
        yield pair


@pytest.fixture
def client(served: Any) -> Iterator[anthropic.Anthropic]:
    _, server = served
    with anthropic.Anthropic(base_url=server.url, api_key=server.token, max_retries=0) as c:
        yield c


def test_a_message_has_text_a_stop_reason_and_usage(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model=MODEL, max_tokens=16, messages=HI, extra_body=T0)
    assert m.type == "message" and m.role == "assistant" and m.model == MODEL and m.id.startswith("msg_")
    assert m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens") and m.stop_sequence is None
    assert m.usage.input_tokens > 5 and 0 < m.usage.output_tokens <= 16


def test_max_tokens_is_the_stop_reason_of_a_cut_answer(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model=MODEL, max_tokens=3, extra_body=T0,
                               messages=[{"role": "user", "content": "Count from one to one hundred in words."}])
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 3


def test_a_max_tokens_beyond_the_context_runs_until_the_answer_ends(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model=MODEL, max_tokens=8192, messages=HI, extra_body=T0)  # > 2048 a slot
    assert m.stop_reason in ("end_turn", "max_tokens") and m.content[0].text
    assert m.usage.input_tokens + m.usage.output_tokens <= 8192


def test_the_system_prompt_and_text_blocks_reach_the_model(client: anthropic.Anthropic) -> None:
    plain = client.messages.create(model=MODEL, max_tokens=4, messages=HI, extra_body=T0)
    rules = "You are a pirate. Always answer like a pirate, in one short sentence. " * 3
    with_system = client.messages.create(
        model=MODEL, max_tokens=4, extra_body=T0, system=[{"type": "text", "text": rules}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}])
    assert with_system.usage.input_tokens > plain.usage.input_tokens + 20
    as_string = client.messages.create(model=MODEL, max_tokens=4, extra_body=T0, system=rules,
                                       messages=HI)
    assert as_string.usage.input_tokens == with_system.usage.input_tokens
    assert as_string.content[0].text == with_system.content[0].text


def test_top_k_and_top_p_are_taken_as_older_clients_send_them(client: anthropic.Anthropic) -> None:
    greedy = client.messages.create(model=MODEL, max_tokens=12, messages=HI, extra_body=T0)
    top1 = client.messages.create(model=MODEL, max_tokens=12, messages=HI,
                                  extra_body={"temperature": 1.0, "top_k": 1, "top_p": 0.9})
    assert top1.content[0].text == greedy.content[0].text
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=MODEL, max_tokens=4, messages=HI, extra_body={"top_k": -1})


def test_stop_sequences_end_the_answer(client: anthropic.Anthropic) -> None:
    whole = client.messages.create(model=MODEL, max_tokens=24, messages=HI, extra_body=T0)
    text = whole.content[0].text
    word = text.split()[1] if len(text.split()) > 1 else text[-2:]
    cut = client.messages.create(model=MODEL, max_tokens=24, messages=HI, extra_body=T0,
                                 stop_sequences=[word])
    assert cut.content[0].text == text[:text.index(word)]
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", word)
    assert (whole.stop_reason, whole.stop_sequence) != ("stop_sequence", word)
    with client.messages.stream(model=MODEL, max_tokens=24, messages=HI, extra_body=T0,
                                stop_sequences=["zzqx", word]) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", word)


def test_a_streamed_message_sends_the_events_in_order_and_joins_to_the_whole(client: anthropic.Anthropic) -> None:
    whole = client.messages.create(model=MODEL, max_tokens=20, messages=HI, extra_body=T0)
    with client.messages.stream(model=MODEL, max_tokens=20, messages=HI, extra_body=T0) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens == whole.usage.output_tokens
    kinds = [e.type for e in client.messages.create(model=MODEL, max_tokens=8, messages=HI,
                                                    extra_body=T0, stream=True)]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}


def test_tokens_are_counted(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model=MODEL, max_tokens=2, messages=HI, system="Be brief.")
    counted = client.messages.count_tokens(model=MODEL, messages=HI, system="Be brief.")
    assert counted.input_tokens == m.usage.input_tokens


def test_errors_have_anthropics_shape(served: Any, client: anthropic.Anthropic) -> None:
    _, server = served
    r = httpx.post(f"{server.url}/v1/messages", json={"model": MODEL, "messages": HI}, headers=auth(server))
    assert r.status_code == 400
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "system", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=MODEL, max_tokens=4, messages=HI, extra_body={"temperature": 1.5})
    prefill = [*HI, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(anthropic.BadRequestError, match="prefill"):
        client.messages.create(model=MODEL, max_tokens=4, messages=prefill)
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="no-such-model", max_tokens=4, messages=HI)
    assert info.value.body["error"]["type"] == "not_found_error"


def test_the_token_is_taken_as_x_api_key_and_a_wrong_one_is_refused(served: Any) -> None:
    _, server = served
    wrong = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with wrong, pytest.raises(anthropic.AuthenticationError) as info:
        wrong.messages.create(model=MODEL, max_tokens=2, messages=HI)
    assert info.value.body["error"]["type"] == "authentication_error"
    r = httpx.get(f"{server.url}/v1/models", headers={"x-api-key": server.token})
    assert r.status_code == 200
    assert httpx.get(f"{server.url}/v1/models", headers={"x-api-key": "nope"}).status_code == 401


NOT_TEXT = [1, -1.5, True, [], {}, ["x"], {"a": 1}]
MALFORMED: dict[str, list[Any]] = {
    "model": [*NOT_TEXT, "", "no-such-model"],
    "messages": ["x", 1, {}, [], [1], [None], [{"role": "user"}], [{"role": "system", "content": "x"}],
                 [{"role": "user", "content": 5}], [{"role": "user", "content": [5]}],
                 [{"role": "user", "content": [{"type": "text"}]}],
                 [{"role": "user", "content": [{"type": "tool_use", "id": "x", "name": "f", "input": {}}]}],
                 [{"role": "assistant", "content": [{"type": "tool_use", "id": 5}]}, {"role": "user", "content": "x"}],
                 [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "q"}]}]],
    "system": [5, True, {}, [5], [{"type": "image"}]], "max_tokens": [0, -1, 10**12, "x", 1.5],
    "temperature": [-1, 1.5, "x"], "top_p": [2, "x"], "top_k": [-1, "x"], "stop_sequences": [5, [1], ["x"] * 100],
    "stream": ["yes", 1], "thinking": [5, {"type": "enabled", "budget_tokens": 1024}],
    "tools": ["x", 5, [5], [{"name": "f"}], [{"name": "f", "input_schema": 5}],
              [{"name": "f", "input_schema": {}, "type": "bash_20250124"}]],
    "tool_choice": ["auto", 5, {}, {"type": "tool"}, {"type": "tool", "name": "zz"}, {"type": "any"}, {"type": "x"}],
}


def test_malformed_requests_get_only_4xx_and_the_server_keeps_working(served: Any, client: anthropic.Anthropic) -> None:
    _, server = served
    base = {"model": MODEL, "messages": HI, "max_tokens": 1}
    with httpx.Client(base_url=server.url, headers=auth(server), timeout=60) as http:
        for field, values in MALFORMED.items():
            for value in values:
                counted = field in ("model", "messages", "system", "tools")  # what the counting route reads
                for path in ("/v1/messages", *(["/v1/messages/count_tokens"] if counted else [])):
                    r = http.post(path, json={**base, field: value})
                    assert 400 <= r.status_code < 500, (path, field, value, r.status_code, r.text)
                    assert r.json()["type"] == "error" and r.json()["error"]["message"]
        for raw in (b"", b"{", b"[]", b"null"):
            assert http.post("/v1/messages", content=raw).status_code == 400
    assert client.messages.create(model=MODEL, max_tokens=2, messages=HI).content


def test_a_forced_tool_gives_a_tool_use_block_whose_input_validates(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model=MODEL, max_tokens=64, extra_body=T0, tools=[WEATHER],
                               tool_choice={"type": "tool", "name": "get_weather"},
                               messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    uses = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason == "tool_use" and uses
    assert uses[0].name == "get_weather" and uses[0].id and isinstance(uses[0].input["city"], str)


def test_output_config_format_constrains_the_text_and_a_forced_tool_still_wins(client: anthropic.Anthropic) -> None:
    schema = {"type": "object", "properties": {"country": {"type": "string"}}, "required": ["country"],
              "additionalProperties": False}
    config = {"output_config": {"format": {"type": "json_schema", "schema": schema}}}
    question = [{"role": "user", "content": "Paris is in which country?"}]
    m = client.messages.create(model=MODEL, max_tokens=64, extra_body={**T0, **config}, messages=question)
    assert m.stop_reason == "end_turn", m.content
    assert isinstance(json.loads(m.content[0].text)["country"], str)
    m = client.messages.create(model=MODEL, max_tokens=64, extra_body={**T0, **config}, tools=[WEATHER],
                               tool_choice={"type": "any"}, messages=question)
    assert m.stop_reason == "tool_use" and [b for b in m.content if b.type == "tool_use"]
    with pytest.raises(anthropic.BadRequestError, match="output_config"):
        client.messages.create(model=MODEL, max_tokens=8, messages=question,
                               extra_body={"output_config": {"format": {"type": "xml"}}})


def test_a_streamed_tool_use_block_accumulates_its_input(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model=MODEL, max_tokens=64, extra_body=T0, tools=[WEATHER],
                                tool_choice={"type": "any"},
                                messages=[{"role": "user", "content": "Weather in Rome?"}]) as stream:
        final = stream.get_final_message()
    uses = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and uses and "city" in uses[0].input


def test_a_tool_result_round_trip(client: anthropic.Anthropic) -> None:
    question = {"role": "user", "content": "What is the weather in Paris?"}
    first = client.messages.create(model=MODEL, max_tokens=64, extra_body=T0, tools=[WEATHER],
                                   tool_choice={"type": "tool", "name": "get_weather"}, messages=[question])
    use = next(b for b in first.content if b.type == "tool_use")
    result = {"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 25 degrees Celsius."}
    messages: Any = [question, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
                     {"role": "user", "content": [result]}]
    second = client.messages.create(model=MODEL, max_tokens=32, extra_body=T0, tools=[WEATHER],
                                    tool_choice={"type": "none"}, messages=messages)
    assert second.stop_reason in ("end_turn", "max_tokens") and second.content[0].text
    alone = client.messages.create(model=MODEL, max_tokens=1, messages=[question])
    assert second.usage.input_tokens > alone.usage.input_tokens + 10  # the call and its result are in the prompt
    orphan = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "x"}]}
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=MODEL, max_tokens=4, messages=[orphan])
