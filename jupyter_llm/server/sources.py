"""Where an API client may make the kernel pull from: registry and hub names, from registries
the user allowed, and nothing on this machine's disk.

``%llm pull`` takes any reference — the user typed it in their own notebook, local paths
included. A client of the HTTP API is someone else, so ``/api/pull`` takes only:

- a name already in the store (nothing is fetched);
- an alias (it pulls from the Hugging Face endpoint, with the package fallback the alias
  table names);
- ``hf.co/USER/REPO[:QUANT]`` — always from the configured Hugging Face endpoint;
- ``ollama://…`` from the configured Ollama registry (``JUPYTER_LLM_OLLAMA_REGISTRY``) or a
  host in ``JUPYTER_LLM_API_PULL_HOSTS``; any other host is refused before anything is
  sent, loopback and private addresses included (they were an SSRF: the kernel fetched any
  address a client named and reflected the answer, issue 11);
- ``pip:`` only with ``JUPYTER_LLM_API_PULL_PIP=1`` (it runs a download from the package index).

Local paths were registered and served, a non-GGUF file's first bytes were quoted in the 422
and "no such file" told which paths exist (issue 11). Now every other reference gets one
answer, the same whether or not a file of that name exists.
"""

from __future__ import annotations

import difflib
from typing import Any
from urllib.parse import urlsplit

from .. import config
from ..errors import ModelNotFoundError
from ..store import names
from .params import HTTPProblem

REMOTE_PREFIXES = (names.HF_PREFIX, names.HF_SCHEME, names.OLLAMA_SCHEME, names.PIP_PREFIX)
"""References whose parsing never looks at the disk (everything else may name a local file)."""


def check_pull(manager: Any, reference: str) -> Any:
    """The stored record if ``reference`` names a complete one (nothing to fetch), else None once
    the API may pull it; raises :class:`HTTPProblem` (403) or :class:`ModelNotFoundError` (404)."""
    record = manager.store.get(reference)
    if record is not None and not record.missing_files():
        return record
    text = reference.strip()
    if not text.lower().startswith(REMOTE_PREFIXES):
        try:
            ref = names.parse(text)
        except ModelNotFoundError:
            ref = None
        if not isinstance(ref, names.AliasRef):  # a path, or a name that is a file here: the same answer
            raise _not_pullable(text, manager)
        return None
    ref = names.parse(text)  # a malformed remote name: its own message, no file was looked at
    if isinstance(ref, names.PipRef) and not config.api_pull_pip():
        raise HTTPProblem(403, f"{text!r}: this server does not pull pip: references for API clients (they run a "
                          "download from the kernel's package index); pull it in the notebook (`%llm pull "
                          f"{text}`), or start Jupyter with JUPYTER_LLM_API_PULL_PIP=1", code="pull_not_allowed",
                          param="model")
    if isinstance(ref, names.OllamaRef) and ref.registry is not None:
        host = ref.registry.lower()
        if host not in allowed_hosts():
            raise HTTPProblem(403, f"{host!r} is not a registry this server pulls from for API clients: it pulls "
                              "from the configured Ollama registry (JUPYTER_LLM_OLLAMA_REGISTRY), the Hugging Face "
                              "endpoint and the hosts in JUPYTER_LLM_API_PULL_HOSTS; add the host there (in the "
                              f"kernel's environment), or pull it in the notebook (`%llm pull {text}`)",
                              code="pull_not_allowed", param="model")
    return None


def allowed_hosts() -> frozenset[str]:
    """Ollama registry hosts (``host[:port]``, lower case) API clients may pull from."""
    hosts = set(config.api_pull_hosts())
    default = config.ollama_registry()
    if default is not None:
        hosts.add(urlsplit(default).netloc.lower() if "://" in default else default.lower())
    return frozenset(hosts)


def _not_pullable(text: str, manager: Any) -> ModelNotFoundError:
    # Suggestions come from the alias table and the store only, never from the disk.
    pool = {n.lower(): n for n in [*names.aliases(), *manager.store.names()]}
    close = [pool[m] for m in difflib.get_close_matches(text.lower(), list(pool), n=3, cutoff=0.6)]
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return ModelNotFoundError(
        f"model {text!r} is neither in this server's store nor a name it pulls{hint}. The API pulls aliases (e.g. "
        f"smollm2), {names.HF_PREFIX}USER/REPO[:QUANT] and {names.OLLAMA_SCHEME}MODEL[:TAG]; a local file is "
        "added in the notebook with `%llm pull PATH`", close)
