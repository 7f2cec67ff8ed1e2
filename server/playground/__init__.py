"""The web playground at ``/``: static HTML, CSS and ES modules shipped in this package (no build
step, nothing fetched from outside), served with a same-origin Content-Security-Policy. The page
talks only to the public API (``/v1/chat/completions`` streamed, ``/v1/mofserve/similarity``,
``/v1/mofserve/info``, ``/metrics``), each call with the bearer token when auth is on; the page's
own files are public so that it can ask for that token (``public_paths``)."""

from .router import CSP, add_playground_routes, public_paths

__all__ = ["CSP", "add_playground_routes", "public_paths"]
