"""A real IPython kernel for tests: run cells, collect every iopub message, interrupt."""

from __future__ import annotations

import os
import queue
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CellRun:
    """What one execute request produced."""

    reply: dict[str, Any]
    messages: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return self.reply["content"]["status"]

    @property
    def error(self) -> str | None:
        content = self.reply["content"]
        return None if content["status"] == "ok" else f"{content.get('ename')}: {content.get('evalue')}"

    def texts(self) -> list[str]:
        """Plain-text/markdown of every output and display update, in order."""
        out = []
        for msg in self.messages:
            content = msg["content"]
            if msg["msg_type"] == "stream":
                out.append(content["text"])
            elif msg["msg_type"] in ("execute_result", "display_data", "update_display_data"):
                data = content["data"]
                out.append(data.get("text/markdown") or data.get("text/plain") or "")
            elif msg["msg_type"] == "error":
                out.append(f"{content['ename']}: {content['evalue']}")
        return out

    def updates(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["msg_type"] == "update_display_data"]


class Kernel:
    """Start a kernel with ``env``; ``run(code)`` executes a cell and waits for it."""

    def __init__(self, env: dict[str, str]) -> None:
        from jupyter_client.manager import KernelManager

        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env={**os.environ, **env})
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)

    def run(self, code: str, timeout: float = 300, on_message: Any = None) -> CellRun:
        t0 = time.perf_counter()
        msg_id = self.kc.execute(code)
        run = CellRun(reply={})
        deadline = time.monotonic() + timeout
        idle = False
        while not idle:
            try:
                msg = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"cell did not finish in {timeout} s: {code[:80]!r}") from None
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status":
                idle = msg["content"]["execution_state"] == "idle"
                continue
            run.messages.append(msg)
            if on_message is not None:
                on_message(msg)
        run.reply = self.kc.get_shell_msg(timeout=max(1.0, deadline - time.monotonic()))
        while run.reply["parent_header"].get("msg_id") != msg_id:
            run.reply = self.kc.get_shell_msg(timeout=max(1.0, deadline - time.monotonic()))
        run.seconds = time.perf_counter() - t0
        return run

    def ok(self, code: str, timeout: float = 300) -> CellRun:
        run = self.run(code, timeout)
        assert run.status == "ok", f"{run.error}\n{''.join(run.texts())}"
        return run

    def alive_check(self) -> None:
        """The kernel still runs and kept its variables."""
        run = self.ok("_alive_probe = globals().get('_alive_probe', 0) + 1; _alive_probe")
        assert run.texts()[-1].strip().isdigit()

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)
