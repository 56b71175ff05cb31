"""The model picker (``%llm picker``): choose, pull, price, load and unload a model.

A view of the manager like every other: its memory estimate comes from
:meth:`~jupyter_llm.manager.ModelManager.estimate` (the same path as ``%llm estimate`` and the
sidebar), which is arithmetic over a cached header scan against a device reading the manager
keeps for a second, so dragging a slider stays smooth. A model not pulled yet is priced only
once asked (the Estimate button): its remote header is read in a thread, never in the kernel's,
and afterwards the sliders re-price it from the manager's in-memory copy (``remote="cached"``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from ..errors import JupyterLLMError, ModelNotFoundError
from ..options import AUTO, KV_TYPES, LoadOptions
from .display import human_bytes
from .widgets import _DIM, _ERROR, Coalesced, escape, estimate_html, loaded_html, view_manager


class ModelPicker(widgets.VBox):
    """Pick a model, see what it would take on each device as the options move, pull, load, unload."""

    def __init__(self, manager: Any = None) -> None:
        self.manager = view_manager(manager)
        self.estimate: Any = None
        """The latest :class:`~jupyter_llm.memory.estimate.MemoryEstimate` (None: not cached yet)."""
        self._syncing = False
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
        self.flash_attn = widgets.Checkbox(description="flash attention", value=LoadOptions().flash_attn, style=style)
        self.parallel = widgets.IntSlider(description="Parallel slots", min=1, max=16, value=1, style=style,
                                          layout=wide)
        # llama.cpp rpc-servers; only asked when the field is left (each estimate connects to them)
        self.rpc = widgets.Text(description="RPC servers", style=style, layout=wide, continuous_update=False,
                                placeholder="host:port, … (llama.cpp rpc-server; trusted networks only)")
        self.estimate_view = widgets.HTML()
        self.estimate_button = widgets.Button(
            description="Estimate", icon="search", layout=widgets.Layout(width="110px"),
            tooltip="read the model's header from its source (a few MiB) to see its memory before pulling it")
        self.estimate_button.layout.display = "none"
        self.load_button = widgets.Button(description="Load", button_style="primary", icon="play")
        self.unload_button = widgets.Button(description="Unload", icon="stop")
        self.status = widgets.HTML()
        self.loaded_view = widgets.HTML()
        row = widgets.HBox
        super().__init__([
            self.model, row([self.pull_name, self.pull_button]), self.pull_progress, self.pull_status,
            row([self.gpu_layers, self.gpu_auto]), row([self.context, self.ctx_auto]), self.kv_type,
            self.flash_attn, self.parallel, self.rpc, self.estimate_view,
            row([self.estimate_button, self.load_button, self.unload_button]),
            self.status, self.loaded_view,
        ])
        self.add_class("jp-LLM-picker")
        for control in (self.gpu_layers, self.gpu_auto, self.context, self.ctx_auto, self.kv_type,
                        self.flash_attn, self.parallel, self.rpc):
            control.observe(self._on_control, names="value")
        self.model.observe(lambda _: self._on_model(), names="value")
        self.pull_button.on_click(lambda _: self.pull(self.pull_name.value))
        self.estimate_button.on_click(lambda _: self.estimate_remote())
        self.load_button.on_click(lambda _: self.load())
        self.unload_button.on_click(lambda _: self.unload())
        self._fill_models()
        self._on_model()
        self._refresh_loaded()
        self._updater = Coalesced(self._on_manager_change)
        self._unsubscribe = self.manager.subscribe(self._on_event)

    # -- what the controls say -----------------------------------------------------------------

    def options(self) -> LoadOptions:
        """The load options the controls describe (``"auto"`` where the boxes are ticked)."""
        return LoadOptions(
            gpu_layers=AUTO if self.gpu_auto.value else int(self.gpu_layers.value),
            n_ctx=AUTO if self.ctx_auto.value else int(self.context.value),
            kv_type=self.kv_type.value, flash_attn=bool(self.flash_attn.value), parallel=int(self.parallel.value),
            rpc=tuple(self.rpc.value.split(",")),  # LoadOptions parses and checks them
        )

    def reprice(self) -> Any:
        """Estimate the selected model with the current options and redraw the bars."""
        name = self.model.value
        self.estimate_button.layout.display = "none"
        try:  # a model not pulled: only a header read before (Estimate reads one, in a thread)
            self.estimate = self.manager.estimate(name, self.options(), remote="cached") if name else None
        except ModelNotFoundError:
            self.estimate = None
        except Exception as exc:
            self.estimate = None
            self.estimate_view.value = f'<div style="{_ERROR}">{escape(exc)}</div>'
            return None
        if self.estimate is None:
            self.estimate_button.layout.display = None if name else "none"
            self.estimate_view.value = (
                f'<div style="{_DIM}">{escape(self.model.value)} is not cached: press Estimate to read its '
                'header (a few MiB) and see its memory before pulling it, or pull it (Load pulls first).</div>'
                if self.model.value else f'<div style="{_DIM}">No model yet: pull one, e.g. smollm2.</div>')
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
        info = self._info()
        if info is not None:
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

    def _info(self) -> Any:
        """The selected model's header facts: the store's, else a remote header read for an
        estimate before; None when neither exists yet."""
        name = self.model.value
        try:
            return self.manager.show(name)["info"] if name else None
        except ModelNotFoundError:
            pass
        try:  # only the header matters here, so any small load will do (the controls may be mid-edit)
            return self.manager.estimate(name, LoadOptions(gpu_layers=0, n_ctx=512), remote="cached").header
        except JupyterLLMError:
            return None

    def estimate_remote(self) -> threading.Thread:
        """Price the selected model before pulling it: its header is read from the source in a
        thread (a dead host fails within seconds, naming its address), then the sliders follow it."""
        name, options = self.model.value, self.options()
        self.estimate_button.disabled = True

        def work() -> str:
            try:
                estimate = self.manager.estimate(name, options)
            finally:
                self.estimate_button.disabled = False
            if self.model.value == name:
                self._on_model()  # the header is cached now: the sliders get its layers and context
            return escape(estimate.notes[-1] if estimate.notes else f"{name}: estimated")

        return self._run(work, self.status, f"reading the header of {escape(name)}…")

    def _fill_models(self) -> None:
        from ..store.names import aliases

        records = self.manager.models()
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
            return f"{escape(record.name)}: {human_bytes(record.size)} pulled"

        return self._run(work, self.pull_status, f"pulling {escape(name)}…")

    def load(self, force: bool = False) -> threading.Thread:
        """Load the selected model with the current options (pulling it first if needed)."""
        name = self.model.value

        def work() -> str:  # the options in here: a bad rpc field is an error in the status line
            model = self.manager.load(name, self.options(), force=force)
            return f"{escape(model.name)} loaded in worker pid {model.runtime.pid}"

        return self._run(work, self.status, f"loading {escape(name)}…")

    def unload(self) -> threading.Thread:
        """Unload the selected model."""
        name = self.model.value

        def work() -> str:
            return "unloaded " + escape(", ".join(self.manager.unload(name)))

        return self._run(work, self.status, f"unloading {escape(name)}…")

    def _run(self, work: Callable[[], Any], target: widgets.HTML, busy: str) -> threading.Thread:
        target.value = f'<span style="{_DIM}">{busy}</span>'

        def run() -> None:
            try:
                target.value = f"<span>{work()}</span>"
            except Exception as exc:  # shown where the user looks, never a traceback in a thread
                target.value = f'<span style="{_ERROR}">{escape(exc)}</span>'

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
