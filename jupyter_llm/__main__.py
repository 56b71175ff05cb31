"""``python -m jupyter_llm VERB …``: the ``%llm`` verbs from a terminal (e.g. to pre-pull a model)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run one ``%llm`` verb and print its result; returns the exit status."""
    from IPython.core.error import UsageError

    from .errors import JupyterLLMError
    from .notebook.magics import LLMMagics

    line = " ".join(_quote(a) for a in (sys.argv[1:] if argv is None else argv))
    magics = LLMMagics(shell=None)
    try:
        result = magics.llm(line)  # type: ignore[misc,call-arg]  # IPython's decorator hides the signature
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except JupyterLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if result is not None:
        print(repr(result))
    from .manager import _manager

    if _manager is not None:
        _manager.close()
    return 0


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


if __name__ == "__main__":
    sys.exit(main())
