"""``%llm create NAME -f Modelfile`` and the ``%%modelfile NAME`` cell: a derived model from a
Modelfile, through :func:`jupyter_llm.derived.create` (the path ``/api/create`` takes too).

A Modelfile's errors are shown as the user's mistake (a UsageError naming the line), not as a
traceback into jupyter_llm.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from IPython.core.error import UsageError

from ..errors import ModelfileError


def create_from_file(manager: Any, name: str, path: str | None) -> Any:
    """``%llm create NAME [-f PATH]`` (default ``./Modelfile``, as ``ollama create`` reads)."""
    file = Path(path or "Modelfile").expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read the Modelfile {file}: {exc.strerror or exc}; give its path with -f") from None
    return _create(manager, name, text, base_dir=file.resolve().parent)


def modelfile_cell(manager: Any, line: str, cell: str) -> Any:
    """``%%modelfile NAME``: the cell is the Modelfile; paths in it are relative to the working directory."""
    from IPython.utils.process import arg_split

    argv = arg_split(line, posix=True)
    if len(argv) != 1:
        raise UsageError("%%modelfile NAME — then the Modelfile in the cell (FROM smollm2, SYSTEM …)")
    return _create(manager, argv[0], cell, base_dir=Path.cwd())


def _create(manager: Any, name: str, text: str, *, base_dir: Path) -> Any:
    from ..derived import create, spec_of
    from .display import Message

    try:
        record = create(manager, name, spec_of(text, base_dir=base_dir))
    except ModelfileError as exc:
        raise UsageError(str(exc)) from None
    layers = record.ollama
    made = [key for key in ("system", "template", "params", "messages", "adapters", "license") if layers.get(key)]
    parent = layers.get("parent") or Path(record.files[0]).name
    what = ", ".join(made) if made else "nothing changed"
    return Message(f"created {record.name} from {parent} ({what}; same files, no bytes copied)", data=record)
