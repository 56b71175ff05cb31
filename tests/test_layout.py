"""The package's architecture holds: two processes with one contract between them, no import
cycles, no module too big to read, and the core typed without ``Any``.

Imports are read with ``ast`` (nothing is imported), counting imports inside functions too:
a deferred import still crosses the boundary when it runs.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jupyter_llm"
SHARED = {"jupyter_llm.wire", "jupyter_llm.errors"}
"""What both processes may import: the contract, and the error tree."""
MAX_LINES = 500


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        if "labextension" in path.relative_to(PACKAGE).parts:
            continue
        parts = ["jupyter_llm", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = modules()


def imports_of(name: str) -> set[str]:
    """Modules ``name`` imports (package-internal ones resolved to the module, others as
    written), excluding imports only made for type checking."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            typing_only.update(id(sub) for sub in ast.walk(node))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            found.update(subs if len(subs) == len(node.names) else [target, *subs])
    found.discard(name)
    return found


GRAPH = {name: {m for m in imports_of(name) if m in MODULES} for name in MODULES}
EXTERNAL = {name: {m for m in imports_of(name) if m not in MODULES} for name in MODULES}


def is_worker(name: str) -> bool:
    return name == "jupyter_llm.worker" or name.startswith("jupyter_llm.worker.")


def test_the_worker_imports_only_the_contract_and_the_errors() -> None:
    for name in filter(is_worker, MODULES):
        kernel_side = {m for m in GRAPH[name] if not is_worker(m) and m not in SHARED}
        assert not kernel_side, f"{name} (worker process) imports kernel-side {sorted(kernel_side)}"


def test_the_kernel_never_imports_worker_code_or_llama_cpp() -> None:
    for name in MODULES:
        if is_worker(name):
            continue
        worker = {m for m in GRAPH[name] if is_worker(m)}
        assert not worker, f"{name} imports worker code {sorted(worker)}: start it by module name (wire.py)"
        native = {m for m in EXTERNAL[name] if m.split(".")[0] == "llama_cpp"}
        assert not native, f"{name} imports {sorted(native)}: llama.cpp runs only in worker processes"


def test_the_contract_imports_nothing_of_either_side() -> None:
    assert GRAPH["jupyter_llm.wire"] == set()


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module (each is an import cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_there_are_no_import_cycles() -> None:
    # A package's __init__ re-exporting its own children is not a cycle of responsibilities.
    graph = {name: {m for m in deps if not (m != name and name.startswith(m + "."))}
             for name, deps in GRAPH.items()}
    assert strongly_connected(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_500_lines(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines: split it by responsibility"


def test_the_core_is_typed_without_any() -> None:
    from jupyter_llm.loaded import LoadedModel
    from jupyter_llm.manager import ModelManager

    assert LoadedModel.__annotations__["runtime"] == "Runtime"
    assert LoadedModel.__annotations__["estimate"] == "MemoryEstimate | None"
    hints = ast.parse(MODULES["jupyter_llm.manager"].read_text())
    server = [n for n in ast.walk(hints) if isinstance(n, ast.AnnAssign)
              and ast.unparse(n.target) == "self.server"]
    assert [ast.unparse(n.annotation) for n in server] == ["Server | None"]
    assert not hasattr(ModelManager, "list"), "a method named list shadows builtins.list in the class"


def test_no_comment_cites_a_file_outside_the_repository() -> None:
    notes = PACKAGE.parent / "docs" / "notes.md"
    assert notes.exists()
    sections = {line.split()[1] for line in notes.read_text().splitlines() if line.startswith("## ")}
    for name, path in MODULES.items():
        text = path.read_text()
        assert "NOTES §" not in text, f"{name} cites NOTES outside the repository"
        for cited in set(re.findall(r"docs/notes\.md §(\d+)", text)):
            assert f"{cited}." in sections, f"{name} cites docs/notes.md §{cited}, which does not exist"
