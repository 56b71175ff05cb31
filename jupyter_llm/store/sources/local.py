"""A GGUF file on disk, used in place (``%llm pull ./model.gguf``).

The file is validated with the header scan (so a wrong or damaged file fails now, with a
reason, rather than later in the worker) and registered where it is: nothing is copied, and
the record owns nothing, so ``%llm rm`` never deletes a user's own file. The sha256 is not
computed here: hashing a 40 GB file just to register it would take minutes; whoever needs
the digest computes it lazily. A split model given by its first part brings all its parts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from ...errors import GGUFError, ModelNotFoundError
from ...progress import PullProgress
from ..gguf import scan, split_parts
from ..names import PathRef
from . import Pulled

_PART = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


def pull(ref: PathRef, *, name: str, progress: Callable[[PullProgress], None]) -> Pulled:
    """Validate the GGUF at ``ref.path`` (and its split siblings) and register it in place."""
    path = Path(ref.path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"no such file: {path}; give the path of a .gguf file")
    path = path.resolve()
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.gguf"))
        listing = f"; it contains {', '.join(found)}" if found else " and contains no .gguf file"
        raise GGUFError(f"{path} is a directory{listing}; give the path of one .gguf file")
    m = _PART.match(path.name)
    if m and int(m.group("no")) != 1:
        first = path.with_name(f"{m.group('stem')}-00001-of-{m.group('count')}.gguf")
        raise GGUFError(f"{path.name} is part {int(m.group('no'))} of a split model; give its first part, "
                        f"{first}")
    parts = split_parts(path)
    infos = [scan(p, name=name) for p in parts]
    split = infos[0].split
    if split is not None and split.count != len(parts):
        raise GGUFError(
            f"{path.name} says it is part {split.no + 1} of {split.count}, but its name does not follow "
            f"the split naming (NAME-00001-of-{split.count:05d}.gguf) that llama.cpp uses to find the "
            f"other parts; rename the parts or merge them with llama.cpp's gguf-split"
        )
    info = infos[0]
    return Pulled("local", files=parts, sha256=None, owned=[], details={
        "path": str(path),
        "architecture": info.architecture,
        "file_type": info.file_type,
        "parts": len(parts),
    })
