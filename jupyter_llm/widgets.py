"""ipywidgets views of the manager: the model picker (``%llm picker``) and memory bars (``%llm mem``).

Both are views: they read the manager's snapshot and events and call its methods; they keep no
state of their own. The picker re-prices its memory estimate on every control change with
:func:`jupyter_llm.estimate.estimate`, which is pure arithmetic over the GGUF header (scanned
once per file here), so dragging a slider stays smooth. Bars are HTML/CSS drawn with
JupyterLab's theme variables (with fallbacks for other front ends), the same colours as the
sidebar's.
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from .display import human_bytes, human_duration
from .options import AUTO, KV_TYPES, LoadOptions

COLORS = {
    "weights": "var(--jp-brand-color1, #1976d2)",
    "kv": "var(--jp-accent-color1, #388e3c)",
    "compute": "var(--jp-warn-color2, #ffb74d)",
    "other": "var(--jp-layout-color4, #9e9e9e)",
    "free": "var(--jp-layout-color2, #eeeeee)",
    "over": "var(--jp-error-color1, #d32f2f)",
}
LABELS = {"weights": "weights", "kv": "KV cache", "compute": "graph", "other": "other processes",
          "free": "free", "over": "missing"}
_TEXT = "color: var(--jp-ui-font-color1, inherit); font-family: var(--jp-ui-font-family, sans-serif)"
_DIM = "color: var(--jp-ui-font-color2, #616161); font-size: var(--jp-ui-font-size0, 11px)"
_ERROR = "color: var(--jp-error-color1, #d32f2f)"
_DEVICE_TTL = 1.0
"""Seconds a device reading is reused while a slider is dragged (NVML and /proc cost ms each)."""


# -- drawing ---------------------------------------------------------------------------------


def bar_html(segments: list[tuple[str, int]], scale: int, *, fits: bool = True) -> str:
    """A stacked bar: ``segments`` are ``(kind, bytes)`` drawn as shares of ``scale``."""
    border = COLORS["over"] if not fits else "var(--jp-border-color1, #bdbdbd)"
    parts = []
    for kind, n in segments:
        if n <= 0 or scale <= 0:
            continue
        width = min(100.0, 100.0 * n / scale)
        parts.append(f'<span class="jp-LLM-seg jp-LLM-seg-{kind}" title="{LABELS[kind]}: {human_bytes(n)}" '
                     f'style="display:block;height:100%;width:{width:.2f}%;background:{COLORS[kind]}"></span>')
    return (f'<div class="jp-LLM-bar{"" if fits else " jp-LLM-bar-over"}" style="display:flex;height:12px;'
            f'margin:3px 0;overflow:hidden;border:1px solid {border};border-radius:3px;'
            f'background:{COLORS["free"]}">{"".join(parts)}</div>')


def legend_html() -> str:
    items = "".join(
        f'<span style="margin-right:10px"><span style="display:inline-block;width:9px;height:9px;'
        f'background:{COLORS[k]};border:1px solid var(--jp-border-color1, #bdbdbd);margin-right:3px">'
        f'</span>{LABELS[k]}</span>' for k in ("weights", "kv", "compute", "other", "free"))
    return f'<div style="{_DIM}">{items}</div>'


def estimate_html(estimate: Any) -> str:
    """Per device: weights, KV and graph against free memory; red beyond what is free."""
    rows = []
    for row in estimate.devices:
        if row.total <= 0:
            continue
        need = row.weights + row.kv + row.compute + row.output
        free = max(row.free if row.free is not None else need, 0)
        room, segments = free, []
        for kind, n in (("weights", row.weights), ("kv", row.kv), ("compute", row.compute + row.output)):
            drawn = min(n, room)
            room -= drawn
            segments.append((kind, drawn))
        segments.append(("free", free - need) if need <= free else ("over", need - free))
        verdict = "" if row.fits else f' — <b style="{_ERROR}">will not fit</b>'
        rows.append(
            f'<div style="{_DIM}">{html.escape(row.device_id)}: weights {human_bytes(row.weights)} · '
            f'KV {human_bytes(row.kv)} · graph {human_bytes(row.compute + row.output)} = '
            f'<b>{human_bytes(row.total)}</b> of {human_bytes(row.free)} free{verdict}</div>'
            + bar_html(segments, max(free, need), fits=row.fits))
    o = estimate.options
    rows.append(f'<div style="{_DIM}">as loaded: {o.gpu_layers} GPU layers, context {estimate.n_ctx}, '
                f'KV {o.kv_type}{", flash attention" if o.flash_attn else ""}, {o.parallel} slot(s)</div>')
    if not estimate.fits and estimate.suggestion():
        rows.append(f'<div style="{_ERROR}">{html.escape(estimate.suggestion())}</div>')
    return f'<div class="jp-LLM-estimate" style="{_TEXT}">{"".join(rows)}</div>'


def _sizes_on(model: dict[str, Any], device: dict[str, Any]) -> tuple[dict[str, int] | None, str]:
    """A loaded model's bytes on a device: measured if llama.cpp reported them, else estimated."""
    for key, sizes in (model.get("measured") or {}).items():
        if key in (device["id"], device.get("backend")):
            return sizes, "measured"
    for row in (model.get("estimate") or {}).get("devices", []):
        if row["device_id"] == device["id"] and row["total"] > 0:
            return row, "estimated"
    return None, ""


def memory_html(snapshot: dict[str, Any], devices: list[str] | None = None) -> str:
    """Every device as a stacked bar (each loaded model's weights / KV / graph, other processes,
    free), then predicted against measured for each loaded model."""
    out = [f'<div class="jp-LLM-memory" style="{_TEXT}">']
    loaded = snapshot.get("loaded", [])
    for device in snapshot.get("devices", []):
        if "error" in device or (devices and device["id"] not in devices):
            continue
        total, ours, segments = device["total_bytes"], 0, []
        for model in loaded:
            sizes, _ = _sizes_on(model, device)
            if sizes:
                graph = sizes["compute"] + sizes["output"]
                segments += [("weights", sizes["weights"]), ("kv", sizes["kv"]), ("compute", graph)]
                ours += sizes["weights"] + sizes["kv"] + graph
        segments += [("other", max(device["used_bytes"] - ours, 0)), ("free", device["free_bytes"])]
        names = ", ".join(m["name"] for m in loaded if _sizes_on(m, device)[0]) or "no model"
        out.append(
            f'<div class="jp-LLM-device" data-device="{html.escape(device["id"])}" style="margin-bottom:6px">'
            f'<b>{html.escape(device["id"])}</b> <span style="{_DIM}">{html.escape(device["name"])} — '
            f'{human_bytes(device["free_bytes"])} free of {human_bytes(total)}; {html.escape(names)}</span>'
            + bar_html(segments, total) + "</div>")
    out.append(legend_html())
    if loaded:
        out.append('<table class="jp-LLM-compare" style="border-collapse:collapse;margin-top:6px;'
                   f'{_DIM}"><tr><th align="left">model</th><th align="left">device</th><th>weights</th>'
                   '<th>KV</th><th>graph</th><th>predicted</th><th>measured</th><th>error</th></tr>')
        for model in loaded:
            out += _comparison_rows(model)
        out.append("</table>")
    else:
        out.append(f'<div style="{_DIM}">No model is loaded: <code>%llm load smollm2</code> loads the '
                   'default model.</div>')
    out.append("</div>")
    return "".join(out)


def _comparison_rows(model: dict[str, Any]) -> list[str]:
    from .estimate import device_for_backend

    predicted = {r["device_id"]: r for r in (model.get("estimate") or {}).get("devices", []) if r["total"] > 0}
    measured = {device_for_backend(k, []): v for k, v in (model.get("measured") or {}).items()}
    rows = []
    for device in sorted(set(predicted) | set(measured)):
        p, m = predicted.get(device), measured.get(device)
        shown = m or p or {}
        error = f'{(m["total"] - p["total"]) / p["total"] * 100:+.1f} %' if p and m and p["total"] else "—"
        rows.append(
            f'<tr data-model="{html.escape(model["name"])}"><td>{html.escape(model["name"])}</td>'
            f'<td>{html.escape(device)}</td><td align="right">{human_bytes(shown.get("weights"))}</td>'
            f'<td align="right">{human_bytes(shown.get("kv"))}</td>'
            f'<td align="right">{human_bytes((shown.get("compute") or 0) + (shown.get("output") or 0))}</td>'
            f'<td align="right">{human_bytes(p["total"] if p else None)}</td>'
            f'<td align="right">{human_bytes(m["total"] if m else None)}</td><td align="right">{error}</td></tr>')
    return rows


# -- keeping views current ---------------------------------------------------------------------


class _Coalesced:
    """Runs ``fn`` in a thread at most once per ``interval`` however often it is poked, and
    every ``period`` seconds when not poked (0: only when poked), until stopped."""

    def __init__(self, fn: Callable[[], None], *, interval: float = 0.25, period: float = 0.0) -> None:
        self._fn, self.interval, self.period = fn, interval, period
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="jupyter_llm-widget", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            woken = self._wake.wait(self.period if self.period > 0 else None)
            self._wake.clear()
            if self._stop.is_set():
                return
            if woken or self.period > 0:
                try:
                    self._fn()
                except Exception:  # a failed redraw must not end the updates
                    pass
            self._stop.wait(self.interval)


def _scan(path: Any) -> Any:
    from .gguf_scan import scan_cached  # deferred: keeps %load_ext instant

    return scan_cached(path)


def _manager(manager: Any) -> Any:
    if manager is not None:
        return manager
    from .manager import get_manager

    return get_manager()


# -- the memory widget -------------------------------------------------------------------------


class MemoryWidget(widgets.VBox):
    """Live per-device memory bars and predicted-vs-measured rows for every loaded model."""

    def __init__(self, manager: Any = None, *, period: float = 2.0, devices: list[str] | None = None) -> None:
        self.manager = _manager(manager)
        self.devices = devices
        self.html = widgets.HTML()
        super().__init__([self.html])
        self.add_class("jp-LLM-memory-widget")
        self.refresh()
        self._updater = _Coalesced(self.refresh, period=period)
        self._unsubscribe = self.manager.subscribe(lambda event: self._updater.poke())

    def refresh(self) -> None:
        """Redraw from the manager's snapshot now."""
        self.html.value = memory_html(self.manager.snapshot(), self.devices)

    def close(self) -> None:
        self._unsubscribe()
        self._updater.stop()
        super().close()


def memory_widget(manager: Any = None, *, period: float = 2.0, devices: list[str] | None = None) -> MemoryWidget:
    """Live memory bars per device (weights / KV / graph / other processes / free) with predicted
    against measured for each loaded model; redrawn on every load, use and unload, and every
    ``period`` seconds. ``devices`` limits the bars to some device ids (e.g. ``["GPU0"]``)."""
    return MemoryWidget(manager, period=period, devices=devices)


def _escape(text: Any) -> str:
    return html.escape(str(text))


def loaded_html(snapshot: dict[str, Any]) -> str:
    """One line per loaded model: context, worker pid, memory measured, when it unloads."""
    lines = []
    now = time.time()
    for m in snapshot.get("loaded", []):
        held = sum(s.get("total", 0) for s in (m.get("measured") or {}).values())
        expires = "kept loaded" if m.get("expires_at") is None else (
            "busy" if m.get("active") else f"unloads in {human_duration(max(0.0, m['expires_at'] - now))}")
        lines.append(f'<div data-model="{_escape(m["name"])}"><b>{_escape(m["name"])}</b> '
                     f'<span style="{_DIM}">ctx {m.get("n_ctx")} · pid {m.get("pid")} · '
                     f'{human_bytes(held)} measured · {expires}</span></div>')
    return "".join(lines) or f'<div style="{_DIM}">No model is loaded.</div>'


# -- the picker --------------------------------------------------------------------------------


class ModelPicker(widgets.VBox):
    """Pick a model, see what it would take on each device as the options move, pull, load, unload."""

    def __init__(self, manager: Any = None) -> None:
        self.manager = _manager(manager)
        self.estimate: Any = None
        """The latest :class:`~jupyter_llm.estimate.MemoryEstimate` (None: not cached yet)."""
        self._syncing = False
        self._devices_cache: tuple[float, list[Any]] = (0.0, [])
        self._progress_at = 0.0
        wide, style = widgets.Layout(width="440px"), {"description_width": "110px"}
        self.model = widgets.Dropdown(description="Model", style=style, layout=wide)
        self.pull_name = widgets.Text(description="Pull", style=style, layout=widgets.Layout(width="360px"),
                                      placeholder="smollm2, hf.co/USER/REPO:Q4_K_M, pip:PKG, /path/model.gguf")
        self.pull_button = widgets.Button(description="Pull", icon="download", layout=widgets.Layout(width="74px"))
        self.pull_progress = widgets.FloatProgress(min=0.0, max=1.0, layout=widgets.Layout(width="440px"))
        self.pull_progress.layout.display = "none"
        self.pull_status = widgets.HTML()
        self.gpu_layers = widgets.IntSlider(description="GPU layers", min=0, max=1, style=style, layout=wide)
        self.gpu_auto = widgets.Checkbox(description="auto", value=True, indent=False)
        self.context = widgets.SelectionSlider(description="Context", options=[4096], value=4096, style=style,
                                               layout=wide)
        self.ctx_auto = widgets.Checkbox(description="auto", value=False, indent=False)
        self.kv_type = widgets.Dropdown(description="KV cache", options=list(KV_TYPES), value="f16", style=style)
        self.flash_attn = widgets.Checkbox(description="flash attention", value=False, style=style)
        self.parallel = widgets.IntSlider(description="Parallel slots", min=1, max=16, value=1, style=style,
                                          layout=wide)
        self.estimate_view = widgets.HTML()
        self.load_button = widgets.Button(description="Load", button_style="primary", icon="play")
        self.unload_button = widgets.Button(description="Unload", icon="stop")
        self.status = widgets.HTML()
        self.loaded_view = widgets.HTML()
        row = widgets.HBox
        super().__init__([
            self.model, row([self.pull_name, self.pull_button]), self.pull_progress, self.pull_status,
            row([self.gpu_layers, self.gpu_auto]), row([self.context, self.ctx_auto]), self.kv_type,
            self.flash_attn, self.parallel, self.estimate_view, row([self.load_button, self.unload_button]),
            self.status, self.loaded_view,
        ])
        self.add_class("jp-LLM-picker")
        for control in (self.gpu_layers, self.gpu_auto, self.context, self.ctx_auto, self.kv_type,
                        self.flash_attn, self.parallel):
            control.observe(self._on_control, names="value")
        self.model.observe(lambda _: self._on_model(), names="value")
        self.pull_button.on_click(lambda _: self.pull(self.pull_name.value))
        self.load_button.on_click(lambda _: self.load())
        self.unload_button.on_click(lambda _: self.unload())
        self._fill_models()
        self._on_model()
        self._refresh_loaded()
        self._updater = _Coalesced(self._on_manager_change)
        self._unsubscribe = self.manager.subscribe(self._on_event)

    # -- what the controls say -----------------------------------------------------------------

    def options(self) -> LoadOptions:
        """The load options the controls describe (``"auto"`` where the boxes are ticked)."""
        return LoadOptions(
            gpu_layers=AUTO if self.gpu_auto.value else int(self.gpu_layers.value),
            n_ctx=AUTO if self.ctx_auto.value else int(self.context.value),
            kv_type=self.kv_type.value, flash_attn=bool(self.flash_attn.value), parallel=int(self.parallel.value),
        )

    def reprice(self) -> Any:
        """Estimate the selected model with the current options and redraw the bars."""
        from .estimate import estimate

        record = self._record()
        if record is None:
            self.estimate = None
            self.estimate_view.value = (
                f'<div style="{_DIM}">{_escape(self.model.value)} is not cached: pull it (or press Load, which '
                'pulls first) to see its memory.</div>' if self.model.value else
                f'<div style="{_DIM}">No model yet: pull one, e.g. smollm2.</div>')
            return None
        try:
            self.estimate = estimate(_scan(record.path), self.options(), self._devices())
        except Exception as exc:
            self.estimate = None
            self.estimate_view.value = f'<div style="{_ERROR}">{_escape(exc)}</div>'
            return None
        with self.hold_sync():
            self._syncing = True
            try:  # show what "auto" chose on the disabled slider
                self.gpu_layers.disabled = self.gpu_auto.value
                self.context.disabled = self.ctx_auto.value
                if self.gpu_auto.value:
                    self.gpu_layers.value = min(int(self.estimate.options.gpu_layers), self.gpu_layers.max)
                if self.ctx_auto.value:
                    self.context.options = sorted(set(self.context.options) | {self.estimate.options.n_ctx})
                    self.context.value = self.estimate.options.n_ctx
            finally:
                self._syncing = False
            self.estimate_view.value = estimate_html(self.estimate)
        return self.estimate

    def _record(self) -> Any:
        name = self.model.value
        return self.manager.store.get(name) if name else None

    def _devices(self) -> list[Any]:
        at, devices = self._devices_cache
        if time.monotonic() - at > _DEVICE_TTL or not devices:
            devices = self.manager.devices()
            self._devices_cache = (time.monotonic(), devices)
        return devices

    def _on_control(self, change: Any) -> None:
        if self._syncing:
            return
        if change["owner"] is self.kv_type and change["new"] != "f16" and not self.flash_attn.value:
            self._syncing = True
            try:  # llama.cpp refuses a quantized V cache without flash attention
                self.flash_attn.value = True
            finally:
                self._syncing = False
        self.reprice()

    def _on_model(self) -> None:
        record = self._record()
        if record is not None:
            info = _scan(record.path)
            n_layer = int(info.block_count or 0)
            train = int(info.context_length or 4096)
            sizes = [n for n in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144) if n < train]
            with self.hold_sync():
                self._syncing = True
                try:
                    keep = self.context.value
                    self.context.options = [*sizes, train]
                    self.context.value = keep if keep in self.context.options else min(4096, train)
                    self.gpu_layers.max = n_layer + 1  # the output layer counts as one more
                finally:
                    self._syncing = False
        self.reprice()

    def _fill_models(self) -> None:
        from .names import aliases

        records = self.manager.list()
        cached = {r.name for r in records}
        choices = [(f"{r.name} — {human_bytes(r.size)} {r.summary.get('quantization') or ''}".rstrip(), r.name)
                   for r in records]
        try:
            table = aliases()
        except Exception:  # a broken user alias file: cached models still work
            table = {}
        choices += [(f"{a.name} — pull: {a.description}", a.name) for a in table.values() if a.name not in cached]
        current = self.model.value
        self._syncing = True
        try:
            self.model.options = choices
            values = [v for _, v in choices]
            if current in values:
                self.model.value = current
            elif values:
                self.model.value = values[0]  # the first cached model (ipywidgets 8 selects none)
        finally:
            self._syncing = False

    # -- actions (in threads: the kernel stays free while a model pulls or loads) --------------

    def pull(self, name: str) -> threading.Thread:
        """Pull ``name`` with a live progress bar; select it when done."""
        name = name.strip()

        def work() -> str:
            record = self.manager.pull(name)
            self._fill_models()
            self.model.value = record.name
            return f"{_escape(record.name)}: {human_bytes(record.size)} pulled"

        return self._run(work, self.pull_status, f"pulling {_escape(name)}…")

    def load(self, force: bool = False) -> threading.Thread:
        """Load the selected model with the current options (pulling it first if needed)."""
        name, options = self.model.value, self.options()

        def work() -> str:
            model = self.manager.load(name, options, force=force)
            return f"{_escape(model.name)} loaded in worker pid {model.runtime.pid}"

        return self._run(work, self.status, f"loading {_escape(name)}…")

    def unload(self) -> threading.Thread:
        """Unload the selected model."""
        name = self.model.value

        def work() -> str:
            return "unloaded " + _escape(", ".join(self.manager.unload(name)))

        return self._run(work, self.status, f"unloading {_escape(name)}…")

    def _run(self, work: Callable[[], Any], target: widgets.HTML, busy: str) -> threading.Thread:
        target.value = f'<span style="{_DIM}">{busy}</span>'

        def run() -> None:
            try:
                target.value = f"<span>{work()}</span>"
            except Exception as exc:  # shown where the user looks, never a traceback in a thread
                target.value = f'<span style="{_ERROR}">{_escape(exc)}</span>'

        thread = threading.Thread(target=run, name="jupyter_llm-picker", daemon=True)
        thread.start()
        return thread

    # -- following the manager -----------------------------------------------------------------

    def _on_event(self, event: dict[str, Any]) -> None:
        if event["type"] != "pull":
            self._updater.poke()
            return
        progress = event["progress"]
        final = progress["status"] in ("success", "error")
        now = time.monotonic()
        if not final and now - self._progress_at < 0.1:
            return  # hundreds of events a second: the bar needs ten
        self._progress_at = now
        with self.hold_sync():
            self.pull_progress.layout.display = "none" if final else None
            total = progress.get("total") or 0
            self.pull_progress.value = progress["completed"] / total if total else 0.0
            self.pull_progress.description = f"{human_bytes(progress['completed'])}" if total else ""

    def _on_manager_change(self) -> None:
        self._fill_models()
        self._refresh_loaded()
        self._devices_cache = (0.0, [])  # a load or unload moved free memory: price against it
        self.reprice()

    def _refresh_loaded(self) -> None:
        self.loaded_view.value = loaded_html(self.manager.snapshot())

    def close(self) -> None:
        self._unsubscribe()
        self._updater.stop()
        super().close()


def picker(manager: Any = None) -> ModelPicker:
    """The model picker: cached models and pullable aliases, a pull box with progress, load
    options whose per-device estimate re-prices live as they move, Load and Unload buttons, and
    the loaded models."""
    return ModelPicker(manager)
