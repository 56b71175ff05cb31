"""Ollama models: pulled from a registry into our store, or used in place from a local Ollama store.

Registry pulls speak Ollama's registry protocol (docs/notes.md §6): the manifest
``GET {registry}/v2/{ns}/{model}/manifests/{tag}`` lists layers by media type; each blob
``GET /v2/{ns}/{model}/blobs/sha256:<hex>`` (a 307 to a CDN that honours Range) goes through
:func:`~jupyter_llm.download.fetch`, sha256-verified (or is hard-linked to the same bytes already on
disk, :mod:`~jupyter_llm.store.blobs`), into our store in Ollama's own layout::

    $JUPYTER_LLM_HOME/ollama/blobs/sha256-<hex>
    $JUPYTER_LLM_HOME/ollama/manifests/<host>/<ns>/<model>/<tag>    (manifest bytes verbatim)

The manifest is written last, atomically, so it only ever names verified blobs; its sha256 is
the model ID, as in Ollama.

A local Ollama store (``$OLLAMA_MODELS``) is only ever read: its model blob is a plain GGUF
that llama.cpp loads in place, so nothing is copied and ``owned`` stays empty (Ollama may be
run by another user, and it prunes blobs no manifest references).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ... import config
from ...errors import AmbiguousModelError, ModelNotFoundError, RemoteError
from ...progress import ProgressFanout, PullProgress
from ..blobs import link_identical
from ..download import fetch
from ..http import get_bytes, make_client
from ..names import DEFAULT_NAMESPACE, OLLAMA_SCHEME
from . import Located, Pulled

if TYPE_CHECKING:
    from ..names import OllamaRef

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
_TEXT_LAYERS = {
    "application/vnd.ollama.image.template": "template",
    "application/vnd.ollama.image.system": "system",
    "application/vnd.ollama.image.license": "license",
}
_PARAMS_MEDIA_TYPE = "application/vnd.ollama.image.params"
_PATH_LAYERS = {
    "application/vnd.ollama.image.projector": "projector",
    "application/vnd.ollama.image.adapter": "adapter",
}
_SMALL_LAYER = 1 << 20  # template/system/params/license are text; never read a big blob into memory
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")


@dataclass
class LocalOllamaModel:
    """A model found in a local Ollama store, usable in place."""

    name: str
    """Our name for it: ``ollama://model:tag``, or ``ollama://host/ns/model:tag``."""
    host: str
    namespace: str
    model: str
    tag: str
    manifest: Path
    pulled: Pulled


def store_name(host: str, namespace: str, model: str, tag: str, *, unique: bool = True) -> str:
    """The name of an Ollama model: short for the default namespace, full otherwise.

    ``unique=False`` means the same ``namespace/model:tag`` exists under several hosts, so the
    short name would be ambiguous and the full one is used.
    """
    if namespace == DEFAULT_NAMESPACE and unique:
        return f"{OLLAMA_SCHEME}{model}:{tag}"
    return f"{OLLAMA_SCHEME}{host}/{namespace}/{model}:{tag}"


# -- registry pulls -------------------------------------------------------------------------------


def pull(ref: OllamaRef, *, name: str, progress: ProgressFanout) -> Pulled:
    """Pull ``ref`` from its registry into our store (see the module doc) and describe it.

    Raises :class:`ModelNotFoundError` when the registry does not know the name or tag (or no
    registry is configured), :class:`HostUnreachableError` within seconds when it cannot be
    reached, and the :func:`~jupyter_llm.download.fetch` errors for the blobs.
    """
    base = registry_url(ref)
    host = urlsplit(base).netloc
    repo = f"{ref.namespace}/{ref.model}"
    progress(PullProgress(name, "pulling manifest", message=f"{host}/{repo}:{ref.tag}"))
    client = make_client()
    try:
        raw, manifest = _fetch_manifest(ref, base, client)
        layers = _sized(_layers(manifest), f"{host}/{repo}:{ref.tag}")
        blobs_dir = _home() / "blobs"
        for layer in layers:
            hexdigest = _hex(layer["digest"])
            blob = blobs_dir / f"sha256-{hexdigest}"
            label = f"{ref.model}:{ref.tag} {hexdigest[:12]}"
            size = layer["size"]
            if not blob.is_file():
                link_identical(blob, hexdigest, size)
            fetch(
                f"{base}/v2/{repo}/blobs/{layer['digest']}", blob, sha256=hexdigest, size=size,
                on_bytes=progress.bytes_callback(name, label, layer["digest"]), client=client,
            )
            progress(PullProgress(name, "verifying sha256 digest", label, layer["digest"], size, size or 0))
    finally:
        client.close()

    progress(PullProgress(name, "writing manifest"))
    manifest_path = _home() / "manifests" / host / ref.namespace / ref.model / ref.tag
    _write_atomic(manifest_path, raw)
    model_layer = _model_layer(manifest)
    model_blob = _blob_path(_home(), model_layer["digest"])
    details = {
        "registry": base,
        "host": host,
        "namespace": ref.namespace,
        "model": ref.model,
        "tag": ref.tag,
        "manifest": str(manifest_path),
        **_describe(manifest, raw, _home()),
    }
    return Pulled(
        source="ollama",
        files=[model_blob],
        sha256=_hex(model_layer["digest"]),
        owned=[*dict.fromkeys(_blob_path(_home(), layer["digest"]) for layer in layers), manifest_path],
        details=details,
    )


def locate(ref: OllamaRef) -> Located:
    """Where the model blob a pull of ``ref`` would download is (the registry's blob URL, whose
    redirect to the CDN the client follows), found from the manifest as the pull finds it.

    Raises what a pull raises before its first blob byte (not found, unreachable, not a registry).
    """
    base = registry_url(ref)
    host = urlsplit(base).netloc
    client = make_client()
    try:
        _, manifest = _fetch_manifest(ref, base, client)
    finally:
        client.close()
    layer = _sized([_model_layer(manifest)], f"{host}/{ref.namespace}/{ref.model}:{ref.tag}")[0]
    return Located(f"{base}/v2/{ref.namespace}/{ref.model}/blobs/{layer['digest']}", layer["size"],
                   _hex(layer["digest"]), f"{host}/{ref.namespace}/{ref.model}:{ref.tag}")


def _fetch_manifest(ref: OllamaRef, base: str, client: Any) -> tuple[bytes, dict[str, Any]]:
    """The manifest's bytes as received, and parsed; an unknown name or tag is ModelNotFoundError."""
    host = urlsplit(base).netloc
    repo = f"{ref.namespace}/{ref.model}"
    try:
        raw = get_bytes(f"{base}/v2/{repo}/manifests/{ref.tag}", headers={"Accept": MANIFEST_MEDIA_TYPE},
                        client=client)
    except RemoteError as exc:
        if exc.status == 404:
            raise ModelNotFoundError(
                f"{repo}:{ref.tag} not found in the Ollama registry {host}; check the model name and tag "
                "(the registry's library page lists the tags)"
            ) from exc
        raise
    return raw, _parse_manifest(raw, f"{host}/{repo}:{ref.tag}")


def registry_url(ref: OllamaRef) -> str:
    """The registry base URL for ``ref``: its host, or ``config.ollama_registry()``.

    A bare host gets ``https://``, except loopback hosts (``http://``) and the configured
    default registry's host (its own scheme). Loopback means ``localhost`` or an address in
    127.0.0.0/8: ``127.evil.example`` is a host name anyone can point anywhere.
    """
    default = config.ollama_registry()
    if ref.registry is None:
        if default is None:
            raise ModelNotFoundError(
                f"{OLLAMA_SCHEME}{ref.model}:{ref.tag} is not in the local Ollama store "
                f"({config.ollama_store()}) and no Ollama registry is configured: set "
                "JUPYTER_LLM_OLLAMA_REGISTRY=https://HOST, or name the registry, e.g. "
                f"`{OLLAMA_SCHEME}HOST/{ref.namespace}/{ref.model}:{ref.tag}`"
            )
        return default.rstrip("/")
    if "://" in ref.registry:
        return ref.registry.rstrip("/")
    if default is not None and urlsplit(default).netloc == ref.registry:
        return default.rstrip("/")
    hostname = urlsplit(f"//{ref.registry}").hostname or ref.registry
    return f"{'http' if _is_loopback(hostname) else 'https'}://{ref.registry}"


def _is_loopback(hostname: str) -> bool:
    if hostname.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:  # a name, not an address: only DNS knows where it points
        return False


# -- a local Ollama store (read-only) --------------------------------------------------------------


def list_local_store(root: str | os.PathLike[str] | None = None) -> list[LocalOllamaModel]:
    """Every complete model in a local Ollama store (default ``config.ollama_store()``).

    Manifests whose model blob is missing, and unreadable files, are skipped: the store may
    be mid-pull or owned by someone else.
    """
    store = Path(root) if root is not None else config.ollama_store()
    manifests = store / "manifests"
    try:
        paths = sorted(p for p in manifests.glob("*/*/*/*") if p.is_file())
    except OSError:  # another user's store we may not read: it simply has nothing for us
        return []
    found: list[tuple[str, str, str, str, Path, Pulled]] = []
    for path in paths:
        host, namespace, model, tag = path.relative_to(manifests).parts
        pulled = _local_pulled(store, path, host, namespace, model, tag)
        if pulled is not None:
            found.append((host, namespace, model, tag, path, pulled))
    hosts_per_model = Counter((ns, m, t) for _, ns, m, t, _, _ in found)
    return [
        LocalOllamaModel(
            store_name(host, ns, m, t, unique=hosts_per_model[(ns, m, t)] == 1), host, ns, m, t, path, pulled
        )
        for host, ns, m, t, path, pulled in found
    ]


def resolve_local(ref: OllamaRef, root: str | os.PathLike[str] | None = None) -> Pulled | None:
    """``ref`` from the local Ollama store, usable in place, or None when the store lacks it.

    Without a registry in ``ref``, any host of the store matches; the configured default
    registry's host wins when several do, otherwise that is an :class:`AmbiguousModelError`.
    """
    matches = [
        m for m in list_local_store(root)
        if (m.namespace, m.model, m.tag) == (ref.namespace, ref.model, ref.tag)
    ]
    if ref.registry is not None:
        wanted = urlsplit(ref.registry).netloc if "://" in ref.registry else ref.registry
        matches = [m for m in matches if m.host == wanted]
    if len(matches) > 1:
        default = config.ollama_registry()
        preferred = [m for m in matches if default and m.host == urlsplit(default).netloc]
        if len(preferred) != 1:
            names = [m.name for m in matches]
            raise AmbiguousModelError(
                f"{ref.namespace}/{ref.model}:{ref.tag} is in the local Ollama store under several "
                f"registries: {', '.join(names)}; use one of those names",
                names,
            )
        matches = preferred
    return matches[0].pulled if matches else None


def pull_local(
    ref: OllamaRef, *, name: str, progress: ProgressFanout, root: str | os.PathLike[str] | None = None
) -> Pulled:
    """Like :func:`resolve_local`, but a model missing from the store is a :class:`ModelNotFoundError`."""
    pulled = resolve_local(ref, root)
    if pulled is None:
        store = Path(root) if root is not None else config.ollama_store()
        available = [m.name for m in list_local_store(root)]
        raise ModelNotFoundError(
            f"{ref.namespace}/{ref.model}:{ref.tag} is not in the local Ollama store {store} "
            f"(it has: {', '.join(available) or 'nothing'}); `ollama pull` it, or pull it from a registry",
            available[:5],
        )
    progress(PullProgress(name, "using local Ollama store", message=str(pulled.files[0])))
    return pulled


def _local_pulled(store: Path, manifest_path: Path, host: str, namespace: str, model: str,
                  tag: str) -> Pulled | None:
    try:
        raw = manifest_path.read_bytes()
        manifest = _parse_manifest(raw, str(manifest_path))
        layer = _model_layer(manifest)
        blob = _blob_path(store, layer["digest"])
        if not blob.is_file():
            return None
        details = {
            "store": str(store),
            "host": host,
            "namespace": namespace,
            "model": model,
            "tag": tag,
            "manifest": str(manifest_path),
            **_describe(manifest, raw, store),
        }
        return Pulled(source="ollama-store", files=[blob], sha256=_hex(layer["digest"]), owned=[],
                      details=details)
    except (OSError, RemoteError, ValueError, KeyError, TypeError):
        return None


# -- manifests and layers ---------------------------------------------------------------------------


def _parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise RemoteError(f"the manifest of {where} is not JSON ({exc}); the registry is not an Ollama "
                          "registry or sent an error page") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), list):
        raise RemoteError(f"the manifest of {where} has no layer list; it is not an Ollama model manifest")
    for layer in _layers(manifest):
        if not isinstance(layer, dict) or not _DIGEST.match(str(layer.get("digest", ""))):
            raise RemoteError(f"the manifest of {where} has a layer without a sha256 digest: {layer!r}")
    _model_layer(manifest, where)
    return manifest


def _sized(layers: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """``layers``, each with its byte size: the size bounds the download of the blob, whose body
    (chunked) may carry no length of its own and could otherwise grow until the disk is full."""
    for layer in layers:
        size = layer.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RemoteError(
                f"the manifest of {where} has a layer without a size ({layer['digest']}); the registry does "
                "not follow the registry protocol — report it to whoever runs it"
            )
    return layers


def _layers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Config blob first (Ollama keeps it too), then the layers."""
    config_blob = manifest.get("config")
    return ([config_blob] if isinstance(config_blob, dict) and config_blob.get("digest") else []) + list(
        manifest["layers"]
    )


def _model_layer(manifest: dict[str, Any], where: str = "the model") -> dict[str, Any]:
    for layer in manifest["layers"]:
        if isinstance(layer, dict) and layer.get("mediaType") == MODEL_MEDIA_TYPE:
            return layer
    raise RemoteError(f"the manifest of {where} has no model layer ({MODEL_MEDIA_TYPE})")


def _hex(digest: str) -> str:
    m = _DIGEST.match(digest)
    if m is None:
        raise RemoteError(f"{digest!r} is not a sha256 digest")
    return m.group(1)


def _blob_path(store: Path, digest: str) -> Path:
    return store / "blobs" / f"sha256-{_hex(digest)}"


def _describe(manifest: dict[str, Any], raw: bytes, store: Path) -> dict[str, Any]:
    """Digests, sizes and the small text layers (template, system, params, license)."""
    model_layer = _model_layer(manifest)
    details: dict[str, Any] = {
        "digest": model_layer["digest"],
        "manifest_digest": "sha256:" + hashlib.sha256(raw).hexdigest(),
        "size": model_layer.get("size"),
    }
    licenses: list[str] = []
    for layer in manifest["layers"]:
        media = layer.get("mediaType", "")
        blob = _blob_path(store, layer["digest"])
        if media in _PATH_LAYERS:
            details[_PATH_LAYERS[media]] = str(blob)
            continue
        if media not in _TEXT_LAYERS and media != _PARAMS_MEDIA_TYPE:
            continue
        text = _small_text(blob)
        if text is None:
            continue
        if media == _PARAMS_MEDIA_TYPE:
            with contextlib.suppress(ValueError):
                details["params"] = json.loads(text)
        elif _TEXT_LAYERS[media] == "license":
            licenses.append(text)
        else:
            details[_TEXT_LAYERS[media]] = text
    if licenses:
        details["license"] = "\n\n".join(licenses)
    config_blob = manifest.get("config")
    if isinstance(config_blob, dict) and config_blob.get("digest"):
        text = _small_text(_blob_path(store, config_blob["digest"]))
        if text is not None:
            with contextlib.suppress(ValueError):
                details["config"] = json.loads(text)
    return details


def _small_text(path: Path) -> str | None:
    try:
        if path.stat().st_size > _SMALL_LAYER:
            return None
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _home() -> Path:
    return config.home() / "ollama"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
