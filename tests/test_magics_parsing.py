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


def test_a_comment_after_a_verb_is_a_comment() -> None:
    from jupyter_llm.notebook.magics import LLMMagics

    text = repr(LLMMagics(shell=None).llm("help   # what can it do?"))
    assert "%llm pull NAME" in text
    with pytest.raises(UsageError, match="unrecognized arguments: extra"):
        LLMMagics(shell=None).llm("list extra  # a real argument before the comment still counts")
    from jupyter_llm.notebook.magics import _without_comment

    line = 'serve --token ab#cd --origin "#x" # note'
    assert _without_comment(line) == 'serve --token ab#cd --origin "#x" '
