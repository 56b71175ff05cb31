"""Blobs a client uploads (``/api/blobs/sha256:…``, as ``ollama create`` does before it creates).

They go where our Ollama source keeps its blobs (``$JUPYTER_LLM_HOME/ollama/blobs/sha256-<hex>``),
so the same bytes pulled from Ollama's registry, uploaded, or already in the Hugging Face cache are
stored once (:mod:`jupyter_llm.store.blobs`). An upload is written to a per-upload temporary file,
hashed as it arrives, refused when the digest or the size bound is wrong, and only then renamed
into place, so a blob under its name always holds exactly those bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .. import config
from ..errors import IntegrityError, StoreError

DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")

DISK_MARGIN = 512 * 1024 * 1024
"""Bytes left free on the disk after an upload; one that would leave less is refused first."""


def blob_dir() -> Path:
    return config.home() / "ollama" / "blobs"


def hex_of(digest: str) -> str:
    """``sha256:<hex>`` (or ``sha256-<hex>``) → ``<hex>``; ValueError saying the form otherwise."""
    match = DIGEST.match(digest.strip())
    if match is None:
        raise ValueError(f"digest {digest!r} is not sha256:<64 lower-case hex digits>")
    return match.group(1)


def blob_path(digest: str) -> Path:
    """Where the blob of ``digest`` lives (whether or not it is there yet)."""
    return blob_dir() / f"sha256-{hex_of(digest)}"


def find(digest: str) -> Path | None:
    """The blob of ``digest`` if we have it; identical bytes elsewhere (another source's blob,
    verified by hashing) are hard-linked in first, as a pull would."""
    from .blobs import link_identical

    path = blob_path(digest)
    if path.is_file():
        return path
    if link_identical(path, hex_of(digest), None):
        return path
    return None


def receive(digest: str, chunks: Iterable[bytes], *, max_bytes: int, declared: int | None = None) -> Path:
    """Write ``chunks`` as the blob of ``digest``; returns its path (see :class:`Upload`)."""
    upload = Upload(digest, max_bytes=max_bytes, declared=declared)
    try:
        for chunk in chunks:
            upload.write(chunk)
        return upload.finish()
    finally:
        upload.abort()


class Upload:
    """One blob being received: :meth:`write` the chunks as they come, then :meth:`finish`.

    IntegrityError when the bytes hash to another digest (nothing is kept), StoreError when the
    upload is larger than ``max_bytes`` or would fill the disk (``declared``: the announced size,
    refused before any byte is written). :meth:`abort` (always safe) removes the partial file.
    """

    def __init__(self, digest: str, *, max_bytes: int, declared: int | None = None) -> None:
        self.sha = hex_of(digest)
        self.target = blob_path(digest)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.room = _room(self.target.parent, declared or 0, max_bytes)
        fd, tmp = tempfile.mkstemp(dir=self.target.parent, prefix=f".upload-{self.sha[:12]}-", suffix=".partial")
        self.tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        self._hasher = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.room:
            _room(self.target.parent, self.size, self.max_bytes)  # says which bound it crossed
            raise StoreError(f"the upload is larger than {self.room:,} bytes, the limit for a blob here")
        self._hasher.update(chunk)
        self._file.write(chunk)

    def finish(self) -> Path:
        self._file.close()
        got = self._hasher.hexdigest()
        if got != self.sha:
            raise IntegrityError(f"the uploaded bytes ({self.size:,}) have sha256 {got}, not {self.sha}; "
                                 "upload the file again (it changed or was cut in transit)")
        os.replace(self.tmp, self.target)  # atomic: a concurrent upload of the same bytes sees all or nothing
        return self.target

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.tmp.unlink(missing_ok=True)


def _room(directory: Path, size: int, max_bytes: int) -> int:
    """The most bytes an upload may have here (the bound, and the disk's free space less a
    margin); StoreError, saying which, when ``size`` is beyond it."""
    if size > max_bytes:
        raise StoreError(f"the upload has {size:,} bytes or more, more than the {max_bytes:,} allowed for a blob")
    free = shutil.disk_usage(directory).free
    if size + DISK_MARGIN > free:
        raise StoreError(f"the upload needs {size:,} bytes but only {free:,} are free under {directory}; "
                         "free some space (`%llm rm` unused models) and upload again")
    return min(max_bytes, free - DISK_MARGIN)
