"""Displayable objects for the magics: tables and reports with an HTML and a plain-text form.

Each object returned by a magic renders itself (``_repr_html_`` in a notebook, ``__repr__`` in a
terminal) and keeps the data it shows (``.rows`` / ``.data``) so code can use it too.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

MiB = 1024 * 1024
BUFFERS = ("weights", "kv", "compute", "output")


def human_bytes(n: float | None) -> str:
    """1536 → '1.5 KiB'; None → '—'."""
    if n is None:
        return "—"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def human_count(n: float | None) -> str:
    """134515008 → '135M'."""
    if n is None:
        return "—"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "forever"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Table:
    """A titled table: HTML in notebooks, aligned text in terminals."""

    def __init__(self, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None,
                 empty: str = "(nothing)", footer: str | None = None, data: Any = None,
                 sections: Sequence[Table] = ()) -> None:
        self.columns = list(columns)
        self.rows = [[("" if c is None else str(c)) for c in row] for row in rows]
        self.title = title
        self.empty = empty
        self.footer = footer
        self.data = data
        self.sections = list(sections)
        """Further tables shown after this one (e.g. ``show``'s bytes per layer)."""

    def __repr__(self) -> str:
        lines = [self.title] if self.title else []
        if not self.rows:
            lines.append(self.empty)
        else:
            widths = [max(len(col), *(len(r[i]) for r in self.rows)) for i, col in enumerate(self.columns)]
            lines.append("  ".join(c.ljust(w) for c, w in zip(self.columns, widths, strict=True)).rstrip())
            for row in self.rows:
                lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if self.footer:
            lines.append(self.footer)
        for section in self.sections:
            lines += ["", repr(section)]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        parts = ['<div class="jp-LLM-table">']
        if self.title:
            parts.append(f"<b>{html.escape(self.title)}</b>")
        if not self.rows:
            parts.append(f"<p>{html.escape(self.empty)}</p>")
        else:
            head = "".join(f"<th style='text-align:left'>{html.escape(c)}</th>" for c in self.columns)
            body = "".join(
                "<tr>" + "".join(f"<td style='text-align:left'>{html.escape(c)}</td>" for c in row) + "</tr>"
                for row in self.rows
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        if self.footer:
            parts.append(f"<p>{html.escape(self.footer)}</p>")
        parts.append("</div>")
        parts += [section._repr_html_() for section in self.sections]
        return "".join(parts)


class Message:
    """A short note (e.g. "removed 1 file") shown as text."""

    def __init__(self, text: str, data: Any = None) -> None:
        self.text = text
        self.data = data

    def __repr__(self) -> str:
        return self.text

    def _repr_markdown_(self) -> str:
        return self.text


def models_table(records: Sequence[Any]) -> Table:
    rows = []
    for r in records:
        s = r.summary or {}
        rows.append([r.name, human_bytes(r.size), s.get("quantization") or "—",
                     human_count(s.get("parameters")), s.get("architecture") or "—", r.source, r.files[0]])
    return Table(["name", "size", "quant", "params", "arch", "source", "location"], rows,
                 title="Cached models", empty="No models yet: `%llm pull smollm2` fetches the default model.",
                 data=list(records))


def _capabilities(record: Any, info: Any) -> list[str]:
    from ..capabilities import capabilities

    return capabilities(info, ollama_template=(getattr(record, "ollama", None) or {}).get("template") or None)


def show_report(record: Any, info: Any) -> Table:
    import json

    template = info.chat_template or ""
    rows = [
        ["name", record.name],
        ["architecture", info.architecture],
        ["model name", info.model_name or "—"],
        ["parameters", f"{human_count(info.parameter_count)} ({info.parameter_count:,})"],
        ["quantization", info.file_type],
        ["context length (trained)", info.context_length],
        ["layers", info.block_count],
        ["embedding length", info.embedding_length],
        ["heads / KV heads", f"{info.head_count} / {info.head_count_kv}"],
        ["head dim", info.head_dim],
        ["vocabulary", info.vocab_size],
        ["weights", human_bytes(info.weights_bytes)],
        ["bytes per layer", _per_layer(info)],
        ["chat template", _one_line(template, 120) or "— (none)"],
        ["capabilities", ", ".join(_capabilities(record, info))],
    ]
    # An Ollama model's manifest layers: its own template, system prompt and parameters, which
    # Ollama uses instead of the GGUF's.
    layers = getattr(record, "ollama", None) or {}
    if layers.get("template"):
        rows.append(["Ollama template", _one_line(layers["template"], 120)])
    if layers.get("system"):
        rows.append(["Ollama system prompt", _one_line(layers["system"], 200)])
    if layers.get("params"):
        rows.append(["Ollama params", json.dumps(layers["params"], sort_keys=True)])
    rows += [
        ["license", _one_line(info.license or layers.get("license") or "", 200) or "—"],
        ["sha256", record.sha256 or "— (not verified: local file)"],
        ["source", record.source],
        ["file", record.files[0] + (f" (+{len(record.files) - 1} parts)" if len(record.files) > 1 else "")],
    ]
    for key, value in sorted((record.details or {}).items()):
        if key in ("template", "system", "license", "params") or value in (None, "", [], {}):
            continue
        rows.append([key, value if not isinstance(value, (list, dict)) else str(value)[:200]])
    return Table(["field", "value"], rows, title=f"Model {record.name}", data={"record": record, "info": info},
                 sections=[layer_table(info)])


def layer_table(info: Any) -> Table:
    """Weight bytes of each repeating layer (identical neighbours as one range ``0–29``), then
    of each tensor outside the layers (embedding, output head…): what offloading N layers moves."""
    rows = []
    runs: list[list[int]] = []  # [first, last, bytes]
    for index, size in info.layer_bytes().items():
        if runs and runs[-1][1] == index - 1 and runs[-1][2] == size:
            runs[-1][1] = index
        else:
            runs.append([index, index, size])
    for first, last, size in runs:
        rows.append([str(first) if first == last else f"{first}–{last}", human_bytes(size),
                     human_bytes(size * (last - first + 1))])
    for tensor in info.non_layer_tensors():
        rows.append([tensor.name, "", human_bytes(tensor.n_bytes)])
    return Table(["layers", "bytes per layer", "bytes"], rows, title="Bytes per layer",
                 footer=f"weights in all: {human_bytes(info.weights_bytes)}", data=info.layer_bytes())


def _per_layer(info: Any) -> str:
    sizes = info.layer_bytes()
    if not sizes:
        return "—"
    values = set(sizes.values())
    if len(values) == 1:
        return f"{human_bytes(values.pop())} × {len(sizes)} layers (table below)"
    return f"{human_bytes(min(values))}–{human_bytes(max(values))} over {len(sizes)} layers (table below)"


def devices_table(devices: Sequence[Any]) -> Table:
    rows = [[d.id, d.kind, d.name, d.backend or "—", human_bytes(d.total_bytes), human_bytes(d.used_bytes),
             human_bytes(d.free_bytes)] for d in devices]
    return Table(["device", "kind", "name", "llama.cpp backend", "total", "used", "free"], rows, title="Devices",
                 data=list(devices))


def estimate_table(name: str, estimate: Any) -> Table:
    rows = []
    for row in estimate.devices:
        rows.append([row.device_id, human_bytes(row.weights), human_bytes(row.kv), human_bytes(row.compute),
                     human_bytes(row.output), human_bytes(row.total), human_bytes(row.free),
                     "yes" if row.fits else "NO"])
    opts = estimate.options
    title = (f"Estimate for {name}: gpu_layers={opts.gpu_layers}, ctx={opts.n_ctx}, kv={opts.kv_type}, "
             f"flash_attn={'on' if opts.flash_attn else 'off'}, parallel={opts.parallel}")
    # whether it fits and what would, then how it was priced (a model not pulled: its remote header)
    footer = "\n".join([estimate.verdict(), *estimate.notes])
    return Table(["device", "weights", "KV cache", "graph", "output", "total", "free", "fits"], rows,
                 title=title, footer=footer, data=estimate)


def load_report(model: Any) -> Table:
    """Measured per-device buffers beside the estimate, with the error in percent."""
    measured = model.to_dict()["measured"]  # keyed by the estimate's device ids (the manager's doing)
    est = {row.device_id: row for row in model.estimate.devices} if model.estimate else {}
    rows = []
    for device, sizes in measured.items():
        e = est.get(device)
        for part in BUFFERS:
            m = sizes.get(part, 0) or 0
            p = getattr(e, part, None) if e is not None else None
            err = f"{(p - m) / m * 100:+.1f} %" if p is not None and m else "—"
            rows.append([device, part, human_bytes(p), human_bytes(m), err])
    report = model.report
    title = (f"Loaded {model.name} in worker pid {model.runtime.pid}: ctx={getattr(report, 'n_ctx', '?')}, "
             f"gpu_layers={model.options.gpu_layers}, keep_alive={human_duration(model.options.keep_alive)}")
    # what the load did beside loading: options of the last load reused, models evicted, notes
    repack = getattr(model, "repack", None)  # repacked or not, and why; said once if a notice says it
    shown = [repack.describe()] if repack is not None and repack.shown and not repack.notice else []
    footer = "\n".join([*model.notices, *shown]) or None
    return Table(["device", "buffer", "estimated", "measured", "error"], rows, title=title, footer=footer,
                 data=model)


def ps_table(models: Sequence[Any]) -> Table:
    import time

    rows = []
    for m in models:
        d = m.to_dict()
        placement = ", ".join(
            f"{dev} {human_bytes(sum(sizes.get(part, 0) for part in BUFFERS))}"
            for dev, sizes in d["measured"].items()
        ) or "—"
        expires = "never" if m.expires_at is None else (
            "busy" if m.active else f"in {human_duration(max(0.0, m.expires_at - time.time()))}")
        rows.append([m.name, human_bytes(m.record.size), placement, d["n_ctx"], d["pid"], expires])
    return Table(["name", "size", "placement", "ctx", "pid", "unloads"], rows, title="Loaded models",
                 empty="No model is loaded: `%llm load smollm2` loads the default model.", data=list(models))


def _one_line(text: str, width: int) -> str:
    flat = text.replace("\n", "⏎")
    return flat if len(flat) <= width else flat[: width - 1] + "…"
