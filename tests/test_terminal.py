"""A plain IPython terminal (no rich front end): ``%%chat`` streams its answer as text, once.

A real ``ipython --simple-prompt`` process reads the session from its stdin, as a user typing
would (a cell magic ends at an empty line: two newlines after its body).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

IPYTHON = Path(sys.executable).with_name("ipython")


def ipython(session: str, env: dict[str, str], timeout: float = 300) -> str:
    """Feed ``session`` to a terminal IPython; returns what it printed (stdout and stderr)."""
    done = subprocess.run([str(IPYTHON), "--simple-prompt", "--no-banner", "--colors=nocolor"], input=session,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})
    return done.stdout + done.stderr


def test_chat_in_a_terminal_prints_the_answer_once_as_text(smollm2_path: Path, isolated_state: Path) -> None:
    session = f"""%load_ext jupyter_llm
from pathlib import Path; from jupyter_llm.manager import get_manager; from jupyter_llm.store.sources import Pulled
_ = get_manager().store.put("smollm2", Pulled("pip", [Path({str(smollm2_path)!r})], owned=[]))
_ = %llm load smollm2 --ctx 512 --keep-alive -1
%%chat --session md --temperature 0 --max-tokens 24 --seed 1
Name three colours.


%%chat --session tx --format text --temperature 0 --max-tokens 24 --seed 1
Name three animals.


import json; print("SESSIONS=" + json.dumps({{n: s.messages for n, s in get_manager().sessions().items()}}))
%llm list
"""
    out = ipython(session, {"JUPYTER_LLM_HOME": str(isolated_state / "home")})
    assert "SESSIONS=" in out, out
    shown, _, rest = out.partition("SESSIONS=")
    sessions = json.loads(rest.splitlines()[0])
    assert "<IPython.core.display" not in out and "object at 0x" not in out, out
    assert "▌" not in out, "no cursor: the answer is written as it comes, not redrawn"
    for name in ("md", "tx"):
        answer = sessions[name][1]["content"]
        assert answer.strip() and shown.count(answer) == 1, (name, answer, shown)
    assert shown.count("smollm2 · ") == 2, "each answer ends with one statistics line naming the model"
    assert "Cached models" in rest and "smollm2" in rest, "tables print as text"
