"""Where the built JupyterLab extension lives inside the package (for ``jupyter labextension``).

The TypeScript source is in ``labextension/``; hatch-jupyter-builder builds it into
``jupyter_llm/labextension/`` and the wheel installs that as shared data, so a plain
``pip install`` is enough for JupyterLab to load the sidebar.
"""

from __future__ import annotations


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """The built extension's folder (relative to this package) and its npm name."""
    return [{"src": "labextension", "dest": "jupyter-llm"}]
