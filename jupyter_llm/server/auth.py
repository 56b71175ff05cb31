"""Safe by default: the bearer token, the Host check, the Origin/CORS policy — one ASGI layer.

Every request passes :class:`Guard` before any route runs, in this order:

1. **Host header** must name the bound address, ``localhost`` or a loopback address (plus any
   names the user allowed). A web page that rebinds its own DNS name to 127.0.0.1 still sends
   its own name as Host, so it is refused (DNS rebinding) — 403.
2. **Origin**: browsers send it on cross-origin requests. Only origins in the configured list
   are allowed (exact match, never a wildcard); they get CORS headers, and their preflight
   ``OPTIONS`` is answered here. Any other Origin is refused with 403, even with no-auth, so
   a page the user visits cannot drive the API (cross-site request forgery).
3. **Bearer token** (``Authorization: Bearer …``, or ``x-api-key: …`` as Anthropic's clients send
   it), compared in constant time, on every route
   but ``GET /health``; 401 otherwise.

It also counts requests for the metrics — the ones it lets through by route template, method
and status, the ones it refuses only by reason (see :mod:`.metrics`) — and caps request bodies.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from .params import MAX_BODY_BYTES, streams_body

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PUBLIC_PATHS = frozenset({"/health"})
"""Routes that answer without a token (GET only)."""

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
MIN_REMOTE_TOKEN = 16
"""Characters a given token needs when the server is reachable from other machines."""


class Token(str):
    """The API token: a plain string to send and copy, whose repr shows only its fingerprint.

    A status dict or a server object left as a cell's last line is written into the saved
    notebook, and notebooks get shared: one test notebook held the token 8 times (issue 11).
    ``print(token)`` and ``str(token)`` still give it.
    """

    @property
    def fingerprint(self) -> str:
        """Enough of the token's sha256 to tell tokens apart, nothing to use it with."""
        return "sha256:" + hashlib.sha256(self.encode()).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"<API token {self.fingerprint}>"


def new_token() -> Token:
    """A fresh random API token (32 URL-safe characters)."""
    return Token(secrets.token_urlsafe(24))


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    """Whether binding ``host`` listens on every interface."""
    return host.strip("[]") in ("0.0.0.0", "::", "")


def network_addresses(bound: str) -> list[str]:
    """The addresses other machines reach a server bound to ``bound`` at, best first.

    A wildcard bind is reached at the machine's non-loopback addresses: the one its routing
    table uses to reach other hosts, then those its host name resolves to. None known: the
    host name itself.
    """
    import socket

    if not is_wildcard(bound):
        return [bound.strip("[]")]
    families = (socket.AF_INET,) if bound == "0.0.0.0" else (socket.AF_INET, socket.AF_INET6)
    found: list[str] = []
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        if family not in families:
            continue
        try:  # connect() on a UDP socket sends nothing: it only picks the route's local address
            with socket.socket(family, socket.SOCK_DGRAM) as udp:
                udp.connect((probe, 9))
                found.append(str(udp.getsockname()[0]))
        except OSError:
            pass
    hostname = socket.gethostname()
    try:
        found += [str(info[4][0]) for info in socket.getaddrinfo(hostname, None) if info[0] in families]
    except OSError:
        pass
    addresses = [a for a in dict.fromkeys(found) if not is_loopback(a) and not is_wildcard(a)]
    return addresses or [hostname]


def allowed_host_names(bound: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """Host header values (without port) that may reach a server bound to ``bound``."""
    names = {bound.strip("[]").lower(), *LOOPBACK_NAMES, *(h.strip("[]").lower() for h in extra)}
    if is_wildcard(bound):
        import socket

        # A wildcard bind is reachable under the machine's own names and addresses.
        hostname = socket.gethostname()
        names.update({hostname.lower(), socket.getfqdn().lower()})
        names.update(a.lower() for a in network_addresses(bound))
        try:
            names.update(str(info[4][0]) for info in socket.getaddrinfo(hostname, None))
        except OSError:
            pass
        names.discard("0.0.0.0")
        names.discard("::")
    return frozenset(names)


def _host_name(header: str) -> str:
    """The name part of a Host header: ``[::1]:8080`` → ``::1``, ``localhost:80`` → ``localhost``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """ASGI middleware: Host check, Origin/CORS, bearer token, body cap and request metrics."""

    def __init__(self, app: ASGIApp, *, token: str | None, hosts: frozenset[str], origins: Iterable[str],
                 route_of: Callable[[Scope], str], on_request: Callable[[str, str, int, float], None],
                 on_refused: Callable[[str], None]) -> None:
        self.app = app
        self.token = token
        self.hosts = hosts
        self.origins = frozenset(o.rstrip("/") for o in origins)
        self.route_of = route_of
        self.on_request = on_request
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":  # no websocket routes: refuse without a handshake
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        headers = _headers(scope)
        origin = headers.get("origin")
        cors = origin is not None and origin.rstrip("/") in self.origins

        async def send_counted(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if cors:
                    message = {**message, "headers": [*message.get("headers", []), *self._cors_headers(origin)]}
            await send(message)

        refused, problem = self._check(scope, headers, origin, cors)
        if refused:
            self.on_refused(refused)  # counted by reason only: a refused client creates no state
            await problem(scope, receive, send_counted)
            return
        route = self.route_of(scope)
        try:
            if problem is not None:
                await problem(scope, receive, send_counted)
                return
            await self.app(scope, receive if streams_body(scope["path"]) else _capped(receive, headers), send_counted)
        finally:
            self.on_request(route, scope["method"], status, time.perf_counter() - started)

    def _check(self, scope: Scope, headers: dict[str, str], origin: str | None, cors: bool) -> tuple[str, Any]:
        """("", None) to go on, ("", app) to answer with ``app``, (reason, app) to refuse."""
        path = scope["path"]
        if _host_name(headers.get("host", "")) not in self.hosts:
            return "host", _error(path, 403, "this Host header is not allowed: the server answers only requests "
                                  "addressed to its own address or localhost (protection against DNS rebinding); "
                                  "add the name with serve(allowed_hosts=[...]) if you proxy to it",
                                  "host_not_allowed")
        if origin is not None and not cors:
            return "origin", _error(path, 403, f"requests from origin {origin[:200]!r} are not allowed; add it "
                                    "with `%llm serve --origin ORIGIN` (or serve(origins=[...])) to use the API "
                                    "from that page", "origin_not_allowed")
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            return "", _preflight  # cors is True here; the headers are added by send_counted
        if self.token is None or (path in PUBLIC_PATHS and scope["method"] in ("GET", "HEAD")):
            return "", None
        given = headers.get("authorization", "")
        scheme, _, credential = given.partition(" ")
        key = headers.get("x-api-key")  # how the anthropic client sends its api_key
        if key is not None and not given:
            scheme, credential, given = "bearer", key, key
        if scheme.lower() != "bearer" or not secrets.compare_digest(credential.strip().encode(), self.token.encode()):
            what = "a wrong token" if given else "no token"
            return "token", _error(path, 401, f"this server needs its API token and got {what}: send the header "
                                   "'Authorization: Bearer TOKEN' or 'x-api-key: TOKEN' (the ollama client reads "
                                   "OLLAMA_API_KEY, the openai and anthropic clients their api_key); "
                                   "`%llm serve --status` says where to find it",
                                   "invalid_api_key", {"www-authenticate": "Bearer"})
        return "", None

    def _cors_headers(self, origin: str | None) -> list[tuple[bytes, bytes]]:
        return [
            (b"access-control-allow-origin", (origin or "").encode("latin-1")),
            (b"access-control-allow-credentials", b"true"),
            (b"access-control-allow-headers", b"authorization, content-type, x-api-key, anthropic-version"),
            (b"access-control-allow-methods", b"GET, POST, DELETE, HEAD, OPTIONS"),
            (b"access-control-max-age", b"600"),
            (b"vary", b"Origin"),
        ]


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def _preflight(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def error_body(path: str, status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    """An error in the shape the caller's API uses: Anthropic's under /v1/messages, OpenAI's
    elsewhere under /v1, Ollama's elsewhere."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}.get(
            status, "invalid_request_error" if status < 500 else "api_error")
        return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()
    if path.startswith("/v1"):
        kind = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
                413: "invalid_request_error", 503: "server_overloaded"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")
        return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()
    return json.dumps({"error": message}).encode()


def _error(path: str, status: int, message: str, code: str, extra: dict[str, str] | None = None) -> ASGIApp:
    body = error_body(path, status, message, code)

    async def respond(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return respond


class BodyTooLarge(Exception):
    """A request body beyond :data:`~jupyter_llm.server.params.MAX_BODY_BYTES` (answered 413)."""


def _capped(receive: Receive, headers: dict[str, str]) -> Receive:
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        async def refuse() -> dict[str, Any]:
            raise BodyTooLarge()

        return refuse
    seen = 0

    async def counted() -> MutableMapping[str, Any]:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > MAX_BODY_BYTES:
                raise BodyTooLarge()
        return message

    return counted
