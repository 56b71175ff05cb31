"""`%llm` parsing: quotes work, bad values give usage errors that say what to type."""

from __future__ import annotations

from pathlib import Path

import IPython
import pytest
from IPython.core.error import UsageError
from IPython.testing.globalipapp import start_ipython

from jupyter_llm.notebook.chatcell import extract_code, substitute
from jupyter_llm.notebook.magics import LLMMagics, _build_parser, load_options, parse_duration
from jupyter_llm.store.sources import Pulled
from tests.ggufs import write_tiny_llama


@pytest.fixture
def magics() -> LLMMagics:
    ip = start_ipython() or IPython.get_ipython()
    ip.run_line_magic("load_ext", "jupyter_llm")
    return ip.magics_manager.registry["LLMMagics"]


@pytest.mark.parametrize(("text", "seconds"), [("5m", 300), ("30s", 30), ("1h", 3600), ("0", 0), ("-1", None),
                                              ("250ms", 0.25), ("45", 45)])
def test_keep_alive_durations_follow_ollama(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


def test_bad_duration_says_what_to_type() -> None:
    with pytest.raises(UsageError, match="5m, 30s"):
        parse_duration("soon")


def test_load_flags_become_options() -> None:
    args = _build_parser().parse_args(["load", "m", "--gpu-layers", "0", "--ctx", "auto", "--kv-type", "q8_0",
                                       "--flash-attn", "--parallel", "2", "--keep-alive", "-1"])
    options = load_options(args)
    assert (options.gpu_layers, options.n_ctx, options.kv_type, options.flash_attn) == (0, "auto", "q8_0", True)
    assert options.parallel == 2 and options.keep_alive is None


@pytest.mark.parametrize("line", ["load m --ctx lots", "load m --kv-type q3", "load m --parallel 0", "frobnicate"])
def test_invalid_input_is_a_usage_error(magics: LLMMagics, line: str) -> None:
    with pytest.raises(UsageError):
        magics.llm(line)


def test_help_lists_every_verb(magics: LLMMagics) -> None:
    text = repr(magics.llm("help"))
    for verb in ("pull", "list", "show", "rm", "cp", "devices", "estimate", "load", "ps", "unload", "%%chat"):
        assert verb in text


def test_quoted_paths_with_spaces_work(magics: LLMMagics, tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "my models" / "tiny one.gguf")
    result = magics.llm(f'pull "{path}"')
    assert result.data.files == [str(path)]
    listing = magics.llm("list")
    assert listing.rows[0][0] == "tiny one"
    shown = magics.llm('show "tiny one"')
    assert ["layers", "2"] in shown.rows


def test_rm_and_cp_through_the_magic(magics: LLMMagics, tmp_path: Path) -> None:
    from jupyter_llm.manager import get_manager

    blob = write_tiny_llama(tmp_path / "blob.gguf")
    get_manager().store.put("tiny", Pulled("pip", [blob], owned=[blob]))
    magics.llm("cp tiny other")
    assert "still used" in repr(magics.llm("rm tiny"))
    assert "deleted 1 file" in repr(magics.llm("rm other"))
    assert not blob.exists()


def test_variables_are_substituted_but_code_braces_stay() -> None:
    text, used = substitute("Tell me about {topic}; keep {unknown} and {{literal}} and {'a': 1}", {"topic": "moons"})
    assert text == "Tell me about moons; keep {unknown} and {{literal}} and {'a': 1}"
    assert used == [{"ref": "{topic}", "text": "moons"}]


def test_code_format_extracts_the_first_fence() -> None:
    assert extract_code("Here:\n```python\nprint(1)\n```\nmore") == "print(1)\n"
    assert extract_code("x = 1") == "x = 1\n"


def test_quantized_kv_without_flash_attention_says_to_add_it(magics: LLMMagics) -> None:
    with pytest.raises(UsageError, match="--flash-attn"):
        magics.llm("estimate m --kv-type q8_0 --no-flash-attn")


def test_devices_lists_host_ram_with_its_llama_cpp_backend(magics: LLMMagics) -> None:
    table = magics.llm("devices")
    cpu = next(row for row in table.rows if row[0] == "CPU")
    assert cpu[3] == "CPU", "llama.cpp's CPU backend, asked in a subprocess"
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    total_kib = int(meminfo["MemTotal"].split()[0])
    assert table.data[0].total_bytes == total_kib * 1024


def test_show_has_a_table_of_bytes_per_layer(magics: LLMMagics, smollm2_path: Path) -> None:
    from jupyter_llm.manager import get_manager
    from jupyter_llm.store.gguf import scan

    get_manager().store.put("smollm2", Pulled("pip", [smollm2_path], owned=[]))
    shown = magics.llm("show smollm2")
    layers = shown.sections[0]
    assert layers.columns[:2] == ["layers", "bytes per layer"]
    info = scan(smollm2_path)
    sizes = info.layer_bytes()
    covered = []
    for row in (row for row in layers.rows if row[0][0].isdigit()):
        first, _, last = row[0].partition("–")
        covered += range(int(first), int(last or first) + 1)
    assert covered == sorted(sizes), "every layer once, in order, identical neighbours as a range"
    assert any(row[0] == "token_embd.weight" for row in layers.rows), "tensors outside the layers too"
    text = repr(shown)
    assert "bytes per layer" in text and f"0–{len(sizes) - 1}" in text
    assert "layers" in shown._repr_html_() and "<table>" in shown._repr_html_()


def test_load_flags_left_out_take_the_environments_defaults_when_the_line_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = _build_parser()  # made before the variables are set, as by %load_ext
    monkeypatch.setenv("OLLAMA_CONTEXT_LENGTH", "1024")
    monkeypatch.setenv("OLLAMA_KV_CACHE_TYPE", "q8_0")
    options = load_options(parser.parse_args(["load", "m"]))
    assert (options.n_ctx, options.kv_type, options.flash_attn) == (1024, "q8_0", True)
    assert load_options(parser.parse_args(["load", "m", "--ctx", "2048"])).n_ctx == 2048
    with pytest.raises(UsageError, match="flash attention"):
        load_options(parser.parse_args(["load", "m", "--no-flash-attn"]))
