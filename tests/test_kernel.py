"""The magics in a real kernel: streaming, history, interrupt, faults that leave the kernel alive."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ggufs import truncate, write_not_gguf, write_tiny_llama
from tests.kernel import Kernel
from tests.model import SHA256

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Kernel]:
    root = tmp_path_factory.mktemp("kernel")
    env = {"JUPYTER_LLM_HOME": str(root / "home"), "HF_HOME": str(root / "hf"),
           "HF_HUB_CACHE": str(root / "hf" / "hub"), "OLLAMA_MODELS": str(root / "ollama"),
           "JUPYTER_LLM_HF_ENDPOINT": "http://127.0.0.1:9", "OMP_WAIT_POLICY": "PASSIVE"}
    k = Kernel(env)
    k.ok("%load_ext jupyter_llm")
    # Register the real default model under its alias, with its verified sha256.
    k.ok(f"""
from pathlib import Path
from jupyter_llm.manager import get_manager
from jupyter_llm.store.sources import Pulled
get_manager().store.put("smollm2", Pulled("pip", [Path({str(smollm2_path)!r})], sha256={SHA256!r}, owned=[]))
""")
    yield k
    k.close()


def test_chat_streams_into_the_cell_in_several_steps(kernel: Kernel) -> None:
    kernel.ok("%llm load smollm2 --ctx 2048 --keep-alive -1")
    run = kernel.ok("%%chat --new --temperature 0 --max-tokens 80 --seed 7\nWrite four short lines about the sea.")
    updates = run.updates()
    texts = [u["content"]["data"]["text/markdown"] for u in updates]
    assert len(set(texts)) >= 3, f"expected several distinct redraws, got {len(set(texts))}"
    final = updates[-1]
    meta = final["content"]["metadata"]["jupyter_llm"]
    assert meta["model"] == "smollm2" and meta["sha256"] == SHA256
    assert meta["seed"] == 7 and meta["sampling"]["temperature"] == 0
    assert meta["completion_tokens"] > 0
    assert "tok/s" in texts[-1] and "first token" in texts[-1]
    assert "▌" not in texts[-1], "the final redraw has no cursor"
    plain = [u["content"]["data"]["text/plain"] for u in updates]
    assert "tok/s" in plain[-1] and not any("<IPython" in p for p in plain), "text/plain carries the answer"


def test_chat_takes_the_text_in_groups_and_shows_all_of_it(kernel: Kernel) -> None:
    # The cell redraws every 0.1 s, so the worker sends its text at most every 0.05 s (the first
    # piece at once), not a message per token waking the kernel: the same answer in fewer messages.
    kernel.ok("%llm load smollm2 --ctx 2048 --keep-alive -1")
    kernel.ok("""
from jupyter_llm.manager import get_manager
_rt = get_manager().get('smollm2').runtime
_chat, _streams = _rt.chat, []
def _spy(*a, **k):
    _streams.append(_chat(*a, **k))
    return _streams[-1]
_rt.chat = _spy
""")
    try:
        run = kernel.ok("%%chat --new --temperature 0 --max-tokens 120 --seed 1\nTell a long story about a ship.")
    finally:
        kernel.ok("_rt.chat = _chat")
    shown = run.updates()[-1]["content"]["data"]["text/plain"]
    got = json.loads(kernel.ok("import json\n_s = _streams[-1]\nprint(json.dumps([_s.extras.every, len(_s._parts), "
                               "_s.result.completion_tokens, _s.result.text, _s.result.total_s]))").texts()[-1])
    every, messages, tokens, text, seconds = got
    assert every == 0.05 and tokens == 120
    # at most one message per interval (plus the first and the last), fewer than the tokens
    assert 2 <= messages <= seconds / every + 2 and messages < tokens, f"{messages} messages, {seconds:.2f} s"
    assert text.strip() and text.strip() in shown
    same = kernel.ok("import jupyter_llm as _llm\nprint(json.dumps(''.join(_llm.Model('smollm2').chat("
                     "[{'role': 'user', 'content': 'Tell a long story about a ship.'}], stream=True, "
                     "temperature=0, max_tokens=120, seed=1))))").texts()[-1]
    assert json.loads(same) == text  # nothing lost or reordered in the grouping


def test_a_late_first_token_shows_the_cursor_until_it_comes(kernel: Kernel) -> None:
    kernel.ok("%llm load smollm2 --ctx 2048 --keep-alive -1 --parallel 1")
    # The one slot is busy with a long answer (far more than PLACEHOLDER_AFTER_S on any CPU), so
    # the cell's first token waits: the empty answer with its cursor is drawn meanwhile.
    kernel.ok("import threading, time, jupyter_llm as _llm\n_m = _llm.Model('smollm2')\n"
              "_bg = threading.Thread(target=lambda: _m.chat('Tell a long story.', temperature=0, max_tokens=400))\n"
              "_bg.start(); time.sleep(0.5)")
    try:
        run = kernel.ok("%%chat --new --temperature 0 --max-tokens 8 --seed 1\nSay hi.")
    finally:
        kernel.ok("_bg.join()")
    shown = [m["content"]["data"].get("text/markdown", "") for m in run.messages if m["msg_type"] == "display_data"]
    assert shown and shown[0].strip() == "▌", shown
    final = run.updates()[-1]["content"]
    assert final["metadata"]["jupyter_llm"]["completion_tokens"] > 0
    assert "▌" not in final["data"]["text/markdown"]


def test_chat_metadata_records_how_the_model_was_loaded(kernel: Kernel) -> None:
    from importlib.metadata import version

    kernel.ok("%llm load smollm2 --ctx 2048 --keep-alive -1")
    run = kernel.ok('%%chat --new --session p --system "Answer in one word." --temperature 0 --max-tokens 4\n'
                    "Say hi.")
    meta = run.updates()[-1]["content"]["metadata"]["jupyter_llm"]
    assert (meta["n_ctx"], meta["kv_type"], meta["flash_attn"]) == (2048, "f16", True)  # the defaults
    assert meta["system"] == "Answer in one word."
    assert meta["llama_cpp"]["version"] == version("llama-cpp-python")
    assert "CPU" in meta["llama_cpp"]["system_info"], "llama.cpp's own build and CPU features"
    run = kernel.ok("import sys; print('llama_cpp' in sys.modules)")
    assert run.texts()[-1].strip() == "False", "the version is read without importing llama_cpp"


def test_chat_answers_with_the_most_recently_loaded_model_and_names_it(kernel: Kernel, tmp_path: Path) -> None:
    tiny = write_tiny_llama(tmp_path / "tiny5.gguf")
    kernel.ok("%llm load smollm2 --ctx 1024 --keep-alive -1")
    first = kernel.ok("%%chat --new --session m --temperature 0 --max-tokens 4\nHi.")
    assert first.updates()[-1]["content"]["metadata"]["jupyter_llm"]["model"] == "smollm2"
    kernel.ok(f"%llm load {tiny} --ctx 256 --keep-alive -1")
    try:
        run = kernel.ok("%%chat --session m --temperature 0 --max-tokens 4\nHi again.")
        final = run.updates()[-1]["content"]
        assert final["metadata"]["jupyter_llm"]["model"] == "tiny5", "the model loaded last answers"
        assert "tiny5" in final["data"]["text/markdown"].rsplit("<sub>", 1)[-1], "the footer names it"
        named = kernel.ok("%%chat -m smollm2 --session m --temperature 0 --max-tokens 4\nAnd now?")
        assert named.updates()[-1]["content"]["metadata"]["jupyter_llm"]["model"] == "smollm2"
    finally:
        kernel.ok("%llm unload tiny5")


def test_a_chat_that_reloads_its_model_says_what_the_load_did(kernel: Kernel) -> None:
    kernel.ok("%llm load smollm2 --ctx 512 --keep-alive -1")
    kernel.ok("%%chat --new --session r --temperature 0 --max-tokens 4\nHi.")
    kernel.ok("%llm unload --all")
    run = kernel.ok("%%chat --session r --temperature 0 --max-tokens 4\nHi again.")
    notes = [t for t in run.texts() if t.startswith("*⚠")]
    assert any("reloaded smollm2" in t and "ctx=512" in t for t in notes), run.texts()


def test_chat_prompts_refer_to_in_out_and_the_last_error(kernel: Kernel) -> None:
    kernel.ok("%llm load smollm2 --ctx 2048 --keep-alive -1")
    given = kernel.ok("21 * 2").reply["content"]["execution_count"]
    failed = kernel.run("def broken():\n    return 1 / 0\nbroken()")
    assert failed.status == "error"
    raised = failed.reply["content"]["execution_count"]
    run = kernel.ok(f"%%chat --new --session e --temperature 0 --max-tokens 8\n"
                    f"Cell {{In[{given}]}} gave {{Out[{given}]}}. Why this error?\n{{Err}}")
    meta = run.updates()[-1]["content"]["metadata"]["jupyter_llm"]
    used = {u["ref"]: u for u in meta["substituted"]}
    assert used[f"{{Out[{given}]}}"]["text"] == "42" and used[f"{{In[{given}]}}"]["text"] == "21 * 2"
    assert used["{Err}"]["as"] == f"Err[{raised}]"
    run = kernel.ok("import json; from jupyter_llm.manager import get_manager; "
                    "print(json.dumps(get_manager().session('e').messages[0]['content']))")
    prompt = json.loads(run.texts()[-1])
    assert prompt.startswith("Cell 21 * 2 gave 42. Why this error?\n")
    assert "ZeroDivisionError: division by zero" in prompt and "return 1 / 0" in prompt
    assert "\x1b[" not in prompt, "the kernel's coloured traceback is sent without colours"


def test_history_is_kept_and_new_starts_over(kernel: Kernel) -> None:
    kernel.ok("%llm load smollm2 --ctx 2048 --keep-alive -1")
    kernel.ok("%%chat --new --session h --temperature 0 --max-tokens 20\nMy name is Ada.")
    kernel.ok("name = 'Ada'")
    kernel.ok("%%chat --session h --temperature 0 --max-tokens 20\nWhat is my name? Is it {name}?")
    run = kernel.ok("import json; from jupyter_llm.manager import get_manager; "
                    "print(json.dumps(get_manager().session('h').messages))")
    messages = json.loads(run.texts()[-1])
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == "What is my name? Is it Ada?"
    kernel.ok("%%chat --new --session h --temperature 0 --max-tokens 5\nHello")
    run = kernel.ok("print(len(get_manager().session('h').messages))")
    assert run.texts()[-1].strip() == "2"


def test_context_overflow_drops_old_turns_visibly_or_refuses(kernel: Kernel) -> None:
    kernel.ok("%llm load smollm2 --ctx 256 --keep-alive -1")
    kernel.ok("filler = 'The quick brown fox jumps over the lazy dog. ' * 5")
    notices = []
    for _ in range(4):
        run = kernel.ok("%%chat -m smollm2 --session o --temperature 0 --max-tokens 20\n"
                        "Summarise: {filler}")
        notices += [t for t in run.texts() if "dropped" in t]
    assert notices, "old turns must be dropped with a visible notice"
    assert "256-token context" in notices[0]
    run = kernel.run("%%chat -m smollm2 --session o --max-tokens 20\n{filler}{filler}{filler}{filler}{filler}")
    assert run.status == "error" and "ContextOverflowError" in (run.error or "")
    assert "--ctx 512" in (run.error or ""), run.error
    kernel.alive_check()


def test_interrupt_during_a_long_prompt_stops_and_the_model_stays_usable(kernel: Kernel) -> None:
    kernel.ok("%llm load smollm2 --ctx 8192 --keep-alive -1")
    kernel.ok("long_text = 'The quick brown fox jumps over the lazy dog. ' * 250")
    started = threading.Event()

    def interrupt_soon() -> None:
        started.wait(60)
        time.sleep(0.5)  # well inside the prompt evaluation (~2750 tokens)
        kernel.km.interrupt_kernel()

    threading.Thread(target=interrupt_soon, daemon=True).start()

    def on_message(msg: dict) -> None:
        if msg["msg_type"] == "display_data":
            started.set()

    t0 = time.perf_counter()
    # --max-tokens is large so that the cell is still running when the interrupt comes, however
    # fast this CPU evaluates the prompt.
    run = kernel.run("%%chat --new --session i --max-tokens 1000\n{long_text}", on_message=on_message)
    elapsed = time.perf_counter() - t0
    assert run.status == "error" and run.reply["content"]["ename"] == "KeyboardInterrupt"
    # The prompt alone takes 4-40 s on the CPUs seen; stopping must be prompt (exact latency: bench/).
    assert elapsed < 20
    final = run.updates()[-1]["content"]
    assert final["metadata"]["jupyter_llm"]["stopped"] is True
    run = kernel.ok("%%chat --new --session i --temperature 0 --max-tokens 8\nSay hi.")
    assert run.updates()[-1]["content"]["metadata"]["jupyter_llm"]["completion_tokens"] > 0


def test_faults_are_reported_and_the_kernel_lives_on(kernel: Kernel, tmp_path: Path, smollm2_path: Path) -> None:
    truncated = truncate(write_tiny_llama(tmp_path / "trunc.gguf"), -1000)  # cut into the tensor data
    not_gguf = write_not_gguf(tmp_path / "notgguf.gguf")
    deep = write_tiny_llama(tmp_path / "deep.gguf", block_count=1000)
    kernel.ok("precious = [1, 2, 3]")

    run = kernel.run(f"%llm load {truncated}")
    assert run.status == "error" and "Truncated" in (run.error or "")
    kernel.alive_check()

    run = kernel.run(f"%llm load {not_gguf}")
    assert run.status == "error" and "not a GGUF" in (run.error or "")
    kernel.alive_check()

    run = kernel.run(f"%llm load {deep} --ctx 256")
    assert run.status == "error", "a GGUF claiming 1000 blocks must not load"
    assert any(word in (run.error or "") for word in ("SIGABRT", "block", "1000")), run.error
    kernel.alive_check()

    run = kernel.run("%llm load smollm2 --ctx 4000000 --keep-alive -1")
    assert run.status == "error" and "WontFitError" in (run.error or "")
    assert "--ctx" in (run.error or "") or "context" in (run.error or "")
    run = kernel.run("%llm load smollm2 --ctx 4000000 --force")
    assert run.status == "error", "a KV cache far beyond RAM must fail cleanly"
    kernel.alive_check()

    # A segfault in the worker's first multi-token decode (where weight repacking crashes on
    # Intel AMX CPUs), made to happen on any CPU.
    run = kernel.run(f"""
from jupyter_llm.runtime import Runtime
from jupyter_llm.options import LoadOptions
Runtime.start({str(smollm2_path)!r}, LoadOptions(gpu_layers=0, n_ctx=512),
              _fault={{"at": "warm_up", "signal": "SIGSEGV"}})
""")
    assert run.status == "error" and "WorkerCrashedError" in (run.error or "") and "SIGSEGV" in (run.error or "")
    kernel.alive_check()

    run = kernel.ok("print(precious)")
    assert run.texts()[-1].strip() == "[1, 2, 3]"
    kernel.ok("%llm load smollm2 --ctx 1024 --keep-alive -1")
    run = kernel.ok("%%chat --new --temperature 0 --max-tokens 8\nSay hi.")
    assert run.updates()[-1]["content"]["metadata"]["jupyter_llm"]["completion_tokens"] > 0


def test_keep_alive_expiry_unloads_and_frees_the_worker(kernel: Kernel) -> None:
    kernel.ok("%llm unload --all")
    run = kernel.ok("%llm load smollm2 --ctx 512 --keep-alive 1s\n"
                    "from jupyter_llm.manager import get_manager\n"
                    "print(get_manager().get('smollm2').runtime.pid)")
    pid = int(run.texts()[-1].strip())
    assert Path(f"/proc/{pid}").exists()
    deadline = time.monotonic() + 15
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not Path(f"/proc/{pid}").exists(), "keep_alive expiry must stop the worker"
    run = kernel.ok("%llm ps")
    assert "No model is loaded" in run.texts()[-1]


def test_reload_ext_leaves_a_working_manager_whose_keep_alive_still_unloads(kernel: Kernel) -> None:
    kernel.ok("%llm load smollm2 --ctx 512 --keep-alive -1")
    old = int(kernel.ok("from jupyter_llm.manager import get_manager\n"
                        "print(get_manager().get('smollm2').runtime.pid)").texts()[-1])
    kernel.ok("%reload_ext jupyter_llm")
    assert not Path(f"/proc/{old}").exists() or _wait_gone(old, 10), "unloading the extension stops its workers"
    run = kernel.ok("%llm load smollm2 --ctx 512 --keep-alive 1s\n"
                    "from jupyter_llm.manager import get_manager\n"
                    "print(get_manager().get('smollm2').runtime.pid)")
    pid = int(run.texts()[-1].strip())
    assert _wait_gone(pid, 15), "after %reload_ext, keep_alive must still unload the model"
    assert "No model is loaded" in kernel.ok("%llm ps").texts()[-1]


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.25)
    return not Path(f"/proc/{pid}").exists()


def test_format_code_puts_the_answer_into_a_new_cell(kernel: Kernel) -> None:
    kernel.ok("%llm load smollm2 --ctx 1024 --keep-alive -1")
    run = kernel.ok("%%chat --new --format code --temperature 0 --max-tokens 60\n"
                    "Write a Python function that adds two numbers.")
    payloads = [p for p in run.reply["content"].get("payload", []) if p.get("source") == "set_next_input"]
    assert len(payloads) == 1 and payloads[0]["replace"] is False
    assert payloads[0]["text"].strip(), "the new cell holds the code"
    assert "```" not in payloads[0]["text"]
    for update in run.updates():
        fences = [line for line in update["content"]["data"]["text/markdown"].splitlines()
                  if line.startswith("```")]
        assert len(fences) <= 2, "one code block while streaming, never fences inside fences"


def test_format_json_returns_parsed_json(kernel: Kernel) -> None:
    kernel.ok("%llm load smollm2 --ctx 1024 --keep-alive -1")
    run = kernel.ok("%%chat --new --format json --temperature 0 --max-tokens 300\n"
                    "Describe a cat as a small JSON object with a name and an age.")
    results = [m for m in run.messages if m["msg_type"] == "execute_result"]
    assert results, "the parsed JSON is the cell's value"
    run = kernel.ok("print(type(_).__name__)")
    assert run.texts()[-1].strip() in ("dict", "list")


def test_format_json_cut_short_says_so(kernel: Kernel) -> None:
    kernel.ok("%llm load smollm2 --ctx 1024 --keep-alive -1")
    run = kernel.ok("%%chat --new --format json --temperature 0 --max-tokens 5\nDescribe a cat as JSON.")
    assert any("not complete JSON" in t and "--max-tokens" in t for t in run.texts()), run.texts()


def test_the_readmes_notebook_examples_run_as_they_read(kernel: Kernel) -> None:
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## In a notebook", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```[a-z]*\n(.*?)```", section, re.S)
    assert len(blocks) >= 2 and blocks[0].lstrip().startswith("%load_ext") and blocks[1].startswith("%%chat")
    for block in blocks:
        kernel.ok(block)
    run = kernel.ok(blocks[1])
    assert run.updates()[-1]["content"]["metadata"]["jupyter_llm"]["completion_tokens"] > 0
