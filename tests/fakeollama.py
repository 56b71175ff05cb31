"""A loopback fake Ollama registry, and a writer for a local Ollama store (docs/notes.md §6).

Registry routes:

- ``GET /v2/{ns}/{model}/manifests/{tag}``: the manifest bytes (docker manifest v2 media type);
  unknown names answer 404 with a registry error body;
- ``GET``/``HEAD /v2/{ns}/{model}/blobs/sha256:<hex>``: a 307 to a "CDN" on
  ``localhost:{port}`` (another origin than the ``127.0.0.1`` registry);
- ``GET /cdn/sha256-<hex>`` on the CDN origin, honouring ``Range``.

Request log and fault injection (drop after N bytes, corrupt, throttle, fail) come from
:class:`tests.fakehub.LoopbackServer`; blob keys are the hex digests.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.fakehub import LoggedRequest, LoopbackServer

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA = {
    "model": "application/vnd.ollama.image.model",
    "template": "application/vnd.ollama.image.template",
    "system": "application/vnd.ollama.image.system",
    "params": "application/vnd.ollama.image.params",
    "license": "application/vnd.ollama.image.license",
}


@dataclass
class FakeModel:
    """A model as the registry serves it: manifest bytes plus the blobs they name."""

    manifest: bytes
    blobs: dict[str, bytes]
    """hex digest → bytes"""
    model_digest: str
    """hex digest of the GGUF layer"""

    @property
    def manifest_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()


def build_model(model: bytes, *, template: str | None = "{{ .Prompt }}", system: str | None = None,
                params: dict[str, Any] | None = None, license: str | None = None) -> FakeModel:
    """Blobs and a manifest in Ollama's format for a GGUF ``model`` and its small layers."""
    blobs: dict[str, bytes] = {}
    layers = []

    def add(media: str, data: bytes) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)}

    layers.append(add(MEDIA["model"], model))
    for kind, value in (("template", template), ("system", system), ("license", license)):
        if value is not None:
            layers.append(add(MEDIA[kind], value.encode()))
    if params is not None:
        layers.append(add(MEDIA["params"], json.dumps(params).encode()))
    config_blob = json.dumps({
        "model_format": "gguf", "model_family": "llama", "model_families": ["llama"],
        "model_type": "tiny", "file_type": "Q4_1", "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]},
    }).encode()
    config_layer = add("application/vnd.docker.container.image.v1+json", config_blob)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "config": config_layer,
                           "layers": layers}, indent=None).encode()
    return FakeModel(manifest, blobs, layers[0]["digest"].removeprefix("sha256:"))


def write_local_store(root: Path, host: str, namespace: str, name: str, tag: str,
                      model: FakeModel) -> Path:
    """Write ``model`` into an Ollama store at ``root`` the way Ollama lays it out; the manifest path."""
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    for digest, data in model.blobs.items():
        (blobs / f"sha256-{digest}").write_bytes(data)
    manifest = root / "manifests" / host / namespace / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_bytes(model.manifest)
    return manifest


class FakeOllamaRegistry(LoopbackServer):
    """Serves models added with :meth:`add`, like an Ollama registry behind a CDN."""

    def __init__(self, lifetime: float = 300.0) -> None:
        super().__init__(lifetime)
        self.models: dict[tuple[str, str, str], FakeModel] = {}
        self.blobs: dict[str, bytes] = {}

    def add(self, namespace: str, name: str, tag: str, model: FakeModel) -> FakeModel:
        self.models[(namespace, name, tag)] = model
        self.blobs.update(model.blobs)
        return model

    def route(self, handler: BaseHTTPRequestHandler, method: str, entry: LoggedRequest) -> None:
        path = urlsplit(handler.path).path
        if path.startswith("/cdn/sha256-"):
            if not entry.host.startswith("localhost:"):
                self.reply(handler, entry, 404, {}, b"blobs are served by the CDN origin", method)
                return
            digest = path[len("/cdn/sha256-"):]
            data = self.blobs.get(digest)
            if data is None:
                self._error(handler, entry, method, 404, "BLOB_UNKNOWN", "blob unknown to registry")
                return
            self.serve_blob(handler, entry, method, digest, data)
            return
        parts = path.strip("/").split("/")
        if len(parts) == 5 and parts[0] == "v2" and parts[3] == "manifests":
            model = self.models.get((parts[1], parts[2], parts[4]))
            if model is None:
                self._error(handler, entry, method, 404, "MANIFEST_UNKNOWN", "manifest unknown")
                return
            digest = model.manifest_digest
            self.reply(handler, entry, 200, {"Content-Type": MANIFEST_MEDIA_TYPE,
                                             "Docker-Content-Digest": digest}, model.manifest, method)
            return
        if len(parts) == 5 and parts[0] == "v2" and parts[3] == "blobs" and parts[4].startswith("sha256:"):
            digest = parts[4].removeprefix("sha256:")
            if digest not in self.blobs:
                self._error(handler, entry, method, 404, "BLOB_UNKNOWN", "blob unknown to registry")
                return
            location = f"{self.cdn}/cdn/sha256-{digest}?sig=fake"
            self.reply(handler, entry, 307, {"Location": location}, b"", method)
            return
        self._error(handler, entry, method, 404, "NAME_UNKNOWN", "repository name not known to registry")

    def _error(self, handler: BaseHTTPRequestHandler, entry: LoggedRequest, method: str, status: int,
               code: str, message: str) -> None:
        body = {"errors": [{"code": code, "message": message}]}
        self.reply_json(handler, entry, body, status, method=method)
