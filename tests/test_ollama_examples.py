"""ollama-python's own examples, from the sdist of the installed ``ollama``, run against our server (issue 13).

The examples are fetched at test time through pip's configured package index (``pip download
--no-binary :all:``), cached under ``.cache/ollama-examples/<version>/`` like the default model,
and never from anywhere else. Each script gets its model names rewritten to the default model and
runs as a subprocess with ``OLLAMA_HOST`` (and ``OLLAMA_API_KEY``, which the client sends as the
bearer token) pointing at a real server on a loopback port. Examples that need what this machine
or the default model lacks are listed in :data:`NEEDS`, each with its reason; every other example
must pass. The table goes to ``test-artifacts/ollama_examples.md``.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from tests.apiserver import MODEL, running_server

ROOT = Path(__file__).resolve().parent.parent
VERSION = importlib.metadata.version("ollama")
CACHE = ROOT / ".cache" / "ollama-examples" / VERSION
ARTIFACT = ROOT / "test-artifacts" / "ollama_examples.md"
TIMEOUT = 240.0
"""Seconds per example: a bound against a script that loops, not a speed expectation (a tool loop of the
tiny model can fill a 1024-token context more than once at a few tokens per second on a busy machine)."""

NEEDS: dict[str, str] = {
    "generate-image.py": "an image-generation model (x/z-image-turbo; Ollama's experimental image output, macOS "
                         "only): llama.cpp text models produce no images",
    "multimodal-chat.py": "a vision model and an image file (it asks for the image's path on stdin): the default "
                          "model reads text only",
    "multimodal-generate.py": "the internet (it downloads an xkcd comic) and a vision model (llava)",
    "structured-outputs-image.py": "a vision model and an image file (it asks for the image's path on stdin)",
    "web-search.py": "Ollama's hosted web search with a key of its cloud; not run at all, since the client "
                     "would send OLLAMA_API_KEY (here our server's token) to that public host",
    "web-search-gpt-oss.py": "Ollama's hosted web search with a key of its cloud (and a cloud model); not run, "
                             "for the same reason as web-search.py",
    "web-search-mcp.py": "the mcp package and Ollama's hosted web search; it is an MCP stdio server that waits "
                         "for an MCP client; not run, for the same reason as web-search.py",
    "web_search_gpt_oss_helper.py": "nothing to run: a helper module web-search-gpt-oss.py imports, not an example",
    "thinking.py": "a thinking model (deepseek-r1): think=True on a model whose template has no reasoning is "
                   "refused, as Ollama refuses it ('does not support thinking')",
    "thinking-generate.py": "a thinking model (deepseek-r1), as thinking.py",
    "thinking-levels.py": "a model with thinking levels (gpt-oss: think='low'/'medium'/'high')",
    "multi-tool.py": "a thinking model with tools (qwen3): it sends think=True, refused as in thinking.py",
    "fill-in-middle.py": "a code model with fill-in-the-middle tokens (codellama:7b-code): the default model's "
                         "vocabulary has none, so 'suffix' is refused with 400 ('insert' capability), as Ollama does",
    "structured-outputs.py": "a model that closes the JSON it is asked for: with the schema's grammar the 135M "
                             "model repeats the two friends until the context is full, and the cut JSON fails "
                             "pydantic's validation (the server's output is valid JSON up to that cut)",
    "async-structured-outputs.py": "a model that closes the JSON it is asked for, as structured-outputs.py",
    "systemone.py": "Ollama's System One route (POST /v1/systemone) and its local 'nimble' scoring model, which "
                    "this server does not implement",
}
"""Examples not expected to pass here, each with what it needs that we do not have."""

TRIED = frozenset({"fill-in-middle.py", "thinking.py", "thinking-generate.py", "thinking-levels.py", "multi-tool.py",
                   "systemone.py"})
"""Listed examples that are still run, for the record: each is refused at once, touching nothing
beyond our server (the others would wait for stdin, reach the internet, or talk until the context
is full); their outcome is shown, not asserted."""

INTERACTIVE: dict[str, str] = {
    "chat-with-history.py": "What is the capital of France?\n",
}
"""Examples that read ``input()`` in an endless loop: given these lines, they answer them and end with
EOFError at the next prompt once stdin runs out (anything else reads /dev/null)."""

KEEP_NAMES = frozenset({"my-assistant"})
"""Model names an example creates itself (create.py's new model), not ones it expects to exist."""

KNOWN_MODELS = re.compile(
    r"""(['"])((?:gemma\d*|llama\d+(?:\.\d+)?|qwen\d*(?:\.\d+)?|gpt-oss|deepseek-r\d|codellama|llava|mistral|"""
    r"""phi\d*|nomic-embed-text|mxbai-embed-large|all-minilm|embeddinggemma|granite[\w.-]*|nimble|"""
    r"""x/z-image-turbo)(?::[\w.-]+)?)\1""")
"""A whole string literal that is a model name of the library, with or without its tag."""
MODEL_KEYWORDS = re.compile(r"""\b(model|from_)\s*=\s*(['"])([^'"\n]+)\2""")
"""``model='…'`` / ``from_='…'`` keyword arguments and ``model = '…'`` assignments."""


def rewrite_models(source: str) -> str:
    """``source`` with every model name it uses replaced by the default model's."""
    source = KNOWN_MODELS.sub(lambda m: f"{m.group(1)}{MODEL}{m.group(1)}", source)
    return MODEL_KEYWORDS.sub(
        lambda m: m.group(0) if m.group(3) in KEEP_NAMES else f"{m.group(1)}={m.group(2)}{MODEL}{m.group(2)}", source)


def model_names(source: str) -> set[str]:
    """The model names ``source`` passes by keyword or by a known name."""
    return {m.group(3) for m in MODEL_KEYWORDS.finditer(source)} | {m.group(2) for m in KNOWN_MODELS.finditer(source)}


UNREACHABLE = re.compile(r"NewConnectionError|Max retries exceeded|ConnectionError|Name or service not known|"
                         r"Temporary failure in name resolution|Network is unreachable|timed out|ProxyError|"
                         r"Could not fetch URL")


def _tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def examples_dir() -> Path:
    """The installed version's ``examples/`` from its sdist, fetched through pip's index once per machine."""
    target = CACHE / "examples"
    if target.is_dir():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        download = Path(tmp) / "sdist"
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               "--disable-pip-version-check", f"ollama=={VERSION}", "-d", str(download)],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            said = _tail(proc.stderr or proc.stdout)
            if UNREACHABLE.search(proc.stderr + proc.stdout):
                pytest.skip(f"the package index is unreachable, so ollama {VERSION}'s sdist (which holds its "
                            f"examples) cannot be fetched: {said}")
            pytest.fail(f"pip could not download ollama {VERSION}'s sdist: {said}")
        sdists = sorted(download.glob("*.tar.gz"))
        assert len(sdists) == 1, f"pip download gave {sorted(p.name for p in download.iterdir())}, not one sdist"
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers()
                       if m.isfile() and PurePosixPath(m.name).parts[1:2] == ("examples",)]
            if not members:
                names = sorted({"/".join(PurePosixPath(m.name).parts[1:2]) for m in tar.getmembers()} - {""})
                pytest.fail(f"ollama {VERSION}'s sdist has no examples/ directory; it holds {names}")
            tar.extractall(Path(tmp) / "x", members=members, filter="data")
        extracted = Path(tmp) / "x" / PurePosixPath(members[0].name).parts[0] / "examples"
        try:
            extracted.rename(target)  # atomic: a half-extracted directory is never taken for the cache
        except OSError:
            if not target.is_dir():  # not another run that got there first
                raise
    return target


@dataclass
class Outcome:
    example: str
    result: str
    """``pass``, ``fail`` or ``needs``"""
    detail: str = ""


def run_example(script: Path, url: str, token: str, workdir: Path) -> Outcome:
    """Run one rewritten example against the server at ``url``: pass on exit 0, else fail with stderr's end."""
    env = {**os.environ, "OLLAMA_HOST": url, "OLLAMA_API_KEY": token, "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
    stdin = INTERACTIVE.get(script.name)
    try:
        proc = subprocess.run([sys.executable, str(script)], cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT, input=stdin if stdin is not None else None,
                              stdin=subprocess.DEVNULL if stdin is None else None)
    except subprocess.TimeoutExpired as exc:
        said = [x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (exc.stdout, exc.stderr)]
        return Outcome(script.name, "fail", f"still running after {TIMEOUT:.0f} s; stdout ends "
                                            f"{said[0][-300:]!r}; stderr ends {said[1][-300:]!r}")
    if proc.returncode == 0:
        return Outcome(script.name, "pass", _tail(proc.stdout, 1)[:120])
    if stdin is not None and proc.stderr.strip().endswith("EOFError: EOF when reading a line") \
            and proc.stdout.count(":") >= 2:  # answered its lines, then the next prompt found stdin's end
        return Outcome(script.name, "pass", f"answered {stdin.count(chr(10))} line(s) of stdin, then EOFError")
    return Outcome(script.name, "fail", f"exit {proc.returncode}: {_tail(proc.stderr)}")


def table(outcomes: list[Outcome]) -> str:
    counts = {kind: sum(o.result == kind for o in outcomes) for kind in ("pass", "fail", "needs")}
    lines = [f"# ollama-python {VERSION} examples against jupyter_llm's Ollama API (model `{MODEL}`)", "",
             f"{counts['pass']} pass, {counts['fail']} fail, {counts['needs']} need what we lack "
             f"(of {len(outcomes)} scripts in the sdist's examples/)", "",
             "| example | result | detail |", "| --- | --- | --- |"]
    for o in outcomes:
        detail = " ".join(o.detail.split()).replace("|", "\\|")
        lines.append(f"| {o.example} | {o.result} | {detail} |")
    return "\n".join(lines) + "\n"


def test_model_names_are_rewritten_to_the_default_model_except_created_ones() -> None:
    source = ("chat('gemma4', messages=m)\ngenerate(model='codellama:7b-code', prompt=p)\nmodel = 'qwen3'\n"
              "embed(model=\"llama3.2\", input='Hello')\nclient.create(model='my-assistant', from_='gemma4')\n"
              "chat(model='some-new-model:1b')\nprint('The first is Ollama 22 years old')\n")
    rewritten = rewrite_models(source)
    assert model_names(rewritten) == {MODEL, "my-assistant"}
    assert "The first is Ollama 22 years old" in rewritten and "from_='smollm2'" in rewritten


def test_the_needs_list_names_only_examples_the_sdist_has() -> None:
    examples = {p.name for p in examples_dir().glob("*.py")}
    assert examples, "the sdist's examples/ has no scripts"
    assert set(NEEDS) | set(INTERACTIVE) <= examples, "stale entries: " + str((set(NEEDS) | set(INTERACTIVE))
                                                                               - examples)
    assert not set(NEEDS) & set(INTERACTIVE) and TRIED.issubset(NEEDS)


@pytest.mark.timeout(2400)  # a bound against a hang, not an expectation: ~10 min on a busy 2-core machine
def test_every_example_not_listed_as_needing_something_passes(smollm2_path: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    source_dir = examples_dir()
    workdir = tmp_path / "examples"
    workdir.mkdir()
    scripts = sorted(source_dir.glob("*.py"))
    for script in scripts:
        rewritten = rewrite_models(script.read_text(encoding="utf-8"))
        assert model_names(rewritten) <= {MODEL} | KEEP_NAMES, (script.name, model_names(rewritten))
        (workdir / script.name).write_text(rewritten, encoding="utf-8")
    # Ollama's examples never bound an answer (num_predict): the context per request does, so a
    # script that would talk until the context is full ends in seconds on the tiny model.
    monkeypatch.setenv("OLLAMA_CONTEXT_LENGTH", "1024")
    outcomes = []
    with running_server(smollm2_path, tmp_path / "server", parallel=1) as (_, server):
        for script in scripts:
            if script.name in TRIED:
                tried = run_example(workdir / script.name, server.url, str(server.token), workdir)
                said = tried.detail.strip().splitlines()[-1] if tried.detail.strip() else ""
                outcomes.append(Outcome(script.name, "needs", f"{NEEDS[script.name]}. Tried: {tried.result}, "
                                                              f"{said[:300]}"))
            elif script.name in NEEDS:
                outcomes.append(Outcome(script.name, "needs", NEEDS[script.name]))
            else:
                outcomes.append(run_example(workdir / script.name, server.url, str(server.token), workdir))
            with capsys.disabled():
                print(f"\n{outcomes[-1].example}: {outcomes[-1].result}", end="", flush=True)
    report = table(outcomes)
    ARTIFACT.parent.mkdir(exist_ok=True)
    ARTIFACT.write_text(report, encoding="utf-8")
    with capsys.disabled():
        print("\n" + report)
    failed = [o for o in outcomes if o.result == "fail"]
    assert not failed, "\n".join(f"{o.example}: {o.detail}" for o in failed)
    shutil.rmtree(workdir / "__pycache__", ignore_errors=True)
