"""OpenAI's Responses API (/v1/responses), driven by the official ``openai`` client against the real
server and model; the response store's bounds in a unit test of its own."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pydantic
import pytest

from jupyter_llm.server.response_store import ResponseStore
from tests.apiserver import MODEL, auth, openai_client, running_server

WEATHER = {
    "type": "function", "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False},
}


@pytest.fixture(scope="module")
def served(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with running_server(smollm2_path, tmp_path_factory.mktemp("responses-api"), parallel=2) as pair:
        yield pair


@pytest.fixture
def client(served: Any) -> Iterator[openai.OpenAI]:
    with openai_client(served[1]) as c:
        yield c


def test_a_response_has_output_text_and_usage(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="Say hello.", instructions="You are terse.",
                                max_output_tokens=16, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.status in ("completed", "incomplete") and r.output_text
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.instructions == "You are terse."
    assert r.usage.input_tokens > 5 and 0 < r.usage.output_tokens <= 16
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"


def test_max_output_tokens_makes_an_incomplete_response(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="Count from one to one hundred in words.",
                                max_output_tokens=3, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3


def test_input_items_with_text_parts_are_a_conversation(client: openai.OpenAI) -> None:
    items: Any = [
        {"role": "developer", "content": "Answer in one word."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Blue."}]},
        {"role": "user", "content": "Another one?"},
    ]
    r = client.responses.create(model=MODEL, input=items, max_output_tokens=8, temperature=0)
    short = client.responses.create(model=MODEL, input="Another one?", max_output_tokens=8, temperature=0)
    assert r.output_text and r.usage.input_tokens > short.usage.input_tokens + 5


def test_a_streamed_response_sends_the_events_in_order_and_the_deltas_make_the_text(client: openai.OpenAI) -> None:
    whole = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=20, temperature=0)
    events = list(client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=20, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    last = "response.incomplete" if whole.status == "incomplete" else "response.completed"
    head = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    tail = ["response.output_text.done", "response.content_part.done", "response.output_item.done", last]
    assert kinds[:4] == head and kinds[-4:] == tail
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-4].text
    final = events[-1].response
    assert final.output_text == text and final.usage.output_tokens == whole.usage.output_tokens
    assert final.id == events[0].response.id


def test_the_stream_helper_gives_the_final_response(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input="Say hi.", max_output_tokens=64, temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and "".join(deltas) == final.output_text


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL, input="My name is Ada. Say hello.", max_output_tokens=12,
                                    temperature=0)
    follow = "What is my name?"
    alone = client.responses.create(model=MODEL, input=follow, max_output_tokens=4, temperature=0)
    second = client.responses.create(model=MODEL, input=follow, previous_response_id=first.id,
                                     max_output_tokens=4, temperature=0)
    assert second.previous_response_id == first.id
    # the first exchange (its prompt and its answer) comes before the new question
    grown = second.usage.input_tokens - alone.usage.input_tokens
    assert grown >= first.usage.input_tokens - alone.usage.input_tokens + first.usage.output_tokens - 2
    third = client.responses.create(model=MODEL, input="And again?", previous_response_id=second.id,
                                    max_output_tokens=4, temperature=0)
    assert third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens
    assert client.responses.retrieve(first.id).output_text == first.output_text


def test_instructions_are_not_carried_over_to_the_next_response(client: openai.OpenAI) -> None:
    long_rules = "Always answer politely and briefly, in plain English, without lists. " * 4
    first = client.responses.create(model=MODEL, input="Hi.", instructions=long_rules, max_output_tokens=4,
                                    temperature=0)
    plain = client.responses.create(model=MODEL, input="Hi.", max_output_tokens=4, temperature=0)
    second = client.responses.create(model=MODEL, input="Hi.", previous_response_id=first.id, max_output_tokens=4,
                                     temperature=0)
    # the second prompt holds the first exchange without the long instructions
    assert second.usage.input_tokens < first.usage.input_tokens + plain.usage.input_tokens


def test_an_unknown_previous_response_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_nope", max_output_tokens=2)
    assert info.value.body["code"] == "previous_response_not_found"
    assert info.value.body["param"] == "previous_response_id"


def test_a_response_made_with_store_false_is_not_kept(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="Hi", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="Hi", previous_response_id=r.id, max_output_tokens=2)


def test_a_response_is_retrieved_and_deleted(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    assert client.responses.retrieve(r.id).id == r.id
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)


def test_a_json_schema_format_constrains_the_text(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    r = client.responses.create(model=MODEL, input="Name a city in France as JSON.", max_output_tokens=40,
                                temperature=0, text={"format": {"type": "json_schema", "name": "city",
                                                                "schema": schema, "strict": True}})
    assert r.status == "completed"
    assert set(json.loads(r.output_text)) == {"city"}
    assert r.text.format.type == "json_schema"

    class City(pydantic.BaseModel):
        city: str

    parsed = client.responses.parse(model=MODEL, input="Name a city in France as JSON.", max_output_tokens=40,
                                    temperature=0, text_format=City)
    assert isinstance(parsed.output_parsed, City) and parsed.output_parsed.city


def test_bad_requests_get_400s_in_openai_shape(served: Any, client: openai.OpenAI) -> None:
    for bad in ({"input": "Hi"}, {"model": MODEL}, {"model": MODEL, "input": [{"type": "item_reference", "id": "x"}]},
                {"model": MODEL, "input": "Hi", "tools": [{"type": "web_search"}]},
                {"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
                {"model": MODEL, "input": "Hi", "tool_choice": "required"},
                {"model": MODEL, "input": "Hi", "truncation": "auto"},
                {"model": MODEL, "input": [{"type": "function_call_output", "call_id": "c1", "output": "x"}]}):
        _, server = served
        r = httpx.post(f"{server.url}/v1/responses", json=bad, headers=auth(server))
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input="Hi")


NOT_TEXT = [1, -1.5, True, [], {}, ["x"], {"a": 1}]
MALFORMED: dict[str, list[Any]] = {
    "model": [*NOT_TEXT, "", "no-such-model"], "input": [1, True, {}, [], [1], [None], ["x"], [{"type": 5}],
                                                         [{"role": "user"}], [{"role": "robot", "content": "x"}],
                                                         [{"role": "user", "content": [5]}],
                                                         [{"role": "user", "content": [{"type": "input_text"}]}],
                                                         [{"type": "function_call", "call_id": "a", "name": "f",
                                                           "arguments": "{bad"}],
                                                         [{"type": "function_call", "call_id": "a", "name": "f",
                                                           "arguments": "[1]"}]],
    "instructions": NOT_TEXT, "max_output_tokens": [0, -1, 10**12, "x", 1.5], "temperature": [-1, 3, "x"],
    "top_p": [2, -1, "x"], "previous_response_id": [*NOT_TEXT, "resp_unknown"], "store": ["yes", 1],
    "stream": ["yes", 1], "truncation": ["auto", 5], "background": [True, "x"],
    "text": [5, "x", {"format": 5}, {"format": {"type": "xml"}}, {"format": {"type": "json_schema"}},
             {"format": {"type": "json_schema", "schema": 5}}],
    "tools": ["x", 5, {}, [5], [{"type": "function"}], [{"type": "function", "name": "f", "parameters": 5}],
              [{"type": "file_search"}]],
    "tool_choice": ["sometimes", 5, {"type": "function"}, {"type": "function", "name": "nope"}, "required"],
}


def test_malformed_requests_get_only_4xx_and_the_server_keeps_working(served: Any, client: openai.OpenAI) -> None:
    _, server = served
    base = {"model": MODEL, "input": "hi", "max_output_tokens": 1}
    with httpx.Client(base_url=server.url, headers=auth(server), timeout=60) as http:
        for field, values in MALFORMED.items():
            for value in values:
                r = http.post("/v1/responses", json={**base, field: value})
                assert 400 <= r.status_code < 500, (field, value, r.status_code, r.text)
                assert r.json()["error"]["message"]
        for raw in (b"", b"{", b"[]", b"null"):
            assert http.post("/v1/responses", content=raw).status_code == 400
    assert client.responses.create(model=MODEL, input="Hi", max_output_tokens=2).output_text


def test_a_required_tool_gives_a_function_call_whose_arguments_validate(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
                                tool_choice="required", max_output_tokens=64, temperature=0)
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id
    assert isinstance(json.loads(calls[0].arguments)["city"], str)


def test_a_forced_tool_wins_over_text_format(client: openai.OpenAI) -> None:
    # instructor's RESPONSES_TOOLS mode sends both: the call must come back, not text in the format
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
              "additionalProperties": False}
    r = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
                                tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=64,
                                temperature=0, text={"format": {"type": "json_schema", "name": "A", "schema": schema}})
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather", r.output
    assert isinstance(json.loads(calls[0].arguments)["city"], str)


def test_a_named_tool_streams_function_call_events(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=MODEL, input="Weather in Rome?", tools=[WEATHER], stream=True,
                                          tool_choice={"type": "function", "name": "get_weather"},
                                          max_output_tokens=64, temperature=0))
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    added = next(e for e in events if e.type == "response.output_item.added" and e.item.type == "function_call")
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    final = [o for o in events[-1].response.output if o.type == "function_call"]
    assert final[0].call_id == added.item.call_id and json.loads(deltas) == json.loads(final[0].arguments)
    assert "city" in json.loads(deltas)


def test_a_function_call_output_round_trip(client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
                                    tool_choice="required", max_output_tokens=64, temperature=0)
    call = next(o for o in first.output if o.type == "function_call")
    answer = {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 25 degrees Celsius."}
    # continued from the stored response, and again with the whole conversation sent back
    second = client.responses.create(model=MODEL, input=[answer], previous_response_id=first.id, tools=[WEATHER],
                                     tool_choice="none", max_output_tokens=32, temperature=0)
    assert second.output_text and not [o for o in second.output if o.type == "function_call"]
    items: Any = [{"role": "user", "content": "What is the weather in Paris?"},
                  {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
                  answer]
    third = client.responses.create(model=MODEL, input=items, tools=[WEATHER], tool_choice="none",
                                    max_output_tokens=32, temperature=0)
    assert third.output_text == second.output_text


def test_the_openai_agents_runner_runs_against_the_server(served: Any) -> None:
    import agents
    _, server = served
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0)
    agents.set_tracing_disabled(True)
    model = agents.OpenAIResponsesModel(model=MODEL, openai_client=client)
    agent = agents.Agent(name="greeter", instructions="You are terse.", model=model,
                         model_settings=agents.ModelSettings(max_tokens=128, temperature=0))
    result = agents.Runner.run_sync(agent, "Say hi.")
    assert isinstance(result.final_output, str) and result.final_output


def test_an_openai_agent_calls_a_function_tool_through_the_server(served: Any) -> None:
    import agents

    _, server = served
    asked: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        asked.append(city)
        return f"Sunny in {city}, 25 degrees Celsius."

    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0)
    agents.set_tracing_disabled(True)
    agent = agents.Agent(name="weather", instructions="Use the tool.", tools=[get_weather],
                         model=agents.OpenAIResponsesModel(model=MODEL, openai_client=client),
                         tool_use_behavior="stop_on_first_tool",
                         model_settings=agents.ModelSettings(max_tokens=64, temperature=0, tool_choice="required"))
    result = agents.Runner.run_sync(agent, "What is the weather in Paris?", max_turns=2)
    assert len(asked) == 1 and isinstance(asked[0], str) and asked[0]
    assert result.final_output == f"Sunny in {asked[0]}, 25 degrees Celsius."


def test_the_store_drops_the_least_recently_used_by_count_and_bytes() -> None:
    store = ResponseStore(max_responses=2, max_bytes=1000)
    assert store.put("a", {"x": 1}, []) and store.put("b", {"x": 2}, [])
    assert store.get("a") is not None  # now b is the least recently used
    store.put("c", {"x": 3}, [])
    assert store.get("b") is None and store.get("a") is not None and len(store) == 2
    assert not store.put("big", {"x": "y" * 2000}, [])  # larger than the cap alone: not kept
    store.put("d", {"x": "y" * 980}, [])
    assert len(store) == 1 and store.get("d") is not None and store.nbytes <= 1000
    assert store.delete("d") and not store.delete("d") and store.nbytes == 0
