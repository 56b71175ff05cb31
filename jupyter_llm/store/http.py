"""HTTP for pulls: one client configuration, retries with backoff, fail-fast on unreachable hosts.

Used by :mod:`jupyter_llm.store.download` (model bytes) and the sources (manifests, listings):
every request a pull makes has the same timeouts (``JUPYTER_LLM_CONNECT_TIMEOUT``,
``JUPYTER_LLM_READ_TIMEOUT``), the same minimum rate (``JUPYTER_LLM_PULL_MIN_RATE``, see
:class:`RateGuard`), the same retry budget (``JUPYTER_LLM_RETRIES``, renewed by progress), the
pull's :class:`~jupyter_llm.store.deadline.Deadline`, and the same errors from
:mod:`jupyter_llm.errors`.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from .. import config
from ..errors import HostUnreachableError, PullError, RemoteError
from .deadline import Deadline, scope

if TYPE_CHECKING:
    import httpx

T = TypeVar("T")

_BACKOFF_BASE = 0.5
_BACKOFF_CAP = 8.0
_RETRY_AFTER_CAP = 30.0
_QUICK_RETRY_DELAY = 0.25  # one retry for a refused/unresolved host, then give up: it is not transient
_TRANSIENT_STATUS = frozenset({408, 429})


class Transient(Exception):
    """An attempt failed in a way a retry from the current offset may fix."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class RateGuard:
    """Fails an attempt whose body arrives slower than ``JUPYTER_LLM_PULL_MIN_RATE``.

    A read timeout only notices silence: a source sending a byte every few seconds keeps every
    read alive forever. So the bytes of each ``JUPYTER_LLM_READ_TIMEOUT`` window are counted and a
    window below the minimum rate raises :class:`Transient`, retried like a stall. A real link
    that merely dips recovers on the retry; a trickle spends the retry budget.
    """

    def __init__(self) -> None:
        self.min_rate = config.pull_min_rate()
        self.window = config.read_timeout()
        self._start = time.monotonic()
        self._bytes = 0

    def add(self, nbytes: int) -> None:
        if not self.min_rate:
            return
        self._bytes += nbytes
        now = time.monotonic()
        elapsed = now - self._start
        if elapsed < self.window:
            return
        if self._bytes < self.min_rate * elapsed:
            raise Transient(
                f"the transfer averaged {self._bytes / elapsed:.0f} B/s over {elapsed:.1f} s, below the "
                f"minimum of {self.min_rate:.0f} B/s (JUPYTER_LLM_PULL_MIN_RATE)"
            )
        self._start, self._bytes = now, 0


@contextlib.contextmanager
def abort_on_cancel(deadline: Deadline, resp: httpx.Response) -> Iterator[None]:
    """While streaming ``resp``, let :meth:`Deadline.cancel` wake a read blocked on its socket.

    Closing a socket from another thread does not wake a blocked ``recv`` on Linux; shutting it
    down does, and the read then fails at once. The shutdown goes through a duplicate of the
    descriptor, so a TLS socket's state is never touched from the cancelling thread.
    """
    stream = resp.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if sock is None:
        yield
        return

    def shut_down() -> None:
        with socket.fromfd(sock.fileno(), sock.family, sock.type) as dup:
            dup.shutdown(socket.SHUT_RDWR)

    with deadline.on_cancel(shut_down):
        yield


def make_client() -> httpx.Client:
    """An httpx client with our timeouts: short connect (fail fast), longer read, redirects on,
    and never sent from a public origin to a loopback or private address (:class:`LocalGuard`)."""
    import httpx

    timeout = httpx.Timeout(config.read_timeout(), connect=config.connect_timeout())
    return httpx.Client(follow_redirects=True, timeout=timeout, event_hooks={"request": [LocalGuard()]})


class LocalGuard:
    """Refuses requests to loopback, private and link-local addresses once the client's first
    request went to a public one.

    A registry on the internet has no business sending the kernel to ``127.0.0.1:8888`` or a
    ``10.x`` service (a redirect, or a host name that resolves there): that would let whoever
    controls a registry, or an API client naming one, probe this machine's network. A registry
    the user configured on such an address (a mirror, a test server) is the client's first
    request, and then everything after it is allowed.
    """

    def __init__(self, resolve: Callable[[str], list[str]] | None = None) -> None:
        self._resolve = resolve or _addresses
        self._origin_local: bool | None = None

    def __call__(self, request: httpx.Request) -> None:
        local = self._is_local(request.url.host)
        if self._origin_local is None:
            self._origin_local = local
        elif local and not self._origin_local:
            raise RemoteError(f"{short_url(str(request.url))} is on this machine or its private network, but the "
                              "pull started at a public registry: refused (a registry must not redirect there)")

    def _is_local(self, host: str) -> bool:
        import ipaddress

        for address in self._resolve(host):
            try:
                ip = ipaddress.ip_address(address.split("%", 1)[0])
            except ValueError:
                continue
            if ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified or ip.is_reserved:
                return True
        return False


def _addresses(host: str) -> list[str]:
    """The addresses ``host`` resolves to (itself for an IP literal); none if it does not resolve
    (the request then fails as unreachable, with its own message)."""
    import socket

    try:
        return [str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)]
    except (OSError, UnicodeError):
        return []


def get_bytes(
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    client: httpx.Client | None = None,
    limit: int = 16 << 20,
) -> bytes:
    """GET a small document (a manifest) with the same retry and fail-fast rules as :func:`fetch`.

    A 4xx answer raises :class:`RemoteError` whose ``status`` the caller can map (404 → "not
    found"); bodies larger than ``limit`` are refused.
    """
    own_client = client is None
    active = client if client is not None else make_client()

    def once(deadline: Deadline) -> bytes:
        with active.stream("GET", url, headers=dict(headers or {})) as resp, abort_on_cancel(deadline, resp):
            raise_for_status(url, resp)
            body = bytearray()
            rate = RateGuard()
            for piece in resp.iter_bytes():
                deadline.check(short_url(url))
                body += piece
                if len(body) > limit:
                    raise RemoteError(f"{short_url(url)} sent more than {limit} bytes", resp.status_code)
                rate.add(len(piece))
            return bytes(body)

    try:
        with scope() as deadline:
            return retrying(url, lambda: once(deadline), progressed=lambda: False, deadline=deadline)
    finally:
        if own_client:
            active.close()


def retrying(url: str, once: Callable[[], T], *, progressed: Callable[[], bool], deadline: Deadline) -> T:
    """Run ``once`` until it returns, retrying transient failures with exponential backoff.

    A host that cannot be reached before any answer gets one quick retry (connection refused
    and DNS failures are rarely transient) and then raises :class:`HostUnreachableError`;
    only a host that answered before spends the retry budget on connect failures. The
    ``deadline`` is checked before each attempt and cuts every backoff short.
    """
    import httpx

    failures = 0
    reached = False
    quick_retry_used = False
    where = short_url(url)
    while True:
        deadline.check(where)
        try:
            return once()
        except httpx.ConnectTimeout as exc:
            if not reached:
                raise _unreachable(url, "connection timed out", exc) from None
            reason: str = f"connect timed out ({exc})"
            retry_after: float | None = None
        except httpx.ConnectError as exc:
            if not reached:
                if quick_retry_used:
                    raise _unreachable(url, str(exc), exc) from None
                quick_retry_used = True
                deadline.sleep(_QUICK_RETRY_DELAY, where)
                continue
            reason, retry_after = f"connect failed ({exc})", None
        except Transient as exc:
            reason, retry_after = str(exc), exc.retry_after
        except (httpx.TransportError, httpx.DecodingError) as exc:
            # ReadTimeout, ReadError (reset), RemoteProtocolError (peer closed mid-body), ...
            reason, retry_after = f"{type(exc).__name__}: {exc}", None
        except httpx.TooManyRedirects as exc:
            raise RemoteError(f"{short_url(url)} redirects in a loop ({exc})") from None
        reached = True
        deadline.check(where)  # a cancel wakes a blocked read as a read error: do not retry it
        failures = 0 if progressed() else failures + 1
        limit = config.retries()
        if failures > limit:
            raise PullError(
                f"downloading {short_url(url)} failed {failures} times in a row (last: {reason}); "
                "run the pull again later — it resumes where it stopped"
            )
        if retry_after is None:
            delay = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** max(failures - 1, 0))
        else:  # the server said when (a 429/503 Retry-After), or 0 for "restart now"
            delay = min(retry_after, _RETRY_AFTER_CAP)
        deadline.sleep(delay, where)


def raise_for_status(url: str, resp: httpx.Response) -> None:
    status = resp.status_code
    if status < 400:
        return
    if status in _TRANSIENT_STATUS or status >= 500:
        raise Transient(f"HTTP {status}", _retry_after(resp.headers.get("Retry-After")))
    hint = {
        401: "the server wants credentials (for Hugging Face: set HF_TOKEN)",
        403: "access denied (a gated or private model needs a token with access: set HF_TOKEN)",
        404: "not found — check the model name and tag",
    }.get(status, "the server refused the request")
    raise RemoteError(f"{short_url(url)} answered HTTP {status}: {hint}", status)


def _unreachable(url: str, reason: str, exc: Exception) -> HostUnreachableError:
    host = urlsplit(url).netloc or url
    error = HostUnreachableError(
        f"cannot reach {host} ({reason}). Check the network connection and the configured endpoint "
        "(JUPYTER_LLM_HF_ENDPOINT / HF_ENDPOINT, JUPYTER_LLM_OLLAMA_REGISTRY); offline, use a model that "
        "is already pulled (`%llm list`)"
    )
    error.__cause__ = exc
    return error


def _retry_after(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        return max(float(raw), 0.0)
    except ValueError:
        return None  # an HTTP date: our own backoff is good enough


def content_range(raw: str | None) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` → (START, TOTAL); None for what is missing or ``*``."""
    if not raw or not raw.startswith("bytes "):
        return None, None
    span, _, total = raw[6:].partition("/")
    start = span.partition("-")[0]
    return (int(start) if start.isdigit() else None, int(total) if total.isdigit() else None)


def short_url(url: str) -> str:
    """A URL without its query string (signed CDN URLs carry long tokens)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.scheme else url
