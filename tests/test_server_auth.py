"""Safe by default: every route needs the token, foreign Host headers and origins are refused,
no-auth only on loopback, a port in use is a clear error — and `%llm serve` drives it all."""

from __future__ import annotations

import json
import re
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import IPython
import pytest
from IPython.testing.globalipapp import start_ipython

from jupyter_llm import server as api
from jupyter_llm.errors import ServerError
from jupyter_llm.manager import ModelManager
from jupyter_llm.server.app import routes
from jupyter_llm.store.records import Store
from jupyter_llm.store.sources import Pulled
from tests.apiserver import MODEL, auth, running_server

ORIGIN = "http://localhost:8888"
# A valid body per route: if the token check ever let a request through, it would act.
BODIES: dict[str, dict[str, Any]] = {
    "/api/show": {"model": MODEL}, "/api/generate": {"model": MODEL, "prompt": ""},
    "/api/chat": {"model": MODEL, "messages": []}, "/api/embed": {"model": MODEL},
    "/api/embeddings": {"model": MODEL}, "/api/pull": {"model": MODEL},
    "/api/copy": {"source": MODEL, "destination": "stolen"}, "/api/delete": {"model": MODEL},
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 1},
    "/v1/embeddings": {"model": MODEL, "input": "hi"},
}


@pytest.fixture(scope="module")
def served(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with running_server(smollm2_path, tmp_path_factory.mktemp("auth"), origins=[ORIGIN]) as pair:
        yield pair


def every_route() -> list[tuple[str, str]]:
    """(method, concrete path) for every route the app has, path parameters filled in."""
    pairs = []
    for route in routes():
        path = re.sub(r"\{[^}]+\}", MODEL, route.path)
        pairs += [(method, path) for method in sorted(route.methods or ())]
    return pairs


def test_every_route_rejects_a_missing_and_a_wrong_token(served: Any) -> None:
    manager, server = served
    pairs = every_route()
    paths = {path for _, path in pairs}
    assert set(BODIES) | {"/", "/api/version", "/api/tags", "/api/ps", "/v1/models", "/metrics"} <= paths
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method, path in pairs:
            body = BODIES.get(path)
            for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {server.token}"},
                            {"Authorization": server.token}):
                response = client.request(method, path, json=body, headers=headers)
                if path == "/health" and method in ("GET", "HEAD"):
                    assert response.status_code == 200, (method, path)
                    continue
                assert response.status_code == 401, (method, path, headers, response.status_code)
                assert response.headers["www-authenticate"] == "Bearer"
                if method != "HEAD":
                    error = response.json()["error"]
                    assert "token" in (error["message"] if path.startswith("/v1") else error)
    # nothing the refused requests asked for happened
    assert manager.store.get(MODEL) is not None and manager.store.get("stolen") is None
    assert manager.ps() == []
    with httpx.Client(base_url=server.url, headers=auth(server), timeout=30) as client:
        assert client.get("/api/tags").status_code == 200
        assert client.get("/metrics").status_code == 200
        assert client.get("/api/tags", params={"token": server.token}, headers={"Authorization": ""}).status_code == 401


def test_health_needs_no_token_but_metrics_does(served: Any) -> None:
    _, server = served
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert httpx.get(f"{server.url}/metrics").status_code == 401


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "192.0.2.1:{port}", "localhost.evil.example",
                                  ""])
def test_a_foreign_host_header_is_refused(served: Any, host: str) -> None:
    _, server = served
    headers = {**auth(server), "Host": host.format(port=server.port)}
    for path in ("/api/tags", "/health"):
        response = httpx.get(f"{server.url}{path}", headers=headers)
        assert response.status_code == 403
        assert "rebinding" in response.json()["error"]


@pytest.mark.parametrize("host", ["localhost:{port}", "127.0.0.1:{port}", "LOCALHOST", "[::1]:{port}"])
def test_loopback_host_headers_are_accepted(served: Any, host: str) -> None:
    _, server = served
    headers = {**auth(server), "Host": host.format(port=server.port)}
    assert httpx.get(f"{server.url}/api/tags", headers=headers).status_code == 200


def test_only_configured_origins_get_cors_and_others_are_refused(served: Any) -> None:
    _, server = served
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    response = httpx.options(f"{server.url}/api/chat", headers=preflight)
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == ORIGIN  # exact, never "*"
    assert "authorization" in response.headers["access-control-allow-headers"]
    allowed = httpx.get(f"{server.url}/api/tags", headers={**auth(server), "Origin": ORIGIN})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    for origin in ("http://evil.example", "http://localhost:9999", "null"):
        refused = httpx.get(f"{server.url}/api/tags", headers={**auth(server), "Origin": origin})
        assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
        assert httpx.options(f"{server.url}/api/chat", headers={**preflight, "Origin": origin}).status_code == 403
    plain = httpx.get(f"{server.url}/api/tags", headers=auth(server))
    assert "access-control-allow-origin" not in plain.headers


@pytest.fixture
def manager(smollm2_path: Path, tmp_path: Path) -> Iterator[ModelManager]:
    manager = ModelManager(Store(root=tmp_path / "records"))
    manager.store.put(MODEL, Pulled("pip", [smollm2_path], owned=[]))
    yield manager
    api.stop(manager)
    manager.close()


def test_no_auth_is_refused_off_loopback(manager: ModelManager) -> None:
    with pytest.raises(ServerError, match="loopback"):
        api.serve(manager, host="0.0.0.0", port=0, auth=False)
    assert manager.server is None


def test_no_auth_on_loopback_warns_and_serves_without_a_token(manager: ModelManager) -> None:
    with pytest.warns(UserWarning, match="without a token"):
        server = api.serve(manager, port=0, auth=False)
    assert server.token is None and "WARNING" in server.instructions()
    assert httpx.get(f"{server.url}/api/tags").status_code == 200


def test_a_generated_token_is_random_and_a_given_one_is_used(manager: ModelManager) -> None:
    first = api.serve(manager, port=0)
    assert len(first.token) >= 32 and first.token not in first.instructions()
    assert api.token(manager) == first.token
    api.stop(manager)
    second = api.serve(manager, port=0)
    assert second.token != first.token
    api.stop(manager)
    mine = api.serve(manager, port=0, token="my-own-token-123")
    assert httpx.get(f"{mine.url}/api/tags", headers={"Authorization": "Bearer my-own-token-123"}).status_code == 200


def test_a_port_in_use_is_a_clear_error(manager: ModelManager) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ServerError, match=f"port {port} .* already in use.*--port"):
            api.serve(manager, port=port)
    assert manager.server is None


def test_wildcard_origins_are_refused(manager: ModelManager) -> None:
    with pytest.raises(ServerError, match="wildcard"):
        api.serve(manager, port=0, origins=["*"])


def test_serving_again_returns_the_running_server_and_other_settings_are_refused(manager: ModelManager) -> None:
    server = api.serve(manager, port=0)
    assert api.serve(manager, port=0) is server
    with pytest.raises(ServerError, match="already runs"):
        api.serve(manager, port=0, parallel=2)
    assert api.status(manager)["url"] == server.url
    assert api.stop(manager) is True
    assert api.stop(manager) is False and api.status(manager) is None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health")


def test_closing_the_manager_stops_its_server(manager: ModelManager) -> None:
    server = api.serve(manager, port=0)
    manager.close()
    assert not server.running and manager.server is None


def test_the_serve_magic_starts_reports_and_stops_the_kernels_server() -> None:
    from jupyter_llm.manager import get_manager

    ip = start_ipython() or IPython.get_ipython()
    ip.run_line_magic("load_ext", "jupyter_llm")
    started = ip.run_line_magic("llm", "serve --port 0 --parallel 2 --origin http://localhost:8888")
    try:
        status = started.data
        assert status["running"] and status["parallel"] == 2 and status["origins"] == [ORIGIN]
        assert status["token_fingerprint"] in started.text and status["url"] in started.text
        assert started._repr_markdown_().startswith("```")  # line breaks survive in a notebook
        assert get_manager().server.url == status["url"]
        reported = ip.run_line_magic("llm", "serve --status")
        assert reported.data["url"] == status["url"]
        health = httpx.get(f"{status['url']}/health")
        assert health.status_code == 200
    finally:
        stopped = ip.run_line_magic("llm", "serve --stop")
    assert "stopped" in stopped.text
    assert "not running" in ip.run_line_magic("llm", "serve --status").text
    with pytest.raises(Exception, match=r"not both|not allowed"):
        ip.run_line_magic("llm", "serve --token abc --no-auth")


def _shown(ip: Any, obj: Any) -> str:
    """Everything a notebook would save of ``obj`` as a cell's result (every mime type)."""
    bundle, metadata = ip.display_formatter.format(obj)
    return json.dumps([bundle, metadata])


def test_the_token_never_reaches_a_cells_output_but_is_at_hand() -> None:
    from jupyter_llm.manager import get_manager

    ip = start_ipython() or IPython.get_ipython()
    ip.run_line_magic("load_ext", "jupyter_llm")
    started = ip.run_line_magic("llm", "serve --port 0")
    try:
        server = get_manager().server
        token = server.token
        status = api.status()
        for obj in (started, ip.run_line_magic("llm", "serve --status"), server, status, get_manager().snapshot(),
                    api.serve(get_manager(), port=server.port)):
            shown = _shown(ip, obj)
            assert token not in shown, shown
        assert status["token_fingerprint"] in _shown(ip, started) and "jupyter_llm.server.token()" in started.text
        assert api.token() == token and json.loads(json.dumps(status))["token"] == token  # the sidebar's copy
        token_file = Path(status["token_file"])
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert json.loads(token_file.read_text())["token"] == token  # where the jupyter-llm commands look
        assert str(token_file) in started.text
        headers = {"Authorization": f"Bearer {api.token()}"}
        assert httpx.get(f"{server.url}/api/tags", headers=headers).status_code == 200
    finally:
        ip.run_line_magic("llm", "serve --stop")
    assert not token_file.exists() and api.token() is None


def test_beyond_loopback_a_short_token_is_refused_and_the_real_address_is_shown(manager: ModelManager) -> None:
    for host in ("0.0.0.0", "::"):
        with pytest.raises(ServerError, match="16 characters"):
            api.serve(manager, host=host, port=0, token="x" * 15)
    assert manager.server is None
    with pytest.warns(UserWarning, match="all interfaces") as warned:
        server = api.serve(manager, host="0.0.0.0", port=0)  # a generated token: 32 characters
    real = urlsplit(server.url)
    assert real.hostname not in ("127.0.0.1", "0.0.0.0", "localhost") and real.port == server.port
    assert server.url in str(warned[0].message) and server.url in server.instructions()
    assert "WARNING" in server.instructions()
    headers = {**auth(server), "Host": real.netloc}  # sent to loopback only, naming the real address
    assert httpx.get(f"http://127.0.0.1:{server.port}/api/tags", headers=headers).status_code == 200
    api.stop(manager)
    with pytest.warns(UserWarning, match="all interfaces"):
        api.serve(manager, host="0.0.0.0", port=0, token="a-long-enough-token-16")
