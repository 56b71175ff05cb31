"""download.fetch against a real loopback HTTP server: resume, verify, lock, retry, fail fast."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_llm.errors import (
    HostUnreachableError,
    InsufficientSpaceError,
    IntegrityError,
    PullError,
    RemoteError,
    StoreError,
)
from jupyter_llm.store import download
from jupyter_llm.store.download import fetch, get_bytes
from tests.fakehub import FakeHub

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub(lifetime=120) as server:
        yield server


@pytest.fixture
def blob(hub: FakeHub) -> tuple[str, bytes, str]:
    """(url, data, sha256) of a 12 MB blob on the fake CDN."""
    data = os.urandom(12 * MB)
    hub.add_repo("user/blob", {"model.gguf": data})
    sha = hashlib.sha256(data).hexdigest()
    return f"{hub.cdn}/cdn/{sha}", data, sha


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name != dest.name)


def _hash_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "jupyter_llm-sha256"]


def test_fetch_writes_verified_file_and_leaves_no_partial_or_lock(hub: FakeHub, blob: tuple[str, bytes, str],
                                                                  tmp_path: Path) -> None:
    url, data, sha = blob
    calls: list[tuple[int, int | None]] = []
    dest = fetch(url, tmp_path / "out.gguf", sha256=sha, size=len(data), on_bytes=lambda c, t: calls.append((c, t)))
    assert dest.read_bytes() == data
    assert _leftovers(dest) == []
    assert calls[0] == (0, len(data)) and calls[-1] == (len(data), len(data))
    assert [c for c, _ in calls] == sorted(c for c, _ in calls)


def test_fetch_resumes_after_dropped_connections_without_resending_bytes(
    hub: FakeHub, blob: tuple[str, bytes, str], tmp_path: Path
) -> None:
    url, data, sha = blob
    hub.drop_after(sha, 3 * MB + 17)
    hub.drop_after(sha, 9 * MB + 5)
    dest = fetch(url, tmp_path / "out.gguf", sha256=sha, size=len(data))
    assert dest.read_bytes() == data
    gets = hub.blob_gets(sha)
    assert [g.range for g in gets] == [None, f"bytes={3 * MB + 17}-", f"bytes={9 * MB + 5}-"]
    assert hub.bytes_sent(sha) == len(data)  # zero bytes sent twice


def test_fetch_continues_partial_left_by_keyboard_interrupt(hub: FakeHub, blob: tuple[str, bytes, str],
                                                            tmp_path: Path) -> None:
    url, data, sha = blob
    hub.throttle(8 * MB)

    def interrupt(completed: int, total: int | None) -> None:
        if completed >= 2 * MB:
            raise KeyboardInterrupt

    dest = tmp_path / "out.gguf"
    with pytest.raises(KeyboardInterrupt):
        fetch(url, dest, sha256=sha, size=len(data), on_bytes=interrupt)
    partial = dest.with_name(dest.name + ".partial")
    kept = partial.stat().st_size
    assert not dest.exists() and 2 * MB <= kept < len(data)
    assert not dest.with_name(dest.name + ".lock").exists()
    assert _hash_threads() == []  # the interrupted fetch cleaned up its hashing thread

    hub.throttle(None)
    fetch(url, dest, sha256=sha, size=len(data))
    assert dest.read_bytes() == data
    second = hub.blob_gets(sha)[-1]
    assert second.range == f"bytes={kept}-"
    assert second.sent == len(data) - kept


def test_fetch_discards_corrupt_download_and_raises_integrity_error(
    hub: FakeHub, blob: tuple[str, bytes, str], tmp_path: Path
) -> None:
    url, data, sha = blob
    hub.corrupt(sha, 5 * MB + 3)
    dest = tmp_path / "out.gguf"
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        fetch(url, dest, sha256=sha, size=len(data))
    assert _leftovers(dest) == [] and not dest.exists()
    assert _hash_threads() == []


def test_fetch_rejects_a_size_other_than_promised(hub: FakeHub, blob: tuple[str, bytes, str],
                                                  tmp_path: Path) -> None:
    url, data, sha = blob
    dest = tmp_path / "out.gguf"
    with pytest.raises(IntegrityError, match="promised"):
        fetch(url, dest, sha256=sha, size=len(data) + 1)
    assert not dest.exists() and _leftovers(dest) == []


def test_fetch_restarts_from_zero_when_server_ignores_range(hub: FakeHub, blob: tuple[str, bytes, str],
                                                            tmp_path: Path) -> None:
    url, data, sha = blob
    dest = tmp_path / "out.gguf"
    dest.with_name(dest.name + ".partial").write_bytes(b"\0" * MB)  # wrong bytes: must not survive
    hub.ignore_range()
    fetch(url, dest, sha256=sha, size=len(data))
    assert dest.read_bytes() == data
    (get,) = hub.blob_gets(sha)
    assert get.range == f"bytes={MB}-" and get.status == 200 and get.sent == len(data)


def test_fetch_discards_partial_longer_than_the_file(hub: FakeHub, blob: tuple[str, bytes, str],
                                                     tmp_path: Path) -> None:
    url, data, sha = blob
    dest = tmp_path / "out.gguf"
    dest.with_name(dest.name + ".partial").write_bytes(os.urandom(len(data) + 10))
    fetch(url, dest, sha256=sha, size=len(data))
    assert dest.read_bytes() == data
    assert [g.range for g in hub.blob_gets(sha)] == [None]


def test_fetch_retries_server_errors_rate_limits_and_read_timeouts(
    hub: FakeHub, blob: tuple[str, bytes, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, data, sha = blob
    monkeypatch.setenv("JUPYTER_LLM_READ_TIMEOUT", "0.5")
    hub.delay(2.0)  # the first GET: no byte within the read timeout
    hub.fail_next(503)
    hub.fail_next(429)
    dest = fetch(url, tmp_path / "out.gguf", sha256=sha, size=len(data))
    assert dest.read_bytes() == data
    gets = hub.blob_gets(sha)
    assert len(gets) == 4 and [g.status for g in gets[1:]] == [503, 429, 200]


def test_fetch_gives_up_after_the_configured_retries(hub: FakeHub, blob: tuple[str, bytes, str],
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, _data, sha = blob
    monkeypatch.setenv("JUPYTER_LLM_RETRIES", "2")
    hub.fail_next(500, times=10)
    with pytest.raises(PullError, match="failed 3 times") as info:
        fetch(url, tmp_path / "out.gguf", sha256=sha)
    assert not isinstance(info.value, HostUnreachableError)
    assert len(hub.blob_gets(sha)) == 3


def test_fetch_client_errors_are_not_retried(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(RemoteError) as info:
        fetch(f"{hub.cdn}/cdn/{'0' * 64}", tmp_path / "out.gguf")
    assert info.value.status == 404
    assert len(hub.log) == 1


@pytest.mark.parametrize("host", ["closed-port", "nonexistent.invalid"])
def test_fetch_unreachable_host_fails_fast(host: str, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/x" if host == "closed-port" else "http://nonexistent.invalid/x"
    began = time.monotonic()
    with pytest.raises(HostUnreachableError, match="cannot reach"):
        fetch(url, tmp_path / "out.gguf", size=10)
    assert time.monotonic() - began < 5


def test_fetch_checks_free_disk_space_before_downloading(hub: FakeHub, blob: tuple[str, bytes, str],
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, data, sha = blob

    class Usage:
        total, used, free = 100 * MB, 99 * MB, MB

    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(InsufficientSpaceError, match=r"12\.6 MB still to download, 1\.0 MB free"):
        fetch(url, tmp_path / "out.gguf", sha256=sha, size=len(data))
    assert hub.blob_gets(sha) == []


def test_fetch_of_an_existing_complete_file_makes_no_request(hub: FakeHub, blob: tuple[str, bytes, str],
                                                             tmp_path: Path) -> None:
    url, data, sha = blob
    dest = tmp_path / "out.gguf"
    dest.write_bytes(data)
    calls: list[tuple[int, int | None]] = []
    assert fetch(url, dest, sha256=sha, size=len(data), on_bytes=lambda c, t: calls.append((c, t))) == dest
    assert hub.log == [] and calls == [(len(data), len(data))]


def test_fetch_reports_progress_at_most_about_twenty_times_a_second(
    hub: FakeHub, blob: tuple[str, bytes, str], tmp_path: Path
) -> None:
    url, data, sha = blob
    hub.throttle(24 * MB)
    calls: list[int] = []
    began = time.monotonic()
    fetch(url, tmp_path / "out.gguf", sha256=sha, size=len(data), on_bytes=lambda c, t: calls.append(c))
    elapsed = time.monotonic() - began
    assert calls[0] == 0 and calls[-1] == len(data) and calls == sorted(calls)
    assert 3 <= len(calls) <= 20 * elapsed + 3  # ~200 packets arrived; views get a bounded rate


def test_two_processes_fetching_one_file_both_end_with_it_downloaded_once(
    hub: FakeHub, blob: tuple[str, bytes, str], tmp_path: Path
) -> None:
    url, data, sha = blob
    hub.throttle(12 * MB)  # ~1 s per download, so the two processes overlap
    dest = tmp_path / "shared.gguf"
    code = (
        "import sys; from jupyter_llm.store.download import fetch; "
        f"p = fetch({url!r}, {str(dest)!r}, sha256={sha!r}, size={len(data)}); print(p)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all(out.decode().strip() == str(dest) for out, _ in outputs)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == sha
    assert hub.bytes_sent(sha) == len(data)  # the second waited for the lock, then found it done
    assert _leftovers(dest) == []


def test_get_bytes_returns_small_documents_and_maps_client_errors(hub: FakeHub) -> None:
    hub.add_repo("user/docs", {"README.md": b"# hello"})
    assert get_bytes(f"{hub.url}/user/docs/resolve/main/README.md") == b"# hello"
    with pytest.raises(RemoteError) as info:
        get_bytes(f"{hub.url}/api/models/nobody/nothing")
    assert info.value.status == 404


# -- bodies longer than announced --------------------------------------------------------------


@pytest.mark.parametrize("announced_by", ["the caller's size", "the Content-Range"])
def test_a_body_longer_than_announced_is_stopped_at_that_size_and_discarded(
    hub: FakeHub, blob: tuple[str, bytes, str], tmp_path: Path, announced_by: str
) -> None:
    url, data, sha = blob
    hub.overlong(sha, 200 * MB)  # chunked, no Content-Length: only the announced size bounds it
    dest = tmp_path / "out.gguf"
    size: int | None = len(data)
    if announced_by == "the Content-Range":
        dest.with_name(dest.name + ".partial").write_bytes(data[:MB])  # a resume: the 206 says the total
        size = None
    written: list[int] = []
    began = time.monotonic()
    with pytest.raises(IntegrityError, match="more than the 12582912 bytes"):
        fetch(url, dest, sha256=sha, size=size, on_bytes=lambda c, t: written.append(c))
    assert max(written) <= len(data), "not one byte beyond the announced size reached the disk"
    assert not dest.exists() and _leftovers(dest) == []
    assert hub.bytes_sent(sha) < len(data) + 32 * MB  # what sat in socket buffers, not 200 MB
    assert time.monotonic() - began < 10


# -- links and other non-files in the store ------------------------------------------------------


def test_a_planted_partial_symlink_is_refused_and_its_target_untouched(
    hub: FakeHub, blob: tuple[str, bytes, str], tmp_path: Path
) -> None:
    url, data, sha = blob
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    dest = tmp_path / "store" / "out.gguf"
    dest.parent.mkdir()
    dest.with_name(dest.name + ".partial").symlink_to(victim)
    with pytest.raises(StoreError, match="symbolic link"):
        fetch(url, dest, sha256=sha, size=len(data))
    assert victim.read_bytes() == b"precious"
    assert hub.blob_gets(sha) == [] and not dest.exists()


def test_a_planted_lock_symlink_is_refused_and_creates_nothing(
    hub: FakeHub, blob: tuple[str, bytes, str], tmp_path: Path
) -> None:
    url, data, sha = blob
    dest = tmp_path / "store" / "out.gguf"
    dest.parent.mkdir()
    target = tmp_path / "created-through-the-link"
    dest.with_name(dest.name + ".lock").symlink_to(target)
    with pytest.raises(StoreError, match="symbolic link"):
        fetch(url, dest, sha256=sha, size=len(data))
    assert not target.exists() and hub.blob_gets(sha) == []


def test_a_symlink_in_place_of_the_finished_file_is_not_trusted(
    hub: FakeHub, blob: tuple[str, bytes, str], tmp_path: Path
) -> None:
    url, data, sha = blob
    victim = tmp_path / "victim.gguf"
    impostor = os.urandom(len(data))  # the right size, so a stat() that follows links says "done"
    victim.write_bytes(impostor)
    dest = tmp_path / "store" / "out.gguf"
    dest.parent.mkdir()
    dest.symlink_to(victim)
    fetch(url, dest, sha256=sha, size=len(data))
    assert not dest.is_symlink() and dest.read_bytes() == data
    assert victim.read_bytes() == impostor


def test_a_fifo_in_place_of_the_partial_is_refused_without_blocking(
    hub: FakeHub, blob: tuple[str, bytes, str], tmp_path: Path
) -> None:
    url, data, sha = blob
    dest = tmp_path / "out.gguf"
    fifo = dest.with_name(dest.name + ".partial")
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fetch(url, dest, sha256=sha, size=len(data))
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # release an open() blocked on the FIFO before failing
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        worker.join(5)
        pytest.fail("fetch blocked on a FIFO in place of its partial")
    assert isinstance(outcome[0], StoreError) and "not a regular file" in str(outcome[0])
    assert hub.blob_gets(sha) == []


def test_a_public_registry_cannot_send_a_pull_to_this_machine() -> None:
    # Narrow unit test of the guard with a stand-in resolver: "registry.test" plays a public
    # host (a loopback server cannot be public); the pull tests cover a local origin for real.
    import httpx

    from jupyter_llm.errors import RemoteError
    from jupyter_llm.store.http import LocalGuard

    table = {"registry.test": ["93.184.216.34"], "cdn.test": ["2606:2800:220:1::1"], "127.0.0.1": ["127.0.0.1"],
             "intranet.test": ["10.1.2.3"], "rebound.test": ["93.184.216.35", "127.0.0.1"]}
    guard = LocalGuard(resolve=lambda host: table[host])
    guard(httpx.Request("GET", "https://registry.test/v2/x/manifests/latest"))
    guard(httpx.Request("GET", "https://cdn.test/blob"))  # another public host: a CDN, fine
    for host in ("127.0.0.1", "intranet.test", "rebound.test"):
        with pytest.raises(RemoteError, match="private network"):
            guard(httpx.Request("GET", f"http://{host}/admin"))
    local = LocalGuard(resolve=lambda host: table[host])
    local(httpx.Request("GET", "http://127.0.0.1:9/v2/"))  # a registry the user runs locally
    local(httpx.Request("GET", "http://intranet.test/blob"))


def test_a_loopback_registry_redirecting_to_its_cdn_on_localhost_still_pulls(hub: FakeHub,
                                                                              tmp_path: Path) -> None:
    # the first request's host is local, so local redirects after it are allowed
    from jupyter_llm.store.http import make_client

    with make_client() as client:
        response = client.get(f"{hub.endpoint}/api/models/none/none")
    assert response.status_code in (200, 404)
