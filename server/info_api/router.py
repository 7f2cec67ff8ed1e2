"""aiohttp route of ``GET /v1/mofserve/info`` (behind the same bearer auth as the rest of the API)."""

from __future__ import annotations

from aiohttp import web

from mofserve.server.engine import TritonEngine
from mofserve.server.metrics import FrontendMetrics

from .protocol import ServerFacts, info_body

PATH = "/v1/mofserve/info"


def add_info_routes(app: web.Application, engine: TritonEngine, metrics: FrontendMetrics,
                    facts: ServerFacts | None = None) -> None:
    """Adds ``GET /v1/mofserve/info`` to ``app`` (before it starts)."""
    facts = facts or ServerFacts()

    async def handle(request: web.Request) -> web.Response:
        with metrics.track("http", "info"):
            ready = await engine.ready()
            return web.json_response(info_body(engine.info, engine.limits, facts, ready=ready),
                                     headers={"Cache-Control": "no-store"})

    app.router.add_get(PATH, handle)
