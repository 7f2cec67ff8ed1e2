"""Sources of the python-backend Triton models.

``export.repository`` copies ``<source>/model.py`` into each generated repository beside a
``config.pbtxt`` written from the one source of truth; the models keep no logic of their own
beyond adapting Triton requests to ``mofserve.core`` (preprocessing, ONNX runners, fusion).
"""
