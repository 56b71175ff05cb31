"""The kernel's side of the worker processes.

:mod:`~jupyter_llm.runtime.process` starts one worker per model and talks to it over the
private socket (:class:`Runtime`), :mod:`~jupyter_llm.runtime.report` what it loaded
(:class:`LoadReport`); :mod:`~jupyter_llm.runtime.stream` is
what a generation gives back (:class:`Stream`, :class:`Chunk`, :class:`Completion`) and what it
may ask for besides text (:class:`Extras`: answers, log probabilities, thinking);
:mod:`~jupyter_llm.runtime.failure` maps the worker's errors to the kernel's exceptions;
:mod:`~jupyter_llm.runtime.grammar` turns JSON schemas into grammars without loading llama.cpp.
"""

from __future__ import annotations

from .grammar import schema_grammar
from .process import Runtime
from .report import LoadReport
from .stream import Chunk, Completion, Extras, Stream, TokenLogprob

__all__ = ["Chunk", "Completion", "Extras", "LoadReport", "Runtime", "Stream", "TokenLogprob", "schema_grammar"]
