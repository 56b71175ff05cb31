"""The private socket's framing (wire.Pipe) on a real socket pair: what one side sends the other
reads back whole and in order, in bursts, across read sizes and in both length framings."""

from __future__ import annotations

import pickle
import socket
import struct
import threading

import pytest

from jupyter_llm import wire


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    left, right = wire.Pipe(a.detach()), wire.Pipe(b.detach())
    yield left, right
    left.close()
    right.close()


def test_messages_arrive_whole_and_in_order_whatever_their_size(pair: tuple[wire.Pipe, wire.Pipe]) -> None:
    left, right = pair
    sizes = [0, 1, 3, 100, 65_535, 65_536, 70_000, 300_000, 5]
    messages = [("tok", i, "x" * n, n) for i, n in enumerate(sizes)]
    sender = threading.Thread(target=lambda: [left.send(m) for m in messages])
    sender.start()
    got = [right.recv() for _ in messages]
    sender.join()
    assert got == messages
    assert not right.pending()


def test_a_burst_read_at_once_is_taken_message_by_message(pair: tuple[wire.Pipe, wire.Pipe]) -> None:
    left, right = pair
    for i in range(200):
        left.send(("tok", 1, f"piece {i}", 1))
    assert right.recv() == ("tok", 1, "piece 0", 1)
    assert right.pending()  # the rest was read with the first, or waits in the socket
    assert [right.recv()[2] for _ in range(199)] == [f"piece {i}" for i in range(1, 200)]


def test_the_long_length_framing_is_read_too(pair: tuple[wire.Pipe, wire.Pipe]) -> None:
    left, right = pair
    data = pickle.dumps(("reply", 7, "long form"), pickle.HIGHEST_PROTOCOL)
    raw = socket.socket(fileno=left._conn.fileno())
    try:  # the framing Connection uses for messages over 2 GiB: -1, then an 8-byte length
        raw.sendall(struct.pack("!iQ", -1, len(data)) + data)
    finally:
        raw.detach()
    assert right.recv() == ("reply", 7, "long form")


def test_a_closed_other_side_is_an_eof(pair: tuple[wire.Pipe, wire.Pipe]) -> None:
    left, right = pair
    left.send(("done", 1, {}))
    left.close()
    assert right.recv() == ("done", 1, {})
    with pytest.raises(EOFError):
        right.recv()
