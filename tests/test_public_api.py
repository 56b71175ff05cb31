"""The public surface is small and pinned, and `%load_ext jupyter_llm` stays instant."""

from __future__ import annotations

import json
import subprocess
import sys

import jupyter_llm

PINNED = [
    "JupyterLLMError", "Model", "__version__", "_jupyter_labextension_paths", "cp", "create", "devices", "estimate",
    "list_models", "load", "load_ipython_extension", "memory_widget", "picker", "ps", "pull", "remote_add",
    "remote_list", "remote_rm", "rm", "serve", "show", "unload", "unload_ipython_extension",
]


def test_exports_are_pinned() -> None:
    assert sorted(jupyter_llm.__all__) == sorted(PINNED)
    for name in PINNED:
        assert hasattr(jupyter_llm, name), name


def test_every_public_function_has_a_docstring() -> None:
    for name in PINNED:
        obj = getattr(jupyter_llm, name)
        if callable(obj):
            assert obj.__doc__, f"{name} has no docstring"


HEAVY = ("llama_cpp", "huggingface_hub", "httpx", "gguf", "numpy", "pynvml", "ipywidgets", "tqdm", "uvicorn")

PROBE = """
import json, sys, time
from IPython.testing.globalipapp import start_ipython
ip = start_ipython()
before = set(sys.modules)
t = time.perf_counter()
ip.run_line_magic("load_ext", "jupyter_llm")
elapsed = time.perf_counter() - t
usage = ip.run_line_magic("llm", "")
print(json.dumps({"elapsed": elapsed, "new": sorted(set(sys.modules) - before), "usage": repr(usage)}))
"""


def test_load_ext_is_instant_and_imports_nothing_heavy() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    heavy = [m for m in probe["new"] if m.split(".")[0] in HEAVY]
    assert heavy == [], f"%load_ext imported {heavy}"
    # Generous bound: the target is < 300 ms; this only catches a heavy import sneaking in.
    assert probe["elapsed"] < 1.0
    assert "%llm pull NAME" in probe["usage"]


def test_json_schema_grammar_keeps_llama_cpp_out_of_the_kernel() -> None:
    code = ("import sys, json; from jupyter_llm.runtime import schema_grammar; "
            "g = schema_grammar({'type': 'object', 'properties': {'a': {'type': 'integer'}}}); "
            "loaded = [m for m in sys.modules if m.startswith('llama_cpp')]; "
            "print(json.dumps({'root': 'root ::=' in g, 'loaded': loaded}))")
    out = subprocess.run([sys.executable, "-W", "error::ResourceWarning", "-c", code], capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout)
    assert result == {"root": True, "loaded": []}


def test_public_functions_survive_importing_every_submodule() -> None:
    # A submodule named like a public function (the old jupyter_llm.estimate / .devices modules)
    # replaced the package attribute on first import: "'module' object is not callable".
    import importlib
    import pkgutil

    for info in pkgutil.walk_packages(jupyter_llm.__path__, "jupyter_llm."):
        if info.name.endswith("__main__") or ".worker" in info.name:
            continue  # entry points and the worker process's code are not imported by the kernel
        importlib.import_module(info.name)
    for name in PINNED:
        obj = getattr(jupyter_llm, name)
        assert not isinstance(obj, type(jupyter_llm)), f"jupyter_llm.{name} is a module, not the public {name}"
