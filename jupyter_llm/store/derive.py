"""Derived models: a new name over a base model's files, with its own SYSTEM, TEMPLATE,
PARAMETER, MESSAGE, ADAPTER and LICENSE (a Modelfile, ``/api/create``, ``jupyter_llm.create``).

A derived model is a record, not a copy: its ``files`` are the base's, and it owns what the base
owned (as ``cp`` does), so removing the base keeps the files while the derived model uses them,
and removing the last name that uses them deletes them (:meth:`Store.remove`). Its Ollama layers
(:attr:`ModelRecord.ollama`) start as the base's and the given ones replace them; ``params`` are
merged (given names win), adapters are added after the base's. Every front end reads those layers
(``chat.start``, the load's options), so a derived model behaves the same in ``%%chat``,
``Model.chat`` and the HTTP API.

A GGUF given as a file (an uploaded blob, a path) is a base of its own: the record owns an
uploaded blob, never a user's file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GGUFError, ModelfileError, StoreError
from . import modelfile as mf
from .names import check_name
from .records import ModelRecord, Store, summarize

Status = Callable[[str], None]


@dataclass
class CreateSpec:
    """What a derived model is made from; None/empty: the base's own."""

    from_: str = ""
    """The base: a store name (or a GGUF path when ``files`` is empty)."""
    files: list[Path] = field(default_factory=list)
    """GGUF file(s) to use instead of a named base (an uploaded blob, a path)."""
    owned: list[Path] = field(default_factory=list)
    """Which of ``files`` / ``adapters`` the new record owns (uploaded blobs, never a user's file)."""
    adapters: list[Path] = field(default_factory=list)
    system: str | None = None
    template: str | None = None
    licenses: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list)


def spec_from_modelfile(text: str, *, base_dir: Path | None = None, local: bool = True) -> CreateSpec:
    """A :class:`CreateSpec` from a Modelfile's text; FROM and ADAPTER paths are read relative
    to ``base_dir`` (the Modelfile's folder; default: the working directory). ``local=False``
    (an API client's Modelfile) never looks at the disk: FROM is a store name, ADAPTER refused."""
    parsed = mf.parse(text)
    refused = parsed.unsupported()
    if refused:
        c = refused[0]
        raise ModelfileError(f"Modelfile line {c.line}: {c.name.upper()} is not supported by jupyter_llm; "
                             "remove the line", c.line)
    spec = CreateSpec(system=parsed.system, template=parsed.template, licenses=parsed.licenses,
                      parameters=parsed.parameters, messages=parsed.messages)
    base = parsed.from_
    path = _local(base, base_dir) if local else None
    if path is not None and path.is_file():
        spec.files = [path]
    else:
        spec.from_ = base
    for c in parsed.commands:
        if c.name == "adapter" and not local:
            raise ModelfileError(f"Modelfile line {c.line}: ADAPTER paths are not read for API clients; upload "
                                 "the adapter to /api/blobs and name it in 'adapters'", c.line)
        if c.name == "adapter":
            adapter = _local(c.args, base_dir)
            if adapter is None or not adapter.is_file():
                raise ModelfileError(f"Modelfile line {c.line}: ADAPTER {c.args!r} is no file; give the path of "
                                     "a LoRA adapter GGUF (relative to the Modelfile's folder)", c.line)
            spec.adapters.append(adapter)
    return spec


def _local(text: str, base_dir: Path | None) -> Path | None:
    """``text`` as a path if it looks like one (Ollama: absolute, ``~``, ``./``, or an existing file)."""
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    if text.startswith(("/", "~", ".")) or text.lower().endswith(".gguf") or path.is_file():
        return path
    return None


def derive(store: Store, name: str, spec: CreateSpec, *, status: Status | None = None) -> ModelRecord:
    """Write the record of the derived model ``name`` (replacing one of that name) and return it.

    ModelNotFoundError for an unknown base, GGUFError for a file that is no model (or an
    adapter that is no LoRA GGUF), ModelfileError for parameters or messages that are wrong.
    """
    say = status or (lambda _text: None)
    check_name(name)
    existing = store.get(name)
    if existing is not None and existing.read_only:
        raise StoreError(f"{name!r} is a model of the local Ollama store; pick another name for the new model")
    params = mf.check_parameters(spec.parameters)
    messages = _messages(spec.messages)
    if spec.files:
        base_name = str(spec.files[0])
        files = [str(f) for f in spec.files]
        say(f"using existing layer {_layer(spec.files[0])}")
        try:
            summary = summarize(list(spec.files))
        except OSError as exc:
            raise StoreError(f"cannot read {spec.files[0]}: {exc}") from exc
        source, layers, sha256, details, owned = "created", {}, _sha(spec.files[0]), {}, []
    else:
        if not spec.from_:
            raise ModelfileError("a new model needs a base: give `from` (a model name) or `files` (a GGUF blob)")
        base = store.require(spec.from_)
        base_name, files, summary = base.name, list(base.files), dict(base.summary)
        say(f"using existing layer {_layer(base.files[0], base.sha256)}")
        source, layers, sha256 = "derived", dict(base.ollama), base.sha256
        details, owned = {k: v for k, v in base.details.items() if k not in _LAYER_DETAILS}, list(base.owned)
    owned += [str(p) for p in spec.owned if str(p) not in owned]
    adapters = [*layers.get("adapters", []), *(_adapter(p) for p in spec.adapters)]
    for key, value in (("system", spec.system), ("template", spec.template)):
        if value is not None:
            layers[key] = value
            say(f"creating {key} layer")
    if spec.licenses:
        layers["license"] = spec.licenses[0] if len(spec.licenses) == 1 else list(spec.licenses)
    if params:
        layers["params"] = {**(layers.get("params") or {}), **params}
        say("creating parameters layer")
    if messages:
        layers["messages"] = messages
        say("creating messages layer")
    if adapters:
        layers["adapters"] = adapters
    layers["parent"] = base_name if not spec.files else ""
    layers = {k: v for k, v in layers.items() if v not in (None, "", [], {})}
    layers["modelfile"] = modelfile_of(base_name if not spec.files else name, layers)  # never a store path
    details["parent_model"] = layers.get("parent", "")
    size = sum(Path(f).stat().st_size for f in files if Path(f).exists())
    record = ModelRecord(name=name, source=source, files=files, sha256=sha256, size=size, owned=owned,
                         details=details, summary=summary, created=time.time(), ollama=layers)
    say("writing manifest")
    store._write(record)
    return record


_LAYER_DETAILS = ("template", "system", "params", "license")
"""Keys of an Ollama source's ``details`` that the derived record's layers replace."""


def modelfile_of(from_: str, layers: dict[str, Any]) -> str:
    """The Modelfile that makes a model with these layers from ``from_``."""
    license_ = layers.get("license") or []
    return mf.render(from_, header="Modelfile generated by jupyter_llm", system=layers.get("system"),
                     template=layers.get("template"),
                     parameters=layers.get("params") or {}, messages=layers.get("messages") or [],
                     adapters=[Path(a["path"]).name if a.get("blob") else a["path"]
                               for a in layers.get("adapters") or []],
                     licenses=[license_] if isinstance(license_, str) else list(license_))


def _messages(items: list[dict[str, str]]) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(items):
        role, content = m.get("role"), m.get("content")
        if role not in mf.ROLES or not isinstance(content, str):
            raise ModelfileError(f"message {i + 1} needs a role ({', '.join(mf.ROLES)}) and a text content")
        out.append({"role": str(role), "content": content})
    return out


def _adapter(path: Path) -> dict[str, Any]:
    """An ADAPTER entry, after checking the file is a LoRA adapter GGUF (llama.cpp would abort later)."""
    from .gguf import scan

    info = scan(path)
    kind, adapter = info.metadata.get("general.type"), info.metadata.get("adapter.type")
    if kind != "adapter" or adapter != "lora":
        raise GGUFError(f"{path} is not a LoRA adapter GGUF (general.type {kind!r}, adapter.type {adapter!r}); "
                        "convert the adapter with llama.cpp's convert_lora_to_gguf.py")
    from .upload import blob_dir

    return {"path": str(path), "scale": 1.0, "blob": path.parent == blob_dir()}


def _layer(path: Path | str, sha256: str | None = None) -> str:
    name = Path(path).name
    digest = sha256 or (name.removeprefix("sha256-") if name.startswith("sha256-") else "")
    return f"sha256:{digest}" if digest else name


def _sha(path: Path) -> str | None:
    name = path.name
    return name.removeprefix("sha256-") if name.startswith("sha256-") else None


def lora(record: ModelRecord) -> tuple[tuple[str, float], ...]:
    """The record's adapters as the load option ``lora`` ((path, scale) pairs)."""
    return tuple((str(a["path"]), float(a.get("scale", 1.0))) for a in record.ollama.get("adapters") or ())


def num_ctx(record: ModelRecord) -> int | None:
    """PARAMETER num_ctx of the record: the context per request (a slot) it is loaded with."""
    value = (record.ollama.get("params") or {}).get("num_ctx")
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) and value >= 16 else None

