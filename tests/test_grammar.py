"""JSON schema → grammar: the size of the grammar is bounded before it is built.

llama-cpp-python's converter writes every repetition out: ``minItems: 10000000`` became a
180 MB grammar in the kernel (and ~45× that in the worker's parser), ``minLength: 1e8`` killed
the worker. The attack inputs here are refused before anything big exists; the ones that would
have been built are run in a subprocess with a memory limit, so a regression cannot take the
test machine's memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jupyter_llm.options import LoadOptions, SamplingOptions
from jupyter_llm.runtime import Runtime, schema_grammar
from jupyter_llm.runtime.grammar import MAX_GRAMMAR_BYTES, MAX_REPEAT
from tests import ggufs

ARRAY = {"type": "array", "items": {"type": "integer"}}
STRING = {"type": "string"}


@pytest.mark.parametrize(("keyword", "schema"), [
    ("minItems", {**ARRAY, "minItems": 10**6}),
    ("maxItems", {**ARRAY, "maxItems": 10**6}),
    ("minLength", {**STRING, "minLength": 10**6}),
    ("maxLength", {**STRING, "maxLength": 10**6}),
    ("pattern", {**STRING, "pattern": "^a{1000000}$"}),
    ("pattern", {**STRING, "pattern": "^(ab|c){3,1000000}$"}),
])
def test_a_repetition_beyond_the_limit_is_refused_naming_the_keyword(keyword: str, schema: dict[str, object]) -> None:
    nested = {"type": "object", "properties": {"tags": schema}}
    with pytest.raises(ValueError) as info:
        schema_grammar(nested)
    message = str(info.value)
    assert f"'{keyword}'" in message and "/properties/tags" in message
    assert f"at most {MAX_REPEAT}" in message


def test_repetitions_up_to_the_limit_are_built() -> None:
    grammar = schema_grammar({"type": "object", "properties": {
        "name": {**STRING, "maxLength": MAX_REPEAT}, "tags": {**ARRAY, "minItems": 1, "maxItems": MAX_REPEAT},
        "code": {**STRING, "pattern": "^[A-Z]{2,8}-[0-9]{4}$"}}})
    assert "root ::=" in grammar and len(grammar) < MAX_GRAMMAR_BYTES


@pytest.mark.parametrize("value", [-1, 2.5, True, "3"])
def test_a_repetition_count_that_is_not_a_whole_number_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match=r"'minItems'.*whole number"):
        schema_grammar({**ARRAY, "minItems": value})


def test_a_whole_float_count_is_accepted() -> None:
    # JSON has one number type: 3.0 is a fine 3 (the converter itself would fail on the float).
    assert "root ::=" in schema_grammar({**ARRAY, "minItems": 3.0})


def test_many_repetitions_within_the_limit_are_refused_by_the_total_size() -> None:
    schema = {"type": "object", "properties": {f"f{i}": {**STRING, "maxLength": MAX_REPEAT} for i in range(500)}}
    with pytest.raises(ValueError, match="MiB"):
        schema_grammar(schema)


def test_long_property_names_cannot_multiply_a_repetition() -> None:
    # The converter names an item's rule after the path to it: a repetition of a rule with a 100 KB
    # name is a repetition of 100 KB.
    item = {"type": "object", "properties": {"a": {"type": "integer"}}}
    schema = {"type": "object", "properties": {"x" * 100_000: {"type": "array", "items": item, "maxItems": MAX_REPEAT}}}
    with pytest.raises(ValueError, match="MiB"):
        schema_grammar(schema)


def test_a_schema_with_too_many_subschemas_is_refused_quickly() -> None:
    # Names that escape to the same rule name make the converter's work quadratic.
    names = ["a" + chr(0x100 + i) for i in range(5000)]
    schema = {"type": "object", "properties": {n: {"const": i} for i, n in enumerate(names)}, "required": names}
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="subschemas"):
        schema_grammar(schema)
    assert time.monotonic() - t0 < 5  # generous: refused before the quadratic part (~10 s) runs


def test_a_deeply_nested_schema_is_a_value_error() -> None:
    schema: dict[str, object] = {"type": "string"}
    for _ in range(3000):
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(ValueError, match="deep"):
        schema_grammar(schema)


ATTACK = """
import json, os, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # a regression fails, it cannot take the machine
from jupyter_llm import wire
from jupyter_llm.runtime import schema_grammar
schema = json.loads(sys.argv[1])
before = wire.rss(os.getpid())
t0 = time.monotonic()
try:
    grammar = schema_grammar(schema)
    outcome = {"built": len(grammar)}
except ValueError as exc:
    outcome = {"refused": str(exc)}
except MemoryError:
    outcome = {"memory": True}
outcome["grew_mb"] = (wire.rss(os.getpid()) - before) / 2**20
outcome["seconds"] = time.monotonic() - t0
print(json.dumps(outcome))
"""


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "minItems": 10_000_000}}},
    {"type": "object", "properties": {"text": {"type": "string", "minLength": 100_000_000}}},
], ids=["minItems-1e7", "minLength-1e8"])
def test_the_reported_attacks_cost_the_kernel_nothing(schema: dict[str, object]) -> None:
    body = json.dumps({"model": "smollm2", "prompt": "hi", "format": schema})
    assert len(body) < 210  # the reported request was 203 bytes
    out = subprocess.run([sys.executable, "-c", ATTACK, json.dumps(schema)], capture_output=True, text=True,
                         timeout=120, check=True)
    outcome = json.loads(out.stdout.strip().splitlines()[-1])
    assert "refused" in outcome, outcome
    assert "at most" in outcome["refused"]
    assert outcome["grew_mb"] < 20 and outcome["seconds"] < 5


def test_the_http_api_answers_400_naming_the_keyword() -> None:
    from jupyter_llm.server.params import HTTPProblem, grammar_for

    with pytest.raises(HTTPProblem) as info:
        grammar_for({**ARRAY, "minItems": 10_000_000})
    assert info.value.status == 400 and "'minItems'" in info.value.message


def test_a_raw_grammar_over_the_size_limit_is_refused_before_it_is_sent(tmp_path: Path) -> None:
    tiny = ggufs.write_tiny_llama(tmp_path / "tiny.gguf")
    with Runtime.start(tiny, LoadOptions(gpu_layers=0, n_ctx=256)) as rt:
        huge = "root ::= " + " | ".join(f'"w{i}"' for i in range(MAX_GRAMMAR_BYTES // 6))
        with pytest.raises(ValueError, match="MiB"):
            rt.generate("hello", grammar=huge)
        assert rt.generate("hello", SamplingOptions(temperature=0, max_tokens=2)).result.completion_tokens


def test_grammars_at_the_limit_constrain_generation_in_the_worker(smollm2_path: Path) -> None:
    # The limit matches what llama.cpp's own parser accepts: 1000 optional repetitions parse,
    # 1001 are refused ("exceeds sane defaults") and far more overflow its stack.
    schema = {"type": "object", "properties": {
        "fruits": {"type": "array", "items": {"type": "string", "maxLength": MAX_REPEAT}, "maxItems": MAX_REPEAT}},
        "required": ["fruits"]}
    ask = [{"role": "user", "content": "List three fruits as JSON."}]
    with Runtime.start(smollm2_path, LoadOptions(gpu_layers=0, n_ctx=1024), name="smollm2") as rt:
        result = rt.chat(ask, SamplingOptions(temperature=0.0, max_tokens=60), json_schema=schema).result
    if result.finish_reason == "stop":
        assert isinstance(json.loads(result.text)["fruits"], list)
    else:
        assert result.text.startswith("{")


def test_json_answers_never_hold_raw_control_characters(smollm2_path: Path) -> None:
    # The converter's char rule let the model write a raw newline inside a string: json.loads then
    # fails with "Invalid control character" (2 of these 12 seeds did, on an AMD EPYC). The
    # grammar now excludes U+0000-U+001F as JSON does, so no seed on any CPU can produce one.
    person = {"type": "object", "properties": {"name": {"type": "string"}, "bio": {"type": "string"}},
              "required": ["name", "bio"]}
    grammar = schema_grammar(person)
    assert r'[^"\\\x7F\x00-\x1F]' in grammar
    with Runtime.start(smollm2_path, LoadOptions(gpu_layers=0, n_ctx=1024)) as rt:
        for seed in range(12):
            text = rt.chat([{"role": "user", "content": "Give me a person with a long multi-line biography."}],
                           SamplingOptions(temperature=1.0, seed=seed, max_tokens=120), grammar=grammar).result.text
            assert not any(ord(c) < 0x20 for c in text), f"seed {seed}: {text!r}"
            try:
                json.loads(text)
            except ValueError as exc:  # cut short by max_tokens is fine; a control character is not
                assert "control character" not in str(exc), f"seed {seed}: {text!r}"
