"""mofserve: serve multimodal LLMs fed by CLIP + DINOv2 Mixture-of-Features visual tokens.

The installed package maps the project's top-level folders into one namespace:
``mofserve.core`` (shared core), ``mofserve.export``, ``mofserve.model_repository``,
``mofserve.server``, ``mofserve.clients`` and ``mofserve.benchmarks``.
"""

__version__ = "0.1.0"
