"""Creating a derived model through the manager: the one path of ``%llm create``, ``%%modelfile``,
``jupyter_llm.create`` and ``POST /api/create``.

The record itself is made by :func:`jupyter_llm.store.derive.derive`; here a model of that name
that is loaded is unloaded first (it would keep serving the old SYSTEM and adapters), and the
manager's views hear that the store changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .store.derive import CreateSpec, Status, derive, spec_from_modelfile

if TYPE_CHECKING:
    from .manager import ModelManager
    from .store.records import ModelRecord


def create(manager: ModelManager, name: str, spec: CreateSpec, *, status: Status | None = None) -> ModelRecord:
    """Make (or replace) the derived model ``name`` from ``spec``; returns its record."""
    if manager.is_loaded(name):
        manager.unload(name, reason="created again")
    record = derive(manager.store, name, spec, status=status)
    manager._emit("models")  # the manager's event: its views (sidebar, widgets) read the store again
    return record


def spec_of(modelfile: str | None = None, *, from_: str | None = None, system: str | None = None,
            template: str | None = None, parameters: dict[str, Any] | None = None,
            messages: list[dict[str, str]] | None = None, adapters: list[str | Path] | None = None,
            license: str | list[str] | None = None, base_dir: Path | None = None, local: bool = True) -> CreateSpec:
    """A :class:`CreateSpec` from a Modelfile's text and/or fields; a field given wins over the
    Modelfile's (as ``/api/create`` treats its body's fields). ``local=False`` (an API client)
    reads no path: ``from_`` and FROM are store names."""
    spec = spec_from_modelfile(modelfile, base_dir=base_dir, local=local) if modelfile else CreateSpec()
    if from_:
        path = Path(from_).expanduser() if local else None
        spec.from_, spec.files = ("", [path]) if path is not None and path.is_file() else (from_, [])
    if system is not None:
        spec.system = system
    if template is not None:
        spec.template = template
    if parameters:
        spec.parameters = {**spec.parameters, **parameters}
    if messages:
        spec.messages = list(messages)
    if adapters:
        spec.adapters = [Path(a).expanduser() for a in adapters]
    if license:
        spec.licenses = [license] if isinstance(license, str) else list(license)
    return spec
