"""The formulas of the memory estimate: what llama.cpp allocates per device, from the GGUF header.

Four buffers per device, as llama.cpp allocates them (docs/notes.md §3):

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

The batch sizes follow :mod:`jupyter_llm.worker.params` (a batch holds at least one token per
slot). Exact for standard-attention models (:func:`is_formula_exact`); the estimate refines the
others with a llama.cpp dry run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..options import LoadOptions

if TYPE_CHECKING:
    from ..store.gguf import GGUFInfo
    from .devices import Device

GiB = 1024**3
MiB = 1024**2
KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
CTX_PAD = 256
"""llama.cpp pads the context (and each slot's share) to a multiple of this."""
DEFAULT_CTX_CAP = 4096
"""Context used to place GPU layers when both are "auto", and cap when a model has no n_ctx_train."""
AUTO_CTX_CEILING = 32768
"""The most ``n_ctx="auto"`` picks, whatever the training context says: some GGUFs claim 2**27
tokens, and a context that only just fits makes a compute graph of many GiB and prompts that
take minutes. Ollama's default context stops at 32k below 48 GiB of VRAM; ``--ctx N`` asks for more."""

_APPROXIMATE_KEYS = (".ssm.", ".wkv.", ".rwkv.", "attention.kv_lora_rank", "attention.sliding_window",
                     ".expert_count", ".shortconv.", "full_attention_interval", ".time_mix")


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
    parts_ = parts(infos)
    n_layer = len(placement) - 1
    out: dict[str, int] = {"CPU": 0}
    output_dev = placement[n_layer]
    has_output_weight = False
    embd_bytes = 0
    for info in parts_:
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
    n_ctx_asked = int(opts.n_ctx)  # resolved before this is called
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


def parts(info: GGUFInfo | Sequence[GGUFInfo]) -> list[GGUFInfo]:
    """A model's GGUF files as a list (a split model has several)."""
    return list(info) if isinstance(info, (list, tuple)) else [info]  # type: ignore[list-item]


def _pad(n: int) -> int:
    return -(-int(n) // CTX_PAD) * CTX_PAD
