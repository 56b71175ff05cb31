"""One progress source for slow work (pulls), fanned out to every view.

A pull emits :class:`PullProgress` events; listeners turn them into a tqdm bar (text in a
terminal, an ipywidgets bar in a notebook, see :func:`bar_class`), the sidebar's state, or the
HTTP API's NDJSON stream. The statuses follow Ollama's pull stream ("pulling manifest",
"downloading", "verifying sha256 digest", "success") so the API can pass them through.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("jupyter_llm")


@dataclass(frozen=True)
class PullProgress:
    """One step of a pull: ``completed`` of ``total`` bytes of ``filename``."""

    name: str
    status: str
    filename: str | None = None
    digest: str | None = None
    total: int | None = None
    completed: int = 0
    message: str | None = None


Listener = Callable[[PullProgress], None]
ByteCallback = Callable[[int, "int | None"], None]


class ProgressFanout:
    """Sends each event to every listener; a failing listener never breaks the pull."""

    def __init__(self, listeners: Iterable[Listener] = ()) -> None:
        self._listeners = list(listeners)
        self._lock = threading.Lock()
        self._broken: set[int] = set()

    def add(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def __call__(self, event: PullProgress) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # a broken view must not cost the user their download; said once
                if id(listener) not in self._broken:
                    self._broken.add(id(listener))
                    log.exception("a jupyter_llm progress view failed (further failures not logged)")

    def bytes_callback(self, name: str, filename: str, digest: str | None) -> ByteCallback:
        """A ``(completed, total)`` callback for one file that emits "downloading" events."""

        def on_bytes(completed: int, total: int | None) -> None:
            self(PullProgress(name, "downloading", filename, digest, total, completed))

        return on_bytes


class TqdmListener:
    """Shows one tqdm bar per downloaded file (a widget in notebooks, text in terminals)."""

    def __init__(self, tqdm_class: Any = None) -> None:
        self._tqdm = tqdm_class if tqdm_class is not None else bar_class()
        self._bars: dict[str, Any] = {}

    def __call__(self, event: PullProgress) -> None:
        key = event.filename or event.name
        if event.status == "downloading":
            bar = self._bars.get(key)
            if bar is None:
                bar = self._tqdm(
                    total=event.total, initial=event.completed, unit="B", unit_scale=True,
                    unit_divisor=1024, desc=_short(key), leave=True,
                )
                self._bars[key] = bar
            if event.total is not None and bar.total != event.total:
                bar.total = event.total
            bar.update(event.completed - bar.n)
        elif event.status in ("success", "error") or event.status.startswith("verifying"):
            bar = self._bars.pop(key, None) if event.status != "verifying sha256 digest" else None
            if bar is not None:
                bar.close()
            if event.status in ("success", "error"):
                for bar in self._bars.values():
                    bar.close()
                self._bars.clear()


def bar_class() -> Any:
    """tqdm's widget bar in a kernel that has ipywidgets, else its text bar.

    Chosen here rather than through ``tqdm.auto``, whose import emits TqdmExperimentalWarning
    and hides it with ``warnings.catch_warnings``: that saves and restores the process-wide
    filters, so when another thread does the same meanwhile the warning reaches the cell and
    the kernel can be left ignoring every later warning. This path touches no filters.
    """
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if getattr(shell, "kernel", None) is not None:  # a front end that can show widgets
        from tqdm import notebook  # deferred, like every heavy import: ipywidgets comes with it

        if notebook.IProgress is not None:
            return notebook.tqdm
    from tqdm.std import tqdm

    return tqdm


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]
