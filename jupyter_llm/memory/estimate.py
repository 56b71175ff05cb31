"""How much memory a model will take on each device, before loading it; auto GPU layers and context.

:func:`estimate` adds up the four buffers llama.cpp allocates per device (weights, KV cache,
compute graph, output; the formulas are in :mod:`jupyter_llm.memory.formulas`) and says whether
they fit into each device's free memory, keeping a margin of 10 % of it or 1 GiB, whichever is
smaller (:func:`~jupyter_llm.memory.formulas.default_margin`); host RAM "free" is
``MemAvailable``. :func:`fit` resolves ``"auto"`` GPU layers and context; a load that does not
fit gets a suggestion with the numbers, each tip quoting the total it would need.

``n_ctx="auto"`` is the largest multiple of 256 that fits on every device with that margin left
free, and at most the training context and ``AUTO_CTX_CEILING`` (32768) tokens. A positive
``gpu_layers`` with no GPU among the devices is 0 with a note (:func:`cpu_only`), as llama.cpp
ignores ``-ngl`` without one. For sliding-window, MLA, recurrent, hybrid and MoE
models the formulas are approximate and ``estimate(..., refine=True)`` replaces KV and graph by
a llama.cpp dry run (:mod:`jupyter_llm.memory.probe`); :func:`dry_run` gives that run's
per-device breakdown. GPU compute splits are derived from the same phases but could not be
measured on this project's GPU-less machines.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..options import AUTO, LoadOptions
from .formulas import (
    AUTO_CTX_CEILING,
    CTX_PAD,
    DEFAULT_CTX_CAP,
    GiB,
    MiB,
    compute_per_device,
    context_cells,
    default_margin,
    device_for_backend,
    is_formula_exact,
    kv_per_device,
    layer_devices,
    weights_per_device,
)
from .formulas import (
    parts as _parts,
)
from .llama_log import BufferSizes
from .rpc import with_rpc

if TYPE_CHECKING:
    from ..store.gguf import GGUFInfo
    from .devices import Device

@dataclass(frozen=True)
class DeviceEstimate:
    """Bytes one device would hold, and whether that fits into its free memory minus a margin."""

    device_id: str
    weights: int
    kv: int
    compute: int
    output: int
    total: int
    free: int | None
    """Free bytes now (host: MemAvailable); None when the device is imaginary/unknown."""
    fits: bool
    margin: int = 0
    """Bytes kept free for safety (see :func:`default_margin`)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MemoryEstimate:
    """Per-device memory a load would take, with the options it assumes (``"auto"`` resolved)."""

    model: str
    options: LoadOptions
    n_ctx: int
    """Context cells llama.cpp will allocate (padded; shared by ``options.parallel`` slots)."""
    devices: list[DeviceEstimate]
    exact: bool
    """True when the formulas are exact for this architecture, or a dry run gave KV and graph."""
    source: str = "formula"
    """``"formula"`` or ``"dry-run"`` (KV and compute graph measured by llama.cpp)."""
    notes: list[str] = field(default_factory=list)
    _suggestion: str | None = None
    _basis: tuple[list[GGUFInfo], list[Device], int | None] | None = field(default=None, repr=False, compare=False)
    """What it was priced from (headers, devices, margin), for :meth:`verdict`."""

    @property
    def fits(self) -> bool:
        return all(d.fits for d in self.devices)

    @property
    def total(self) -> int:
        return sum(d.total for d in self.devices)

    @property
    def weights(self) -> int:
        return sum(d.weights for d in self.devices)

    @property
    def kv(self) -> int:
        return sum(d.kv for d in self.devices)

    @property
    def compute(self) -> int:
        return sum(d.compute for d in self.devices)

    @property
    def output(self) -> int:
        return sum(d.output for d in self.devices)

    def device(self, device_id: str) -> DeviceEstimate:
        """The row of one device (``"CPU"``, ``"GPU0"``…)."""
        for row in self.devices:
            if row.device_id == device_id:
                return row
        raise KeyError(device_id)

    def suggestion(self) -> str | None:
        """What to change so that it fits, with the numbers; None when it already fits."""
        return None if self.fits else self._suggestion

    @property
    def header(self) -> GGUFInfo | None:
        """The (first) GGUF header it was priced from: a remote one for a model not pulled yet."""
        return self._basis[0][0] if self._basis is not None else None

    def verdict(self) -> str:
        """One line: whether it fits, and what would (the largest context, the most GPU layers);
        when it does not fit, the suggestion."""
        if not self.fits:
            return f"does not fit: {self.suggestion() or 'no device has room'}"
        if self._basis is None:
            return f"fits ({_human(self.total)} in all)"
        parts, devices, margin = self._basis
        opts, trained = self.options, int(parts[0].context_length or 0)
        ctx = max(int(fit(parts, opts.with_(n_ctx=AUTO), devices, margin=margin).n_ctx), int(opts.n_ctx))
        context = (f"the whole trained context, ctx {trained}" if ctx >= trained else
                   f"ctx {ctx} or more" if ctx >= AUTO_CTX_CEILING else f"ctx up to {ctx}")
        n_layer = int(parts[0].block_count or 0)
        if not any(d.kind == "gpu" for d in devices):
            layers = "there is no GPU: every layer runs on the CPU"
        else:
            most = int(fit(parts, opts.with_(gpu_layers=AUTO), devices, margin=margin).gpu_layers)
            layers = f"with up to {most} of {n_layer + 1} layers on the GPU at ctx {opts.n_ctx}"
        return f"fits ({_human(self.total)} in all); it would still fit with {context}; {layers}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "options": self.options.to_dict(), "n_ctx": self.n_ctx,
            "devices": [d.to_dict() for d in self.devices], "fits": self.fits, "total": self.total,
            "exact": self.exact, "source": self.source, "notes": list(self.notes),
            "suggestion": self.suggestion(),
        }


# -- the estimate -----------------------------------------------------------------------------------


def estimate(info: GGUFInfo | Sequence[GGUFInfo], options: LoadOptions | None = None,
             devices: list[Device] | None = None, *, refine: bool | str = False,
             margin: int | None = None, notes: Sequence[str] = ()) -> MemoryEstimate:
    """Memory per device for loading the model with ``options`` (``"auto"`` resolved by :func:`fit`).

    ``devices`` defaults to :func:`jupyter_llm.devices.list_devices`. ``refine=True`` runs a
    llama.cpp dry run (~1 s, in a subprocess) for architectures the formulas only approximate;
    ``refine="always"`` runs it for every model. ``margin`` (bytes per device) overrides
    :func:`default_margin`. ``notes`` are added to the result's (e.g. where the header came from).
    """
    options = options or LoadOptions()
    parts = _parts(info)
    if devices is None:
        from .devices import list_devices

        devices = list_devices()
    devices = with_rpc(devices, options.rpc)  # rpc-servers' devices take layers like GPUs
    options, cpu_note = cpu_only(options, devices)
    if options.gpu_layers == AUTO or options.n_ctx == AUTO:
        options = fit(parts, options, devices, margin=margin)
    result = _estimate(parts, options, devices, margin)
    if cpu_note is not None:
        result.notes.insert(0, cpu_note)
    if refine == "always" or (refine and not result.exact):
        result = _refined(parts, options, devices, margin, result)
    if not result.fits:
        result._suggestion = _suggest(parts, options, devices, margin, result)
    result._basis = (parts, list(devices), margin)
    result.notes += notes
    return result


def _estimate(parts: list[GGUFInfo], opts: LoadOptions, devices: Sequence[Device],
              margin: int | None) -> MemoryEstimate:
    info = parts[0]
    n_layer = int(info.block_count or 0)
    gpus = [d for d in devices if d.kind == "gpu"]
    ngl = int(opts.gpu_layers)
    placement = layer_devices(n_layer, ngl, gpus, opts.tensor_split)
    n_cells, per_slot = context_cells(int(opts.n_ctx), opts.parallel)
    weights = weights_per_device(parts, placement)
    kv = kv_per_device(info, placement, n_cells, opts.kv_type)
    compute = compute_per_device(info, opts, placement, n_cells, per_slot)
    output = {"CPU": int(info.vocab_size or 0) * 4 * opts.parallel}
    exact = is_formula_exact(info)
    notes = [] if exact else [
        f"{info.architecture}: KV cache and compute graph are approximate; refine=True asks llama.cpp"
    ]
    if opts.kv_type != "f16" and not opts.flash_attn:
        notes.append(f"kv_type={opts.kv_type} needs flash_attn=True (llama.cpp refuses a quantized V "
                     "cache without it)")
    rows = _rows(devices, {"weights": weights, "kv": kv, "compute": compute, "output": output}, margin)
    return MemoryEstimate(str(info.path), opts, n_cells, rows, exact, "formula", notes)


def _rows(devices: Sequence[Device], parts: dict[str, dict[str, int]], margin: int | None
          ) -> list[DeviceEstimate]:
    known = {d.id: d for d in devices}
    ids = [d.id for d in devices]
    if "CPU" not in ids:
        ids.insert(0, "CPU")
    ids += sorted({k for p in parts.values() for k in p} - set(ids))
    rows = []
    for dev_id in ids:
        sizes = {name: int(p.get(dev_id, 0)) for name, p in parts.items()}
        total = sum(sizes.values())
        device = known.get(dev_id)
        free = device.free_bytes if device is not None else None
        keep = 0 if free is None else (default_margin(free) if margin is None else margin)
        fits = (total + keep <= free) if free is not None else total == 0
        rows.append(DeviceEstimate(dev_id, total=total, free=free, fits=fits, margin=keep, **sizes))
    return rows


def _refined(parts: list[GGUFInfo], opts: LoadOptions, devices: Sequence[Device], margin: int | None,
             formula: MemoryEstimate) -> MemoryEstimate:
    """Replace the KV and compute figures by a llama.cpp dry run's."""
    from .probe import measure

    measured = measure(str(parts[0].path), [opts])
    result = (measured.get("results") or [{}])[0]
    if measured.get("error") or result.get("error"):
        formula.notes.append(f"dry run failed: {measured.get('error') or result.get('error')}")
        return formula
    by_dev: dict[str, dict[str, int]] = {}
    for name, sizes in result.get("devices", {}).items():
        dev = device_for_backend(name, devices)
        for key in ("compute", "output"):
            by_dev.setdefault(key, {})[dev] = by_dev.get(key, {}).get(dev, 0) + int(sizes[key])
    kv_total = int(result.get("kv_size", 0))
    kv_formula = {d.device_id: d.kv for d in formula.devices}
    scale = kv_total / max(sum(kv_formula.values()), 1)
    kv = {dev: round(v * scale) for dev, v in kv_formula.items()}
    weights = {d.device_id: d.weights for d in formula.devices}
    rows = _rows(devices, {"weights": weights, "kv": kv, "compute": by_dev.get("compute", {}),
                           "output": by_dev.get("output", {})}, margin)
    notes = [n for n in formula.notes if "approximate" not in n]
    n_ctx = int(result.get("n_ctx") or formula.n_ctx)
    return MemoryEstimate(formula.model, opts, n_ctx, rows, True, "dry-run", notes)


def dry_run(path: str | os.PathLike[str], options: Any = None) -> dict[str, BufferSizes]:
    """Per-device buffers llama.cpp would allocate, measured by a dry run (keyed by llama.cpp's
    device names: ``"CPU"``, ``"CUDA0"``…).

    KV and compute come from llama.cpp; weights (printed as 0 in dry-run mode) from the tensor
    table and the layer rule, with the KV total shared out the same way.
    """
    from ..errors import ModelLoadError
    from ..store.gguf import scan
    from .probe import measure

    options = options or LoadOptions(gpu_layers=0)
    info = scan(path)
    if options.n_ctx == AUTO or options.gpu_layers == AUTO:
        options = fit(info, options)
    raw = measure(path, [options])
    result = (raw.get("results") or [{}])[0]
    if raw.get("error") or result.get("error"):
        raise ModelLoadError(f"{path}: {raw.get('error') or result.get('error')}")
    n_layer = int(info.block_count or 0)
    placement = layer_devices(n_layer, int(options.gpu_layers), [], options.tensor_split)
    weights = weights_per_device(info, placement)
    out: dict[str, BufferSizes] = {dev: BufferSizes(weights=w) for dev, w in weights.items()}
    for dev, sizes in result.get("devices", {}).items():
        row = out.setdefault(dev, BufferSizes())
        row.compute += int(sizes["compute"])
        row.output += int(sizes["output"])
        row.kv += int(sizes["kv"])
    if not any(row.kv for row in out.values()):
        out.setdefault("CPU", BufferSizes()).kv = int(result.get("kv_size", 0))
    return out


# -- auto: GPU layers and context --------------------------------------------------------------------


def fit(info: GGUFInfo | Sequence[GGUFInfo], options: LoadOptions | None = None,
        devices: Sequence[Device] | None = None, *, margin: int | None = None) -> LoadOptions:
    """Resolve ``gpu_layers="auto"`` and ``n_ctx="auto"`` against free memory.

    Layers: the most that fit on the GPUs (0 without GPUs), placed at the requested context
    (``DEFAULT_CTX_CAP`` when that is "auto" too). Context: the largest multiple of 256 that
    fits everywhere, host RAM included, with each device's margin kept free, up to the model's
    training context and at most ``AUTO_CTX_CEILING``. When nothing fits, the smallest
    candidates are returned and :func:`estimate` says why it does not fit.
    """
    options = options or LoadOptions()
    parts = _parts(info)
    if devices is None:
        from .devices import list_devices

        devices = list_devices()
    devices = with_rpc(devices, options.rpc)
    n_layer = int(parts[0].block_count or 0)
    ctx_cap = min(int(parts[0].context_length or DEFAULT_CTX_CAP), AUTO_CTX_CEILING)
    if options.gpu_layers == AUTO:
        probe_ctx = options.n_ctx if options.n_ctx != AUTO else min(DEFAULT_CTX_CAP, ctx_cap)
        probe = options.with_(n_ctx=probe_ctx)
        has_gpu = any(d.kind == "gpu" for d in devices)
        layers = 0
        if has_gpu:
            layers = _largest(0, n_layer + 1, lambda n: _gpus_fit(parts, probe.with_(gpu_layers=n),
                                                                   devices, margin))
        options = options.with_(gpu_layers=layers)
    if options.n_ctx == AUTO:
        lowest = min(CTX_PAD, ctx_cap)
        steps = max((ctx_cap - lowest) // CTX_PAD, 0)
        best = _largest(0, steps, lambda k: _estimate(
            parts, options.with_(n_ctx=lowest + k * CTX_PAD), devices, margin).fits)
        options = options.with_(n_ctx=max(lowest + best * CTX_PAD, 16))
    return options


def cpu_only(options: LoadOptions, devices: Sequence[Device]) -> tuple[LoadOptions, str | None]:
    """``options`` with a positive ``gpu_layers`` set to 0 when ``devices`` hold no GPU, and the
    note that says so (None when nothing changed).

    llama.cpp itself warns and ignores ``-ngl`` without a GPU, and scripts pass ``-ngl 99``
    everywhere; so it is not an error, but the user is told, and the report says 0, not N.
    """
    layers = options.gpu_layers
    if layers == AUTO or int(layers) == 0 or any(d.kind == "gpu" for d in devices):
        return options, None
    return options.with_(gpu_layers=0), (
        f"no GPU found: gpu_layers={layers} ignored, every layer runs on the CPU (as llama.cpp does; "
        "--gpu-layers 0 or auto loads without this note)")


def _gpus_fit(parts: list[GGUFInfo], opts: LoadOptions, devices: Sequence[Device], margin: int | None) -> bool:
    est = _estimate(parts, opts, devices, margin)
    return all(row.fits for row in est.devices if row.device_id != "CPU")


def _largest(lo: int, hi: int, ok: Any) -> int:
    """The largest n in [lo, hi] with ok(n), assuming ok is monotone (true, then false); lo if none."""
    if ok(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _suggest(parts: list[GGUFInfo], opts: LoadOptions, devices: Sequence[Device], margin: int | None,
             est: MemoryEstimate) -> str:
    short = [d for d in est.devices if not d.fits]
    lines = []
    for d in short:
        free = "no known free memory" if d.free is None else (
            f"{_human(d.free)} free, {_human(d.margin)} kept as margin")
        lines.append(f"{d.device_id} needs {_human(d.total)} (weights {_human(d.weights)}, KV "
                     f"{_human(d.kv)}, graph {_human(d.compute)}) but has {free}")
    tips: list[str] = []
    any_fits = False
    if any(d.kind == "gpu" for d in devices):
        layers = fit(parts, opts.with_(gpu_layers=AUTO), devices, margin=margin).gpu_layers
        if layers != opts.gpu_layers and _estimate(parts, opts.with_(gpu_layers=layers), devices, margin).fits:
            tips.append(f"gpu_layers={layers} (--gpu-layers {layers})")
            any_fits = True
    ctx_opts = fit(parts, opts.with_(n_ctx=AUTO), devices, margin=margin)
    ctx_est = _estimate(parts, ctx_opts, devices, margin)
    if ctx_est.fits and int(ctx_opts.n_ctx) < int(opts.n_ctx):
        tips.append(f"n_ctx={ctx_opts.n_ctx} (--ctx {ctx_opts.n_ctx}; {_in_all(ctx_est, est)}, KV "
                    f"{_human(ctx_est.kv)} instead of {_human(est.kv)})")
        any_fits = True
    if not opts.flash_attn:
        fa_est = _estimate(parts, opts.with_(flash_attn=True), devices, margin)
        tips.append(f"flash_attn=True (--flash-attn; {_in_all(fa_est, est)} (graph {_human(fa_est.compute)} "
                    f"instead of {_human(est.compute)}), {'fits' if fa_est.fits else 'still does not fit'})")
        any_fits |= fa_est.fits
    if opts.kv_type == "f16":
        q8_est = _estimate(parts, opts.with_(kv_type="q8_0", flash_attn=True), devices, margin)
        tips.append(f"kv_type='q8_0' with flash_attn=True (--kv-type q8_0 --flash-attn; {_in_all(q8_est, est)} "
                    f"(KV {_human(q8_est.kv)} instead of {_human(est.kv)}), "
                    f"{'fits' if q8_est.fits else 'still does not fit'})")
        any_fits |= q8_est.fits
    text = "; ".join(lines)
    smallest = min(CTX_PAD, int(parts[0].context_length or CTX_PAD))
    floor_opts = fit(parts, opts.with_(n_ctx=smallest, gpu_layers=AUTO), devices, margin=margin)
    floor = _estimate(parts, floor_opts, devices, margin)
    if not floor.fits:
        worst = max((d for d in floor.devices if not d.fits), key=lambda d: d.total - (d.free or 0))
        return (f"{text}. Even with a {smallest}-token context it needs {_human(worst.total)} on "
                f"{worst.device_id} (weights {_human(worst.weights)}): free memory (unload other "
                f"models) or pick a smaller quantization")
    if not any_fits:  # no single change is enough: fewer GPU layers *and* a smaller context
        both = fit(parts, opts.with_(gpu_layers=AUTO, n_ctx=AUTO), devices, margin=margin)
        if _estimate(parts, both, devices, margin).fits:
            tips.insert(0, f"gpu_layers={both.gpu_layers} with n_ctx={both.n_ctx} (--gpu-layers "
                           f"{both.gpu_layers} --ctx {both.n_ctx})")
    return f"{text}. Try {', or '.join(tips)}"


# -- helpers ---------------------------------------------------------------------------------------------


def _in_all(tip: MemoryEstimate, asked: MemoryEstimate) -> str:
    """The whole of what a tip needs beside what was asked for: a smaller KV cache alone can
    hide a graph that grows, so a tip never quotes one buffer only."""
    return f"{_human(tip.total)} in all instead of {_human(asked.total)}"


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


__all__ = [
    "DeviceEstimate",
    "MemoryEstimate",
    "cpu_only",
    "dry_run",
    "estimate",
    "fit",
]
