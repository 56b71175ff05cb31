"""A GGUF's chat template is a program from a download: its render is limited in time, output and
memory, a cancel stops it, and the worker survives to serve the next request.

Each attack is a tiny model whose template does one bad thing. A watchdog kills the worker if it
grows past a few hundred MB, so a regression fails the test instead of exhausting the machine
(the unfixed worker grew at ~85 MB/s on the nested loops and reached 3.7 GB on ``tojson``).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jupyter_llm.errors import ContextOverflowError
from jupyter_llm.options import LoadOptions, SamplingOptions
from jupyter_llm.runtime import Runtime
from tests import ggufs

HI = [{"role": "user", "content": "hi"}]
GROWTH_LIMIT = 300 * 2**20
"""More than a bounded render can need, far less than the machine has."""

LOOP = "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}"
ATTACKS = {
    "nested-loops-with-output": LOOP + "{{ 'x' }}{% endfor %}{% endfor %}{% endfor %}",
    "tojson-indent": "{{ messages | tojson(indent=300000000) }}",
    "string-repeat": "{{ 'a' * 1000000000 }}",
    "str-center": "{{ 'a'.center(1000000000) }}",
    "format-filter": "{{ '%1000000000d' | format(1) }}",
    "str-format": "{{ '{:>1000000000}'.format(1) }}",
    "percent-format": "{{ '%1000000000d' % 1 }}",
    "big-power": "{{ 10 ** (10 ** 9) }}",
    "replace": "{% set s = 'ab' * 1000 %}{{ s.replace('a', s).replace('b', s) }}",
    "join": "{{ range(100000) | join('x' * 1000) }}",
    "indent": "{% set s = 'a\n' * 1000 %}{{ s | indent(1000) | indent(1000) }}",
    "growing-namespace": "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}"
                         "{% set ns.l = ns.l + [range(1000) | list] %}{% endfor %}",
    "loop-over-a-string": "{% set s = 'x' * 2000 %}{% for a in s %}{% for b in s %}{% for c in s %}"
                          "{% endfor %}{% endfor %}{% endfor %}",
}


def write_model(tmp_path: Path, template: str, name: str = "evil") -> Path:
    return ggufs.write_tiny_llama(tmp_path / f"{name}.gguf", chat_template=template)


@pytest.fixture
def watched() -> Iterator[Callable[[Runtime], None]]:
    """Watch a runtime's worker: SIGKILL it if it grows GROWTH_LIMIT past its size at the start."""
    stop = threading.Event()
    killed: list[int] = []
    threads: list[threading.Thread] = []

    def watch(rt: Runtime) -> None:
        base = rt.rss_bytes()

        def loop() -> None:
            while not stop.wait(0.05):
                size = rt.rss_bytes()
                if size and size - base > GROWTH_LIMIT:
                    killed.append(size)
                    os.kill(rt.pid, signal.SIGKILL)
                    return

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        threads.append(thread)

    yield watch
    stop.set()
    for thread in threads:
        thread.join()
    assert not killed, f"the worker grew to {killed[0] >> 20} MB rendering the template"


def in_thread(seconds: float, work: Callable[[], Any]) -> BaseException | None:
    box: dict[str, BaseException | None] = {"error": None}

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # handed to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the render was still running after {seconds} s"
    return box["error"]


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_runaway_template_is_refused_and_the_worker_survives(
        attack: str, tmp_path: Path, watched: Callable[[Runtime], None]) -> None:
    with Runtime.start(write_model(tmp_path, ATTACKS[attack]), LoadOptions(gpu_layers=0, n_ctx=256)) as rt:
        watched(rt)
        error = in_thread(90, lambda: rt.chat(HI, SamplingOptions(temperature=0, max_tokens=2)).result)
        assert isinstance(error, ValueError | ContextOverflowError), repr(error)
        assert "chat template" in str(error)
        assert rt.alive
        # the same worker goes on serving: a raw prompt, and the template refused again
        assert rt.generate("hello", SamplingOptions(temperature=0, max_tokens=2)).result.completion_tokens
        assert isinstance(in_thread(90, lambda: rt.render(HI)), ValueError | ContextOverflowError)


def test_a_template_that_computes_forever_hits_the_time_limit(tmp_path: Path,
                                                             watched: Callable[[Runtime], None]) -> None:
    silent = LOOP + "{% endfor %}{% endfor %}{% endfor %}"  # no output: only the clock stops it
    with Runtime.start(write_model(tmp_path, silent), LoadOptions(gpu_layers=0, n_ctx=256)) as rt:
        watched(rt)
        t0 = time.monotonic()
        error = in_thread(90, lambda: rt.render(HI))
        assert isinstance(error, ValueError) and "seconds" in str(error)
        assert time.monotonic() - t0 > 1  # it ran until the limit, not refused up front
        assert rt.generate("hello", SamplingOptions(temperature=0, max_tokens=2)).result.completion_tokens


def test_cancelling_stops_a_render_long_before_its_time_limit(tmp_path: Path,
                                                              watched: Callable[[Runtime], None]) -> None:
    silent = LOOP + "{% endfor %}{% endfor %}{% endfor %}"
    with Runtime.start(write_model(tmp_path, silent), LoadOptions(gpu_layers=0, n_ctx=256),
                       _template_seconds=600) as rt:
        watched(rt)
        stream = rt.chat(HI, SamplingOptions(temperature=0, max_tokens=2))
        time.sleep(0.5)
        t0 = time.monotonic()
        stream.cancel()
        assert in_thread(60, lambda: stream.result) is None
        assert stream.result.finish_reason == "cancelled"
        assert time.monotonic() - t0 < 30  # the limit is 600 s: the cancel stopped it
        # the engine was never blocked meanwhile, and is not now
        assert rt.generate("hello", SamplingOptions(temperature=0, max_tokens=2)).result.completion_tokens


def test_a_template_cannot_call_into_python_internals(tmp_path: Path) -> None:
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with Runtime.start(write_model(tmp_path, escape), LoadOptions(gpu_layers=0, n_ctx=256)) as rt, \
            pytest.raises(ValueError, match="chat template"):
        rt.render(HI)


def test_ordinary_templates_render_as_before(tmp_path: Path) -> None:
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] | trim + '<|im_end|>\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
                "{{ messages | tojson(indent=2) | length > 0 }}{{ '%3d' % 7 }}{{ 'x'.center(5) }}")
    with Runtime.start(write_model(tmp_path, template), LoadOptions(gpu_layers=0, n_ctx=256)) as rt:
        assert rt.render(HI) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nTrue  7  x  "
