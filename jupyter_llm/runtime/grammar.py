"""JSON schemas to GBNF grammars, without loading llama.cpp into the kernel.

The conversion is llama-cpp-python's own (pure Python); constrained sampling with the grammar
happens in the worker.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError


def schema_grammar(json_schema: dict[str, Any]) -> str:
    """A GBNF grammar for JSON matching ``json_schema``; ``{}`` means any JSON object."""
    grammar = _grammar_converter()
    if not json_schema:
        return str(grammar.JSON_GBNF)
    return str(grammar.json_schema_to_gbnf(json.dumps(json_schema)))


def _grammar_converter() -> Any:
    """llama-cpp-python's pure-Python schema-to-GBNF converter, loaded from its file alone.

    ``import llama_cpp.llama_grammar`` would run ``llama_cpp/__init__``, which loads libllama into
    the kernel, installs a log callback and leaves two /dev/null files open: llama.cpp belongs in
    the workers only. The converter module itself imports nothing but the standard library.
    """
    import importlib.util

    name = "_jupyter_llm_llama_grammar"
    if name in sys.modules:
        return sys.modules[name]
    package = importlib.util.find_spec("llama_cpp")  # locates the package without importing it
    if package is None or not package.submodule_search_locations:
        raise ModelLoadError("llama-cpp-python is not installed; `pip install jupyter-llm` installs it")
    path = Path(next(iter(package.submodule_search_locations))) / "llama_grammar.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
