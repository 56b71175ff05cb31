"""The worker's side of ``rpc=``: rpc-servers' devices registered with ggml and handed to llama.cpp.

As llama.cpp's own ``--rpc`` does (``common/arg.cpp: add_rpc_devices``): the RPC backend's
``ggml_backend_rpc_add_server(endpoint)`` (found through ``ggml_backend_reg_get_proc_address``)
connects to a server and returns a backend registry holding its devices, which is registered;
the model then gets the device list explicitly in ``llama_model_params.devices`` (NULL-ended):
the local GPUs first, then the rpc devices in the order given, the order the kernel's estimate
assumes (:mod:`jupyter_llm.memory.rpc`). llama-cpp-python's ``Llama`` no longer takes
``rpc_servers``, so this is plain ctypes.

ggml ends the process (``GGML_ABORT``) when a server cannot be reached or stops answering
mid-computation. :func:`install_abort_message` makes the last line the worker writes to stderr,
which the kernel reports in its ``WorkerCrashedError``, name the server that is gone.
"""

from __future__ import annotations

import ctypes
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from .llama import ggml_libraries

_DEV_GPU, _DEV_IGPU = 1, 2
_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
_ABORT_CB = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
_kept: list[Any] = []  # ctypes objects llama.cpp keeps pointers to, alive for the process


class RpcUnavailable(RuntimeError):
    """This llama.cpp has no RPC backend, or a server has no devices."""


def _declare(ggml: ctypes.CDLL, base: ctypes.CDLL) -> None:
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    for lib, name, res, args in (
        (ggml, "ggml_backend_reg_by_name", vp, [ctypes.c_char_p]),
        (ggml, "ggml_backend_register", None, [vp]),
        (ggml, "ggml_backend_dev_count", sz, []),
        (ggml, "ggml_backend_dev_get", vp, [sz]),
        (base, "ggml_backend_reg_get_proc_address", vp, [vp, ctypes.c_char_p]),
        (base, "ggml_backend_reg_dev_count", sz, [vp]),
        (base, "ggml_backend_reg_dev_get", vp, [vp, sz]),
        (base, "ggml_backend_dev_type", ctypes.c_int, [vp]),
        (base, "ggml_backend_dev_name", ctypes.c_char_p, [vp]),
        (base, "ggml_backend_dev_memory", None, [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)]),
        (base, "ggml_set_abort_callback", vp, [vp]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


def devices(endpoints: Sequence[str]) -> tuple[Any, list[dict[str, Any]]]:
    """The NULL-ended device array for ``llama_model_params.devices`` (local GPUs, then every
    device of each server in order) and the rpc devices as ``{endpoint, index, name}``.

    Connects to each server (ggml aborts the process if one cannot be reached: see
    :func:`install_abort_message`). Raises RpcUnavailable when this build has no RPC backend.
    """
    ggml, base = ggml_libraries()
    _declare(ggml, base)
    local = [ggml.ggml_backend_dev_get(i) for i in range(ggml.ggml_backend_dev_count())]
    gpus = [d for d in local if base.ggml_backend_dev_type(d) == _DEV_GPU]
    # llama.cpp's own default: integrated GPUs only when there is no discrete one
    gpus = gpus or [d for d in local if base.ggml_backend_dev_type(d) == _DEV_IGPU]
    reg = ggml.ggml_backend_reg_by_name(b"RPC")
    address = base.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server") if reg else None
    if not address:
        raise RpcUnavailable("this llama-cpp-python was built without ggml's RPC backend: reinstall it with "
                             "CMAKE_ARGS=-DGGML_RPC=ON (make install does)")
    add_server = _ADD_SERVER(address)
    found: list[dict[str, Any]] = []
    remote = []
    for endpoint in endpoints:
        server = add_server(endpoint.encode())
        if not server:
            raise RpcUnavailable(f"the rpc-server at {endpoint} offers no devices")
        ggml.ggml_backend_register(server)
        for index in range(base.ggml_backend_reg_dev_count(server)):
            dev = base.ggml_backend_reg_dev_get(server, index)
            remote.append(dev)
            found.append({"endpoint": endpoint, "index": index,
                          "name": (base.ggml_backend_dev_name(dev) or b"").decode(errors="replace")})
    listed = [*gpus, *remote]
    array = (ctypes.c_void_p * (len(listed) + 1))(*listed, None)
    _kept.append(array)
    return array, found


def memory(found: Sequence[dict[str, Any]], array: Any) -> list[dict[str, Any]]:
    """``found`` with each device's free and total bytes as its server reports them now."""
    ggml, base = ggml_libraries()
    _declare(ggml, base)
    n_local = sum(1 for _ in _until_null(array)) - len(found)
    out = []
    for i, d in enumerate(found):
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        base.ggml_backend_dev_memory(array[n_local + i], ctypes.byref(free), ctypes.byref(total))
        out.append({**d, "free": free.value, "total": total.value})
    return out


def _until_null(array: Any) -> Any:
    i = 0
    while array[i]:
        yield array[i]
        i += 1


def install_abort_message(endpoints: Sequence[str]) -> None:
    """Before ggml aborts the process, write one line to stderr that names the rpc-server that
    is gone (the first endpoint that refuses a connection now) and what to do."""
    ggml, base = ggml_libraries()
    _declare(ggml, base)

    def on_abort(message: bytes | None) -> None:
        try:
            text = (message or b"").decode("utf-8", "replace").strip()
            if "RPC" not in text and "connect" not in text and "handshake" not in text:
                sys.stderr.write(text + "\n")
                sys.stderr.flush()
                return
            gone: list[str] = []
            for _ in range(20):  # a server being killed closes its connections before its port
                gone = [e for e in endpoints if not _reachable(e)]
                if gone:
                    break
                time.sleep(0.1)
            said = text.rpartition(": ")[2] if ": " in text else text
            if gone:
                line = (f"the rpc-server at {', '.join(gone)} is gone ({said}): is rpc-server still running "
                        "there? Start it again, then load the model again")
            else:
                line = (f"an rpc-server of {', '.join(endpoints)} stopped answering ({said}): check that "
                        "rpc-server is running on each and the network between")
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except BaseException:
            pass  # an exception must never unwind into C

    callback = _ABORT_CB(on_abort)
    _kept.append(callback)
    base.ggml_set_abort_callback(ctypes.cast(callback, ctypes.c_void_p))


def _reachable(endpoint: str) -> bool:
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False
