"""The API server's fast path: the worker writes a streamed answer into the client's socket
(jupyter_llm/worker/direct.py) — its framing on real sockets, and the real server and model
driven by the official openai client and by raw HTTP clients (HTTP/1.0, a client that stops
reading, one that leaves)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jupyter_llm import wire
from jupyter_llm.runtime.stream import Stream
from jupyter_llm.server import connection
from jupyter_llm.worker.direct import DirectOut, Writer
from tests.apiserver import MODEL, auth, openai_client, raw_request, running_server, wait_until, worker_stats

PREFIX, SUFFIX = b'data: {"delta": ', b"}\n\n"


def unchunk(data: bytes) -> list[bytes]:
    """The chunks of an HTTP/1.1 chunked body (without the terminating empty one)."""
    out = []
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        n = int(size_line, 16)
        if n == 0:
            break
        assert rest[n:n + 2] == b"\r\n", "a chunk must end with CRLF"
        out.append(rest[:n])
        data = rest[n + 2:]
    return out


def texts_of(chunks: list[bytes]) -> list[str]:
    out = []
    for c in chunks:
        assert c.startswith(PREFIX) and c.endswith(SUFFIX)
        out.append(json.loads(c[len(PREFIX):-len(SUFFIX)]))
    return out


def read_available(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    got = b""
    while True:
        try:
            part = sock.recv(1 << 16)
        except BlockingIOError:
            return got
        if not part:
            return got
        got += part


# -- the worker's side, on real sockets ------------------------------------------------------------

def writer() -> tuple[Writer, list[tuple[Any, ...]]]:
    """A real writer thread whose messages for the kernel are collected."""
    sent: list[tuple[Any, ...]] = []
    return Writer(sent.append), sent


def test_the_first_piece_goes_to_the_kernel_the_held_ones_are_written_at_the_attach() -> None:
    out, (w, sent) = DirectOut(PREFIX, SUFFIX, cancel=lambda: None), writer()
    assert out.piece(7, "Hel", 1) == (wire.TOKEN, 7, "Hel", 1)
    assert out.piece(7, "lo", 1) is None and out.piece(7, ' "wo\nrld" é', 2) is None  # held
    ours, client = socket.socketpair()
    with ours, client:
        assert out.attach(7, socket.socket(fileno=os.dup(ours.fileno())), w) is None
        assert out.piece(7, "!", 1) is None
        assert DirectOut.last(out, 7, (wire.DONE, 7, {"finish_reason": "stop"})) == []  # behind the writes
        assert w.drain()
        written = read_available(client)
    assert texts_of(unchunk(written)) == ["lo", ' "wo\nrld" é', "!"]
    assert sent == [(wire.DONE, 7, {"finish_reason": "stop", "direct_text": 'lo "wo\nrld" é!'})]
    assert out.sock is None, "the writer closed its socket"


PIECES = 200


def test_the_writer_keeps_each_answer_in_order_while_the_engine_goes_on() -> None:
    """Pieces queued faster than a client reads still arrive whole and in order, and the
    answer's end is sent only after its last byte left."""
    # PIECES: a socketpair takes 278 such sends before it is full even with a reader that
    # never got the CPU (each send's buffer overhead counts), so no spill (tested below) can
    # happen here however slow the machine
    out, (w, sent) = DirectOut(PREFIX, SUFFIX, cancel=lambda: None), writer()
    out.piece(2, "first", 1)
    ours, client = socket.socketpair()
    got = bytearray()

    def read() -> None:  # a client reading as it comes, until the worker's side is closed
        while part := client.recv(1 << 16):
            got.extend(part)

    with ours, client:
        out.attach(2, socket.socket(fileno=os.dup(ours.fileno())), w)
        reader = threading.Thread(target=read)
        reader.start()
        for i in range(PIECES):
            out.piece(2, f"piece {i} ", 1)
        DirectOut.last(out, 2, (wire.DONE, 2, {}))
        assert w.drain()
        ours.close()  # (the writer closed its own copy)
        reader.join(10)
    assert texts_of(unchunk(bytes(got))) == [f"piece {i} " for i in range(PIECES)]
    assert sent == [(wire.DONE, 2, {"direct_text": "".join(f"piece {i} " for i in range(PIECES))})]


def test_an_answer_that_ends_before_the_attach_gives_its_held_pieces_to_the_kernel() -> None:
    out = DirectOut(PREFIX, SUFFIX, cancel=lambda: None)
    out.piece(1, "a", 1)
    out.piece(1, "b", 1)
    out.piece(1, "c", 2)
    done = (wire.DONE, 1, {})
    assert DirectOut.last(out, 1, done) == [(wire.TOKEN, 1, "bc", 3), (wire.DONE, 1, {"direct_text": ""})]
    ours, client = socket.socketpair()
    with client:
        assert DirectOut.attach_to(None, 1, ours, writer()[0]) is None  # the engine no longer knows the answer
        assert ours.fileno() == -1, "the socket of an answer that ended is closed"
    assert out.written == []


def test_an_attach_without_a_socket_sends_everything_to_the_kernel() -> None:
    out = DirectOut(PREFIX, SUFFIX, cancel=lambda: None)
    out.piece(3, "a", 1)
    out.piece(3, "b", 1)
    assert out.attach(3, None, writer()[0]) == (wire.TOKEN, 3, "b", 1)
    assert out.piece(3, "c", 1) == (wire.TOKEN, 3, "c", 1)
    assert DirectOut.last(out, 3, (wire.ERROR, 3, "RuntimeError", "x", {})) == [(wire.ERROR, 3, "RuntimeError",
                                                                                "x", {})]


def test_a_client_that_does_not_read_gets_the_rest_through_the_kernel() -> None:
    """The engine never waits for a client: what the socket does not take is spilled, raw."""
    out, (w, sent) = DirectOut(PREFIX, SUFFIX, cancel=lambda: None), writer()
    out.piece(5, "first", 1)
    ours, client = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    with ours, client:
        out.attach(5, socket.socket(fileno=os.dup(ours.fileno())), w)
        piece = "x" * 500
        assert all(out.piece(5, piece, 1) is None for _ in range(200)), "the engine only queues"
        DirectOut.last(out, 5, (wire.DONE, 5, {}))
        assert w.drain()
        spills = [m for m in sent if m[0] == wire.SPILL]
        assert len(spills) == 1, "one spill, then the kernel gets plain pieces"
        after = sent[sent.index(spills[0]) + 1:-1]
        assert after and all(m == (wire.TOKEN, 5, piece, 1) for m in after)
        written = b""
        while True:  # what the worker wrote, then the spilled rest: whole chunks again
            part = read_available(client)
            if not part:
                break
            written += part
    chunks = unchunk(written + spills[0][2])
    assert texts_of(chunks) == [piece] * (200 - len(after))
    assert out.written == [piece] * (200 - len(after)), "spilled text counts as the worker's"
    assert sent[-1] == (wire.DONE, 5, {"direct_text": piece * (200 - len(after))})


def test_a_client_gone_cancels_the_answer() -> None:
    cancelled = []
    out, (w, sent) = DirectOut(PREFIX, SUFFIX, cancel=lambda: cancelled.append(True)), writer()
    out.piece(9, "a", 1)
    ours, client = socket.socketpair()
    with ours:
        out.attach(9, socket.socket(fileno=os.dup(ours.fileno())), w)
        client.close()
        assert out.piece(9, "b", 1) is None
        assert w.drain()
    assert cancelled == [True]
    out.piece(9, "c", 1)
    assert w.drain()
    assert sent == [(wire.TOKEN, 9, "c", 1)]


def test_a_descriptor_sent_with_a_message_arrives_with_it() -> None:
    a, b = socket.socketpair()
    sender, receiver = wire.Pipe(os.dup(a.fileno())), wire.Pipe(os.dup(b.fileno()), takes_fds=True)
    a.close()
    b.close()
    x, y = socket.socketpair()
    try:
        sender.send(("gen", 1))
        sender.send_fd((wire.ATTACH, 1, True), x.fileno(), 5.0)
        sender.send(("cancel", 1))
        assert receiver.recv() == ("gen", 1)
        assert receiver.recv() == (wire.ATTACH, 1, True)
        got = socket.socket(fileno=receiver.fds.popleft())
        with got:
            got.sendall(b"through the copy")
            assert y.recv(100) == b"through the copy"
        assert receiver.recv() == ("cancel", 1)
        assert not receiver.fds
    finally:
        for s in (x, y):
            s.close()
        sender.close()
        receiver.close()


# -- the real server and model ------------------------------------------------------------------------

@pytest.fixture
def attaches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, bool]]:
    """(a socket was offered, the worker took it) for each attach of a stream."""
    seen: list[tuple[bool, bool]] = []
    real = Stream.attach

    def spy(self: Stream, fd: int | None, on_spill: Any) -> bool:
        took = real(self, fd, on_spill)
        seen.append((fd is not None, took))
        return took

    monkeypatch.setattr(Stream, "attach", spy)
    return seen


@pytest.fixture(scope="module")
def served(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A server with two slots (the model's worker writes the streamed answers)."""
    with running_server(smollm2_path, tmp_path_factory.mktemp("direct-api"), parallel=2) as pair:
        yield pair


STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]


def whole_answer(client: Any, messages: list[dict[str, str]], max_tokens: int) -> str:
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)
    return str(reply.choices[0].message.content)


def test_the_worker_writes_a_streamed_answer_that_equals_the_whole_one(served: Any,
                                                                       attaches: list[tuple[bool, bool]]) -> None:
    _manager, server = served
    with openai_client(server) as client:
        whole = whole_answer(client, STORY, 60)
        chunks = list(client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=60, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        completion = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=30, temperature=0)
        pieces = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=30,
                                                temperature=0, stream=True))
    assert attaches[:1] == [(True, True)], "the worker was handed the client's socket"
    assert text == whole
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 20, "streamed piece by piece"
    assert chunks[-1].usage.completion_tokens == 60 and chunks[-2].choices[0].finish_reason == "length"
    assert "".join(p.choices[0].text for p in pieces if p.choices) == completion.choices[0].text
    assert len(attaches) == 2 and all(took for _, took in attaches)


def test_the_worker_writes_ollama_lines_with_their_own_times(served: Any,
                                                            attaches: list[tuple[bool, bool]]) -> None:
    """Ollama's lines carry the time each piece was made: the worker writes its clock's."""
    from datetime import datetime

    import ollama

    _manager, server = served
    with ollama.Client(host=server.url, headers=auth(server)) as client:
        options = {"temperature": 0, "num_predict": 40}
        whole = client.chat(model=MODEL, messages=STORY, options=options)
        lines = list(client.chat(model=MODEL, messages=STORY, options=options, stream=True))
        generated = client.generate(model=MODEL, prompt="Once upon a time", options=options)
        pieces = list(client.generate(model=MODEL, prompt="Once upon a time", options=options, stream=True))
    assert attaches == [(True, True), (True, True)]
    assert "".join(line.message.content or "" for line in lines) == whole.message.content
    assert lines[-1].done and lines[-1].eval_count == whole.eval_count
    times = [datetime.fromisoformat(str(line.created_at).replace("Z", "+00:00")) for line in lines]
    assert times == sorted(times) and times[-2] > times[1], "each line has the time it was written"
    assert "".join(p.response for p in pieces) == generated.response


def test_answers_streamed_together_each_equal_their_own(served: Any, attaches: list[tuple[bool, bool]]) -> None:
    _manager, server = served
    asks = [[{"role": "user", "content": f"Tell a short story about the number {i}."}] for i in range(3)]
    with openai_client(server) as client:
        wholes = [whole_answer(client, m, 40) for m in asks]
        got: dict[int, str] = {}

        def stream(i: int) -> None:
            got[i] = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=MODEL, messages=asks[i], max_tokens=40, temperature=0, stream=True) if c.choices)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert [got.get(i) for i in range(3)] == wholes
    assert sum(took for _, took in attaches) >= 2


def chat_request(server: Any, messages: list[dict[str, str]], max_tokens: int, **how: Any) -> socket.socket:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    return raw_request(server, "/v1/chat/completions", body, close=True, **how)


def read_all(sock: socket.socket) -> tuple[bytes, bytes]:
    sock.settimeout(60)
    data = b""
    while part := sock.recv(1 << 16):
        data += part
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def sse_text(events: bytes) -> str:
    text = ""
    for line in events.decode().split("\n"):
        if line.startswith("data: ") and line != "data: [DONE]":
            choices = json.loads(line[6:]).get("choices") or []
            if choices:
                text += (choices[0].get("delta") or {}).get("content") or ""
    return text


def test_an_http_1_0_client_is_answered_by_the_kernel(served: Any, attaches: list[tuple[bool, bool]]) -> None:
    """No chunked encoding there: the worker is told to send everything back instead."""
    _manager, server = served
    with openai_client(server) as client:
        whole = whole_answer(client, STORY, 30)
    head, body = read_all(chat_request(server, STORY, 30, version="1.0"))
    assert b" 200 " in head.split(b"\r\n")[0] and b"chunked" not in head.lower()
    assert sse_text(body) == whole
    assert attaches == [(False, False)]


def test_a_client_that_stops_reading_gets_the_whole_answer(served: Any, attaches: list[tuple[bool, bool]],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's write finds the socket full: the rest goes through the kernel, in order."""
    manager, server = served
    real_fd = connection.Handover.socket_fd
    raw_writes: list[int] = []
    real_raw = connection.Handover.write_raw

    def small_buffer(self: connection.Handover) -> int | None:
        fd = real_fd(self)
        if fd is not None:  # a small send buffer: a client that does not read fills it at once
            s = socket.socket(fileno=fd)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            s.detach()
        return fd

    def counted(self: connection.Handover, data: bytes) -> None:
        raw_writes.append(len(data))
        real_raw(self, data)

    monkeypatch.setattr(connection.Handover, "socket_fd", small_buffer)
    monkeypatch.setattr(connection.Handover, "write_raw", counted)
    with openai_client(server) as client:
        whole = whole_answer(client, STORY, 200)
    sock = chat_request(server, STORY, 200, rcvbuf=4096)
    assert wait_until(lambda: bool(attaches), 60)
    assert wait_until(lambda: worker_stats(manager)["busy"] == 0, 60), "the answer ended without the client"
    head, body = read_all(sock)
    assert b"chunked" in head.lower()
    events = b"".join(unchunk(body))
    assert sse_text(events) == whole and events.endswith(b"data: [DONE]\n\n")
    assert attaches == [(True, True)] and len(raw_writes) == 1, "the worker wrote, then spilled once"


def test_a_client_that_leaves_frees_its_slot(served: Any, attaches: list[tuple[bool, bool]]) -> None:
    manager, server = served
    sock = chat_request(server, STORY, 400)
    sock.settimeout(30)
    got = b""
    while got.count(b"data: ") < 5:
        got += sock.recv(4096)
    assert wait_until(lambda: bool(attaches)) and attaches[0] == (True, True)
    sock.close()
    started = time.monotonic()
    assert wait_until(lambda: worker_stats(manager)["busy"] == 0, 30)
    assert time.monotonic() - started < 10, "the generation stopped long before its 400 tokens"
    with openai_client(server) as client:
        assert whole_answer(client, STORY, 5)
