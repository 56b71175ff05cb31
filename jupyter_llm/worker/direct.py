"""An answer's text written straight into its HTTP client's socket (the API server's fast path).

A token streamed by the kernel's API server used to cost the kernel ~0.5 ms of CPU (its reader
thread, the event loop, the HTTP framing) on the two cores the decode needs: the server ran at
0.79-0.87× llama-server with one client (docs/notes.md §14). For a plain streamed answer (one
choice, no log probabilities, no reasoning split, no tool calls; OpenAI's server-sent events
and Ollama's lines) the server asks for ``direct`` output: the bytes before and after the JSON
string of a piece, as its own formatter makes them (and where the time goes, for Ollama's).

- The first piece goes to the kernel as usual (``tok``): the server answers with its status,
  headers and first chunk.
- The kernel then sends ``attach`` with the client's socket (a descriptor passed over the
  private socket) and writes nothing more until ``done``; pieces sampled in between are held
  and written at the attach. Each piece is written as one HTTP/1.1 chunk; ``done`` carries the
  text written (``direct_text``), for the completion.
- ``attach`` without a socket (the kernel could not hand it over), or an answer that ends
  before the attach: the held pieces go to the kernel as one ``tok``, and so does the rest.
- A client that does not read (the socket's buffer full) must not stall the engine: the bytes
  it did not take go to the kernel as ``spill`` and every later piece as ``tok``; the kernel's
  transport then does flow control as for any answer. A client gone (EPIPE) cancels the answer.

Each byte of the answer is written once, by one side, in order: the kernel writes what it
received before it attached and what comes after a spill; the worker only what it held or
sampled in between.

The writes are the :class:`Writer` thread's, not the engine's: a ``send`` into a loopback socket
wakes its client and cost the engine ~150 µs a piece (0.6 ms of a 4-answer step of 30 ms),
during which it decoded nothing; llama-server too leaves its sockets to its HTTP threads. With
the writer the engine goes on to the next decode at once: 4 clients × 256 tokens, 6 alternating
pairs, 1.130 1.070 1.011 0.965 1.043 1.060 (median 1.05×) the throughput of writing in the engine
(docs/notes.md §14). Once an answer is attached every message about it goes through the writer,
in order: its pieces, what a full socket spills, the socket's close and the final ``done`` or
``error`` (the kernel writes the answer's end only after the worker's last byte).
"""

from __future__ import annotations

import json
import os
import queue
import socket
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from .. import wire

_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


class Writer:
    """The thread that writes attached answers into their sockets (one per engine; started with
    the first attach), and sends the messages queued behind those writes."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        self._send = send
        self._queue: queue.SimpleQueue[tuple[DirectOut, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def put(self, out: DirectOut, item: Any) -> None:
        """Queue for ``out``: ("piece", text, tokens, bytes), ("close",) its socket, or ("send", message)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jupyter-llm-writer", daemon=True)
            self._thread.start()
        self._queue.put((out, item))

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written and sent (the worker's close; tests)."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put((None, done))  # type: ignore[arg-type]
        return done.wait(timeout)

    def _run(self) -> None:
        try:
            while True:
                out, item = self._queue.get()
                if out is None:
                    item.set()
                    continue
                message = out.take(item)
                if message is not None:
                    self._send(message)
        except BaseException:  # a lost write would corrupt an answer: end the worker as the engine does
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            os._exit(70)


class DirectOut:
    """The direct output of one answer: its state is the engine thread's, its socket the writer's."""

    def __init__(self, *parts: bytes, cancel: Callable[[], None]) -> None:
        """``parts``: the bytes before and after a piece's JSON string, or before the time, between
        it and the string, and after (the kernel's ``Extras.direct``). ``cancel``: called when the
        client turns out to be gone (the engine ends the answer)."""
        self.prefix, self.suffix = parts[0], parts[-1]
        self.between = parts[1] if len(parts) == 3 else None
        self._cancel = cancel
        self.state = "first"
        """first → held (the first piece went to the kernel) → attached (the writer has it) → ended;
        or off (the kernel writes everything)."""
        self.rid = -1
        self.sock: socket.socket | None = None
        """The writer's: None once the client stopped taking bytes or left (then the kernel writes)."""
        self.writer: Writer | None = None
        self.held: list[str] = []
        self.held_tokens = 0
        self.written: list[str] = []
        """Texts this side wrote (or spilled), by the writer once attached: the kernel's stream adds
        them to the completion (``done``'s ``direct_text``)."""

    def piece(self, rid: int, text: str, n_tokens: int) -> tuple[Any, ...] | None:
        """The message for the kernel that ``text`` becomes, or None when held or queued."""
        if self.state == "held":
            self.held.append(text)
            self.held_tokens += n_tokens
            return None
        if self.state == "attached":
            assert self.writer is not None
            self.writer.put(self, ("piece", text, n_tokens, self._frame(text)))
            return None
        if self.state == "first":
            self.state = "held"
        return (wire.TOKEN, rid, text, n_tokens)

    @staticmethod
    def attach_to(out: DirectOut | None, rid: int, sock: socket.socket | None,
                  writer: Writer | None = None) -> tuple[Any, ...] | None:
        """:meth:`attach` for ``out``; without one (the answer ended) the socket is closed."""
        if out is None:
            if sock is not None:
                sock.close()
            return None
        return out.attach(rid, sock, writer)

    def attach(self, rid: int, sock: socket.socket | None, writer: Writer | None = None) -> tuple[Any, ...] | None:
        """The kernel's ``attach``: ``writer`` writes the held pieces and what follows into ``sock``,
        or (None) everything goes back to the kernel. Returns the message to send, if any."""
        held, n, self.held, self.held_tokens = self.held, self.held_tokens, [], 0
        if self.state != "held" or sock is None or writer is None:
            if sock is not None:
                sock.close()
            if self.state in ("first", "held"):  # (an attach before the first piece: the kernel writes all)
                self.state = "off"
            return (wire.TOKEN, rid, "".join(held), n) if held else None
        self.rid, self.sock, self.writer, self.state = rid, sock, writer, "attached"
        if held:
            text = "".join(held)
            writer.put(self, ("piece", text, n, b"".join(self._frame(t) for t in held)))
        return None

    @staticmethod
    def last(out: DirectOut | None, rid: int, message: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """The messages that end answer ``rid`` (``message``, its ``done`` or ``error``, last), to
        send now; an attached answer's go through its writer, behind its writes."""
        if out is None:
            return [message]
        if out.state == "attached":
            assert out.writer is not None
            out.state = "ended"
            out.writer.put(out, ("close",))
            out.writer.put(out, ("send", message))
            return []
        held, n, out.held = out.held, out.held_tokens, []
        out.state = "off"
        return [*([(wire.TOKEN, rid, "".join(held), n)] if held else []), out._done(message)]

    def take(self, item: Any) -> tuple[Any, ...] | None:
        """Writer thread: write a queued piece, or close the socket; the message to send, if any."""
        if item[0] == "close":
            if self.sock is not None:
                self.sock.close()
                self.sock = None
            return None
        if item[0] == "send":  # a message queued behind the writes
            return self._done(item[1])
        _, text, n_tokens, data = item
        if self.sock is None:  # the socket is the kernel's again: it frames the rest itself
            return (wire.TOKEN, self.rid, text, n_tokens)
        self.written.append(text)
        try:
            sent = self.sock.send(data, _FLAGS)
        except BlockingIOError:
            sent = 0
        except OSError:  # the client closed the connection (EPIPE, ECONNRESET)
            self.sock.close()
            self.sock = None
            self._cancel()
            return None
        if sent == len(data):
            return None
        self.sock.close()
        self.sock = None
        return (wire.SPILL, self.rid, data[sent:])

    def _done(self, message: tuple[Any, ...]) -> tuple[Any, ...]:
        if message[0] == wire.DONE:  # with what this side wrote, now that it is final
            message[2]["direct_text"] = "".join(self.written)
        return message

    def _frame(self, text: str) -> bytes:
        body = json.dumps(text, ensure_ascii=False).encode() + self.suffix
        if self.between is None:
            body = self.prefix + body
        else:  # the time of this piece, as Ollama writes it into each line
            body = self.prefix + datetime.now(timezone.utc).strftime(wire.OLLAMA_TIME).encode() + self.between + body
        return b"%x\r\n%b\r\n" % (len(body), body)


__all__ = ["DirectOut", "Writer"]
