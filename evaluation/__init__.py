"""Evaluators of a running mofserve server (installed as ``mofserve.evaluation``).

They talk to the server through ``mofserve.clients`` only and grade with ``mofserve.core``;
they never import ``mofserve.server``. ``mmvp`` runs the MMVP benchmark (``mofserve eval mmvp``);
``mmvp_vlm`` its CLIP-only variant MMVP-VLM (``mofserve eval mmvp-vlm``);
``datasets`` reads benchmark folders and ``reports`` writes the JSON / CSV / Markdown outputs and
the resumable checkpoints that every evaluator shares.
"""
