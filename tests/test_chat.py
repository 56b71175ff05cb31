"""Conversation history and the context-overflow policy (never truncate silently)."""

from __future__ import annotations

import pytest

from jupyter_llm.chat import ChatSession, fit_history
from jupyter_llm.errors import ContextOverflowError


def words(messages: list[dict[str, str]]) -> int:
    """A stand-in token counter: one token per word plus 4 per message (like a template)."""
    return sum(len(m["content"].split()) + 4 for m in messages)


def test_history_fits_untouched() -> None:
    session = ChatSession("s", system="be brief")
    session.record("hello there", "hi")
    fit = fit_history(session, "how are you", count_tokens=words, n_ctx=100, reserve=10)
    assert fit.dropped_messages == 0 and fit.notice is None
    assert [m["role"] for m in fit.messages] == ["system", "user", "assistant", "user"]


def test_oldest_exchanges_are_dropped_with_a_notice() -> None:
    session = ChatSession("s")
    for i in range(5):
        session.record(f"question {i} " + "word " * 10, f"answer {i} " + "word " * 10)
    fit = fit_history(session, "last question", count_tokens=words, n_ctx=60, reserve=10)
    assert fit.dropped_messages >= 2 and fit.dropped_messages % 2 == 0
    assert fit.notice is not None and "dropped" in fit.notice and "60-token" in fit.notice
    assert fit.messages[0]["role"] == "user", "history never starts with an assistant turn"
    assert fit.messages[-1]["content"] == "last question"
    assert fit.prompt_tokens + 10 <= 60
    assert session.dropped == fit.dropped_messages


def test_a_message_too_long_for_the_context_is_refused_with_numbers() -> None:
    session = ChatSession("s")
    with pytest.raises(ContextOverflowError) as info:
        fit_history(session, "word " * 200, count_tokens=words, n_ctx=100, reserve=20)
    assert info.value.n_ctx == 100 and info.value.n_tokens == 224
    assert "--ctx 512" in str(info.value)


def test_reset_changes_system_prompt_and_clears_history() -> None:
    session = ChatSession("s", system="a")
    session.record("q", "a")
    session.reset(system="b")
    assert session.messages == [] and session.system == "b"
