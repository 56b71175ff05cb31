"""Log probabilities, several choices and reasoning, in Ollama's and OpenAI's shapes.

What a request asks for (:func:`openai_asks`, :func:`ollama_asks`) becomes an
:class:`~jupyter_llm.runtime.stream.Extras` and a ``think`` value for the chat turn; what comes
back (the chunks' and completions' ``logprobs``, ``thinking`` and ``index``) is written here into
the API's own objects:

- OpenAI chat: ``choices[i].logprobs.content[]`` = ``{token, logprob, bytes, top_logprobs}``,
  ``message.reasoning_content`` (streamed as ``delta.reasoning_content``), as llama-server and
  DeepSeek's API send reasoning; legacy completions: ``logprobs: {tokens, token_logprobs,
  top_logprobs, text_offset}``;
- Ollama: ``logprobs: [{token, logprob, bytes, top_logprobs}]`` on each line, ``message.thinking``
  (chat) and ``thinking`` (generate).

The numbers are the model's raw distribution at each step (before temperature and the other
samplers, see ``worker/logprobs.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .params import Body, bad

MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 64
"""The most slots a model may have (``LoadOptions.parallel``): each choice takes one."""
REASONING_EFFORTS = ("minimal", "low", "medium", "high")


def _extras(n: int, top: int | None) -> Any:
    from ..runtime.stream import Extras

    return Extras(n=n, logprobs=top)


def openai_asks(body: Body, *, chat: bool) -> tuple[Any, Any]:
    """(Extras, think) of an OpenAI request: ``n``, ``logprobs``/``top_logprobs`` (chat) or
    ``logprobs: k`` (completions), ``reasoning_effort`` (chat)."""
    n = body.integer("n", 1, lo=1, hi=MAX_CHOICES)
    top: int | None = None
    if chat:
        wanted = body.flag("logprobs", False)
        k = body.integer("top_logprobs", lo=0, hi=MAX_TOP_LOGPROBS)
        if k is not None and not wanted:
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        top = (k or 0) if wanted else None
    else:
        top = body.integer("logprobs", lo=0, hi=MAX_TOP_LOGPROBS)
    think: Any = None
    effort = body.text("reasoning_effort") if chat else None
    if effort is not None:
        if effort not in (*REASONING_EFFORTS, "none"):
            raise bad(f"'reasoning_effort' must be one of {', '.join(REASONING_EFFORTS)} or none", "reasoning_effort")
        think = False if effort == "none" else ("low" if effort == "minimal" else effort)
    return _extras(n, top), think


def ollama_asks(body: Body) -> tuple[Any, Any]:
    """(Extras, think) of an Ollama request: ``logprobs``, ``top_logprobs``, ``think``."""
    wanted = body.flag("logprobs", False)
    k = body.integer("top_logprobs", lo=0, hi=MAX_TOP_LOGPROBS)
    think = body.raw("think")
    if think is not None:
        from ..thinking import check_level

        try:
            think = check_level(think)
        except ValueError as exc:
            raise bad(str(exc), "think") from None
    return _extras(1, (k or 0) if wanted or k else None), think


def wants(extras: Any, think: Any) -> bool:
    """Whether anything here changes the answer's shape (else the routes' plain shapes stand)."""
    return extras.n != 1 or extras.logprobs is not None or think is not None


# -- log probabilities ---------------------------------------------------------------------------


def _one(lp: Any) -> dict[str, Any]:
    return {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.bytes)}


def openai_logprobs(lps: Sequence[Any] | None) -> dict[str, Any] | None:
    """A chat choice's ``logprobs`` object."""
    if lps is None:
        return None
    return {"content": [{**_one(lp), "top_logprobs": [_one(t) for t in lp.top]} for lp in lps], "refusal": None}


def legacy_logprobs(lps: Sequence[Any] | None, offset: int = 0) -> dict[str, Any] | None:
    """A completion choice's legacy ``logprobs`` object; ``offset``: where the text starts."""
    if lps is None:
        return None
    offsets, at = [], offset
    for lp in lps:
        offsets.append(at)
        at += len(lp.token)
    return {"tokens": [lp.token for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in lps], "text_offset": offsets}


def ollama_logprobs(lps: Sequence[Any]) -> list[dict[str, Any]]:
    """Ollama's ``logprobs`` list."""
    return [{**_one(lp), "top_logprobs": [_one(t) for t in lp.top]} for lp in lps]


# -- OpenAI ------------------------------------------------------------------------------------


def openai_choices(first: dict[str, Any], results: Sequence[Any], *, chat: bool,
                   echo: str = "") -> list[dict[str, Any]]:
    """Every choice of a finished request: ``first`` (the route's choice 0, tool calls and all)
    given its logprobs and reasoning, then one per further result."""
    from .tool_shapes import finish_reason

    choices = []
    for result in results:
        choice = first if result.index == 0 else {**first, "index": result.index}
        if chat:
            message = dict(first["message"])
            if result.index:
                message["content"] = result.text
                choice["finish_reason"] = finish_reason(result, [])
            if result.thinking is not None:
                message["reasoning_content"] = result.thinking
            choice["message"] = message
            choice["logprobs"] = openai_logprobs(result.logprobs)
        else:
            if result.index:
                choice["text"] = echo + result.text
                choice["finish_reason"] = "length" if result.finish_reason == "length" else "stop"
            choice["logprobs"] = legacy_logprobs(result.logprobs, len(echo))
        choices.append(choice)
    return choices


def openai_usage(results: Sequence[Any]) -> dict[str, int]:
    """Usage of all choices: the prompt once (it was evaluated once), every choice's tokens."""
    prompt, completion = results[0].prompt_tokens, sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def indexed(item: dict[str, Any], index: int) -> dict[str, Any]:
    """A streamed chunk object for choice ``index``."""
    item["choices"][0]["index"] = index
    return item


def openai_delta(item: dict[str, Any], chunk: Any, *, chat: bool) -> dict[str, Any]:
    """A streamed chunk object for ``chunk``: its choice index, reasoning and logprobs."""
    choice = item["choices"][0]
    choice["index"] = chunk.index
    if chat:
        if chunk.thinking:
            choice["delta"]["reasoning_content"] = chunk.thinking
            if not chunk.text:
                choice["delta"].pop("content", None)
        if chunk.logprobs:
            choice["logprobs"] = openai_logprobs(chunk.logprobs)
    elif chunk.logprobs:
        choice["logprobs"] = legacy_logprobs(chunk.logprobs)
    return item


# -- Ollama -----------------------------------------------------------------------------------


def ollama_piece(item: dict[str, Any], chunk_or_result: Any, *, chat: bool) -> dict[str, Any]:
    """An Ollama line (a chunk), or the whole answer (a Completion), with its reasoning and logprobs."""
    thinking = chunk_or_result.thinking
    if thinking:
        if chat:
            item["message"]["thinking"] = thinking
        else:
            item["thinking"] = thinking
    lps = chunk_or_result.logprobs
    if lps:
        item["logprobs"] = ollama_logprobs(lps)
    return item


__all__ = ["indexed", "legacy_logprobs", "ollama_asks", "ollama_logprobs", "ollama_piece", "openai_asks",
           "openai_choices", "openai_delta", "openai_logprobs", "openai_usage", "wants"]
