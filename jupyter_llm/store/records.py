"""The model store: which names the user has, which files they point at, who owns what.

A record is one small JSON file per name under ``$JUPYTER_LLM_HOME/records/``, written
atomically, so two kernels never corrupt a shared index. The model files themselves stay where
their source put them (the huggingface_hub cache, our blob directory, a user's Ollama store or
a local path) — the store never copies weights.

``rm`` deletes a file only when the record owned it *and* no other record still uses it, so
``cp`` is free (a second name for the same blobs, as in Ollama) and a user's own files and
Ollama store are never touched.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import config
from ..errors import GGUFError, ModelNotFoundError, StoreError
from .names import check_name, record_file
from .sources import Pulled

if TYPE_CHECKING:
    from .gguf_info import GGUFInfo


@dataclass
class ModelRecord:
    """One name in the store and everything ``list``/``show``/``load`` need to know about it."""

    name: str
    source: str
    files: list[str]
    sha256: str | None = None
    size: int = 0
    owned: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    """Header facts cached at pull time: architecture, parameters, quantization, context, layers."""
    created: float = 0.0
    ollama: dict[str, Any] = field(default_factory=dict)
    """An Ollama model's manifest layers: ``template`` (Go template text), ``system`` (text),
    ``params`` (the JSON object: stop, temperature, num_ctx…) and ``license``; empty otherwise.
    A derived model (:mod:`jupyter_llm.store.derive`) adds ``messages`` (put before every chat),
    ``adapters`` (``{"path", "scale", "blob"}`` LoRA GGUFs), ``parent`` (its base's name) and
    ``modelfile`` (the Modelfile that makes it)."""

    def __post_init__(self) -> None:
        if not self.ollama and self.source in _OLLAMA_SOURCES:
            # Records written before this field kept the layers in ``details`` only.
            self.ollama = ollama_layers(self.details)

    @property
    def path(self) -> Path:
        """The file llama.cpp loads (the first part of a split model).

        Raises :class:`ModelNotFoundError` when the record's files are gone (another tool
        removed them), saying how to get them back, rather than a bare FileNotFoundError later.
        """
        missing = self.missing_files()
        if missing:
            raise ModelNotFoundError(f"model {self.name!r}: {self._gone(missing)}")
        return Path(self.files[0])

    def _gone(self, missing: list[str]) -> str:
        again = f"`%llm pull {self.name}` fetches them again, or `%llm rm {self.name}` forgets the name"
        if self.source == "hf":
            return f"its files were removed from the Hugging Face cache; {again}"
        if self.source == "ollama":
            return f"its files were removed from jupyter_llm's Ollama blobs; {again}"
        if self.source == "ollama-store":
            return "its blob was removed from the local Ollama store; `ollama pull` it again"
        if self.source in ("derived", "created"):
            return (f"the files of its base {self.ollama.get('parent') or missing[0]!r} are gone; pull the base "
                    f"again and create {self.name} again, or `%llm rm {self.name}`")
        return f"{missing[0]} no longer exists; {again}"

    @property
    def read_only(self) -> bool:
        return self.source == "ollama-store"

    def missing_files(self) -> list[str]:
        return [f for f in self.files if not os.path.exists(f)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_OLLAMA_SOURCES = ("ollama", "ollama-store")
_OLLAMA_LAYERS = ("template", "system", "params", "license")


def ollama_layers(details: dict[str, Any]) -> dict[str, Any]:
    """The manifest layers an Ollama source put in ``details`` (see :attr:`ModelRecord.ollama`)."""
    return {key: details[key] for key in _OLLAMA_LAYERS if details.get(key) not in (None, "", {})}


def summarize(files: list[Path]) -> dict[str, Any]:
    """Header facts for ``list`` (one fast header scan, about 30 ms on the default model)."""
    from .gguf import scan

    return _summary(scan(files[0]))


def _summary(info: GGUFInfo) -> dict[str, Any]:
    return {
        "architecture": info.architecture,
        "parameters": info.parameter_count,
        "quantization": info.file_type,
        "context_length": info.context_length,
        "layers": info.block_count,
        "model_name": info.model_name,
    }


class Store:
    """Records in ``root`` (default ``$JUPYTER_LLM_HOME/records``), plus a read-only Ollama store."""

    def __init__(self, root: Path | None = None) -> None:
        self._root = root

    @property
    def root(self) -> Path:
        return self._root or config.home() / "records"

    def _file(self, name: str) -> Path:
        return self.root / record_file(name)

    # -- reading -----------------------------------------------------------------------------

    def _own_records(self) -> Iterator[ModelRecord]:
        if not self.root.is_dir():
            return
        for path in sorted(self.root.glob("*.json")):
            try:
                yield ModelRecord(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue  # a half-written or foreign file must not break `list`

    def _ollama_store_records(self) -> Iterator[ModelRecord]:
        from .sources import ollama

        try:
            models = ollama.list_local_store()
        except OSError:
            return
        for model in models:
            pulled = model.pulled
            yield ModelRecord(
                name=model.name, source=pulled.source, files=[str(f) for f in pulled.files],
                sha256=pulled.sha256, size=_size(pulled.files), owned=[], details=pulled.details,
                summary=_cached_summary(pulled.files), created=_mtime(pulled.files[0]),
                ollama=ollama_layers(pulled.details),
            )

    def records(self) -> list[ModelRecord]:
        """Every usable name: our records first, then models found in a local Ollama store.

        A record whose files another tool removed (``hf cache rm``) is left out; ``get`` still
        finds it, so ``show``/``load`` say what happened and ``rm`` can forget it.
        """
        own = list(self._own_records())
        records = [r for r in own if not r.missing_files()]
        seen = {r.name for r in own}
        records += [r for r in self._ollama_store_records() if r.name not in seen]
        return records

    def names(self) -> list[str]:
        return [r.name for r in self.records()]

    def get(self, name: str) -> ModelRecord | None:
        """The record for ``name`` (exact, or with ``:latest`` added/removed), else None."""
        for candidate in _name_variants(name):
            if not _storable(candidate):
                continue  # no record can have this name (and looking it up would be an OSError)
            path = self._file(candidate)
            if path.exists():
                try:
                    return ModelRecord(**json.loads(path.read_text()))
                except (OSError, ValueError, TypeError) as exc:
                    raise StoreError(f"the record {path} is unreadable ({exc}); remove it and pull again") from exc
        variants = set(_name_variants(name))
        for record in self._ollama_store_records():
            if record.name in variants:
                return record
        return None

    def require(self, name: str) -> ModelRecord:
        """Like :meth:`get`, but raises ModelNotFoundError with the nearest names."""
        record = self.get(name)
        if record is None:
            import difflib

            close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
            hint = f" — did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ModelNotFoundError(
                f"model {name!r} is not in the store{hint} `%llm list` shows cached models; "
                f"`%llm pull {name}` fetches it", close,
            )
        return record

    # -- writing -----------------------------------------------------------------------------

    def put(self, name: str, pulled: Pulled) -> ModelRecord:
        """Record ``pulled`` under ``name`` (replacing an older record of that name).

        ``name`` obeys :func:`~jupyter_llm.store.names.check_name`; it may shadow an alias, as
        the pull of an alias (or a deliberate registration) does.
        """
        check_name(name, force=True)
        try:
            summary = summarize(pulled.files)
        except GGUFError:
            raise
        except OSError as exc:
            raise StoreError(f"cannot read {pulled.files[0]}: {exc}") from exc
        files = [str(f) for f in pulled.files]
        owned = [str(f) for f in pulled.owned]
        # A file the pull found already there is ours too when one of our records owns it (our
        # own earlier download, this name's included); one that another tool put there never is.
        ours = {p for other in self._own_records() for p in other.owned}
        owned += [p for p in _with_targets(files) if p in ours and p not in owned]
        record = ModelRecord(
            name=name, source=pulled.source, files=files, sha256=pulled.sha256, size=_size(pulled.files),
            owned=owned, details=dict(pulled.details), summary=summary, created=time.time(),
            ollama=ollama_layers(pulled.details) if pulled.source in _OLLAMA_SOURCES else {},
        )
        self._write(record)
        return record

    def _write(self, record: ModelRecord) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        target = self._file(record.name)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".record-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record.to_dict(), f, indent=1, default=str)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def copy(self, source: str, destination: str, *, overwrite: bool = False, force: bool = False) -> ModelRecord:
        """A second name for the same files (no bytes copied, like ``ollama cp``).

        ``destination`` must pass :func:`~jupyter_llm.store.names.check_name`; ``force`` lets it
        shadow an alias or a reference on purpose, ``overwrite`` lets it replace a record.
        """
        check_name(destination, force=force)
        record = self.require(source)
        if not overwrite and self._file(destination).exists():
            raise StoreError(f"{destination!r} already exists; `%llm rm {destination}` first, or pick another name")
        copy = ModelRecord(**{**record.to_dict(), "name": destination, "created": time.time()})
        self._write(copy)
        return copy

    def remove(self, name: str) -> list[str]:
        """Forget ``name``; delete the files it owned that no other record still uses.

        Returns the paths deleted from disk.
        """
        record = self.require(name)
        if record.read_only:
            raise StoreError(
                f"{record.name!r} lives in a local Ollama store, which jupyter_llm treats as read-only; "
                f"remove it with `ollama rm` instead"
            )
        self._file(record.name).unlink(missing_ok=True)
        # What another name still uses, through its snapshot links too.
        in_use = {f for other in self._own_records() for f in (*other.owned, *_with_targets(other.files))}
        deleted: list[str] = []
        for path in record.owned:
            if path in in_use or not os.path.exists(path):
                continue
            try:
                os.unlink(path)
                deleted.append(path)
            except OSError as exc:
                raise StoreError(f"could not delete {path}: {exc}") from exc
        # Snapshot links (huggingface_hub's layout) whose blob is gone would dangle: drop them.
        for path in record.files:
            if path not in in_use and os.path.islink(path) and not os.path.exists(path):
                os.unlink(path)
                deleted.append(path)
        return deleted


def _with_targets(files: list[str]) -> list[str]:
    """``files`` and, for links (the Hugging Face cache's snapshots), the blobs they point at."""
    return list(dict.fromkeys([*files, *(os.path.realpath(f) for f in files if os.path.islink(f))]))


def _cached_summary(files: list[Path]) -> dict[str, Any]:
    """:func:`summarize` through the header cache (``list`` asks for every local Ollama model
    each time); a broken blob has no summary rather than breaking ``list``."""
    from .gguf import scan_cached

    try:
        info = scan_cached(files[0])
    except (GGUFError, OSError):
        return {}
    return _summary(info)


def _storable(name: str) -> bool:
    try:
        check_name(name, force=True)
    except StoreError:
        return False
    return True


def _name_variants(name: str) -> list[str]:
    if name.endswith(":latest"):
        return [name, name[: -len(":latest")]]
    return [name, name + ":latest"] if ":" not in name.rsplit("/", 1)[-1] else [name]


def _size(files: list[Path] | list[str]) -> int:
    return sum(os.path.getsize(f) for f in files if os.path.exists(f))


def _mtime(path: Path | str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0
