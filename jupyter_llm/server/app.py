"""The ASGI application: every route in one list, behind the :class:`~.auth.Guard`.

``GET /health`` (no token) and ``GET /metrics`` live here; the Ollama routes are in
:mod:`.ollama_api`, the OpenAI routes in :mod:`.openai_api` and :mod:`.openai_responses`,
Anthropic's Messages API in :mod:`.anthropic_api`. :func:`build_app` is the only
place routes are assembled, so tests can enumerate them all (and prove each needs the token).
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from .._version import __version__
from .auth import Guard, allowed_host_names
from .backend import Backend
from .metrics import Metrics, StatsCache, model_gauges
from .params import HTTPProblem
from .responses import ctx, endpoint, error_response, json_response, run_blocking


@dataclass
class Context:
    """What every route needs: the manager (the owner of all state), the backend, the metrics."""

    manager: Any
    backend: Backend
    metrics: Metrics
    settings: dict[str, Any] = field(default_factory=dict)
    stats: StatsCache = field(default_factory=StatsCache)


@endpoint
async def health(request: Any) -> Any:
    """Liveness, without a token (for supervisors); says nothing about models."""
    return json_response({"status": "ok", "version": __version__})


@endpoint
async def metrics(request: Any) -> Any:
    """Prometheus text format: counters and histograms, and gauges of the workers."""
    from starlette.responses import Response

    c = ctx(request)
    text = await run_blocking(render_metrics, c)
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def render_metrics(c: Context) -> str:
    """The /metrics text; blocks at most :data:`~.metrics.STATS_WAIT_S` for the workers' counters."""
    models = c.manager.ps()
    stats, ages = c.stats.read(models)
    return c.metrics.render(model_gauges(models, stats, c.backend.waiting(), ages))


async def _not_found(request: Any, exc: Exception) -> Any:
    return error_response(request.url.path, HTTPProblem(
        404, f"no route {request.method} {request.url.path} on this server (an Ollama- and OpenAI-compatible API; "
        "see /api/tags or /v1/models)", code="not_found"))


async def _not_allowed(request: Any, exc: Exception) -> Any:
    return error_response(request.url.path, HTTPProblem(
        405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed"))


def routes() -> list[Any]:
    """Every route of the server."""
    from starlette.routing import Route

    from . import anthropic_api, ollama_api, openai_api, openai_responses

    return [
        Route("/health", health, methods=["GET", "HEAD"]),
        Route("/metrics", metrics, methods=["GET"]),
        *ollama_api.routes(),
        *openai_api.routes(),
        *openai_responses.routes(),
        *anthropic_api.routes(),
    ]


def build_app(context: Context, *, token: str | None, host: str, origins: Iterable[str] = (),
              allowed_hosts: Iterable[str] = ()) -> Guard:
    """The full ASGI app: Starlette routes wrapped in the Guard (Host, Origin, token, metrics)."""
    from starlette.applications import Starlette
    from starlette.routing import Match

    table = routes()
    app = Starlette(routes=table, exception_handlers={404: _not_found, 405: _not_allowed})
    app.state.ctx = context

    def route_of(scope: MutableMapping[str, Any]) -> str:
        partial = None
        for route in table:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return str(route.path)
            if match is Match.PARTIAL and partial is None:
                partial = str(route.path)
        return partial or "unmatched"

    return Guard(app, token=token, hosts=allowed_host_names(host, allowed_hosts), origins=origins,
                 route_of=route_of, on_request=context.metrics.request, on_refused=context.metrics.refuse)
