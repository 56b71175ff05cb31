"""llama.cpp rpc-servers as devices: what they hold, asked over the network, without llama.cpp.

A load with ``rpc=("host:port", …)`` puts layers on the devices of ``rpc-server`` processes
(ggml's RPC backend, registered in the worker by :mod:`jupyter_llm.worker.rpc`); endpoints are
parsed by :mod:`jupyter_llm.memory.rpc_endpoints`. :func:`query` speaks just enough of the
protocol (HELLO, DEVICE_COUNT, GET_DEVICE_MEMORY as ``ggml-rpc.cpp`` lays them out, protocol 7)
to ask a server for its devices' memory, with timeouts, so that a dead or busy server is a
clear error naming it before any worker starts. An rpc-server serves **one client at a time**
(docs/notes.md §9): while a worker holds it, another client waits unanswered, which
:func:`query` reports as busy.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import RpcServerError

if TYPE_CHECKING:
    from .devices import Device

PROTO_MAJOR = 7
"""RPC_PROTO_MAJOR_VERSION of the vendored ggml-rpc.h: servers of another major version refuse us."""
_CMD_GET_DEVICE_MEMORY, _CMD_HELLO, _CMD_DEVICE_COUNT = 11, 14, 15
_CONN_CAPS = 24  # RPC_CONN_CAPS_SIZE: zeros advertise plain TCP (no RDMA)
CONNECT_TIMEOUT = 3.0
"""Seconds to wait for a TCP connection (refused ones fail at once)."""
ANSWER_TIMEOUT = 3.0
"""Seconds to wait for the HELLO answer: a live server answers in milliseconds unless it is
serving another client."""


@dataclass(frozen=True)
class RpcDevice:
    """One device of an rpc-server, with its memory as the server reports it."""

    endpoint: str
    index: int
    """The device's number on its server (llama.cpp names its buffers ``RPC<index>[endpoint]``)."""
    free_bytes: int
    total_bytes: int

    @property
    def backend(self) -> str:
        return f"RPC{self.index}[{self.endpoint}]"


def query(endpoint: str, *, connect_timeout: float = CONNECT_TIMEOUT,
          answer_timeout: float = ANSWER_TIMEOUT) -> list[RpcDevice]:
    """The devices of the rpc-server at ``endpoint`` with their memory. RpcServerError, naming
    the endpoint and what to do, when it is refused, silent, busy or speaks another version."""
    host, _, port = endpoint.rpartition(":")
    try:
        sock = socket.create_connection((host, int(port)), timeout=connect_timeout)
    except OSError as exc:
        reason = "connection refused" if isinstance(exc, ConnectionRefusedError) else (str(exc) or type(exc).__name__)
        raise RpcServerError(endpoint, f"cannot reach the rpc-server at {endpoint} ({reason}): is rpc-server "
                                       f"running there (rpc-server -H HOST -p {port})?") from None
    with sock:
        sock.settimeout(answer_timeout)
        try:
            hello = _call(sock, _CMD_HELLO, bytes(_CONN_CAPS), 4 + _CONN_CAPS)
        except TimeoutError:
            raise RpcServerError(endpoint, f"the rpc-server at {endpoint} does not answer within "
                                           f"{answer_timeout:g} s: it serves one client at a time, so another "
                                           "model (or program) is probably using it; unload that model or "
                                           "start another rpc-server") from None
        except (OSError, ValueError) as exc:
            raise RpcServerError(endpoint, f"the rpc-server at {endpoint} closed the connection ({exc}): "
                                           "is it an rpc-server of the same llama.cpp version?") from None
        if hello[0] != PROTO_MAJOR:
            raise RpcServerError(endpoint, f"the rpc-server at {endpoint} speaks RPC protocol "
                                           f"{hello[0]}.{hello[1]}.{hello[2]}, we speak {PROTO_MAJOR}.x: run the "
                                           "rpc-server built by scripts/build-llama-cpp.sh there")
        try:
            (count,) = struct.unpack("<I", _call(sock, _CMD_DEVICE_COUNT, b"", 4))
            out = []
            for index in range(count):
                free, total = struct.unpack("<QQ", _call(sock, _CMD_GET_DEVICE_MEMORY,
                                                         struct.pack("<I", index), 16))
                out.append(RpcDevice(endpoint, index, int(free), int(total)))
        except (OSError, ValueError) as exc:
            raise RpcServerError(endpoint, f"the rpc-server at {endpoint} stopped answering ({exc})") from None
    return out


def _call(sock: socket.socket, cmd: int, payload: bytes, answer_size: int) -> bytes:
    """One request (``cmd`` byte, u64 size, payload) and its answer (u64 size, bytes)."""
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    (size,) = struct.unpack("<Q", _recv(sock, 8))
    if size != answer_size:
        raise ValueError(f"answer of {size} bytes where {answer_size} were expected")
    return _recv(sock, size)


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ValueError("the connection closed")
        data += chunk
    return data


def server_devices(endpoints: Sequence[str]) -> list[RpcDevice]:
    """:func:`query` of each endpoint in order. Asked afresh each time (a millisecond on a
    local network): a reused reading would hide a server that has just gone."""
    return [device for endpoint in endpoints for device in query(endpoint)]


def as_devices(found: Sequence[RpcDevice]) -> list[Device]:
    """Devices of the estimate for rpc devices, offload targets like GPUs, in the order the
    worker hands them to llama.cpp. Their id is llama.cpp's buffer name, ``RPC0[host:port]``:
    the same for a server in every estimate and every load report."""
    from .devices import Device

    return [Device(d.backend, "gpu", f"rpc-server {d.endpoint}, device {d.index}", d.total_bytes,
                   d.free_bytes, d.total_bytes - d.free_bytes, backend=d.backend, host=d.endpoint)
            for d in found]


def rpc_placeholders(endpoints: Sequence[str]) -> list[Device]:
    """One offload device per endpoint, memory unknown (0), without asking the servers: for
    rules that only need to know there is somewhere to offload to."""
    return as_devices([RpcDevice(e, 0, 0, 0) for e in endpoints])


def with_rpc(devices: Sequence[Device], endpoints: Sequence[str]) -> list[Device]:
    """The local ``devices`` and the rpc devices of ``endpoints`` after them, asked now (rpc
    devices in ``devices``, e.g. another model's, are left out: a load uses only its own).
    Raises RpcServerError for a server that is refused, silent, busy (serving another client)
    or of another protocol."""
    local = [d for d in devices if not d.host]
    return local + as_devices(server_devices(endpoints)) if endpoints else local


def loaded_rpc_devices(reports: list[Any]) -> list[Device]:
    """The rpc devices the loaded models use (from their load reports), each once: an
    rpc-server serves one client at a time, so while a worker holds it the kernel cannot ask
    it; the memory shown is what the server reported to that worker right after its load."""
    found: dict[str, RpcDevice] = {}
    for report in reports:
        for d in (getattr(report, "metadata", None) or {}).get("rpc_devices") or ():
            device = RpcDevice(str(d["endpoint"]), int(d["index"]), int(d["free"]), int(d["total"]))
            found.setdefault(device.backend, device)
    return as_devices(list(found.values()))


__all__ = ["RpcDevice", "RpcServerError", "as_devices", "loaded_rpc_devices", "query", "rpc_placeholders",
           "server_devices", "with_rpc"]
