"""One copy of identical model files, whichever source they came from.

The same GGUF is often published both as a Hugging Face LFS file and as an Ollama layer, and
both name it by its sha256: the huggingface_hub cache as ``models--NS--NAME/blobs/<sha256>``,
Ollama (ours under ``$JUPYTER_LLM_HOME/ollama``, and the user's local store) as
``blobs/sha256-<sha256>`` (docs/notes.md §5, §6). Before a source downloads a blob it asks
:func:`link_identical` for a hard link to bytes already on disk, so a model pulled from both is
stored once while each source keeps its own layout and each name its own link: removing one
name leaves the other's file intact.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .. import config


def identical_blobs(sha256: str) -> list[Path]:
    """Files on disk that should hold these bytes: our Ollama blobs, the local Ollama store's,
    then any repository's blob in the huggingface_hub cache."""
    ollama_name = f"sha256-{sha256}"
    found = [root / "blobs" / ollama_name for root in (config.home() / "ollama", config.ollama_store())]
    try:
        found += sorted(config.hf_cache().expanduser().resolve().glob(f"models--*/blobs/{sha256}"))
    except OSError:
        pass  # an unreadable cache has nothing to share
    return [path for path in found if path.is_file()]


def link_identical(dest: Path, sha256: str, size: int | None) -> bool:
    """Hard-link ``dest`` (not yet on disk) to a file already holding exactly these bytes;
    True if it did.

    A candidate is hashed before it is trusted (huggingface_hub checks only sizes), so a
    corrupt file elsewhere is never linked in. Links fail across file systems and, with
    ``fs.protected_hardlinks``, to another user's files: then the caller downloads as usual.
    """
    for source in identical_blobs(sha256):
        try:
            if size is not None and source.stat().st_size != size:
                continue
            if _file_sha256(source) != sha256:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.link")
            tmp.unlink(missing_ok=True)
            try:
                os.link(source, tmp)
                os.replace(tmp, dest)  # atomic: a concurrent pull sees no blob or the whole one
            finally:
                tmp.unlink(missing_ok=True)
            return True
        except OSError:
            continue
    return False


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
