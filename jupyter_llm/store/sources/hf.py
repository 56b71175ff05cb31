"""Hugging Face GGUF repositories, pulled into the standard huggingface_hub cache.

A pull lists the repository (one ``model_info`` request with file sizes and LFS sha256s),
picks the file(s) for the quant tag (:func:`choose_files`), and for each file:

1. asks the Hub for its metadata (commit, etag = LFS sha256, size, CDN location);
2. downloads it with our :func:`~jupyter_llm.download.fetch` straight into the cache's blob
   path ``models--NS--NAME/blobs/<etag>`` — resumable and sha256-verified, which
   huggingface_hub's own downloader is not (docs/notes.md §5) — or hard-links the same bytes
   already on disk from an Ollama pull (:mod:`~jupyter_llm.store.blobs`);
3. calls ``hf_hub_download``, which finds the blob and only writes ``refs/`` and the
   ``snapshots/<commit>/<file>`` symlink.

So huggingface_hub, llama-cpp-python and transformers all see the file, with no second copy.
The endpoint is always passed explicitly (``config.hf_endpoint()``): huggingface_hub reads
``HF_ENDPOINT`` only at import time.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from ... import config
from ...errors import (
    AmbiguousModelError,
    HostUnreachableError,
    JupyterLLMError,
    ModelNotFoundError,
    PullError,
    RemoteError,
)
from ...progress import ProgressFanout, PullProgress
from ..blobs import link_identical
from ..deadline import Deadline, current
from ..download import fetch
from ..names import HF_PREFIX
from . import Located, Pulled

if TYPE_CHECKING:
    from ..names import HFRef

T = TypeVar("T")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SAFE_ETAG = re.compile(r"^[0-9A-Za-z_-][0-9A-Za-z._-]{0,127}$")  # it becomes a file name in the cache
_SPLIT = re.compile(r"^(?P<base>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_QUANT_TOKEN = re.compile(
    r"(?:^|[-./])(?P<quant>(?:I?Q|TQ)\d+(?:_[A-Z0-9]+)*|MXFP4(?:_MOE)?|BF16|F16|F32|FP16|FP32)(?=[-./])",
    re.IGNORECASE,
)
_Q4_PREFERENCE = ("Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1", "IQ4_XS", "IQ4_NL")
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class HFFile:
    """One GGUF file of a repository listing."""

    path: str
    size: int | None
    sha256: str | None
    """The LFS sha256 (None for a file not stored in LFS)."""


# -- listing and choosing ------------------------------------------------------------------------


def list_gguf_files(repo: str, revision: str = "main") -> list[HFFile]:
    """The ``.gguf`` files of ``repo`` at ``revision``, with sizes and LFS sha256s.

    Raises :class:`ModelNotFoundError` (unknown repo or revision), :class:`HostUnreachableError`
    (within seconds) or :class:`RemoteError`.
    """
    from huggingface_hub import HfApi

    endpoint = config.hf_endpoint()
    api = HfApi(endpoint=endpoint, token=config.hf_token())
    info = _hub_call(
        lambda: api.model_info(repo, revision=revision, files_metadata=True, timeout=_hub_timeout()),
        repo=repo, revision=revision, endpoint=endpoint,
    )
    return [
        HFFile(s.rfilename, s.size if s.lfs is None else s.lfs.size, s.lfs.sha256 if s.lfs else None)
        for s in info.siblings or []
        if s.rfilename.lower().endswith(".gguf")
    ]


@dataclass(frozen=True)
class _Candidate:
    """One loadable model: a single file, or all parts of a split GGUF."""

    name: str
    parts: tuple[str, ...]
    size: int | None
    missing: tuple[int, ...] = ()

    @property
    def quant(self) -> str | None:
        found = list(_QUANT_TOKEN.finditer(self.name))
        return found[-1].group("quant").upper() if found else None

    @property
    def projector(self) -> bool:
        # Vision projectors sit beside the model in the same repos; never a default choice.
        return "mmproj" in os.path.basename(self.name).lower()


def choose_files(
    filenames: Iterable[str],
    quant: str | None = None,
    *,
    sizes: Mapping[str, int | None] | None = None,
    repo: str | None = None,
) -> list[str]:
    """The file(s) to download for ``quant``: one file, or every part of a split GGUF in order.

    No ``quant``: Q4_K_M if present, else another Q4, else Q8_0, else the smallest file. A
    ``quant`` is a case-insensitive quant token of the file name (``-Q4_K_M.gguf``,
    ``.Q4_K_M.gguf``, ``-q4_k_m.gguf``) or a full file name. Raises
    :class:`AmbiguousModelError` when several models match and :class:`ModelNotFoundError`
    (listing the available quants) when none does.
    """
    sizes = sizes or {}
    candidates = _candidates(filenames, sizes)
    where = f" in {repo}" if repo else ""
    if not candidates:
        raise ModelNotFoundError(
            f"no .gguf files{where}; jupyter_llm runs GGUF models — look for a GGUF conversion of this "
            "model (often a repository whose name ends in '-GGUF')"
        )
    picked = _by_tag(candidates, quant) if quant else _default(candidates)
    if not picked:
        available = sorted({c.quant for c in candidates if c.quant and not c.projector})
        example = f"`%llm pull {HF_PREFIX}{repo}:{available[0]}`" if repo and available else "a listed quant"
        raise ModelNotFoundError(
            f"no GGUF file{where} matches {quant!r}; available quants: {', '.join(available) or 'none'} "
            f"(files: {', '.join(c.name for c in candidates)}); use {example} or a full file name",
            [f"{HF_PREFIX}{repo}:{q}" for q in available] if repo else available,
        )
    if len(picked) > 1:
        names = [c.name for c in picked]
        first = os.path.basename(names[0])
        example = f"`%llm pull {HF_PREFIX}{repo}:{first}`" if repo else "the full file name"
        what = f"{quant!r} matches" if quant else f"the default quant ({picked[0].quant}) exists for"
        raise AmbiguousModelError(
            f"{what} several models{where}: {', '.join(names)}; "
            f"name the file instead, e.g. {example}",
            names,
        )
    chosen = picked[0]
    if chosen.missing:
        raise ModelNotFoundError(
            f"the split model {chosen.name}{where} lacks part(s) {', '.join(map(str, chosen.missing))}; "
            "the repository is incomplete — pick another quant"
        )
    return list(chosen.parts)


def _candidates(filenames: Iterable[str], sizes: Mapping[str, int | None]) -> list[_Candidate]:
    singles: list[str] = []
    splits: dict[str, dict[int, str]] = {}
    counts: dict[str, int] = {}
    for fn in filenames:
        if not fn.lower().endswith(".gguf"):
            continue
        m = _SPLIT.match(fn)
        if m is None:
            singles.append(fn)
            continue
        splits.setdefault(m["base"], {})[int(m["index"])] = fn
        counts[m["base"]] = max(counts.get(m["base"], 0), int(m["count"]))
    out = [_Candidate(fn, (fn,), sizes.get(fn)) for fn in sorted(singles)]
    for base in sorted(splits):
        parts = splits[base]
        ordered = tuple(parts[i] for i in sorted(parts))
        part_sizes = [sizes.get(p) for p in ordered]
        total = None if any(s is None for s in part_sizes) else sum(s or 0 for s in part_sizes)
        missing = tuple(i for i in range(1, counts[base] + 1) if i not in parts)
        out.append(_Candidate(base + ".gguf", ordered, total, missing))
    return out


def _by_tag(candidates: list[_Candidate], tag: str) -> list[_Candidate]:
    wanted = tag.lower()
    exact = [
        c for c in candidates
        if any(wanted in (p.lower(), os.path.basename(p).lower()) for p in (c.name, *c.parts))
    ]
    if exact:
        return exact
    token = re.compile(rf"(?:^|[-./]){re.escape(wanted)}(?=[-./])", re.IGNORECASE)
    return [c for c in candidates if not c.projector and token.search(c.name)]


def _default(candidates: list[_Candidate]) -> list[_Candidate]:
    models = [c for c in candidates if not c.projector] or candidates
    for quant in _Q4_PREFERENCE:
        found = [c for c in models if c.quant == quant]
        if found:
            return found
    other_q4 = [c for c in models if c.quant and "Q4" in c.quant]
    if other_q4:
        return [_smallest(other_q4)]
    q8 = [c for c in models if c.quant == "Q8_0"]
    if q8:
        return q8
    return [_smallest(models)]


def _smallest(candidates: list[_Candidate]) -> _Candidate:
    return min(candidates, key=lambda c: (c.size is None, c.size or 0, c.name))


# -- pulling --------------------------------------------------------------------------------------


def pull(ref: HFRef, *, name: str, progress: ProgressFanout) -> Pulled:
    """Download the GGUF file(s) ``ref`` names into the huggingface_hub cache; see the module doc.

    Files already in the cache (blob present, right size) are not downloaded again. The caller
    emits the final "success" event.
    """
    from ..http import make_client

    repo, revision = ref.repo, ref.revision or "main"
    progress(PullProgress(name, "pulling manifest", message=f"{repo}@{revision}"))
    listing = {f.path: f for f in list_gguf_files(repo, revision)}
    chosen = choose_files(listing, ref.filename or ref.quant, sizes={p: f.size for p, f in listing.items()},
                          repo=repo)
    client = make_client()  # one connection pool for every part of a split model
    try:
        pulled = [_pull_file(repo, revision, filename, listing.get(filename), name, progress, client)
                  for filename in chosen]
    finally:
        client.close()
    first = chosen[0]
    # Only what this pull downloaded is ours to delete: a blob another tool (or another Hugging
    # Face library) already had in the cache stays theirs, and so does its snapshot link. The
    # store adds back files one of our own records owns. A snapshot link goes with its blob: a
    # dangling link would confuse huggingface_hub.
    downloaded = [f for f in pulled if not f.found]
    return Pulled(
        source="hf",
        files=[f.snapshot for f in pulled],
        sha256=pulled[0].sha256,
        owned=[*(f.blob for f in downloaded), *(f.snapshot for f in downloaded)],
        details={
            "repo": repo,
            "revision": revision,
            "commit": pulled[-1].commit,
            "filename": first,
            "filenames": list(chosen),
            "quant": _Candidate(first, (first,), None).quant,
            "endpoint": config.hf_endpoint(),
            "sha256": [f.sha256 for f in pulled],
        },
    )


@dataclass(frozen=True)
class _Located(Located):
    """What the pull needs beside: the verified sha256 and the commit the file is at."""

    sha256: str | None = None
    commit: str = ""


def locate(ref: HFRef) -> list[Located]:
    """Where the file(s) a pull of ``ref`` would download are, found exactly as the pull finds
    them (the listing, the quant choice, the Hub's metadata and redirect, the token only for
    the Hub's own origin), without downloading anything.

    Raises what a pull raises before its first byte: :class:`ModelNotFoundError`,
    :class:`AmbiguousModelError`, :class:`HostUnreachableError` (within seconds), :class:`RemoteError`.
    """
    repo, revision = ref.repo, ref.revision or "main"
    listing = {f.path: f for f in list_gguf_files(repo, revision)}
    chosen = choose_files(listing, ref.filename or ref.quant, sizes={p: f.size for p, f in listing.items()},
                          repo=repo)
    return [_locate(repo, revision, filename, listing.get(filename)) for filename in chosen]


def _locate(repo: str, revision: str, filename: str, listed: HFFile | None) -> _Located:
    """One file's metadata from the Hub: where its bytes are (the CDN), their etag and sha256, size."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    endpoint = config.hf_endpoint()
    token = config.hf_token()
    url = hf_hub_url(repo, filename, revision=revision, endpoint=endpoint)
    meta = _hub_call(
        functools.partial(get_hf_file_metadata, url, token=token, timeout=_hub_timeout(), endpoint=endpoint),
        repo=repo, revision=revision, endpoint=endpoint, filename=filename,
    )
    if not meta.etag or not meta.commit_hash or not _SAFE_ETAG.match(meta.etag):
        raise RemoteError(
            f"{endpoint} did not send usable metadata for {repo}/{filename} (commit {meta.commit_hash!r}, "
            f"etag {meta.etag!r}); check that JUPYTER_LLM_HF_ENDPOINT / HF_ENDPOINT points at a Hugging Face Hub"
        )
    sha256 = meta.etag if _SHA256.match(meta.etag) else (listed.sha256 if listed else None)
    headers = build_hf_headers(token=token)
    if _origin(meta.location) != _origin(endpoint):
        headers.pop("authorization", None)  # a signed CDN URL must not receive the token
    # The size bounds the download (a chunked body has none of its own): the Hub's, else the listing's.
    size = meta.size if meta.size is not None else (listed.size if listed else None)
    return _Located(meta.location, size, meta.etag, f"{repo}/{filename}", headers, sha256, meta.commit_hash)


@dataclass(frozen=True)
class _PulledFile:
    snapshot: Path
    blob: Path
    sha256: str | None
    commit: str
    found: bool
    """The blob was already in the cache before this pull (not downloaded, not linked by us)."""


def _pull_file(
    repo: str, revision: str, filename: str, listed: HFFile | None, name: str, progress: ProgressFanout,
    client: Any,
) -> _PulledFile:
    """One file: metadata, our verified download into the blob (or a hard link to identical
    bytes we already have from Ollama), then huggingface_hub's links."""
    from huggingface_hub import hf_hub_download

    endpoint = config.hf_endpoint()
    token = config.hf_token()
    where = {"repo": repo, "revision": revision, "endpoint": endpoint, "filename": filename}
    located = _locate(repo, revision, filename, listed)
    sha256, size = located.sha256, located.size
    blob = config.hf_cache().expanduser().resolve() / ("models--" + repo.replace("/", "--")) / "blobs" / located.key
    found = blob.is_file()
    if not found and sha256 is not None:
        link_identical(blob, sha256, size)
    fetch(located.url, blob, sha256=sha256, size=size, headers=located.headers,
          on_bytes=progress.bytes_callback(name, filename, sha256), client=client)
    progress(PullProgress(name, "verifying sha256 digest", filename, sha256, size, size or 0))
    # The blob is in place, so this only writes refs/<revision> and the snapshot symlink.
    snapshot = _hub_call(
        functools.partial(hf_hub_download, repo, filename, revision=revision, cache_dir=blob.parents[2],
                          endpoint=endpoint, token=token, etag_timeout=_hub_timeout()),
        **where,
    )
    return _PulledFile(Path(str(snapshot)), blob, sha256, located.commit, found)



# -- talking to the Hub -----------------------------------------------------------------------------


def _hub_http() -> Any:
    """The httpx flavour huggingface_hub uses (``httpx2`` in 2.x, ``httpx`` in 1.x)."""
    from huggingface_hub import get_session

    return importlib.import_module(type(get_session()).__module__.partition(".")[0])


def _hub_timeout() -> Any:
    """A short connect timeout (unreachable hosts fail fast) and our read timeout."""
    return _hub_http().Timeout(config.read_timeout(), connect=config.connect_timeout())


def _hub_call(
    call: Callable[[], T], *, repo: str, revision: str, endpoint: str, filename: str | None = None
) -> T:
    """Run a huggingface_hub call, retrying 429/5xx briefly and translating its errors to ours.

    The pull's deadline is checked before each try and cuts the backoff short; a call itself is
    bounded by huggingface_hub's timeouts (ours, per read), as its connections are not ours to wake.
    """
    deadline = current() or Deadline()
    where = f"{repo}@{revision}" + (f"/{filename}" if filename else "")
    failures = 0
    while True:
        deadline.check(where)
        try:
            return call()
        except JupyterLLMError:
            raise
        except Exception as exc:
            status = _status(exc)
            if status in _TRANSIENT_STATUS and failures < config.retries():
                failures += 1
                deadline.sleep(min(0.5 * 2 ** (failures - 1), 4.0), where)
                continue
            translated = _translate(exc, repo=repo, revision=revision, endpoint=endpoint, filename=filename)
            if translated is None:
                raise
            raise translated from exc


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _translate(
    exc: Exception, *, repo: str, revision: str, endpoint: str, filename: str | None
) -> JupyterLLMError | None:
    from huggingface_hub import errors as hf_errors

    http = _hub_http()
    host = urlsplit(endpoint).netloc or endpoint
    status = _status(exc)
    if isinstance(exc, hf_errors.GatedRepoError):
        return RemoteError(
            f"{repo} is gated: accept its conditions at {endpoint}/{repo} while logged in, then set HF_TOKEN "
            "to a token of that account (or run `hf auth login`) and pull again",
            status,
        )
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return ModelNotFoundError(
            f"repository {repo} not found at {host}; check the spelling (`{HF_PREFIX}USER/REPO`), and for "
            "a private repository set HF_TOKEN"
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return ModelNotFoundError(
            f"revision {revision!r} not found in {repo}; leave it out to use the main branch"
        )
    if isinstance(exc, hf_errors.RemoteEntryNotFoundError):
        return ModelNotFoundError(
            f"{filename} not found in {repo} at {revision}; `%llm pull {HF_PREFIX}{repo}` picks a file"
        )
    if isinstance(exc, hf_errors.LocalEntryNotFoundError):
        # hf_hub_download lost the Hub between our download and its metadata request.
        return HostUnreachableError(f"lost the connection to {host} while linking {filename}; pull again")
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return HostUnreachableError(
            f"HF_HUB_OFFLINE is set, so huggingface_hub refuses to contact {host}; unset it to pull {repo}"
        )
    if isinstance(exc, (http.ConnectError, http.ConnectTimeout)):
        return HostUnreachableError(
            f"cannot reach {host} ({exc}). Check the network connection and JUPYTER_LLM_HF_ENDPOINT / "
            "HF_ENDPOINT; offline, use a model that is already pulled (`%llm list`)"
        )
    if isinstance(exc, hf_errors.HfHubHTTPError):
        return RemoteError(f"{host} answered HTTP {status} for {repo}: {exc}", status)
    if isinstance(exc, http.TimeoutException):
        return PullError(f"{host} did not answer in time ({type(exc).__name__}); pull again later")
    if isinstance(exc, http.TransportError):
        return PullError(f"the connection to {host} failed ({exc}); pull again")
    return None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port
