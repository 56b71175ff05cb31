"""Narrow units of the API: request validation, option mapping, error mapping, metrics text."""

from __future__ import annotations

import pytest

from jupyter_llm.errors import ContextOverflowError, ModelNotFoundError, StoreError, WontFitError
from jupyter_llm.server.auth import _host_name, allowed_host_names, is_loopback
from jupyter_llm.server.metrics import Metrics, model_gauges
from jupyter_llm.server.params import Body, HTTPProblem, keep_alive, ollama_options, parse_json, sampling
from jupyter_llm.server.responses import problem_from


@pytest.mark.parametrize(("value", "seconds"), [
    (0, 0.0), (300, 300.0), (2.5, 2.5), (-1, None), ("5m", 300.0), ("1h30m", 5400.0), ("30s", 30.0),
    ("250ms", 0.25), ("-1m", None), ("0", 0.0), ("45", 45.0), ("1.5h", 5400.0), ("-0s", 0.0),
])
def test_keep_alive_follows_ollama_durations(value: object, seconds: float | None) -> None:
    assert keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5x", "1h5", "--5m", "", True, [], {}, "1e400", "m"])
def test_bad_keep_alive_is_a_400_naming_the_field(value: object) -> None:
    with pytest.raises(HTTPProblem) as err:
        keep_alive(value)
    assert err.value.status == 400 and err.value.param == "keep_alive"


def test_body_getters_check_type_and_range() -> None:
    body = Body({"t": 0.5, "n": 5.0, "b": True, "s": "x", "big": 10**40, "o": {"k": "v"}})
    assert body.number("t", lo=0, hi=1) == 0.5
    assert body.integer("n") == 5  # JSON's 5.0 is a whole number
    assert body.flag("b") is True and body.text("s") == "x"
    assert body.obj("o").text("k") == "v" and body.integer("missing", 7) == 7
    for call in (lambda: body.integer("t"), lambda: body.integer("b"), lambda: body.number("s"), lambda: body.text("n"),
                 lambda: body.integer("big", hi=2**31), lambda: body.flag("s"), lambda: body.obj("s"),
                 lambda: body.text("missing", required=True)):
        with pytest.raises(HTTPProblem) as err:
            call()
        assert err.value.status == 400


@pytest.mark.parametrize("raw", [b"", b"[1]", b"{", b'{"a": NaN}', b"\xff", b"[" * 50_000])
def test_only_a_json_object_is_a_body(raw: bytes) -> None:
    with pytest.raises(HTTPProblem):
        parse_json(raw)


def test_ollama_options_map_onto_sampling_and_the_context() -> None:
    fields, num_ctx = ollama_options(Body({"temperature": 0, "top_p": 0.5, "top_k": 10, "min_p": 0.1, "seed": 3,
                                           "num_predict": 20, "stop": ["\n"], "repeat_penalty": 1.1,
                                           "num_ctx": 1024, "num_thread": 4}, "options."), n_ctx_max=8192)
    options = sampling(fields)
    assert (options.temperature, options.top_p, options.top_k, options.min_p) == (0.0, 0.5, 10, 0.1)
    assert (options.seed, options.max_tokens, options.stop, options.repeat_penalty) == (3, 20, ("\n",), 1.1)
    assert num_ctx == 1024
    unlimited, _ = ollama_options(Body({"num_predict": -1, "seed": -1}), n_ctx_max=8192)
    assert unlimited["max_tokens"] is None and unlimited["seed"] is None  # -1: until the end; a fresh seed
    with pytest.raises(HTTPProblem, match="unknown option"):
        ollama_options(Body({"temprature": 0.1}), n_ctx_max=8192)
    with pytest.raises(HTTPProblem, match="num_ctx"):
        ollama_options(Body({"num_ctx": 100_000}, "options."), n_ctx_max=8192)


def test_errors_map_to_statuses_that_say_whose_fault_it_is() -> None:
    assert problem_from(ModelNotFoundError("nope")).status == 404
    assert problem_from(ContextOverflowError("too long", 9000, 2048)).status == 400
    assert problem_from(ValueError("bad")).status == 400
    assert problem_from(StoreError("exists")).status == 409
    assert problem_from(WontFitError("too big")).status == 507
    unexpected = problem_from(RuntimeError("boom"))
    assert unexpected.status == 500 and "boom" in unexpected.message


def test_loopback_and_host_names() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.5", "example.org"))
    assert _host_name("[::1]:8080") == "::1" and _host_name("LocalHost:80") == "localhost"
    assert _host_name("127.0.0.1") == "127.0.0.1"
    assert allowed_host_names("127.0.0.1") == {"127.0.0.1", "localhost", "::1"}


def test_metrics_render_prometheus_text() -> None:
    metrics = Metrics()
    metrics.request("/api/chat", "POST", 200, 0.3)
    metrics.request("/api/chat", "POST", 200, 7.0)
    metrics.generation("m", 10, 5, 0.02)
    text = metrics.render(model_gauges([], {}, {}))
    assert 'jupyter_llm_http_requests_total{route="/api/chat",method="POST",status="200"} 2' in text
    assert 'jupyter_llm_http_request_duration_seconds_bucket{route="/api/chat",le="0.5"} 1' in text
    assert 'jupyter_llm_http_request_duration_seconds_bucket{route="/api/chat",le="+Inf"} 2' in text
    assert 'jupyter_llm_tokens_total{model="m",direction="out"} 5' in text
    assert "jupyter_llm_models_loaded 0" in text
    assert "# TYPE jupyter_llm_time_to_first_token_seconds histogram" in text
