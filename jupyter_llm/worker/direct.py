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
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from .. import wire

_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


class DirectOut:
    """The direct output of one answer (engine thread only)."""

    def __init__(self, *parts: bytes, cancel: Callable[[], None]) -> None:
        """``parts``: the bytes before and after a piece's JSON string, or before the time, between
        it and the string, and after (the kernel's ``Extras.direct``). ``cancel``: called when the
        client turns out to be gone (the engine ends the answer)."""
        self.prefix, self.suffix = parts[0], parts[-1]
        self.between = parts[1] if len(parts) == 3 else None
        self._cancel = cancel
        self.state = "first"
        """first → held (the first piece went to the kernel) → attached → off (the kernel writes)."""
        self.sock: socket.socket | None = None
        self.held: list[str] = []
        self.held_tokens = 0
        self.written: list[str] = []
        """Texts this side wrote (or spilled): the kernel's stream adds them to the completion."""

    def piece(self, rid: int, text: str, n_tokens: int) -> tuple[Any, ...] | None:
        """The message for the kernel that ``text`` becomes, or None when written or held."""
        if self.state == "held":
            self.held.append(text)
            self.held_tokens += n_tokens
            return None
        if self.state == "attached":
            return self._write(rid, [text])
        if self.state == "first":
            self.state = "held"
        return (wire.TOKEN, rid, text, n_tokens)

    @staticmethod
    def attach_to(out: DirectOut | None, rid: int, sock: socket.socket | None) -> tuple[Any, ...] | None:
        """:meth:`attach` for ``out``; without one (the answer ended) the socket is closed."""
        if out is None:
            if sock is not None:
                sock.close()
            return None
        return out.attach(rid, sock)

    def attach(self, rid: int, sock: socket.socket | None) -> tuple[Any, ...] | None:
        """The kernel's ``attach``: write the held pieces and what follows into ``sock``, or
        (None) give everything back to the kernel. Returns the message to send, if any."""
        held, n, self.held, self.held_tokens = self.held, self.held_tokens, [], 0
        if self.state != "held" or sock is None:
            if sock is not None:
                sock.close()
            if self.state in ("first", "held"):  # (an attach before the first piece: the kernel writes all)
                self.state = "off"
            return (wire.TOKEN, rid, "".join(held), n) if held else None
        self.sock, self.state = sock, "attached"
        return self._write(rid, held) if held else None

    def end(self, rid: int) -> tuple[Any, ...] | None:
        """The answer ended: the held pieces, if it was never attached; the socket closed."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        held, n, self.held = self.held, self.held_tokens, []
        self.state = "off"
        return (wire.TOKEN, rid, "".join(held), n) if held else None

    def _write(self, rid: int, texts: list[str]) -> tuple[Any, ...] | None:
        assert self.sock is not None
        data = b"".join(self._frame(t) for t in texts)
        self.written.extend(texts)
        try:
            sent = self.sock.send(data, _FLAGS)
        except BlockingIOError:
            sent = 0
        except OSError:  # the client closed the connection (EPIPE, ECONNRESET)
            self._off()
            self._cancel()
            return None
        if sent == len(data):
            return None
        self._off()
        return (wire.SPILL, rid, data[sent:])

    def _frame(self, text: str) -> bytes:
        body = json.dumps(text, ensure_ascii=False).encode() + self.suffix
        if self.between is None:
            body = self.prefix + body
        else:  # the time of this piece, as Ollama writes it into each line
            body = self.prefix + datetime.now(timezone.utc).strftime(wire.OLLAMA_TIME).encode() + self.between + body
        return b"%x\r\n%b\r\n" % (len(body), body)

    def _off(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.state = "off"


__all__ = ["DirectOut"]
