"""HTTP for pulls: one client configuration, retries with backoff, fail-fast on unreachable hosts.

Used by :mod:`jupyter_llm.store.download` (model bytes) and the sources (manifests, listings):
every request a pull makes has the same timeouts (``JUPYTER_LLM_CONNECT_TIMEOUT``,
``JUPYTER_LLM_READ_TIMEOUT``), the same retry budget (``JUPYTER_LLM_RETRIES``, renewed by
progress) and the same errors from :mod:`jupyter_llm.errors`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from .. import config
from ..errors import HostUnreachableError, PullError, RemoteError

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


def make_client() -> httpx.Client:
    """An httpx client with our timeouts: short connect (fail fast), longer read, redirects on."""
    import httpx

    timeout = httpx.Timeout(config.read_timeout(), connect=config.connect_timeout())
    return httpx.Client(follow_redirects=True, timeout=timeout)


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

    def once() -> bytes:
        with active.stream("GET", url, headers=dict(headers or {})) as resp:
            raise_for_status(url, resp)
            body = bytearray()
            for piece in resp.iter_bytes():
                body += piece
                if len(body) > limit:
                    raise RemoteError(f"{short_url(url)} sent more than {limit} bytes", resp.status_code)
            return bytes(body)

    try:
        return retrying(url, once, progressed=lambda: False)
    finally:
        if own_client:
            active.close()


def retrying(url: str, once: Callable[[], T], *, progressed: Callable[[], bool]) -> T:
    """Run ``once`` until it returns, retrying transient failures with exponential backoff.

    A host that cannot be reached before any answer gets one quick retry (connection refused
    and DNS failures are rarely transient) and then raises :class:`HostUnreachableError`;
    only a host that answered before spends the retry budget on connect failures.
    """
    import httpx

    failures = 0
    reached = False
    quick_retry_used = False
    while True:
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
                time.sleep(_QUICK_RETRY_DELAY)
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
        time.sleep(delay)


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
