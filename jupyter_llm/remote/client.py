"""The HTTP side of a remote engine: one client per remote, its errors, and a streamed answer.

Every request goes through :class:`Client`, which alone holds the remote's token (read from
the environment variable the user named, at call time) and scrubs it from any text an error
carries, so the token never reaches an output, a repr, the snapshot or the remotes file.
Connecting fails within :data:`CONNECT_S` seconds, naming the address; reading waits
:data:`READ_S` seconds between two pieces, as long generations on a big machine need.

:class:`RemoteStream` is the remote's counterpart of :class:`jupyter_llm.runtime.Stream`: it
yields the same :class:`~jupyter_llm.runtime.stream.Chunk` s and ends with the same
:class:`~jupyter_llm.runtime.stream.Completion`, so ``%%chat``, ``Model`` and the HTTP API
do not care where the model runs.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ModelNotFoundError, RemoteEngineError
from ..options import SamplingOptions
from ..runtime.stream import Answering, Chunk, Completion

if TYPE_CHECKING:
    import httpx

    from .registry import Remote

CONNECT_S = 3.0
"""Seconds to connect to a remote: a dead one fails this fast, with its address."""
READ_S = 600.0
"""Seconds to wait between two pieces of an answer (a long prompt on a big model is slow)."""
HOP_HEADER = "X-Jupyter-LLM-Remote"
"""Sent with every request to a remote: a jupyter_llm server that receives it lists only its own
models, so kernels that are each other's remotes (or a kernel that is its own) never ask in a loop."""
POLL_S = 3.0
"""Seconds a state or model-list request may take in all (they run off the cell's thread)."""


@dataclass(frozen=True)
class Piece:
    """What an engine's stream parser gives: text, or (last) the statistics it reported."""

    text: str = ""
    done: bool = False
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_s: float | None = None
    """Seconds the remote spent on the prompt, when it says (Ollama's prompt_eval_duration)."""
    eval_s: float | None = None


def changed_sampling(s: SamplingOptions) -> dict[str, Any]:
    """The sampling fields the caller changed from our defaults: only those are sent, so a
    remote model's own defaults (an Ollama Modelfile's PARAMETERs) apply as a local manifest's
    do. ``max_tokens`` is always sent: a remote answer is bounded like a local one."""
    defaults = SamplingOptions()
    return {k: getattr(s, k) for k in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")
            if getattr(s, k) != getattr(defaults, k)}


class Client:
    """HTTP requests to one remote; errors are :class:`RemoteEngineError` naming its address."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote

    @property
    def where(self) -> str:
        return f"remote {self.remote.name!r} at {self.remote.url}"

    def _headers(self) -> dict[str, str]:
        token = self.remote.token()
        return {HOP_HEADER: "1", **({"Authorization": f"Bearer {token}"} if token else {})}

    def scrub(self, text: str) -> str:
        """``text`` with the token cut out (an engine may echo a header in its error)."""
        token = self.remote.token()
        return text.replace(token, "***") if token else text

    def _http(self, read: float) -> httpx.Client:
        import httpx

        # No proxy from the environment (a remote is a machine the user named, usually on their
        # network, and its token must not pass through a proxy); no redirects (the token would follow).
        return httpx.Client(base_url=self.remote.url, headers=self._headers(), follow_redirects=False,
                            timeout=httpx.Timeout(read, connect=min(CONNECT_S, read)), trust_env=False)

    def _failed(self, exc: Exception) -> RemoteEngineError:
        import httpx

        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            reason = "could not connect"
        elif isinstance(exc, httpx.TimeoutException):
            reason = "did not answer in time"
        else:
            reason = "broke off the connection"
        return RemoteEngineError(self.scrub(
            f"{self.where} {reason} ({type(exc).__name__}: {exc}); check that the engine runs there and the "
            f"address is right (`%llm remote list` shows each remote's state, `%llm remote rm {self.remote.name}` "
            "removes it)"))

    def _refused(self, response: httpx.Response, model: str | None) -> Exception:
        try:
            response.read()
            body = response.text
        except Exception:  # the body is only for the message
            body = ""
        detail = body.strip()[:300]
        try:
            parsed = json.loads(body)
            error = parsed.get("error") if isinstance(parsed, dict) else None
            detail = str(error.get("message") if isinstance(error, dict) else error or detail)[:300]
        except ValueError:
            pass
        status = response.status_code
        if status == 404 and model is not None:
            return ModelNotFoundError(self.scrub(
                f"{self.where} has no model {model!r} ({detail}); `%llm list` shows its models as "
                f"{self.remote.name}/MODEL"))
        hint = (f"; set the token in ${self.remote.token_env}" if self.remote.token_env else
                f"; add it again with --token-env VARIABLE (`%llm remote add {self.remote.name} URL --token-env V`)"
                ) if status in (401, 403) else ""
        return RemoteEngineError(self.scrub(f"{self.where} answered {status}: {detail}{hint}"), status)

    def get_json(self, path: str, *, read: float = POLL_S) -> Any:
        """GET ``path`` and its JSON (RemoteEngineError if unreachable or not 2xx)."""
        return json.loads(self.get_text(path, read=read))

    def get_text(self, path: str, *, read: float = POLL_S) -> str:
        import httpx

        try:
            with self._http(read) as http:
                response = http.get(path)
        except httpx.HTTPError as exc:
            raise self._failed(exc) from None
        if response.status_code >= 300:
            raise self._refused(response, None)
        return response.text

    @contextmanager
    def stream(self, path: str, body: dict[str, Any], live: Live, *,
               model: str | None = None) -> Iterator[Iterator[str]]:
        """POST ``body`` and give the answer's lines as they come; ``live.cancel()`` closes it."""
        import httpx

        try:
            with self._http(READ_S) as http, http.stream("POST", path, json=body) as response:
                if response.status_code >= 300:
                    raise self._refused(response, model)
                live.attach(response)
                yield self._lines(response, live)
        except httpx.HTTPError as exc:
            if live.cancelled:
                return
            raise self._failed(exc) from None

    def _lines(self, response: httpx.Response, live: Live) -> Iterator[str]:
        for line in response.iter_lines():
            if live.cancelled:
                return
            if line.strip():
                yield line


class Live:
    """One answer in flight: cancelling it (from any thread) closes its connection."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._response: Any = None
        self.cancelled = False

    def attach(self, response: Any) -> None:
        with self._lock:
            self._response = response
            close = self.cancelled
        if close:
            response.close()

    def cancel(self) -> None:
        # closing the connection is how an engine learns to stop (docs/notes.md §10)
        with self._lock:
            self.cancelled = True
            response = self._response
        if response is not None:
            try:
                response.close()  # the engine sees the connection go and stops generating
            except Exception:  # already closed by the reading thread
                pass


class RemoteStream(Answering):
    """Chunks of one remote answer as they come; ``.result`` is the Completion (as Stream)."""

    dropped: int | None = 0
    """Remote engines fit (or refuse) a conversation themselves: nothing is dropped here."""

    def __init__(self, pieces: Callable[[Live], Generator[Piece, None, None]], *, seed: int | None,
                 where: str) -> None:
        self._where = where
        self._live = Live()
        self._pieces = pieces(self._live)
        self._seed = seed if seed is not None else -1
        self._t0 = time.perf_counter()
        self._ttft: float | None = None
        self._parts: list[str] = []
        self._result: Completion | None = None
        self._error: BaseException | None = None
        self._early: list[Chunk] = []
        self._lock = threading.Lock()

    def __next__(self) -> Chunk:
        if self._early:
            return self._early.pop(0)
        try:
            return self._next()
        except KeyboardInterrupt:  # the stop button: the connection is closed, the engine stops
            self.cancel()
            self._end(Piece(done=True, finish_reason="cancelled"))
            raise

    def _next(self) -> Chunk:
        while True:
            if self._result is not None:
                raise StopIteration
            if self._error is not None:
                raise self._error
            try:
                with self._lock:
                    piece = next(self._pieces)
            except StopIteration:
                self._end(Piece(done=True, finish_reason="cancelled" if self._live.cancelled else "stop"))
                continue
            except (RemoteEngineError, ModelNotFoundError) as exc:
                self._error = exc
                continue
            except Exception as exc:  # a connection closed under the reader by cancel()
                if not self._live.cancelled:
                    self._error = RemoteEngineError(f"the answer of {self._where} broke off ({type(exc).__name__}: "
                                                    f"{exc}); ask again, or check the engine's log")
                    continue
                self._end(Piece(done=True, finish_reason="cancelled"))
                continue
            if piece.done:
                self._end(piece)
                self._close_pieces()  # the reader waits after its last piece: end it, closing the connection now
                continue
            if piece.text:
                if self._ttft is None:
                    self._ttft = time.perf_counter() - self._t0
                self._parts.append(piece.text)
                return Chunk(piece.text, 1)

    def _end(self, piece: Piece) -> None:
        if self._result is not None:
            return
        total = time.perf_counter() - self._t0
        n = piece.completion_tokens or len(self._parts)
        eval_s = piece.eval_s if piece.eval_s else max(total - (self._ttft or 0.0), 0.0)
        prompt_s = piece.prompt_s if piece.prompt_s else (self._ttft or 0.0)
        reason = "cancelled" if self._live.cancelled else piece.finish_reason
        self._result = Completion("".join(self._parts), reason, piece.prompt_tokens, n, self._ttft,
                                  n / eval_s if eval_s > 0 else 0.0,
                                  piece.prompt_tokens / prompt_s if prompt_s > 0 else 0.0, total, self._seed)

    def fitted(self) -> int:
        """Send the request and wait for the engine's first answer, raising its refusal now
        (an unknown model, a bad token) so the caller can still answer with an error."""
        try:
            chunk = self._next()
        except StopIteration:
            return 0
        self._early.append(chunk)
        return 0

    def cancel(self) -> None:
        """Stop the answer: its connection is closed (returns at once, from any thread)."""
        if not self.done:
            self._live.cancel()

    def __exit__(self, *exc: object) -> None:
        if not self.done:
            self.cancel()
            self._close_pieces()

    def _close_pieces(self) -> None:
        try:
            with self._lock:
                self._pieces.close()
        except Exception:  # closing a stream that broke is not an error of its own
            pass
