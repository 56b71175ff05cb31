"""The remote engines this kernel uses: added, listed, removed, persisted, and what each reports.

A remote is a name, a base URL, the API it speaks (``openai`` or ``ollama``) and, optionally,
the name of the environment variable that holds its token — never the token itself, which
is read when a request is sent. The list lives in ``remotes.json`` in the store's home,
written atomically. Its models are named ``NAME/MODEL`` everywhere a model name goes.

What a remote reports (its models, what it has loaded, its metrics) is polled on demand and
kept for :data:`STATE_TTL` seconds. Polls run in threads of their own: a caller waits at most
about :data:`~jupyter_llm.remote.client.CONNECT_S` + :data:`~jupyter_llm.remote.client.POLL_S`
seconds (a refused port answers at once), and :meth:`Remotes.snapshot` never waits at all.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelNotFoundError, RemoteEngineError
from ..progress import Listener, ProgressFanout, PullProgress
from .client import CONNECT_S, HOP_HEADER, POLL_S, Client
from .model import RemoteModel, RemoteRuntime
from .ollama_engine import OllamaEngine
from .openai_engine import OpenAIEngine

log = logging.getLogger("jupyter_llm")

APIS = ("openai", "ollama")
STATE_TTL = 5.0
"""Seconds a remote's reported state is reused before it is asked again."""
FILE = "remotes.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


@dataclass(frozen=True)
class Remote:
    """One remote engine; ``token_env`` names the variable holding its token."""

    name: str
    url: str
    api: str
    token_env: str | None = None

    def token(self) -> str | None:
        return os.environ.get(self.token_env) or None if self.token_env else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check(name: str, url: str, api: str, token_env: str | None) -> Remote:
    """A valid remote from what the user typed, or ValueError saying what to fix."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"remote name {name!r}: use letters, digits, '-' and '_' (no '/' or '.'), at most 64")
    if api not in APIS:
        raise ValueError(f"--api {api!r}: give openai (llama-server, vLLM, LM Studio) or ollama")
    if token_env is not None and not _ENV.fullmatch(token_env):
        raise ValueError(f"--token-env {token_env!r} is not an environment variable's name: give the variable's "
                         "NAME (e.g. --token-env MY_ENGINE_TOKEN), never the token itself")
    text = url.strip().rstrip("/")
    if not re.fullmatch(r"https?://[^/\s@]+(/\S*)?", text):
        raise ValueError(f"remote address {url!r}: give http://HOST:PORT or https://HOST[:PORT][/PATH] "
                         "(no user or password in it: put a token in an environment variable and name it "
                         "with --token-env)")
    if api == "openai" and text.endswith("/v1"):
        text = text[:-3]  # the routes are asked for with their /v1 prefix
    return Remote(name, text, api, token_env)


def _broken(exc: RemoteEngineError) -> dict[str, Any]:
    """The state shown in place of the remotes when their file cannot be read."""
    return {"name": "?", "url": "?", "api": "?", "token_env": None, "state": "error", "error": str(exc),
            "models": [], "running": [], "checked_at": None, "polling": False}


class Remotes:
    """The remotes of one manager: persisted in ``path()``, states polled on demand."""

    def __init__(self, path: Callable[[], Path], emit: Callable[..., None]) -> None:
        self._path = path
        self._emit = emit
        self._lock = threading.Lock()
        self._read_at: tuple[Path, int, int] | None = None
        self._remotes: dict[str, Remote] = {}
        self._states: dict[str, dict[str, Any]] = {}
        self._polls: dict[str, threading.Thread] = {}
        self._warned = False

    # -- the list ----------------------------------------------------------------------------

    def _load(self) -> dict[str, Remote]:
        """The remotes in the file (read again only when it changed)."""
        path = self._path() / FILE
        try:
            st = path.stat()
        except FileNotFoundError:
            with self._lock:
                self._read_at, self._remotes = None, {}
                return {}
        key = (path, st.st_mtime_ns, st.st_size)
        with self._lock:
            if self._read_at == key:
                return dict(self._remotes)
        try:
            items = json.loads(path.read_text("utf-8")).get("remotes") or []
            found = {}
            for item in items:
                remote = check(str(item["name"]), str(item["url"]), str(item["api"]), item.get("token_env"))
                found[remote.name] = remote
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RemoteEngineError(f"{path} is not a valid remotes file ({exc}); fix or delete it, then "
                                    "`%llm remote add` again") from None
        with self._lock:
            self._read_at, self._remotes = key, found
        return dict(found)

    def _save(self, remotes: dict[str, Remote]) -> None:
        path = self._path() / FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"remotes": [r.to_dict() for r in remotes.values()]}, indent=2)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".remotes-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # readers see the old list or the new one, never half of one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def add(self, name: str, url: str, *, api: str = "openai", token_env: str | None = None) -> Remote:
        """Add (or replace) the remote ``name``; its models are then ``name/MODEL``."""
        remote = check(name, url, api, token_env)
        remotes = self._load()
        remotes[remote.name] = remote
        self._save(remotes)
        with self._lock:
            self._states.pop(remote.name, None)
        self._emit("remotes")
        return remote

    def remove(self, name: str) -> Remote:
        remotes = self._load()
        if name not in remotes:
            raise self._unknown(name, remotes)
        remote = remotes.pop(name)
        self._save(remotes)
        with self._lock:
            self._states.pop(name, None)
        self._emit("remotes")
        return remote

    def all(self) -> list[Remote]:
        return sorted(self._load().values(), key=lambda r: r.name)

    def get(self, name: str) -> Remote:
        remotes = self._load()
        if name not in remotes:
            raise self._unknown(name, remotes)
        return remotes[name]

    @staticmethod
    def _unknown(name: str, remotes: dict[str, Remote]) -> ModelNotFoundError:
        known = ", ".join(sorted(remotes)) or "none yet"
        return ModelNotFoundError(f"no remote named {name!r} (remotes: {known}); `%llm remote add {name} URL --api "
                                  "openai|ollama` adds one", sorted(remotes))

    def split(self, reference: str | None) -> tuple[Remote, str] | None:
        """``(remote, model)`` when ``reference`` is ``NAME/MODEL`` of a known remote, else None."""
        if not reference or "/" not in reference:
            return None
        head, _, model = reference.partition("/")
        try:
            remote = self._load().get(head)
        except RemoteEngineError as exc:  # a broken remotes file must not stop the local models
            if not self._warned:
                self._warned = True
                log.warning("%s", exc)
            return None
        return (remote, model) if remote is not None and model else None

    def engine(self, remote: Remote) -> OpenAIEngine | OllamaEngine:
        client = Client(remote)
        return OllamaEngine(client) if remote.api == "ollama" else OpenAIEngine(client)

    def model(self, reference: str | None) -> RemoteModel | None:
        """The remote model ``reference`` names, or None if it names no remote (no request sent)."""
        found = self.split(reference)
        if found is None:
            return None
        remote, model = found
        return RemoteModel(f"{remote.name}/{model}", remote.name, model, RemoteRuntime(self.engine(remote), model))

    # -- what the remotes report ---------------------------------------------------------------

    def states(self, *, max_age: float = STATE_TTL, wait: float = CONNECT_S + POLL_S) -> list[dict[str, Any]]:
        """Each remote's state, asked again when older than ``max_age`` seconds; waits at most
        ``wait`` seconds in all (a remote still answering then is shown as it was, "polling")."""
        try:
            remotes = self.all()
        except RemoteEngineError as exc:
            return [_broken(exc)]
        polls = [self._poll(r, max_age) for r in remotes]
        deadline = time.monotonic() + wait
        for poll in polls:
            if poll is not None:
                poll.join(max(0.0, deadline - time.monotonic()))
        return [self._state_of(r) for r in remotes]

    def snapshot(self) -> list[dict[str, Any]]:
        """The states as last polled (stale ones are polled in the background; never waits)."""
        try:
            remotes = self.all()
        except RemoteEngineError as exc:
            return [_broken(exc)]
        for remote in remotes:
            self._poll(remote)
        return [self._state_of(r) for r in remotes]

    def _state_of(self, remote: Remote) -> dict[str, Any]:
        with self._lock:
            state = self._states.get(remote.name)
            polling = remote.name in self._polls
        if state is None:
            state = {"state": "checking" if polling else "unknown", "error": None, "models": [], "running": [],
                     "checked_at": None}
        return {**remote.to_dict(), **state, "polling": polling}

    def _poll(self, remote: Remote, max_age: float = STATE_TTL) -> threading.Thread | None:
        """Start asking ``remote`` for its state unless it was asked recently (or is being asked)."""
        with self._lock:
            running = self._polls.get(remote.name)
            if running is not None:
                return running
            state = self._states.get(remote.name)
            if state is not None and time.time() - state["checked_at"] < max_age:
                return None
            thread = threading.Thread(target=self._ask, args=(remote,), name="jupyter_llm-remote-poll", daemon=True)
            self._polls[remote.name] = thread
        thread.start()
        return thread

    def _ask(self, remote: Remote) -> None:
        engine = self.engine(remote)
        state: dict[str, Any] = {"state": "reachable", "error": None, "models": [], "running": []}
        try:
            models = engine.models()
            state["models"] = [{"name": f"{remote.name}/{m['model']}", **m} for m in models]
            reported = engine.state()
            running = engine.running(reported, [m["model"] for m in models])
            state["running"] = [{"name": f"{remote.name}/{r['model']}", **r} for r in running]
        except RemoteEngineError as exc:
            state.update(state="unreachable" if exc.status is None else "error", error=str(exc))
        except Exception as exc:  # an engine that answers something unexpected is shown, never a crash
            log.debug("remote %s answered unexpectedly", remote.name, exc_info=True)
            state.update(state="error", error=Client(remote).scrub(f"unexpected answer ({type(exc).__name__}: {exc})"))
        state["checked_at"] = time.time()
        with self._lock:
            before = self._states.get(remote.name)
            self._states[remote.name] = state
            self._polls.pop(remote.name, None)
        if before is None or {**before, "checked_at": 0} != {**state, "checked_at": 0}:
            self._emit("remotes")

    def served(self, headers: Mapping[str, str]) -> list[dict[str, Any]]:
        """Every reachable remote's models (``name`` is NAME/MODEL), for the HTTP API's model lists;
        none for a request that is itself a remote's poll (``headers`` has HOP_HEADER)."""
        if HOP_HEADER.lower() in {k.lower() for k in headers}:
            return []
        return [{**m, "remote": s["name"]} for s in self.states() for m in s["models"]]

    def forget_state(self, name: str) -> None:
        """Ask ``name`` again next time (after a pull, its models changed)."""
        with self._lock:
            self._states.pop(name, None)

    # -- pulling onto a remote -----------------------------------------------------------------

    def pull(self, reference: str, *, listeners: Sequence[Listener] = ()) -> dict[str, Any]:
        """Pull ``NAME/MODEL`` onto the remote NAME (an Ollama-compatible one), with progress."""
        found = self.split(reference)
        if found is None:
            raise ModelNotFoundError(f"{reference!r} names no remote; remotes: "
                                     f"{', '.join(r.name for r in self.all()) or 'none'}")
        remote, model = found
        engine = self.engine(remote)
        if not isinstance(engine, OllamaEngine):
            raise RemoteEngineError(f"remote {remote.name!r} speaks OpenAI's API, which cannot pull models: pull "
                                    f"{model!r} on that machine (or add it with --api ollama if it is Ollama)")
        fanout = ProgressFanout(listeners)

        def progress(event: PullProgress) -> None:
            fanout(event)
            self._emit("pull", progress=vars(event))

        try:
            engine.pull(model, reference, progress)
        except Exception as exc:
            progress(PullProgress(reference, "error", message=str(exc)))
            raise
        finally:
            self.forget_state(remote.name)
        self._emit("models")
        return {"name": reference, "remote": remote.name, "model": model, "url": remote.url}
