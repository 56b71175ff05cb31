"""A pull's limits: a minimum rate, an overall deadline, bounded lock waits, and cancel from another thread.

Each test runs its pull in a daemon thread (:class:`Background`) so that a pull that never ends
fails the test instead of hanging the suite.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jupyter_llm import config
from jupyter_llm.errors import PullError
from jupyter_llm.manager import ModelManager
from jupyter_llm.store.deadline import Deadline
from jupyter_llm.store.download import fetch
from tests.fakehub import FakeHub
from tests.fakeollama import FakeOllamaRegistry, build_model
from tests.ggufs import write_tiny_llama

MB = 1 << 20


class Background:
    """``fn()`` in a daemon thread (under ``deadline`` when given); :meth:`outcome` waits, bounded."""

    def __init__(self, fn: Callable[[], object], deadline: Deadline | None = None) -> None:
        self._outcome: list[object] = []

        def run() -> None:
            try:
                if deadline is None:
                    self._outcome.append(fn())
                else:
                    with deadline.applied():
                        self._outcome.append(fn())
            except BaseException as exc:
                self._outcome.append(exc)

        self.thread = threading.Thread(target=run, name="test-pull", daemon=True)
        self.thread.start()

    def outcome(self, timeout: float) -> object:
        self.thread.join(timeout)
        if self.thread.is_alive():
            pytest.fail(f"the pull was still running after {timeout} s")
        return self._outcome[0]


@pytest.fixture
def blob(hub: FakeHub) -> tuple[str, bytes, str]:
    """(url, data, sha256) of a 4 MB blob on the fake CDN."""
    data = os.urandom(4 * MB)
    hub.add_repo("user/blob", {"model.gguf": data})
    sha = hashlib.sha256(data).hexdigest()
    return f"{hub.cdn}/cdn/{sha}", data, sha


def _partial(dest: Path) -> Path:
    return dest.with_name(dest.name + ".partial")


def _hold_lock(dest: Path) -> int:
    """Take the download lock of ``dest`` the way another kernel would."""
    fd = os.open(dest.with_name(dest.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            pytest.fail("the condition never came true")
        time.sleep(0.02)


def _our_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "test-pull" or t.name.startswith("jupyter_llm")]


# -- the minimum rate --------------------------------------------------------------------------------


def test_a_trickling_source_is_dropped_for_being_too_slow(
    hub: FakeHub, blob: tuple[str, bytes, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, data, sha = blob
    monkeypatch.setenv("JUPYTER_LLM_READ_TIMEOUT", "0.5")  # also the window the rate is averaged over
    monkeypatch.setenv("JUPYTER_LLM_RETRIES", "1")
    hub.throttle(20)  # a byte every 50 ms: never silent long enough for a read timeout
    dest = tmp_path / "out.gguf"
    began = time.monotonic()
    error = Background(lambda: fetch(url, dest, sha256=sha, size=len(data))).outcome(10)
    elapsed = time.monotonic() - began
    assert isinstance(error, PullError), error
    assert "below the minimum of 1000 B/s" in str(error) and "JUPYTER_LLM_PULL_MIN_RATE" in str(error)
    assert elapsed < 3  # two attempts of 0.5 s and one backoff
    assert 0 < _partial(dest).stat().st_size < 200, "what arrived is kept for the next pull"


def test_a_slow_but_real_link_passes_the_default_limits(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(8000)
    hub.add_repo("user/small", {"model.gguf": data})
    sha = hashlib.sha256(data).hexdigest()
    monkeypatch.setenv("JUPYTER_LLM_READ_TIMEOUT", "0.5")
    hub.throttle(4000)  # 4 kB/s, a poor mobile link
    dest = fetch(f"{hub.cdn}/cdn/{sha}", tmp_path / "out.gguf", sha256=sha, size=len(data))
    assert dest.read_bytes() == data
    assert config.pull_min_rate() == 1000
    assert config.pull_deadline() == 24 * 3600  # a 4 GB model over 1 Mbit/s takes 9 hours


# -- the deadline ------------------------------------------------------------------------------------


def test_a_download_stops_at_the_pull_deadline_and_resumes_later(
    hub: FakeHub, blob: tuple[str, bytes, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, data, sha = blob
    monkeypatch.setenv("JUPYTER_LLM_PULL_DEADLINE", "1")
    hub.throttle(MB)  # 4 MB would take 4 s
    dest = tmp_path / "out.gguf"
    began = time.monotonic()
    error = Background(lambda: fetch(url, dest, sha256=sha, size=len(data))).outcome(10)
    elapsed = time.monotonic() - began
    assert isinstance(error, PullError), error
    assert "deadline of 1 s" in str(error) and "JUPYTER_LLM_PULL_DEADLINE" in str(error)
    assert 1 <= elapsed < 2
    kept = _partial(dest).stat().st_size
    assert MB // 2 <= kept < len(data)

    monkeypatch.delenv("JUPYTER_LLM_PULL_DEADLINE")
    hub.throttle(None)
    assert fetch(url, dest, sha256=sha, size=len(data)).read_bytes() == data
    assert hub.blob_gets(sha)[-1].range == f"bytes={kept}-"


def test_one_deadline_covers_every_file_of_a_pull(hub: FakeHub, tmp_path: Path) -> None:
    parts = [os.urandom(MB), os.urandom(MB)]
    hub.add_repo("user/parts", {f"p{i}.gguf": d for i, d in enumerate(parts)})
    hub.throttle(MB)  # 1 s per file: each alone is within 1.5 s, both are not
    deadline = Deadline(1.5)

    def both() -> None:
        for i, data in enumerate(parts):
            sha = hashlib.sha256(data).hexdigest()
            fetch(f"{hub.cdn}/cdn/{sha}", tmp_path / f"p{i}.gguf", sha256=sha, size=len(data))

    error = Background(both, deadline).outcome(10)
    assert isinstance(error, PullError) and "deadline of 1.5 s" in str(error)
    assert (tmp_path / "p0.gguf").exists() and not (tmp_path / "p1.gguf").exists()


def test_a_pull_through_the_manager_ends_at_its_deadline(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.add_repo("team/Slow-GGUF", {"slow-q8_0.gguf": write_tiny_llama(tmp_path / "t.gguf").read_bytes()})
    monkeypatch.setenv("JUPYTER_LLM_PULL_DEADLINE", "0.8")
    hub.throttle(20_000)
    began = time.monotonic()
    error = Background(lambda: ModelManager().pull("hf.co/team/Slow-GGUF")).outcome(10)
    assert isinstance(error, PullError) and "JUPYTER_LLM_PULL_DEADLINE" in str(error)
    assert time.monotonic() - began < 2


# -- waiting for another puller ------------------------------------------------------------------------


def test_a_second_puller_gives_up_when_the_lock_holder_makes_no_progress(
    hub: FakeHub, blob: tuple[str, bytes, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, data, sha = blob
    monkeypatch.setenv("JUPYTER_LLM_READ_TIMEOUT", "0.2")  # no progress for 10 windows (2 s) ends the wait
    dest = tmp_path / "out.gguf"
    fd = _hold_lock(dest)
    try:
        began = time.monotonic()
        error = Background(lambda: fetch(url, dest, sha256=sha, size=len(data))).outcome(10)
        elapsed = time.monotonic() - began
    finally:
        os.close(fd)
    assert isinstance(error, PullError), error
    assert "another process holds the download lock" in str(error)
    assert "slower than 1000 B/s (JUPYTER_LLM_PULL_MIN_RATE) for 2 s" in str(error)
    assert 2 <= elapsed < 4
    assert hub.blob_gets(sha) == []


def test_a_trickling_lock_holder_does_not_keep_the_waiters(
    hub: FakeHub, blob: tuple[str, bytes, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, data, sha = blob
    monkeypatch.setenv("JUPYTER_LLM_READ_TIMEOUT", "0.2")
    dest = tmp_path / "out.gguf"
    fd = _hold_lock(dest)
    stop = threading.Event()

    def trickle() -> None:  # 10 B/s: the partial changes all the time, but far below the minimum rate
        with open(_partial(dest), "ab") as f:
            while not stop.wait(0.1):
                f.write(b"x")
                f.flush()

    threading.Thread(target=trickle, daemon=True).start()
    try:
        began = time.monotonic()
        error = Background(lambda: fetch(url, dest, sha256=sha, size=len(data))).outcome(10)
        elapsed = time.monotonic() - began
    finally:
        stop.set()
        os.close(fd)
    assert isinstance(error, PullError) and "slower than 1000 B/s" in str(error), error
    assert 2 <= elapsed < 4


def test_a_second_puller_waits_as_long_as_the_lock_holder_makes_progress(
    hub: FakeHub, blob: tuple[str, bytes, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, data, sha = blob
    monkeypatch.setenv("JUPYTER_LLM_READ_TIMEOUT", "0.2")
    dest = tmp_path / "out.gguf"
    lock = dest.with_name(dest.name + ".lock")
    fd = _hold_lock(dest)

    def holder() -> None:  # another kernel: 3.5 s of steady progress, longer than the 2 s stall limit
        with open(_partial(dest), "ab") as f:
            for _ in range(35):
                f.write(b"x" * 1000)
                f.flush()
                time.sleep(0.1)
        _partial(dest).unlink()
        dest.write_bytes(data)
        os.unlink(lock)
        os.close(fd)

    threading.Thread(target=holder, daemon=True).start()
    began = time.monotonic()
    result = Background(lambda: fetch(url, dest, sha256=sha, size=len(data))).outcome(10)
    assert result == dest and time.monotonic() - began >= 3
    assert hub.blob_gets(sha) == []


# -- cancelling --------------------------------------------------------------------------------------


def test_cancel_from_another_thread_stops_a_trickling_download_at_once(
    hub: FakeHub, blob: tuple[str, bytes, str], tmp_path: Path
) -> None:
    url, data, sha = blob
    hub.throttle(2)  # a byte every 0.5 s: the reader is blocked in recv nearly all the time
    dest = tmp_path / "out.gguf"
    deadline = Deadline()
    run = Background(lambda: fetch(url, dest, sha256=sha, size=len(data)), deadline)
    _wait_for(lambda: _partial(dest).exists() and _partial(dest).stat().st_size >= 2)
    time.sleep(0.1)
    began = time.monotonic()
    deadline.cancel("the client closed the connection")
    error = run.outcome(5)
    latency = time.monotonic() - began
    assert isinstance(error, PullError), error
    assert "cancelled (the client closed the connection)" in str(error)
    assert latency < 0.3
    kept = _partial(dest).stat().st_size
    assert kept >= 2 and not dest.with_name(dest.name + ".lock").exists()
    assert _our_threads() == []

    hub.throttle(None)
    assert fetch(url, dest, sha256=sha, size=len(data)).read_bytes() == data
    assert hub.blob_gets(sha)[-1].range == f"bytes={kept}-"


def test_cancel_wakes_a_puller_waiting_for_the_lock(
    hub: FakeHub, blob: tuple[str, bytes, str], tmp_path: Path
) -> None:
    url, data, sha = blob
    dest = tmp_path / "out.gguf"
    fd = _hold_lock(dest)
    try:
        deadline = Deadline()
        run = Background(lambda: fetch(url, dest, sha256=sha, size=len(data)), deadline)
        time.sleep(0.3)
        began = time.monotonic()
        deadline.cancel("the client closed the connection")
        error = run.outcome(5)
        assert time.monotonic() - began < 0.3
    finally:
        os.close(fd)
    assert isinstance(error, PullError) and "cancelled" in str(error)


@pytest.fixture
def slow_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOllamaRegistry]:
    with FakeOllamaRegistry(lifetime=60) as registry:
        monkeypatch.setenv("JUPYTER_LLM_OLLAMA_REGISTRY", registry.url)
        registry.add("library", "tiny", "latest", build_model(write_tiny_llama(tmp_path / "t.gguf").read_bytes()))
        registry.throttle(2)
        yield registry


def test_pulls_whose_callers_left_leave_no_thread_behind(slow_registry: FakeOllamaRegistry) -> None:
    manager = ModelManager()
    try:
        deadlines = [Deadline() for _ in range(20)]
        runs = [Background(lambda: manager.pull("ollama://tiny"), d) for d in deadlines]
        time.sleep(1.0)  # one downloads a byte at a time, nineteen wait for its lock
        assert all(r.thread.is_alive() for r in runs)
        began = time.monotonic()
        for d in deadlines:
            d.cancel("the client closed the connection")
        errors = [r.outcome(5) for r in runs]
        assert time.monotonic() - began < 1
    finally:
        manager.close()
    assert all(isinstance(e, PullError) and "cancelled" in str(e) for e in errors), errors
    assert _our_threads() == []
    assert manager.pulls() == []
