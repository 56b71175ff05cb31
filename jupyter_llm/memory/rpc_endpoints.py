"""Endpoints of llama.cpp rpc-servers (``host:port``): the one parser, and the exposure warning.

Apart from :mod:`jupyter_llm.memory.rpc` (which talks to the servers) so that
:class:`~jupyter_llm.options.LoadOptions` can parse its ``rpc`` field without importing
anything else. The RPC protocol has no authentication and no encryption: anyone who reaches an
rpc-server can run computations on it and read what it holds, so an endpoint that is neither
loopback nor a private address gets a warning (docs/notes.md §9).
"""

from __future__ import annotations

import ipaddress
import warnings
from collections.abc import Iterable, Sequence


class RpcExposedWarning(UserWarning):
    """An rpc-server endpoint outside loopback and private networks (RPC has no authentication)."""


def parse_endpoint(text: str) -> str:
    """``"host:port"`` normalised (host lower-cased, port as a number); ValueError otherwise.

    llama.cpp splits an endpoint at its first colon, so IPv6 addresses cannot be given.
    """
    value = str(text).strip()
    host, sep, port = value.rpartition(":")
    usage = f"rpc endpoint {text!r}: use HOST:PORT, e.g. 192.168.1.20:50052"
    if not sep or not host or not port.isdigit() or ":" in host or any(c.isspace() for c in host):
        if ":" in host or host.startswith("["):
            raise ValueError(f"{usage} (llama.cpp's RPC backend takes no IPv6 addresses)")
        raise ValueError(usage)
    number = int(port)
    if not 0 < number < 65536:
        raise ValueError(f"{usage} (port {number} is outside 1-65535)")
    return f"{host.lower()}:{number}"


def parse_endpoints(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """Endpoints from ``"a:1,b:2"`` or a sequence of them, normalised, each once, in order."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    found = [parse_endpoint(item) for item in items if str(item).strip()]
    if len(found) > 16:  # GGML_RPC_MAX_SERVERS
        raise ValueError(f"at most 16 rpc servers, not {len(found)}")
    return tuple(dict.fromkeys(found))


def host_scope(host: str) -> str:
    """``"loopback"``, ``"private"`` or ``"public"`` for an IP address or ``localhost``;
    ``"unknown"`` for any other name (where it points is the resolver's business)."""
    if host == "localhost" or host.endswith(".localhost"):
        return "loopback"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "unknown"
    if address.is_loopback:
        return "loopback"
    if address.is_private or address.is_link_local:
        return "private"
    return "public"


def exposure_warning(endpoints: Sequence[str]) -> str | None:
    """The warning for endpoints outside loopback and private networks, or None if all are inside."""
    exposed = [e for e in endpoints if host_scope(e.rpartition(":")[0]) not in ("loopback", "private")]
    if not exposed:
        return None
    return (f"rpc server {', '.join(exposed)} is not on a loopback or private address: llama.cpp's RPC "
            "protocol has no authentication or encryption, so anyone who can reach it can use it and read "
            "the model's tensors. Reach it through a private network or an SSH tunnel (ssh -L) instead.")


def warn_if_exposed(endpoints: Sequence[str], *, stacklevel: int = 2) -> None:
    """:func:`exposure_warning` as a :class:`RpcExposedWarning`, if there is one."""
    message = exposure_warning(endpoints)
    if message:
        warnings.warn(message, RpcExposedWarning, stacklevel=stacklevel + 1)


__all__ = ["RpcExposedWarning", "exposure_warning", "host_scope", "parse_endpoint", "parse_endpoints",
           "warn_if_exposed"]
