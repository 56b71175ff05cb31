"""Questions only llama.cpp can answer, asked in a subprocess: never run llama.cpp in the kernel.

:func:`query` starts ``python -m jupyter_llm.worker.probe`` (by module name; the kernel never
imports worker code) and returns its JSON answer; :func:`measure` asks for llama.cpp's own
buffer sizes of one or more load option sets and parses its log lines here, into
:class:`~jupyter_llm.memory.llama_log.MemoryLog` figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from .. import wire
from ..options import LoadOptions
from .llama_log import MemoryLog

TIMEOUT = 120.0


def query(args: Sequence[str], timeout: float = TIMEOUT) -> dict[str, Any]:
    """Run ``python -m jupyter_llm.worker.probe ARGS`` and return its JSON answer.

    A failure (crash, timeout, no answer) becomes ``{"error": …}`` with the last stderr line.
    """
    try:
        proc = subprocess.run([sys.executable, "-m", wire.PROBE_MODULE, *args],
                              capture_output=True, text=True, timeout=timeout, env=wire.worker_env())
    except subprocess.TimeoutExpired:
        return {"error": f"llama.cpp took more than {timeout:.0f} s to answer"}
    except OSError as exc:
        return {"error": f"could not start the llama.cpp subprocess: {exc}"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {"error": f"llama.cpp subprocess failed: {tail[0]}"}
    try:
        return dict(json.loads(lines[-1]))
    except ValueError:
        return {"error": f"llama.cpp subprocess answered {lines[-1][:200]!r}"}


def measure(path: str | os.PathLike[str], option_sets: Sequence[LoadOptions | dict[str, Any]], *,
            real: bool = False, timeout: float = TIMEOUT) -> dict[str, Any]:
    """llama.cpp's own buffer sizes for each option set (LoadOptions, or dicts of some of its
    fields), in one subprocess.

    Dry run (default): nothing is read or allocated; ~0.2 s for the model, ~15 ms per context;
    KV and compute are exact, the per-buffer model and KV lines print 0. ``real=True`` loads
    and allocates (mmap), so the model buffer line is real too. Returns ``{"results": [...]}``
    with one entry per option set (``devices``, ``kv_size``, ``n_ctx``, ``error``…) and
    ``"model"``, the model load's figures.
    """
    sets = []
    for o in option_sets:
        d = (o if isinstance(o, LoadOptions) else LoadOptions(**dict(o))).to_dict()
        d.pop("keep_alive", None)
        d["tensor_split"] = list(d.get("tensor_split") or ())
        # no rpc in a dry run: it would connect to the servers, which serve one client at a time
        d.pop("rpc", None)
        sets.append(d)
    args = ["estimate", os.fspath(path), "--json-options", json.dumps(sets)]
    answer = query([*args, "--real"] if real else args, timeout)
    answer["model"] = _parsed(answer.pop("model_log", []))
    for result in answer.setdefault("results", []):
        result.update(_parsed(result.pop("log", [])))
    return answer


def _parsed(lines: Sequence[Sequence[Any]]) -> dict[str, Any]:
    log = MemoryLog()
    for level, text in lines:
        log.feed(int(level), str(text))
    return log.to_dict()
