"""Conversation history and the context-overflow policy (never truncate silently).

The rule that fits a conversation runs in the worker (:func:`jupyter_llm.worker.text.fit`, on
the model's real template and tokens there); here it is driven with a stand-in token counter.
"""

from __future__ import annotations

import pytest

from jupyter_llm.chat import ChatSession, fit_notice
from jupyter_llm.worker import RequestError
from jupyter_llm.worker.text import fit


def words(messages: list[dict[str, str]]) -> list[int]:
    """Stand-in tokens: one per word plus 4 per message (like a template)."""
    return [0] * sum(len(m["content"].split()) + 4 for m in messages)


def test_history_fits_untouched() -> None:
    session = ChatSession("s", system="be brief")
    session.record("hello there", "hi")
    messages, _, dropped = fit(session.prompt_messages("how are you"), words, n_ctx=100, reserve=10)
    assert dropped == 0 and fit_notice(dropped, 100) is None
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]


def test_oldest_exchanges_are_dropped_with_a_notice() -> None:
    session = ChatSession("s")
    for i in range(5):
        session.record(f"question {i} " + "word " * 10, f"answer {i} " + "word " * 10)
    messages, tokens, dropped = fit(session.prompt_messages("last question"), words, n_ctx=60, reserve=10)
    notice = fit_notice(dropped, 60)
    assert dropped >= 2 and dropped % 2 == 0
    assert notice is not None and "dropped" in notice and "60-token" in notice
    assert messages[0]["role"] == "user", "history never starts with an assistant turn"
    assert messages[-1]["content"] == "last question"
    assert len(tokens) + 10 <= 60
    session.forget_oldest(dropped)
    assert session.dropped == dropped
    assert session.prompt_messages("last question") == messages


def test_a_message_too_long_for_the_context_is_refused_with_numbers() -> None:
    session = ChatSession("s")
    with pytest.raises(RequestError) as info:
        fit(session.prompt_messages("word " * 200), words, n_ctx=100, reserve=20)
    assert info.value.kind == "ContextOverflowError"
    assert info.value.extra["n_ctx"] == 100 and info.value.extra["n_tokens"] == 224
    assert "--ctx 512" in str(info.value)


def test_reset_changes_system_prompt_and_clears_history() -> None:
    session = ChatSession("s", system="a")
    session.record("q", "a")
    session.reset(system="b")
    assert session.messages == [] and session.system == "b"
