"""Evaluators of a running mofserve server (installed as ``mofserve.evaluation``).

They talk to the server through ``mofserve.clients`` only and grade with ``mofserve.core``;
they never import ``mofserve.server``. ``mmvp`` runs the MMVP benchmark (``mofserve eval mmvp``;
``mmvp_scoring`` grades, ``mmvp_report`` writes the outputs); ``mmvp_vlm`` its CLIP-only variant
MMVP-VLM (``mofserve eval mmvp-vlm``); ``mining`` the CLIP-blind pair miner (``mofserve mine``;
``image_embedding``, ``pair_search``, ``contact_sheet``, with the embeddings cached by
``embedding_cache``). ``datasets`` reads benchmark folders and ``checkpoint`` holds the resumable
JSON-lines checkpoints; the JSON / CSV / Markdown outputs go through ``mofserve.core.reports``.
"""
