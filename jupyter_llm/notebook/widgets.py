"""ipywidgets views of the manager: memory bars (``%llm mem``) and what the picker draws with.

Views read the manager's snapshot and events and call its methods; they keep no state of their
own. Bars are HTML/CSS drawn with JupyterLab's theme variables (with fallbacks for other front
ends), the same colours as the sidebar's. The picker (``%llm picker``) is in
:mod:`jupyter_llm.notebook.picker`.
"""

from __future__ import annotations

import html
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from .display import human_bytes, human_duration

log = logging.getLogger("jupyter_llm")

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
    out.append(remotes_html(snapshot.get("remotes") or []))
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


def _known_bytes(n: Any) -> str:
    """Bytes a remote reported, or "?" for what it did not report (unknown, not zero)."""
    return human_bytes(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else "?"


def remotes_html(remotes: list[dict[str, Any]]) -> str:
    """Each remote engine's memory as it reports it, one row per model it has loaded (Ollama's
    ``/api/ps`` size and size in VRAM; llama-server reports no sizes: "?"). The states are the
    registry's last poll (:meth:`~jupyter_llm.remote.registry.Remotes.snapshot` never waits), so
    a remote that has not answered yet shows "checking", one that cannot be reached says so."""
    if not remotes:
        return ""
    out = ['<div class="jp-LLM-remotes" style="margin-top:6px"><b>Remote engines</b>']
    for r in remotes:
        state = str(r.get("state") or "unknown")
        head = (f'<div class="jp-LLM-remote" data-remote="{escape(r.get("name"))}" data-state="{escape(state)}">'
                f'<b>{escape(r.get("name"))}</b> <span style="{_DIM}">{escape(r.get("url"))} ({escape(r.get("api"))})'
                f' — ')
        if state != "reachable":
            error = (r.get("error") or "").split("; ")[0]  # what happened; `%llm remote list` says what to do
            shown = {"checking": "checking…", "unknown": "not asked yet"}.get(state, state)
            style = _DIM if state in ("checking", "unknown") else _ERROR
            out.append(head + f'<span style="{style}">{escape(shown)}{": " + escape(error) if error else ""}'
                       "</span></span></div>")
            continue
        running = r.get("running") or []
        out.append(head + (f"{len(running)} model(s) loaded" if running else "no model loaded") + "</span></div>")
        if running:
            out.append(f'<table class="jp-LLM-remote-models" style="border-collapse:collapse;{_DIM}"><tr>'
                       '<th align="left">model</th><th>size</th><th>in VRAM</th><th>context</th><th>slots</th></tr>')
            for m in running:
                slots = "?" if m.get("slots") is None else (
                    f'{m["busy"]}/{m["slots"]} busy' if m.get("busy") is not None else str(m["slots"]))
                ctx = m.get("context_length")
                out.append(f'<tr data-remote-model="{escape(m.get("name"))}"><td>{escape(m.get("name"))}</td>'
                           f'<td align="right">{_known_bytes(m.get("size"))}</td>'
                           f'<td align="right">{_known_bytes(m.get("size_vram"))}</td>'
                           f'<td align="right">{escape(ctx) if ctx is not None else "?"}</td>'
                           f'<td align="right">{escape(slots)}</td></tr>')
            out.append("</table>")
    out.append("</div>")
    return "".join(out)


def _comparison_rows(model: dict[str, Any]) -> list[str]:
    from ..memory.estimate import device_for_backend

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


class Coalesced:
    """Runs ``fn`` in a thread at most once per ``interval`` however often it is poked, and
    every ``period`` seconds when not poked (0: only when poked), until stopped."""

    def __init__(self, fn: Callable[[], None], *, interval: float = 0.25, period: float = 0.0) -> None:
        self._fn, self.interval, self.period = fn, interval, period
        self._wake, self._stop = threading.Event(), threading.Event()
        self._failed = False
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
                except Exception:  # a failed redraw must not end the updates; said once
                    if not self._failed:
                        self._failed = True
                        log.exception("a jupyter_llm widget could not redraw")
            self._stop.wait(self.interval)


def view_manager(manager: Any) -> Any:
    """The manager a view shows: the one given, else the kernel's."""
    if manager is not None:
        return manager
    from ..manager import get_manager

    return get_manager()


# -- the memory widget -------------------------------------------------------------------------


class MemoryWidget(widgets.VBox):
    """Live per-device memory bars and predicted-vs-measured rows for every loaded model."""

    def __init__(self, manager: Any = None, *, period: float = 2.0, devices: list[str] | None = None) -> None:
        self.manager = view_manager(manager)
        self.devices = devices
        self.html = widgets.HTML()
        super().__init__([self.html])
        self.add_class("jp-LLM-memory-widget")
        self.refresh()
        self._updater = Coalesced(self.refresh, period=period)
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


def escape(text: Any) -> str:
    return html.escape(str(text))


def loaded_html(snapshot: dict[str, Any]) -> str:
    """One line per loaded model: context, worker pid, memory measured, when it unloads."""
    lines = []
    now = time.time()
    for m in snapshot.get("loaded", []):
        held = sum(s.get("total", 0) for s in (m.get("measured") or {}).values())
        expires = "kept loaded" if m.get("expires_at") is None else (
            "busy" if m.get("active") else f"unloads in {human_duration(max(0.0, m['expires_at'] - now))}")
        lines.append(f'<div data-model="{escape(m["name"])}"><b>{escape(m["name"])}</b> '
                     f'<span style="{_DIM}">ctx {m.get("n_ctx")} · pid {m.get("pid")} · '
                     f'{human_bytes(held)} measured · {expires}</span></div>')
    return "".join(lines) or f'<div style="{_DIM}">No model is loaded.</div>'
