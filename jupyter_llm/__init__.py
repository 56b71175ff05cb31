"""jupyter_llm: run local language models from a notebook.

``%load_ext jupyter_llm`` adds the ``%llm`` line magic and the ``%%chat`` cell magic; the same
verbs are available as functions here. Everything not listed in ``__all__`` is private.
"""

from __future__ import annotations

from typing import Any

from ._labextension import _jupyter_labextension_paths
from ._version import __version__
from .api import (
    Model,
    cp,
    create,
    devices,
    estimate,
    list_models,
    load,
    memory_widget,
    picker,
    ps,
    pull,
    remote_add,
    remote_list,
    remote_rm,
    rm,
    serve,
    show,
    unload,
)
from .errors import JupyterLLMError

__all__ = [
    "JupyterLLMError",
    "Model",
    "__version__",
    "_jupyter_labextension_paths",
    "cp",
    "create",
    "devices",
    "estimate",
    "list_models",
    "load",
    "load_ipython_extension",
    "memory_widget",
    "picker",
    "ps",
    "pull",
    "remote_add",
    "remote_list",
    "remote_rm",
    "rm",
    "serve",
    "show",
    "unload",
    "unload_ipython_extension",
]


def load_ipython_extension(ipython: Any) -> None:
    """Called by ``%load_ext jupyter_llm``: registers the magics (nothing heavy is imported)."""
    from .notebook.magics import LLMMagics

    ipython.register_magics(LLMMagics)
    from .notebook.comm import open_from_kernel

    open_from_kernel(ipython)  # the sidebar's comm; does nothing outside a kernel


def unload_ipython_extension(ipython: Any) -> None:
    """Called by ``%unload_ext jupyter_llm``: stops every worker this kernel started."""
    from . import manager
    from .notebook import comm

    comm.close_all()
    manager.close_manager()
