"""How much memory a model will take on each device, before loading it; auto GPU layers and context.

Four buffers per device, as llama.cpp allocates them (NOTES §3):

- **weights**: the GGUF tensor table placed by llama.cpp's layer rule (:func:`layer_devices`):
  with ``ngl`` GPU layers, layer ``il`` is on a GPU iff ``il >= max(n_layer + 1 - ngl, 0)``; the
  output layer counts as layer ``n_layer`` (so it moves first); ``token_embd`` stays on the CPU
  and, when the embeddings are tied, is duplicated onto the output layer's device. GPU layers
  are split across GPUs by cumulative ``tensor_split``, or by free memory when none is given.
- **KV cache**: ``n_ctx × Σ_layers n_head_kv(il) × (head_dim_k × b_k + head_dim_v × b_v)``,
  bytes per element f16 2, q8_0 34/32, q4_0 18/32, each layer's share on the layer's device.
  ``n_ctx`` as llama.cpp will use it: padded to 256, and per slot padded again (:func:`context_cells`).
- **compute graph** (the scheduler's reserve for one ubatch of ``T`` tokens over ``n_kv`` cells
  per slot), the largest of three phases, calibrated against llama.cpp's own dry runs::

      logits            4T × (T_out/T × n_vocab + 2 n_embd)
      attention         mask + 4T × (n_kv × n_head + 5 n_embd + 2 n_embd_kv)
      attention, FA     mask + 4T × 8 n_embd
      feed-forward      mask + 4T × (3 n_ff + 3 n_embd + 2 n_embd_kv)
      feed-forward, FA  mask + 4T × (3 n_ff + 4 n_embd)
      mask              T × n_kv × (4 without, 2 with flash attention)

  (``n_embd_kv = n_head_kv × head_dim``; the n_embd terms are the activations that live beside
  the big tensors, fitted to dry runs of models with n_embd 64…1024 and n_ff/n_embd 2…64.)

  ``T = min(n_ctx as asked, n_batch, n_ubatch)`` rounded up to a multiple of the slots.
- **output**: ``n_vocab × 4 × slots`` (one row of logits per sequence), in host memory.

Exact for standard-attention models; for sliding-window, MLA, recurrent, hybrid and MoE models
the KV and graph formulas are approximate and ``estimate(..., refine=True)`` replaces them with
the numbers of a llama.cpp dry run (:func:`dry_run`, in a subprocess). GPU compute splits are
derived from the same phases but could not be measured on this project's GPU-less machines.

Host RAM "free" is ``MemAvailable``; every device keeps a safety margin of 10 % of its free
memory or 1 GiB, whichever is smaller (:func:`default_margin`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .dryrun import breakdown as dry_run
from .options import AUTO, LoadOptions

if TYPE_CHECKING:
    from .devices import Device
    from .gguf_scan import GGUFInfo

GiB = 1024**3
MiB = 1024**2
KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
CTX_PAD = 256
"""llama.cpp pads the context (and each slot's share) to a multiple of this."""
DEFAULT_CTX_CAP = 4096
"""Context used to place GPU layers when both are "auto", and cap when a model has no n_ctx_train."""

_APPROXIMATE_KEYS = (".ssm.", ".wkv.", ".rwkv.", "attention.kv_lora_rank", "attention.sliding_window",
                     ".expert_count", ".shortconv.", "full_attention_interval", ".time_mix")


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "options": self.options.to_dict(), "n_ctx": self.n_ctx,
            "devices": [d.to_dict() for d in self.devices], "fits": self.fits, "total": self.total,
            "exact": self.exact, "source": self.source, "notes": list(self.notes),
            "suggestion": self.suggestion(),
        }


# -- the pieces ------------------------------------------------------------------------------------


def default_margin(free: int) -> int:
    """Bytes to keep free on a device: 10 % of its free memory or 1 GiB, whichever is smaller."""
    return min(free // 10, GiB)


def context_cells(n_ctx: int, parallel: int = 1) -> tuple[int, int]:
    """``(n_ctx, n_ctx_per_slot)`` as llama.cpp allocates them (padded; one KV stream per slot)."""
    n_ctx = _pad(n_ctx)
    per_slot = _pad(n_ctx // parallel)
    return per_slot * parallel, per_slot


def layer_devices(n_layer: int, gpu_layers: int, gpus: Sequence[Device] = (),
                  tensor_split: Sequence[float] = ()) -> list[str]:
    """Device id of each layer ``0 … n_layer``, where index ``n_layer`` is the output layer."""
    if not gpus or gpu_layers <= 0:
        return ["CPU"] * (n_layer + 1)
    weights = list(tensor_split)[: len(gpus)]
    if not any(w > 0 for w in weights):
        weights = [max(g.free_bytes, 0) for g in gpus]
        if not any(weights):
            weights = [1.0] * len(gpus)
    weights += [0.0] * (len(gpus) - len(weights))
    total = float(sum(weights))
    cumulative, running = [], 0.0
    for w in weights:
        running += w
        cumulative.append(running / total)
    start = max(n_layer + 1 - gpu_layers, 0)
    active = min(gpu_layers, n_layer + 1)
    out = []
    for il in range(n_layer + 1):
        if il < start or il - start >= active:
            out.append("CPU")
            continue
        position = (il - start) / active
        index = next((i for i, c in enumerate(cumulative) if c > position), len(gpus) - 1)
        out.append(gpus[index].id)
    return out


def weights_per_device(infos: GGUFInfo | Sequence[GGUFInfo], placement: Sequence[str]) -> dict[str, int]:
    """Tensor bytes per device for a layer placement from :func:`layer_devices`."""
    parts = _parts(infos)
    n_layer = len(placement) - 1
    out: dict[str, int] = {"CPU": 0}
    output_dev = placement[n_layer]
    has_output_weight = False
    embd_bytes = 0
    for info in parts:
        for t in info.tensors:
            if t.name.startswith("blk."):
                il = int(t.name.split(".", 2)[1])
                dev = placement[il] if il < n_layer else output_dev  # extra (e.g. MTP) blocks
            elif t.name.startswith("output"):
                dev = output_dev
                has_output_weight |= t.name == "output.weight"
            else:
                dev = "CPU"  # token_embd and other input tensors stay with the input layer
                if t.name == "token_embd.weight":
                    embd_bytes = t.n_bytes
            out[dev] = out.get(dev, 0) + t.n_bytes
    if not has_output_weight and output_dev != "CPU":
        out[output_dev] = out.get(output_dev, 0) + embd_bytes  # tied: a copy for the output layer
    return out


def kv_per_device(info: GGUFInfo, placement: Sequence[str], n_cells: int, kv_type: str) -> dict[str, int]:
    """KV cache bytes per device: each layer's K and V rows where the layer is."""
    heads_kv = info.head_count_kv_per_layer()
    dim_k, dim_v = info.head_dim or 0, info.head_dim_v or 0
    per_elem = KV_BYTES[kv_type]
    out: dict[str, int] = {}
    for il, n_kv in enumerate(heads_kv[: len(placement) - 1]):
        row = round(n_kv * dim_k * per_elem) + round(n_kv * dim_v * per_elem)
        out[placement[il]] = out.get(placement[il], 0) + n_cells * row
    return out


@dataclass(frozen=True)
class _Phases:
    logits: int
    layer: int  # the larger of attention and feed-forward: what a device running layers needs
    host_inputs: int


def _phases(info: GGUFInfo, opts: LoadOptions, n_cells: int, per_slot: int) -> _Phases:
    n_embd = int(info.embedding_length or 0)
    n_head = int(info.head_count or 0)
    n_vocab = int(info.vocab_size or 0)
    n_embd_kv = int(info.head_count_kv or 0) * int(info.head_dim or 0)
    ff = info.feed_forward_length
    n_ff = int(max(ff) if isinstance(ff, list) else ff or 4 * n_embd)
    n_ctx_asked = int(opts.n_ctx)  # type: ignore[arg-type]  # resolved before this is called
    # llama.cpp caps n_batch at the context asked for (before padding), and n_ubatch at n_batch;
    # the worker raises n_batch to the number of slots
    n_batch = min(n_ctx_asked, max(opts.n_batch, opts.parallel))
    tokens = min(n_cells, n_batch, opts.n_ubatch)
    tokens = -(-tokens // opts.parallel) * opts.parallel  # the reserve splits tokens evenly over slots
    n_out = min(tokens, n_batch)
    mask = tokens * per_slot * (2 if opts.flash_attn else 4)
    per_token = 4 * tokens  # bytes of one f32 activation column over the ubatch
    logits = n_out * n_vocab * 4 + 2 * n_embd * per_token
    if opts.flash_attn:
        attention = mask + 8 * n_embd * per_token
        # (with a quantized cache llama.cpp needs up to 8 % less here: erring on the safe side)
        feed_forward = mask + (3 * n_ff + 4 * n_embd) * per_token
    else:
        attention = mask + per_slot * n_head * per_token + (5 * n_embd + 2 * n_embd_kv) * per_token
        feed_forward = mask + (3 * n_ff + 3 * n_embd + 2 * n_embd_kv) * per_token
    return _Phases(logits, max(attention, feed_forward), 2 * n_embd * per_token)


def compute_per_device(info: GGUFInfo, opts: LoadOptions, placement: Sequence[str],
                       n_cells: int, per_slot: int) -> dict[str, int]:
    """Compute-graph bytes per device: layer activations where layers run, logits at the output."""
    ph = _phases(info, opts, n_cells, per_slot)
    n_layer = len(placement) - 1
    out: dict[str, int] = {}
    for dev in set(placement[:n_layer]):
        out[dev] = ph.layer
    out[placement[n_layer]] = max(out.get(placement[n_layer], 0), ph.logits)
    if "CPU" not in out:
        out["CPU"] = ph.host_inputs  # fully offloaded: the host only stages the ubatch's inputs
    return out


def device_for_backend(name: str, devices: Sequence[Device]) -> str:
    """Our device id for a llama.cpp device name: ``"CUDA1"`` → ``"GPU1"`` unless told otherwise."""
    for d in devices:
        if d.backend == name:
            return d.id
    digits = name.lstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
    return f"GPU{digits}" if name != "CPU" and digits.isdigit() else name


def is_formula_exact(info: GGUFInfo) -> bool:
    """False for architectures whose KV or graph the formulas only approximate (SWA, MLA,
    recurrent, hybrid, MoE): use the dry run there."""
    if any(any(k in key for k in _APPROXIMATE_KEYS) for key in info.metadata):
        return False
    heads_kv = info.head_count_kv_per_layer()
    return bool(heads_kv) and min(heads_kv) > 0


# -- the estimate -----------------------------------------------------------------------------------


def estimate(info: GGUFInfo | Sequence[GGUFInfo], options: LoadOptions | None = None,
             devices: list[Device] | None = None, *, refine: bool | str = False,
             margin: int | None = None) -> MemoryEstimate:
    """Memory per device for loading the model with ``options`` (``"auto"`` resolved by :func:`fit`).

    ``devices`` defaults to :func:`jupyter_llm.devices.list_devices`. ``refine=True`` runs a
    llama.cpp dry run (~1 s, in a subprocess) for architectures the formulas only approximate;
    ``refine="always"`` runs it for every model. ``margin`` (bytes per device) overrides
    :func:`default_margin`.
    """
    options = options or LoadOptions()
    parts = _parts(info)
    if devices is None:
        from .devices import list_devices

        devices = list_devices()
    if options.gpu_layers == AUTO or options.n_ctx == AUTO:
        options = fit(parts, options, devices, margin=margin)
    result = _estimate(parts, options, devices, margin)
    if refine == "always" or (refine and not result.exact):
        result = _refined(parts, options, devices, margin, result)
    if not result.fits:
        result._suggestion = _suggest(parts, options, devices, margin, result)
    return result


def _estimate(parts: list[GGUFInfo], opts: LoadOptions, devices: Sequence[Device],
              margin: int | None) -> MemoryEstimate:
    info = parts[0]
    n_layer = int(info.block_count or 0)
    gpus = [d for d in devices if d.kind == "gpu"]
    ngl = int(opts.gpu_layers)  # type: ignore[arg-type]
    placement = layer_devices(n_layer, ngl, gpus, opts.tensor_split)
    n_cells, per_slot = context_cells(int(opts.n_ctx), opts.parallel)  # type: ignore[arg-type]
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
    from .dryrun import measure

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


# -- auto: GPU layers and context --------------------------------------------------------------------


def fit(info: GGUFInfo | Sequence[GGUFInfo], options: LoadOptions | None = None,
        devices: list[Device] | None = None, *, margin: int | None = None) -> LoadOptions:
    """Resolve ``gpu_layers="auto"`` and ``n_ctx="auto"`` against free memory.

    Layers: the most that fit on the GPUs (0 without GPUs), placed at the requested context
    (``DEFAULT_CTX_CAP`` when that is "auto" too). Context: the largest multiple of 256 up to
    the model's training context that fits everywhere, host RAM included. When nothing fits, the
    smallest candidates are returned and :func:`estimate` says why it does not fit.
    """
    options = options or LoadOptions()
    parts = _parts(info)
    if devices is None:
        from .devices import list_devices

        devices = list_devices()
    n_layer = int(parts[0].block_count or 0)
    ctx_cap = int(parts[0].context_length or DEFAULT_CTX_CAP)
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
    if ctx_est.fits and int(ctx_opts.n_ctx) < int(opts.n_ctx):  # type: ignore[arg-type]
        tips.append(f"n_ctx={ctx_opts.n_ctx} (--ctx {ctx_opts.n_ctx}; KV {_human(ctx_est.kv)} instead "
                    f"of {_human(est.kv)})")
        any_fits = True
    if not opts.flash_attn:
        fa_est = _estimate(parts, opts.with_(flash_attn=True), devices, margin)
        tips.append(f"flash_attn=True (--flash-attn; graph {_human(fa_est.compute)} instead of "
                    f"{_human(est.compute)}, {'fits' if fa_est.fits else 'still does not fit'})")
        any_fits |= fa_est.fits
    if opts.kv_type == "f16":
        q8_est = _estimate(parts, opts.with_(kv_type="q8_0", flash_attn=True), devices, margin)
        tips.append(f"kv_type='q8_0' with flash_attn=True (--kv-type q8_0 --flash-attn; KV "
                    f"{_human(q8_est.kv)} instead of {_human(est.kv)}, "
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


def _parts(info: GGUFInfo | Sequence[GGUFInfo]) -> list[GGUFInfo]:
    return list(info) if isinstance(info, (list, tuple)) else [info]  # type: ignore[list-item]


def _pad(n: int) -> int:
    return -(-int(n) // CTX_PAD) * CTX_PAD


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


__all__ = [
    "DeviceEstimate",
    "MemoryEstimate",
    "compute_per_device",
    "context_cells",
    "default_margin",
    "dry_run",
    "estimate",
    "fit",
    "is_formula_exact",
    "kv_per_device",
    "layer_devices",
    "weights_per_device",
]
