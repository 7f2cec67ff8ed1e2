"""What every python-backend model of the repository does the same way on start-up."""

from __future__ import annotations

import json
from typing import Any


def model_config(args: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The model's config (as Triton passes it) and its ``parameters`` as plain strings."""
    config = json.loads(args["model_config"])
    params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
    return config, params


def set_torch_threads(params: dict[str, str]) -> None:
    """Apply the ``threads`` parameter (0 or absent: torch's default, all cores)."""
    threads = int(params.get("threads", "0"))
    if threads:
        import torch

        torch.set_num_threads(threads)
