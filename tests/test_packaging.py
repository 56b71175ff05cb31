"""Installing: an sdist or wheel carries the built sidebar (no Node.js needed), a git clone builds
it (Node.js needed), and the README says which is which.

Checked by hand once, as it is slow (ran: `python -m build --sdist`, then `pip install` of it into
a fresh venv whose PATH has no node): the build hook skips the npm build and the sidebar is
installed. These tests pin the configuration that makes that work.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_an_sdist_carries_the_built_sidebar_so_its_install_skips_node() -> None:
    build = pyproject()["tool"]["hatch"]["build"]
    hook = build["hooks"]["jupyter-builder"]
    artifacts = build["targets"]["sdist"]["artifacts"]
    # the hook skips the npm build when these exist, and an sdist ships them (they are git-ignored)
    assert hook["skip-if-exists"], "without skip-if-exists every install runs npm"
    for path in [*hook["skip-if-exists"], *hook["ensured-targets"]]:
        assert any(path.startswith(a.rstrip("/") + "/") for a in artifacts), f"{path} is not in the sdist"
    shared = build["targets"]["wheel"]["shared-data"]
    assert any(src.rstrip("/") in artifacts for src in shared), "the wheel installs what the sdist carries"


def test_the_readme_says_a_clone_needs_node_and_an_sdist_does_not() -> None:
    readme = (ROOT / "README.md").read_text()
    engines = json.loads((ROOT / "labextension" / "package.json").read_text())["engines"]["node"]
    major = re.search(r"\d+", engines).group(0)  # type: ignore[union-attr]
    requirements = readme[readme.index("Requirements"):][:800]
    assert f"Node.js ≥ {major}" in requirements
    assert "git clone" in requirements and "sdist" in requirements
