"""``GET /v1/mofserve/info``: what this server is (profile, model versions, the random-weights
notice, modes, limits, the image the encoders see, the CLIP-blind thresholds, which extra routes
exist), in one JSON object for the playground and other clients. vLLM style: ``protocol`` builds
the body, ``router`` serves it."""

from .router import add_info_routes

__all__ = ["add_info_routes"]
