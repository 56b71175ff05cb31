"""Tool calling: the parsers on fixed strings, tool specs from functions, and calls made by the real
default model through the real server (official ``openai`` and ``ollama`` clients, langchain-ollama,
instructor) and the Python API. A forced call (tool_choice required or named) is constrained by a
grammar, so even the 135M model's calls validate against their schema."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import jsonschema
import pytest

from jupyter_llm.tools import CallFilter, ToolCall, call_schema, parse, tool_choice, tool_spec, tool_specs, validate
from jupyter_llm.worker import tool_prompt
from tests.apiserver import MODEL, running_server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
ASK = [{"role": "user", "content": "What is the weather like in Paris?"}]
NAMES = ["get_weather", "add"]


def schema_of(name: str) -> dict[str, Any]:
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


def check_call(name: str, arguments: dict[str, Any]) -> None:
    """The call names an offered tool and its arguments validate against that tool's schema."""
    assert name in NAMES
    jsonschema.validate(arguments, schema_of(name))


# -- parsers on fixed strings ------------------------------------------------------------------


def test_hermes_qwen_calls_are_parsed_and_the_text_around_them_kept() -> None:
    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n'
            '</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')
    content, calls = parse(text, NAMES)
    assert content == "Let me look."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Oslo", "unit": "celsius"}),
                                                      ("add", {"a": 1, "b": 2})]
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")
    # an unclosed tag (the model stopped at its end-of-turn token) still counts
    assert parse('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}', NAMES)[1][0].name == "add"


def test_llama3_json_calls_with_parameters_and_the_python_tag() -> None:
    _, calls = parse('{"name": "add", "parameters": {"a": 4, "b": 5}}', NAMES)
    assert calls == [ToolCall(calls[0].id, "add", {"a": 4, "b": 5})]
    _, calls = parse('<|python_tag|>{"type": "function", "name": "add", "parameters": {"a": 1, "b": 1}}; '
                     '{"name": "get_weather", "parameters": {"city": "Rome", "unit": "celsius"}}', NAMES)
    assert [c.name for c in calls] == ["add", "get_weather"]


def test_mistral_calls_in_both_forms() -> None:
    content, calls = parse('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 2, "b": 3}, "id": "abc123def"}]', NAMES)
    assert content == "" and calls == [ToolCall("abc123def", "add", {"a": 2, "b": 3})]
    _, calls = parse('[TOOL_CALLS]add[ARGS]{"a": 7, "b": 8}', NAMES)
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 7, "b": 8})]


def test_the_generic_fallback_fenced_and_with_arguments_as_a_string() -> None:
    _, calls = parse('```json\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}\n```', NAMES)
    assert calls[0].arguments == {"a": 1, "b": 2} and calls[0].arguments_json == '{"a": 1, "b": 2}'
    _, calls = parse('{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 0}}}', NAMES)
    assert calls[0].name == "add"


def test_replies_that_are_no_call_stay_text() -> None:
    for text in ["Paris is sunny today.", '{"name": "unknown_tool", "arguments": {}}', '{"city": "Paris"}',
                 'Here: {"name": "add", "arguments": {"a": 1, "b": 2}} as you see', "<tool_call>not json</tool_call>"]:
        content, calls = parse(text, NAMES)
        assert calls == [] and content == text


def test_a_stream_holds_back_call_markup_and_shows_the_rest() -> None:
    def run(pieces: list[str]) -> tuple[str, str, list[ToolCall]]:
        f = CallFilter(NAMES)
        shown = "".join(f.feed(p) for p in pieces)
        rest, content, calls = f.finish()
        return shown + rest, content, calls

    shown, content, calls = run(["Checking", " now. <tool", '_call>{"name": "add", ', '"arguments": {"a": 1, "b": 2}}',
                                 "</tool_call>"])
    assert shown == content and content.strip() == "Checking now." and calls[0].name == "add"
    shown, _, calls = run(["  ", '{"name"', ': "add", "arguments": {"a": 1, "b": 2}}'])
    assert shown == "" and calls[0].arguments == {"a": 1, "b": 2}
    shown, content, calls = run(["{not a call", "} at all"])
    assert shown == content == "{not a call} at all" and calls == []
    shown, _, calls = run(["I like <tool", "s> and more"])
    assert shown == "I like <tools> and more" and calls == []


# -- describing tools --------------------------------------------------------------------------


def forecast(city: str, days: int = 1, unit: Literal["c", "f"] = "c", detail: bool | None = None) -> str:
    """Forecast the weather.

    Args:
        city: The city to forecast for.
        days: How many days ahead.
    """
    return f"{city}: sunny for {days} day(s)"


def test_a_python_function_becomes_a_tool_spec() -> None:
    spec = tool_spec(forecast)
    fn = spec["function"]
    assert spec["type"] == "function" and fn["name"] == "forecast" and fn["description"] == "Forecast the weather."
    props = fn["parameters"]["properties"]
    assert props["city"] == {"type": "string", "description": "The city to forecast for."}
    assert props["days"]["type"] == "integer" and props["unit"] == {"enum": ["c", "f"]}
    assert props["detail"] == {"type": "boolean"}
    assert fn["parameters"]["required"] == ["city"]


def test_tool_shapes_of_openai_ollama_and_anthropic_are_normalised() -> None:
    anthropic = {"name": "add", "description": "Add.", "input_schema": ADD["function"]["parameters"]}
    assert tool_spec(anthropic) == {**ADD, "function": {**ADD["function"], "description": "Add."}}
    assert tool_spec(ADD) == ADD and tool_spec(ADD["function"]) == ADD
    assert tool_spec({"type": "function", "function": {"name": "noargs"}})["function"]["parameters"] == {
        "type": "object", "properties": {}}
    for bad in [{"type": "web_search"}, {"function": {"name": "bad name!"}}, 5]:
        with pytest.raises(ValueError):
            tool_spec(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unique"):
        tool_specs([ADD, ADD])


def test_tool_choice_values() -> None:
    specs = tool_specs(TOOLS)
    assert tool_choice(None, specs) is None and tool_choice("auto", specs) is None
    assert tool_choice("none", specs) == "none" and tool_choice("required", specs) == "required"
    assert tool_choice("any", specs) == "required"
    assert tool_choice({"type": "function", "function": {"name": "add"}}, specs) == "add"
    assert tool_choice({"name": "add"}, specs) == "add"
    with pytest.raises(ValueError, match="not among the tools"):
        tool_choice({"type": "function", "function": {"name": "nope"}}, specs)


def test_the_call_schema_allows_exactly_the_named_functions() -> None:
    schema = call_schema(tool_specs(TOOLS), "required")
    good = {"name": "add", "arguments": {"a": 1, "b": 2}}
    jsonschema.validate(good, schema)
    for wrong in [{"name": "add", "arguments": {"a": "x", "b": 2}}, {"name": "other", "arguments": {}},
                  {"name": "add"}]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(good, call_schema(tool_specs(TOOLS), "get_weather"))
    assert validate(ADD, {"a": 1, "b": 2}) == [] and validate(ADD, {"a": 1})


def test_a_raw_tool_choice_never_makes_an_empty_grammar() -> None:
    from jupyter_llm.server.params import HTTPProblem
    from jupyter_llm.server.tool_shapes import forced_grammar

    specs = tool_specs(TOOLS)
    raw = forced_grammar(specs, {"type": "function", "function": {"name": "add"}})  # as a client sends it
    assert raw is not None and raw == forced_grammar(specs, "add") and "root ::=" in raw
    assert forced_grammar(specs, "none") is None and forced_grammar(specs, None) is None
    with pytest.raises(HTTPProblem, match="not among the tools"):
        forced_grammar(specs, {"name": "nope"})
    with pytest.raises(ValueError, match="no tool matches"):
        call_schema(specs, "nope")


def test_templates_without_tools_get_them_in_the_system_prompt() -> None:
    chatml = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "21 C"}]
    messages, extra = tool_prompt.prepare(chatml, history, TOOLS)
    assert extra == {} and messages[0]["role"] == "system" and '"name": "get_weather"' in messages[0]["content"]
    assert messages[2]["content"] == '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert messages[3] == {"role": "user", "content": "Result of get_weather: 21 C"}
    hermes = "{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.role }}{% endfor %}"
    messages, extra = tool_prompt.prepare(hermes, history, TOOLS)
    assert extra == {"tools": TOOLS} and messages[1]["content"] == "" and messages[2]["role"] == "tool"


OLLAMA_QWEN = """{{- if or .System .Tools }}<|im_start|>system
{{- if .System }}
{{ .System }}
{{- end }}
{{- if .Tools }}
<tools>
{{- range .Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}
</tools>
{{- end }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if .Content }}{{ .Content }}
{{- else if .ToolCalls }}<tool_call>
{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
{{ end }}</tool_call>
{{- end }}{{ if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}<|im_start|>user
<tool_response>
{{ .Content }}
</tool_response><|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}"""
"""Ollama's Qwen 2.5 template (Go), tools and tool calls included."""


def test_ollama_go_templates_get_tools_and_tool_calls() -> None:
    from jupyter_llm.worker import gotemplate
    from jupyter_llm.worker.template import Meter, compile_template, render

    meter = Meter(n_ctx=4096, bytes_per_token=8, seconds=5)
    source = gotemplate.to_jinja(OLLAMA_QWEN)
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "add", "content": "5"}]
    messages, extra = tool_prompt.prepare(source, history, [ADD])
    prompt = render(compile_template(source, meter), meter, messages=messages, system="", **extra)
    assert '{"type": "function", "function": {"name": "add", "description": "Add two integers.", ' in prompt
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>' in prompt
    assert "<tool_response>\n5\n</tool_response>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="ranges over"):
        gotemplate.to_jinja("{{ range .ToolCalls }}x{{ end }}")  # calls belong to a message


# -- the real model through the real server -----------------------------------------------------


@pytest.fixture(scope="module")
def served(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with running_server(smollm2_path, tmp_path_factory.mktemp("tools-api"), parallel=2) as pair:
        yield pair


@pytest.fixture
def openai_client(served: Any) -> Iterator[Any]:
    import openai

    _, server = served
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0) as client:
        yield client


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_through_the_openai_client_validates(openai_client: Any, choice: Any) -> None:
    reply = openai_client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                                  max_tokens=120, temperature=0)
    choice0 = reply.choices[0]
    assert choice0.finish_reason == "tool_calls"
    calls = choice0.message.tool_calls
    assert calls and calls[0].type == "function" and calls[0].id
    arguments = json.loads(calls[0].function.arguments)  # a JSON string, as OpenAI sends it
    check_call(calls[0].function.name, arguments)
    if isinstance(choice, dict):
        assert calls[0].function.name == "get_weather"


def test_a_forced_call_streams_as_tool_call_deltas(openai_client: Any) -> None:
    stream = openai_client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=120,
                                                   tool_choice={"type": "function", "function": {"name": "add"}},
                                                   temperature=0, stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "add"
    check_call("add", json.loads(calls[0]["arguments"]))


def test_tool_choice_none_offers_no_tools(openai_client: Any, served: Any) -> None:
    reply = openai_client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none",
                                                  max_tokens=8, temperature=0)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason in ("stop", "length")


def test_a_bad_tool_choice_is_a_400(openai_client: Any) -> None:
    import openai

    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        openai_client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=4,
                                              tool_choice={"type": "function", "function": {"name": "nope"}})


def test_a_tool_result_round_trip_ends_in_text(openai_client: Any, served: Any) -> None:
    manager, _ = served
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_w1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_w1", "content": "23 degrees and sunny"}]
    # tool_choice "none": the 135M model, offered the tools again, tends to repeat its call
    reply = openai_client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=40,
                                                  temperature=0, tool_choice="none")
    assert reply.choices[0].message.content and reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason in ("stop", "length")
    rendered = manager.get(MODEL).runtime.render(
        [*ASK, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_w1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
         {"role": "tool", "tool_call_id": "call_w1", "name": "get_weather", "content": "23 degrees and sunny"}],
        tool_specs(TOOLS))
    assert "23 degrees and sunny" in rendered and '"city": "Paris"' in rendered and "get_weather" in rendered


@pytest.fixture
def ollama_client(served: Any) -> Iterator[Any]:
    import ollama

    _, server = served
    with ollama.Client(host=server.url, headers={"Authorization": f"Bearer {server.token}"}) as client:
        yield client  # closed after the test: its pooled socket is not left to the garbage collector


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_call_through_the_ollama_client_validates(ollama_client: Any, stream: bool) -> None:
    options = {"tool_choice": "required", "temperature": 0, "num_predict": 120}
    if stream:
        calls = [c for part in ollama_client.chat(model=MODEL, messages=ASK, tools=TOOLS, options=options,
                                                  stream=True) for c in part.message.tool_calls or []]
    else:
        reply = ollama_client.chat(model=MODEL, messages=ASK, tools=TOOLS, options=options)
        calls = list(reply.message.tool_calls or [])
    assert len(calls) == 1
    arguments = calls[0].function.arguments  # an object, as Ollama sends it
    assert isinstance(arguments, dict)
    check_call(calls[0].function.name, dict(arguments))


def test_a_python_function_as_an_ollama_tool_round_trips(ollama_client: Any) -> None:
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    ask = [{"role": "user", "content": "What is 2 plus 3?"}]
    reply = ollama_client.chat(model=MODEL, messages=ask, tools=[add],
                               options={"tool_choice": {"name": "add"}, "temperature": 0, "num_predict": 60})
    call = reply.message.tool_calls[0]
    assert call.function.name == "add"
    check_call("add", dict(call.function.arguments))
    result = add(**call.function.arguments)
    options = {"tool_choice": "none", "temperature": 0, "num_predict": 30}  # (else the 135M model calls again)
    answer = ollama_client.chat(model=MODEL, tools=[add], options=options, messages=[
        *ask, reply.message, {"role": "tool", "content": str(result), "tool_name": "add"}])
    assert answer.message.content and not answer.message.tool_calls


def test_langchain_ollama_bind_tools(served: Any) -> None:
    from langchain_ollama import ChatOllama

    _, server = served

    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """The current weather in a city."""
        return "sunny"

    chat = ChatOllama(model=MODEL, base_url=server.url, temperature=0, num_predict=120,
                      client_kwargs={"headers": {"Authorization": f"Bearer {server.token}"}})
    # Ollama's API has no tool_choice (langchain ignores its own argument): the server takes it in options
    bound = chat.bind_tools([get_weather], tool_choice="get_weather",
                            options={"tool_choice": "required", "temperature": 0, "num_predict": 120})
    message = bound.invoke("What is the weather like in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    check_call("get_weather", message.tool_calls[0]["args"])


def test_instructor_tools_mode_returns_a_validated_model(served: Any) -> None:
    import instructor
    import openai
    from pydantic import BaseModel

    _, server = served

    class City(BaseModel):
        name: str
        population: int

    client = instructor.from_openai(openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0),
                                    mode=instructor.Mode.TOOLS)
    city = client.chat.completions.create(model=MODEL, response_model=City, max_retries=0, max_tokens=80,
                                          temperature=0,
                                          messages=[{"role": "user", "content": "Paris has 2 million people."}])
    assert isinstance(city, City) and isinstance(city.population, int) and isinstance(city.name, str)


# -- the Python API and %%chat ------------------------------------------------------------------


@pytest.fixture
def model(smollm2_path: Path) -> Iterator[Any]:
    import jupyter_llm as llm
    from jupyter_llm import manager as manager_module
    from jupyter_llm.store.sources import Pulled

    manager_module._manager = None  # a fresh manager pointing at this test's store
    manager = manager_module.get_manager()
    manager.store.put("smollm2", Pulled("pip", [smollm2_path], owned=[]))
    yield llm.load("smollm2", n_ctx=2048, gpu_layers=0, keep_alive=None)
    manager.close()
    manager_module._manager = None


@pytest.mark.timeout(900)  # up to 11 answers (two tool loops of at most 5), on a shared machine
def test_model_chat_returns_the_calls_and_runs_python_tools(model: Any) -> None:
    seen: list[tuple[int, int]] = []

    def add(a: int, b: int) -> int:
        """Add two integers."""
        seen.append((a, b))
        return a + b

    ask = [{"role": "user", "content": "What is 2 plus 3?"}]
    asked = model.chat(ask, tools=[add], tool_choice="required", temperature=0, max_tokens=40)
    assert seen == [] and len(asked.tool_calls) == 1 and asked.tool_calls[0].name == "add"
    check_call("add", asked.tool_calls[0].arguments)

    reply = model.chat(ask, tools=[add], tool_choice="add", run_tools=True, temperature=0, max_tokens=40)
    assert len(seen) >= 1 and isinstance(reply, str) and reply.tool_calls == []
    call, result = reply.messages[0], reply.messages[1]
    assert call["role"] == "assistant" and call["tool_calls"][0]["function"]["name"] == "add"
    assert result == {"role": "tool", "content": str(sum(seen[0])), "tool_call_id": call["tool_calls"][0]["id"],
                      "name": "add"}

    streamed = model.chat("What is 2 plus 3?", tools=[add], tool_choice="add", run_tools=True, stream=True,
                          temperature=0, max_tokens=40)
    text = "".join(streamed)
    assert streamed.reply == text and len(seen) >= 2
    roles = [m["role"] for m in model.history]
    assert roles[:3] == ["user", "assistant", "tool"] and roles[-1] == "assistant"


@pytest.mark.slow
def test_chat_cell_runs_the_notebook_functions_it_names(tmp_path: Path, smollm2_path: Path) -> None:
    from tests.kernel import Kernel

    env = {"JUPYTER_LLM_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "OLLAMA_MODELS": str(tmp_path / "ollama"),
           "JUPYTER_LLM_HF_ENDPOINT": "http://127.0.0.1:9", "OMP_WAIT_POLICY": "PASSIVE"}
    k = Kernel(env)
    try:
        k.ok("%load_ext jupyter_llm")
        k.ok(f"""
from pathlib import Path
from jupyter_llm.manager import get_manager
from jupyter_llm.store.sources import Pulled
get_manager().store.put("smollm2", Pulled("pip", [Path({str(smollm2_path)!r})], owned=[]))
calls = []
def get_weather(city: str, unit: str) -> str:
    '''The current weather in a city.'''
    calls.append(city)
    return "23 degrees and sunny"
""")
        k.ok("%llm load smollm2 --ctx 2048 --keep-alive -1")
        missing = k.run("%%chat --tools nothing_here\nHi.")
        assert missing.error is not None and "not defined in this notebook" in missing.error
        run = k.ok("%%chat --new --tools get_weather --tool-choice required --temperature 0 --max-tokens 60\n"
                   "What is the weather like in Paris?")
        shown = run.texts()[-1]
        assert "get_weather(" in shown and "23 degrees and sunny" in shown
        count = k.ok("print(len(calls))")
        assert int("".join(count.texts()).strip()) >= 1
        history = k.ok("from jupyter_llm.manager import get_manager\n"
                       "print([m['role'] for m in get_manager().session('default').messages])")
        assert "'tool'" in "".join(history.texts())
    finally:
        k.close()
