"""aiohttp routes of the playground: ``GET /`` (index.html) and ``GET /playground/<file>``.

Only the files shipped in ``static/`` are served (a fixed table built at start: no path from the
request touches the file system), each with a Content-Security-Policy that allows this origin
only (images also from ``data:`` and ``blob:`` URLs, which the page makes from files the user
picks), no framing, no referrer and ``nosniff``."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).resolve().parent / "static"
PREFIX = "/playground/"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml",
         ".png": "image/png", ".json": "application/json"}


def static_files() -> dict[str, Path]:
    """URL path -> shipped file: ``/`` is index.html, every file under static/ is /playground/<path>."""
    files = {PREFIX + p.relative_to(STATIC).as_posix(): p for p in sorted(STATIC.rglob("*"))
             if p.is_file() and p.suffix in TYPES}
    files["/"] = STATIC / "index.html"
    return files


def public_paths() -> frozenset[str]:
    """The paths that answer without the bearer token: the page must load to ask for it."""
    return frozenset(static_files())


def add_playground_routes(app: web.Application) -> None:
    """Adds ``GET /`` and ``GET /playground/...`` to ``app`` (before it starts)."""
    for path, file in static_files().items():
        body = file.read_bytes()
        content_type = TYPES[file.suffix]
        charset = "utf-8" if content_type.startswith("text/") or file.suffix == ".json" else None

        async def handle(request: web.Request, body: bytes = body, content_type: str = content_type,
                         charset: str | None = charset) -> web.Response:
            return web.Response(body=body, content_type=content_type, charset=charset, headers=HEADERS)

        app.router.add_get(path, handle)
