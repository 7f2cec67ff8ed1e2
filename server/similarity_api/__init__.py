"""``POST /v1/mofserve/similarity``: two images -> how CLIP and DINOv2 each see them.

The pooled cosines (CLIP's projected image embedding, DINOv2's normed CLS: what ``mofserve mine``
compares), the CLIP-blind verdict at the paper's thresholds (CLIP > 0.95 and DINOv2 < 0.6) and a
per-patch cosine map for each encoder (patch i of one image against patch i of the other, over
the square the encoders see). One package per endpoint, vLLM style: ``protocol`` (the wire
format), ``serving`` (the call to Triton's ``embed`` ensemble and the maths), ``router`` (aiohttp).
"""

from .router import add_similarity_routes

__all__ = ["add_similarity_routes"]
