"""The HTTP routes beyond OpenAI's, composed in one place for ``app``: ``GET /v1/mofserve/info``
(``info_api``), ``POST /v1/mofserve/similarity`` (``similarity_api``) and, unless turned off
(``playground = false``, ``serve --no-playground``), the web playground at ``/`` (``playground``),
with the paths that must answer without the bearer token."""

from __future__ import annotations

from aiohttp import web

from mofserve.core.profiles import Profile

from .admission import Admission
from .config import ServeConfig
from .engine import TritonEngine
from .info_api import add_info_routes
from .info_api.protocol import ServerFacts
from .metrics import FrontendMetrics
from .playground import add_playground_routes, public_paths
from .security import OPEN_HTTP_PATHS
from .similarity_api import add_similarity_routes


def open_http_paths(playground: bool) -> frozenset[str]:
    """Health, and the playground's own files when it is served (its API calls carry the token)."""
    return OPEN_HTTP_PATHS | (public_paths() if playground else frozenset())


def add_web_routes(app: web.Application, engine: TritonEngine, metrics: FrontendMetrics, admission: Admission,
                   config: ServeConfig, profile: Profile | None = None, *, auth: bool = False, tls: bool = False,
                   triton_metrics: bool = False) -> None:
    """Adds the info and similarity endpoints, and the playground when ``config.playground``."""
    facts = ServerFacts(target=config.target, auth=auth, tls=tls, triton_metrics=triton_metrics,
                        playground=config.playground, split=bool(config.triton_url))
    add_info_routes(app, engine, metrics, facts)
    add_similarity_routes(app, engine, metrics, admission, max_body_bytes=config.max_body_bytes or None,
                          image_size=profile.image_size if profile else None,
                          aspect=profile.aspect if profile else None)
    if config.playground:
        add_playground_routes(app)
