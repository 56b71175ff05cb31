"""The ``%%chat`` cell without a model: what a prompt may refer to, and what is drawn.

On a real IPython shell (the terminal one that ``start_ipython`` gives): cells run with
``store_history=True`` as typed cells are, so ``In``, ``Out`` and IPython's record of each
cell's exception are the real ones.
"""

from __future__ import annotations

import re
from typing import Any

import IPython
import pytest
from IPython.core.error import UsageError
from IPython.testing.globalipapp import start_ipython

from jupyter_llm.notebook import chatcell
from jupyter_llm.notebook.chatcell import Notice, Renderer, prompt_from_cell


@pytest.fixture
def shell() -> Any:
    return start_ipython() or IPython.get_ipython()


def run(shell: Any, code: str) -> int:
    """Run ``code`` as a typed cell; returns its execution count."""
    count = shell.execution_count
    shell.run_cell(code, store_history=True)
    return int(count)


def test_prompts_refer_to_inputs_outputs_and_errors_by_execution_count(shell: Any) -> None:
    given = run(shell, "total = 40 + 2\ntotal")
    raised = run(shell, "def lookup():\n    return {}['missing']\nlookup()")
    run(shell, "'a later cell that works'")
    cell = (f"Cell {given} ran {{In[{given}]}} and gave {{Out[{given}]}}.\n"
            f"Explain {{Err}}\nand again {{Err[{raised}]}}")
    text, used = prompt_from_cell(cell, shell)
    assert "total = 40 + 2\ntotal and gave 42." in text
    assert text.count("KeyError: 'missing'") == 2
    assert "return {}['missing']" in text, "the traceback shows the failing line"
    assert f"In[{raised}]" in text, "frames name the cell they come from"
    assert not re.search(r"\x1b\[|^-{20,}", text, re.M), "no colours, no ruler: compact"
    assert [u["ref"] for u in used] == [f"{{In[{given}]}}", f"{{Out[{given}]}}", "{Err}", f"{{Err[{raised}]}}"]
    assert used[2]["as"] == f"Err[{raised}]", "{Err} records which cell's exception it was"
    assert used[1]["text"] == "42"


def test_the_recorded_exceptions_are_read_only_for_a_cell_that_names_one(shell: Any, monkeypatch: Any) -> None:
    raised = run(shell, "{}['gone']")
    reads: list[int] = []
    real = chatcell.recorded_errors
    monkeypatch.setattr(chatcell, "recorded_errors", lambda s: reads.append(1) or real(s))
    assert prompt_from_cell("Nothing of the notebook here, {{Err}} escaped", shell)[0].endswith("{{Err}} escaped")
    assert reads == [], "a prompt naming no exception does not work through the tracebacks"
    text, _ = prompt_from_cell(f"{{Err}} and {{Err[{raised}]}}", shell)
    assert text.count("KeyError: 'gone'") == 2
    assert reads == [1], "read once for all of a cell's references"


def test_a_reference_to_nothing_says_what_exists(shell: Any) -> None:
    quiet = run(shell, "x_quiet = 1")
    with pytest.raises(UsageError, match=rf"Out\[{quiet}\].*no output"):
        prompt_from_cell(f"{{Out[{quiet}]}}", shell)
    with pytest.raises(UsageError, match=rf"Err\[{quiet}\].*no exception"):
        prompt_from_cell(f"{{Err[{quiet}]}}", shell)
    with pytest.raises(UsageError, match=r"In\[99999\]"):
        prompt_from_cell("{In[99999]}", shell)


def test_variables_escapes_and_a_users_own_err_are_kept(shell: Any) -> None:
    run(shell, "topic = 'moons'; Err = 'my own variable'")
    try:
        text, used = prompt_from_cell("About {topic}: {Err}; {{Err}} {{In[1]}} {unknown} {'a': 1}", shell)
    finally:
        run(shell, "del Err")
    assert text == "About moons: my own variable; {{Err}} {{In[1]}} {unknown} {'a': 1}"
    assert [u["ref"] for u in used] == ["{topic}", "{Err}"]


@pytest.mark.parametrize("streamed", [
    "Sure, here it is:\n```python\ndef add(a, b):\n    return a",
    "Sure, here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds",
    "def add(a, b):\n    return a + b",
    "```python\ndef add(a, b):\n    return a + b\n``",
    "```pyth",
])
def test_code_format_streams_one_code_block(streamed: str) -> None:
    markdown = Renderer("code").render(streamed, final=False).markdown
    lines = markdown.splitlines()
    assert lines[0].startswith("```") and lines[-1].startswith("```"), markdown
    assert not any(line.lstrip().startswith("`") for line in lines[1:-1]), "no fence inside the block"
    assert "Sure, here" not in markdown
    assert "def add(a, b):" in markdown or streamed == "```pyth"


def test_a_fence_inside_the_code_gets_a_longer_outer_fence() -> None:
    answer = 'Here:\n```python\ndoc = """\n```text\nexample\n```\n"""\n```'
    markdown = Renderer("code").render(answer, final=True).markdown
    assert markdown.startswith("````python\n") and "\n````" in markdown
    assert "```text" in markdown


def test_every_chat_displayable_carries_its_text_as_plain_text(shell: Any) -> None:
    answer = "**Moons** orbit planets."
    shown = []
    for fmt in ("markdown", "text", "code", "json"):
        for final in (False, True):
            shown.append(Renderer(fmt).render(answer, final=final, stats="smollm2 · 5 tokens"))
    shown.append(Notice("dropped the 2 oldest messages"))
    for obj in shown:
        data, _ = shell.display_formatter.format(obj)
        plain = data["text/plain"]
        assert "object at 0x" not in plain and "<IPython" not in plain, plain
        assert "Moons" in plain or "dropped" in plain, plain


def test_bad_chat_options_are_usage_errors_that_say_what_to_fix(shell: Any) -> None:
    from jupyter_llm.notebook.chatcell import run_chat_cell

    with pytest.raises(UsageError, match="close the quote"):
        run_chat_cell(shell, None, '--system "unclosed', "Hi")
    with pytest.raises(UsageError, match="markdown"):
        run_chat_cell(shell, None, "--format html", "Hi")


class _Displayed:
    """What IPython's display() was given, and the handles' updates."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def display(self, obj: Any, display_id: bool = False, **kw: Any) -> Any:
        self.calls.append(("display", repr(obj)))
        recorder = self

        class Handle:
            def update(self, obj: Any, **kw: Any) -> None:
                recorder.calls.append(("update", repr(obj)))

        return Handle()


@pytest.mark.parametrize("first_token_soon", [True, False])
def test_the_cursor_is_drawn_only_when_the_first_token_is_late(monkeypatch: pytest.MonkeyPatch,
                                                               first_token_soon: bool) -> None:
    import IPython.display

    from jupyter_llm.notebook.chatcell import PLACEHOLDER_AFTER_S, _CellView

    shown = _Displayed()
    monkeypatch.setattr(IPython.display, "display", shown.display)
    waited: list[float] = []

    def arrived(timeout: float) -> bool:
        waited.append(timeout)
        return first_token_soon

    view = _CellView(Renderer("markdown"))
    view.begin(arrived)
    assert waited == [PLACEHOLDER_AFTER_S]
    view.update("Hello", "Hello")
    view.end("Hello there", "stats", {})
    kinds = [kind for kind, _ in shown.calls]
    if first_token_soon:  # the first output is the answer itself, then redrawn in place
        assert kinds == ["display", "update"] and "Hello" in shown.calls[0][1]
    else:  # the empty answer with its cursor first, then redrawn in place
        assert kinds[0] == "display" and "Hello" not in shown.calls[0][1] and "▌" in shown.calls[0][1]
        assert set(kinds[1:]) == {"update"}
    assert "Hello there" in shown.calls[-1][1] and "▌" not in shown.calls[-1][1]
