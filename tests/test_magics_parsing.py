"""`%llm` lines that the shell-like splitter cannot read become usage errors, not tracebacks."""

from __future__ import annotations

import IPython
import pytest
from IPython.core.error import UsageError
from IPython.testing.globalipapp import start_ipython

from jupyter_llm.notebook.magics import LLMMagics


@pytest.fixture
def magics() -> LLMMagics:
    ip = start_ipython() or IPython.get_ipython()
    ip.run_line_magic("load_ext", "jupyter_llm")
    return ip.magics_manager.registry["LLMMagics"]


@pytest.mark.parametrize("line", ['pull "unterminated', "cp 'a b", 'load "x'])
def test_an_unterminated_quote_is_a_usage_error_that_says_how_to_fix_it(magics: LLMMagics, line: str) -> None:
    with pytest.raises(UsageError, match="close the quote"):
        magics.llm(line)
