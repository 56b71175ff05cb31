"""A worker that stops answering is declared hung, killed and reported like a crash.

The hang is real: the worker is stopped with SIGSTOP (what a debugger, a frozen cgroup or a
stuck driver call looks like from outside). Every wait runs in a helper thread with a generous
join timeout, so a regression fails instead of hanging the suite.
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

from jupyter_llm.errors import WorkerCrashedError
from jupyter_llm.options import LoadOptions, SamplingOptions
from jupyter_llm.runtime import Runtime
from jupyter_llm.runtime.process import HUNG_AFTER_S
from tests import ggufs

SMALL = LoadOptions(gpu_layers=0, n_ctx=512)
PATIENCE = HUNG_AFTER_S + 30
"""How long a test waits for a hung worker to be reported (the detection itself takes about
``HUNG_AFTER_S`` plus a second or two)."""


def outcome_within(seconds: float, work: Callable[[], Any]) -> tuple[BaseException | None, float]:
    """Run ``work`` in a thread; its exception (None if it returned) and how long it took. Fails
    the test if it is still running after ``seconds``."""
    box: dict[str, BaseException | None] = {"error": None}

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # handed to the test
            box["error"] = exc

    t0 = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting on the stopped worker after {seconds} s"
    return box["error"], time.monotonic() - t0


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return ggufs.write_tiny_llama(tmp_path / "tiny.gguf")


@pytest.fixture
def started(smollm2_path: Path) -> Iterator[Runtime]:
    rt = Runtime.start(smollm2_path, SMALL, name="smollm2")
    try:
        yield rt
    finally:
        if rt._proc.poll() is None:
            os.kill(rt.pid, signal.SIGCONT)
        rt.close()


def assert_hung_report(error: BaseException | None, name: str) -> None:
    assert isinstance(error, WorkerCrashedError), repr(error)
    message = str(error)
    assert f"the worker running {name} stopped responding" in message
    assert f"`%llm load {name}`" in message


def test_a_stream_from_a_stopped_worker_ends_with_stopped_responding(started: Runtime) -> None:
    stream = started.generate("Once upon a time", SamplingOptions(temperature=0.0, max_tokens=400))
    next(iter(stream))
    os.kill(started.pid, signal.SIGSTOP)
    error, _ = outcome_within(PATIENCE, lambda: [None for _ in stream])
    assert_hung_report(error, "smollm2")
    assert not started.alive
    started._proc.wait(5)  # killed, not left stopped
    with pytest.raises(WorkerCrashedError, match="stopped responding"):
        started.count_tokens("hello")  # and every later call says so at once


def test_a_call_to_a_stopped_worker_raises_instead_of_hanging(started: Runtime) -> None:
    os.kill(started.pid, signal.SIGSTOP)
    error, _ = outcome_within(PATIENCE, lambda: started.stats())
    assert_hung_report(error, "smollm2")


def test_a_big_request_to_a_stopped_worker_does_not_block_in_send(started: Runtime) -> None:
    # More than the socket buffer holds: without a send deadline the kernel thread blocks in
    # send() forever, holding the send lock every other request needs.
    os.kill(started.pid, signal.SIGSTOP)
    error, _ = outcome_within(PATIENCE, lambda: started.count_tokens("word " * 2_000_000))
    assert_hung_report(error, "smollm2")


def test_closing_a_stopped_worker_kills_it_promptly(started: Runtime) -> None:
    os.kill(started.pid, signal.SIGSTOP)
    error, seconds = outcome_within(PATIENCE, started.close)
    assert error is None
    assert seconds < 5  # the grace is about a second; a close that waits its 10 s timeout fails
    assert started._proc.returncode == -signal.SIGKILL


def test_a_worker_that_stops_while_loading_is_reported(tiny: Path) -> None:
    error, _ = outcome_within(PATIENCE, lambda: Runtime.start(
        tiny, LoadOptions(gpu_layers=0, n_ctx=256), name="tiny", _fault={"at": "load", "signal": "SIGSTOP"}))
    assert_hung_report(error, "tiny")
    assert "while loading" in str(error)


def test_a_busy_engine_is_not_mistaken_for_a_hung_worker(tiny: Path) -> None:
    # The engine thread sits in one "decode" for longer than the hang deadline (as a long
    # prompt on a slow CPU does); the control thread keeps answering, so nothing is killed.
    stall = {"at": "decode", "stall": str(HUNG_AFTER_S + 4)}
    with Runtime.start(tiny, LoadOptions(gpu_layers=0, n_ctx=256), name="tiny", _fault=stall) as rt:
        stream = rt.generate("hello", SamplingOptions(temperature=0.0, max_tokens=3))
        error, seconds = outcome_within(PATIENCE, lambda: stream.result)
        assert error is None and seconds > HUNG_AFTER_S
        assert rt.alive and stream.result.completion_tokens > 0
