"""``%llm remote add | list | rm``: the remote engines whose models are ``NAME/MODEL``.

Thin, as every verb: parse, one call on the manager's :class:`~jupyter_llm.remote.Remotes`,
a table or a message back. A token is never typed here: ``--token-env`` names the
environment variable that holds it.
"""

from __future__ import annotations

import argparse
from typing import Any

from IPython.core.error import UsageError

USAGE = ("%llm remote add NAME URL --api openai|ollama [--token-env VAR]  (openai: llama-server, vLLM, LM Studio; "
         "ollama: Ollama or another kernel's %llm serve), %llm remote list, %llm remote rm NAME")


def add_parser(sub: Any) -> None:
    """The ``remote`` verb and its own verbs, on ``%llm``'s subparsers."""
    remote = sub.add_parser("remote")
    verbs = remote.add_subparsers(dest="remote_verb", parser_class=type(remote))
    p = verbs.add_parser("add")
    p.add_argument("name")
    p.add_argument("url")
    p.add_argument("--api", choices=["openai", "ollama"], default="openai")
    p.add_argument("--token-env", dest="token_env", default=None)
    verbs.add_parser("list")
    verbs.add_parser("ls")
    verbs.add_parser("rm").add_argument("name")


def run(manager: Any, args: argparse.Namespace) -> Any:
    from .display import Message
    from .remote_display import remotes_table

    remotes = manager.remotes
    if args.remote_verb == "add":
        try:
            remote = remotes.add(args.name, args.url, api=args.api, token_env=args.token_env)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        token = f", token from ${remote.token_env}" if remote.token_env else ""
        return Message(f"added remote {remote.name} at {remote.url} ({remote.api} API{token}); its models are "
                       f"{remote.name}/MODEL (`%llm list` shows them)", data=remote)
    if args.remote_verb == "rm":
        remote = remotes.remove(args.name)
        return Message(f"removed remote {remote.name} ({remote.url}); nothing on it was changed", data=remote)
    if args.remote_verb in ("list", "ls"):
        return remotes_table(remotes.states())
    raise UsageError(USAGE)
