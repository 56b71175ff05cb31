"""Weight repacking is decided per machine and weight type by a probe in its own process.

The verdicts differ between CPUs (the AMX machine crashes, an AMD EPYC is faster for Q4_0), so
no test expects a particular verdict: each checks that the probe answers with its numbers, that
the answer is kept, and that a load does what the verdict says.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jupyter_llm import config
from jupyter_llm.errors import WorkerCrashedError
from jupyter_llm.manager import ModelManager
from jupyter_llm.notebook.display import load_report
from jupyter_llm.options import LoadOptions, SamplingOptions
from jupyter_llm.runtime import repack
from jupyter_llm.runtime.process import Runtime
from jupyter_llm.store.gguf import scan

VERDICTS = {"safe+faster", "slower", "differs", "not repacked", "crashed", "busy"}
"""Every answer a probe that ran to its end may give ("busy": too loaded to time, not stored)."""
REPACKED_LINE = re.compile(r"\b(CPU_REPACK|AMX|KLEIDIAI)\b.*model buffer size")
"""llama.cpp's log line of a repacked weight buffer (docs/notes.md §3)."""


def _opts(**kw: Any) -> LoadOptions:
    return LoadOptions(**{"gpu_layers": 0, "n_ctx": 256, "threads": 2, "keep_alive": None, **kw})


@pytest.fixture(autouse=True)
def _fresh_verdicts() -> Iterator[None]:
    repack._unstored.clear()  # this process's unstored verdicts (the stored ones live in the test's home)
    yield
    repack._unstored.clear()


@pytest.fixture
def auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_LLM_REPACK", "auto")


@pytest.fixture
def no_probe(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Fails any attempt to start a probe subprocess; returns the attempts."""
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args)
        raise AssertionError("a probe subprocess was started")

    monkeypatch.setattr(repack.subprocess, "run", refuse)
    return attempts


@pytest.fixture
def q4_0_model(tmp_path: Path) -> Path:
    """A small random-weight Q4_0 llama model (written by the gguf package alone)."""
    from jupyter_llm.worker.repack_probe import write_model

    return write_model(tmp_path / "q4_0.gguf", "Q4_0")


@pytest.fixture
def mm() -> Iterator[ModelManager]:
    manager = ModelManager()
    yield manager
    manager.close()


def _repacked(model: Any) -> bool:
    return any(REPACKED_LINE.search(line) for line in model.report.log)


@pytest.mark.parametrize("quant", ["Q4_0", "Q8_0"])
def test_the_probe_measures_here_and_its_verdict_is_kept(quant: str, auto: None, monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    found = repack.verdict(quant)
    assert found["verdict"] in VERDICTS, found
    assert found["quant"] == quant and found["key"] == repack.cache_key(quant)
    assert found["wall_s"] < repack.TIMEOUT
    if found["verdict"] != "crashed":
        # both runs were compared against the exact (F32) product of the same weights
        assert 0 <= found["rel_err_plain"] < 0.5 and found["rel_err_repacked"] >= 0
        assert found["allowed"] > found["rel_err_plain"]
    if found["verdict"] in ("safe+faster", "slower"):
        assert found["decode_tok_s"]["plain"] > 0 and found["decode_tok_s"]["repacked"] > 0
        assert found["prompt_ms"]["plain"] > 0 and found["repacked_mib"] > 0
        assert (found["verdict"] == "safe+faster") == (found["decode_speedup"] >= 1.03
                                                        and found["prompt_speedup"] >= 1.0)
    if found["verdict"] != "busy":
        assert repack.cache_key(quant) in (config.home() / repack.CACHE_FILE).read_text()
    assert not any(p.name.startswith("probe-") for p in config.home().iterdir()), "the probe's models are deleted"

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a cached verdict must not start a probe")

    monkeypatch.setattr(repack.subprocess, "run", refuse)
    assert repack.verdict(quant) == found
    print(f"{quant} on {repack.cache_key(quant)}: {found}")


def test_the_cache_key_names_cpu_flags_build_and_type(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = ("Some CPU", {"avx2", "fma"})
    key = repack.cache_key("Q4_0", build="0.3.36+aaaa", cpu=cpu)
    assert key != repack.cache_key("Q4_0", build="0.3.37+aaaa", cpu=cpu)
    assert key != repack.cache_key("Q4_0", build="0.3.36+aaaa", cpu=("Some CPU", {"avx2", "fma", "amx_int8"}))
    assert key != repack.cache_key("Q4_0", build="0.3.36+aaaa", cpu=("Other CPU", {"avx2", "fma"}))
    assert key != repack.cache_key("Q8_0", build="0.3.36+aaaa", cpu=cpu)
    assert key == repack.cache_key("Q4_0", build="0.3.36+aaaa", cpu=("Some CPU", {"fma", "avx2"}))
    assert repack.build_id().startswith("0.3.")

    # a verdict stored for another build is not this build's
    repack._store(repack.cache_key("Q4_0"), {"verdict": "safe+faster", "quant": "Q4_0"})
    assert repack.cached("Q4_0") is not None
    monkeypatch.setattr(repack, "build_id", lambda: "9.9.9+other")
    assert repack.cached("Q4_0") is None


def test_a_probe_that_crashes_leaves_the_kernel_and_the_load_unaffected(
        auto: None, manager: ModelManager, smollm2_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    quant = repack.weight_type(scan(smollm2_path))
    assert quant is not None
    # whether this CPU has a kernel for the type or not, the verdict decides
    monkeypatch.setattr(repack, "candidates", lambda: frozenset({quant}))
    found = repack.verdict(quant, _fault="SIGSEGV")  # a real invalid read in the probe process
    assert found["verdict"] == "crashed" and found["signal"] == signal.Signals.SIGSEGV.name
    assert repack.cached(quant) == found, "kept: the probe does not run again"

    events: list[dict[str, Any]] = []
    manager.subscribe(events.append)
    model = manager.load("smollm2", _opts())
    assert model.repack is not None and not model.repack.use and "crashed" in model.repack.reason
    assert not _repacked(model)
    assert not any(e.get("status") for e in events if e["type"] == "loading"), "no second probe"
    with manager.using("smollm2") as m:
        done = m.runtime.generate("Hello", SamplingOptions(max_tokens=4, temperature=0.0)).result
    assert done.completion_tokens > 0 and model.runtime.alive
    assert os.getpid() > 0  # this process (the kernel) is still here to say so


def test_a_load_follows_the_verdict_of_its_weight_type(auto: None, mm: ModelManager, q4_0_model: Path) -> None:
    events: list[dict[str, Any]] = []
    mm.subscribe(events.append)
    assert repack.weight_type(scan(q4_0_model)) == "Q4_0"
    probed = "Q4_0" in repack.candidates()
    try:
        model = mm.load(str(q4_0_model), _opts())
    except WorkerCrashedError:  # pragma: no cover - only if a probe-passing CPU crashes on this model
        pytest.fail("a load whose repacking crashed must be made again without it")
    choice = model.repack
    assert choice is not None and choice.quant == "Q4_0"
    found = repack.cached("Q4_0")
    if probed:
        assert found is not None and found["verdict"] in VERDICTS
        assert choice.use == (found["verdict"] == repack.ON)
        assert any("checking once whether repacking Q4_0" in (e.get("status") or "") for e in events)
    else:
        assert found is None and not choice.use
    assert _repacked(model) == choice.use
    assert (choice.describe() in model.notices) == choice.use
    footer = load_report(model).footer or ""
    assert choice.describe() in footer and ("repacked: yes" in footer) == choice.use
    done = model.runtime.generate("a", SamplingOptions(max_tokens=3, temperature=0.0)).result
    assert done.completion_tokens > 0, "the model decodes with the weights as loaded"


def test_a_positive_verdict_turns_repacking_on(auto: None, mm: ModelManager, q4_0_model: Path,
                                              monkeypatch: pytest.MonkeyPatch, no_probe: list[Any]) -> None:
    monkeypatch.setattr(repack, "candidates", lambda: frozenset({"Q4_0"}))
    repack._store(repack.cache_key("Q4_0"), {"verdict": repack.ON, "quant": "Q4_0", "decode_speedup": 1.43,
                                             "prompt_speedup": 2.16})
    model = mm.load(str(q4_0_model), _opts())
    choice = model.repack
    assert choice is not None and not no_probe
    if choice.use:
        assert _repacked(model) and choice.reason == "probe passed, 1.43× decode, 2.16× prompt"
    else:  # a CPU whose load crashed with it (the verdict was planted, not measured): loaded without
        assert "crashed" in choice.reason and not _repacked(model)
    assert choice.describe() in model.notices and choice.describe() in (load_report(model).footer or "")
    assert model.runtime.generate("a", SamplingOptions(max_tokens=2, temperature=0.0)).result.completion_tokens > 0


def test_a_load_that_crashes_with_repacking_is_made_again_without(
        auto: None, mm: ModelManager, q4_0_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the probe's model passed, this model's load dies (a real SIGSEGV in its worker's warm-up)
    monkeypatch.setattr(repack, "candidates", lambda: frozenset({"Q4_0"}))
    repack._store(repack.cache_key("Q4_0"), {"verdict": repack.ON, "quant": "Q4_0", "decode_speedup": 1.4,
                                             "prompt_speedup": 2.1})
    real = Runtime.start
    starts: list[bool] = []

    def start(cls: type[Runtime], path: Any, options: Any = None, **kw: Any) -> Runtime:
        starts.append(bool(kw.get("_extra_bufts")))
        if kw.get("_extra_bufts"):
            kw["_fault"] = {"at": "warm_up", "signal": "SIGSEGV"}
        return real(path, options, **kw)

    monkeypatch.setattr(Runtime, "start", classmethod(start))
    model = mm.load(str(q4_0_model), _opts())
    assert starts == [True, False]
    assert model.repack is not None and not model.repack.use and "crashed" in model.repack.reason
    assert model.repack.describe() in model.notices and not _repacked(model)
    found = repack.cached("Q4_0")
    assert found is not None and found["verdict"] == "crashed", "not repacked from now on"
    assert model.runtime.generate("a", SamplingOptions(max_tokens=2, temperature=0.0)).result.completion_tokens > 0


def test_a_type_no_kernel_repacks_is_loaded_without_a_probe(
        auto: None, manager: ModelManager, monkeypatch: pytest.MonkeyPatch, no_probe: list[Any]) -> None:
    monkeypatch.setattr(repack, "candidates", lambda: frozenset())
    model = manager.load("smollm2", _opts())
    assert model.repack is not None and not model.repack.use and not model.repack.shown
    assert not _repacked(model) and not no_probe


def test_repack_off_in_the_environment_wins(q4_0_model: Path, mm: ModelManager, monkeypatch: pytest.MonkeyPatch,
                                           no_probe: list[Any]) -> None:
    monkeypatch.setenv("JUPYTER_LLM_REPACK", "off")
    repack._store(repack.cache_key("Q4_0"), {"verdict": "safe+faster", "quant": "Q4_0"})
    model = mm.load(str(q4_0_model), _opts())
    assert model.repack is not None and not model.repack.use and model.repack.reason == "JUPYTER_LLM_REPACK=off"
    assert not _repacked(model) and not no_probe


def test_repack_on_in_the_environment_wins(auto: None, q4_0_model: Path, mm: ModelManager,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # what this CPU does with Q4_0 repacked, measured first (the only probe of this test)
    monkeypatch.setattr(repack, "candidates", lambda: frozenset({"Q4_0"}))
    found = repack.verdict("Q4_0")
    monkeypatch.setenv("JUPYTER_LLM_REPACK", "on")
    monkeypatch.setattr(repack.subprocess, "run", lambda *a, **k: pytest.fail("forced on: no probe"))
    if found["verdict"] == "crashed":
        with pytest.raises(WorkerCrashedError):  # forced on: no silent fallback
            mm.load(str(q4_0_model), _opts())
        return
    assert "repacked_mib" in found, found  # the probe's repacked decode ran
    model = mm.load(str(q4_0_model), _opts())
    assert model.repack is not None and model.repack.use and model.repack.reason == "JUPYTER_LLM_REPACK=on"
    assert _repacked(model) == (found["repacked_mib"] > 0)
    assert model.repack.describe() in model.notices


def test_an_answer_for_now_only_is_kept_for_this_process_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def busy(quant: str, **kwargs: Any) -> dict[str, Any]:
        calls.append(quant)
        return {"verdict": "busy", "quant": quant, "load_avg": 11.5}

    monkeypatch.setattr(repack, "probe", busy)
    assert repack.verdict("Q4_0")["verdict"] == "busy"
    assert repack.verdict("Q4_0")["verdict"] == "busy" and calls == ["Q4_0"]
    assert not (config.home() / repack.CACHE_FILE).exists(), "the next kernel asks again"


def test_the_setting_is_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUPYTER_LLM_REPACK", raising=False)
    assert config.repack() == "auto"
    for raw, mode in (("on", "on"), ("1", "on"), ("OFF", "off"), ("false", "off"), (" auto ", "auto")):
        monkeypatch.setenv("JUPYTER_LLM_REPACK", raw)
        assert config.repack() == mode
    monkeypatch.setenv("JUPYTER_LLM_REPACK", "fast")
    with pytest.raises(ValueError, match="JUPYTER_LLM_REPACK"):
        config.repack()
