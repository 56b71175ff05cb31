"""What a load starts from: its options (given, or remembered from the model's last explicit
load), those options resolved against the devices, and the record of a GGUF path used in place.

The manager owns the state (:class:`RememberedOptions` is one of its parts) and does the
loading; this module holds the rules, so that ``load``, ``estimate`` and ``show`` agree on them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .options import AUTO, LoadOptions

if TYPE_CHECKING:
    from .memory.devices import Device
    from .store.gguf_info import GGUFInfo
    from .store.records import ModelRecord


class RememberedOptions:
    """The options of each model's last explicit load ("auto" unresolved), by store name.

    A load by name alone (a reload after keep_alive or an unload, the next ``%%chat``, a
    ``Model`` handle) uses them, so what the user chose survives until they choose again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[str, LoadOptions] = {}

    def get(self, name: str) -> LoadOptions | None:
        with self._lock:
            return self._by_name.get(name)

    def choose(self, name: str, options: LoadOptions | None, overrides: dict[str, Any],
               record: ModelRecord | None = None) -> tuple[LoadOptions, bool]:
        """The options to load ``name`` with, and whether they are the remembered ones: those
        when nothing is given, else the given ones (over the defaults); under ``record``'s own
        (:func:`model_defaults`)."""
        if options is None and not overrides:
            remembered = self.get(name)
            if remembered is not None:
                return model_defaults(record, remembered), True
        options = options or LoadOptions()
        return model_defaults(record, options.with_(**overrides) if overrides else options), False

    def remember(self, name: str, options: LoadOptions) -> None:
        with self._lock:
            self._by_name[name] = options

    def forget(self, name: str) -> None:
        with self._lock:
            self._by_name.pop(name, None)


class GpuCheck:
    """NVML sees NVIDIA GPUs only; Vulkan, ROCm and Metal devices show in llama.cpp's view alone.
    So before GPU layers asked for are called CPU-only, llama.cpp is asked (in a subprocess,
    ~1 s; once per manager when it finds none)."""

    def __init__(self) -> None:
        self.no_gpu = False

    def devices(self, devices: list[Device], options: LoadOptions, ask: Callable[[], list[Device]]
                ) -> list[Device]:
        """``devices``, or ``ask()`` (llama.cpp's view) when it may find a GPU they lack."""
        if options.gpu_layers in (AUTO, 0) or any(d.kind == "gpu" for d in devices) or self.no_gpu:
            return devices
        found = ask()
        self.no_gpu = not any(d.kind == "gpu" for d in found)
        return found


def resolve(info: GGUFInfo, requested: LoadOptions, devices: Sequence[Device],
            checked: Sequence[Device]) -> tuple[LoadOptions, list[str]]:
    """``requested`` with "auto" resolved against ``devices`` (free memory now), and the notes
    a user must see: GPU layers asked for while ``checked`` (the devices, with llama.cpp asked
    too when NVML saw no GPU) holds no GPU are 0 (:func:`~jupyter_llm.memory.estimate.cpu_only`)."""
    from .memory.estimate import cpu_only, fit
    from .memory.rpc import rpc_placeholders, with_rpc
    from .memory.rpc_endpoints import warn_if_exposed

    if requested.rpc:
        # rpc-servers' devices take layers like GPUs. Their memory is asked only when "auto"
        # needs it: a server serves one client at a time, and a model already loaded on it
        # (loaded again alike, which the manager answers at once) holds it.
        warn_if_exposed(requested.rpc, stacklevel=4)
        checked = [*checked, *rpc_placeholders(requested.rpc)]
        if AUTO in (requested.gpu_layers, requested.n_ctx):
            devices = with_rpc(devices, requested.rpc)
    resolved, note = cpu_only(requested, checked)
    if resolved.gpu_layers == AUTO or resolved.n_ctx == AUTO:
        resolved = fit(info, resolved, devices)
    return resolved, [note] if note else []


def record_or_path(name: str, record: Callable[[str], ModelRecord]) -> ModelRecord:
    """``record(name)`` (the store's), or for a path to a GGUF file one made on the spot."""
    from .errors import ModelNotFoundError

    try:
        return record(name)
    except ModelNotFoundError:
        found = path_record(name)
        if found is None:
            raise
        return found


def path_record(name: str) -> ModelRecord | None:
    """A record, not stored, for ``name`` if it is a path to a GGUF file; None if it is no path.

    ``show`` and ``estimate`` only look at a file, so they must not register it the way a load
    does; a missing or broken file raises the header scan's error ("no such file: …").
    """
    from .store.names import PathRef, canonical, parse
    from .store.records import ModelRecord, summarize
    from .store.sources import local

    if not (name.lower().endswith(".gguf") or Path(name).expanduser().is_file()):
        return None
    ref = parse(name)
    if not isinstance(ref, PathRef):
        return None
    pulled = local.pull(ref, name=canonical(ref), progress=lambda _event: None)
    files = [Path(f) for f in pulled.files]
    return ModelRecord(name=canonical(ref), source=pulled.source, files=[str(f) for f in files],
                       size=sum(f.stat().st_size for f in files), details=dict(pulled.details),
                       summary=summarize(files))


def model_defaults(record: ModelRecord | None, options: LoadOptions) -> LoadOptions:
    """``options`` with what a derived model's record sets (:mod:`jupyter_llm.store.derive`): its
    ADAPTER files always (they are part of the model), and its PARAMETER num_ctx (a context per
    slot, as in Ollama) when the context is still the default, the rule of
    :meth:`SamplingOptions.with_model_defaults <jupyter_llm.options.SamplingOptions.with_model_defaults>`."""
    if record is None or not record.ollama:
        return options
    from .store.derive import lora, num_ctx

    changes: dict[str, Any] = {}
    adapters = lora(record)
    if adapters != options.lora:
        changes["lora"] = adapters
    per_slot = num_ctx(record)
    if per_slot is not None and options.n_ctx == LoadOptions().n_ctx:
        changes["n_ctx"] = per_slot * options.parallel
    return options.with_(**changes) if changes else options
