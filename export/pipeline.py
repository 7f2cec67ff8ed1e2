"""``mofserve export``: profile -> checkpoints -> ONNX graphs (parity-checked) -> model repository."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from mofserve.core.checkpoints import CheckpointPaths, ModelShapes, read_shapes, resolve_profile
from mofserve.core.profiles import Profile, artifacts_dir

from .configs import EXPORTS
from .onnx_export import ExportedGraph, Log, export_vision
from .repository import repository_specs, write_repository
from .tensorrt_engine import attach_engines, build_engines, require_tensorrt

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltRepository:
    path: Path
    profile: Profile
    target: str
    checkpoints: CheckpointPaths
    shapes: ModelShapes
    graphs: dict[str, ExportedGraph]


def export_profile(profile: Profile, target: str = "cpu", log: Log = _logger.info,
                   force: bool = False, output: Path | None = None) -> BuiltRepository:
    """Build (or reuse) everything a target needs to serve ``profile``."""
    started = time.perf_counter()
    builder = None
    if target == "gpu-trt":  # fail before the long ONNX export when no engine can be built here
        builder = require_tensorrt()
    if profile.seeded is not None:
        log(f"profile {profile.name}: seeded random weights (answers are not meaningful)")
    paths = resolve_profile(profile)
    shapes = read_shapes(paths, profile)
    log(f"profile {profile.name}: {shapes.num_patches} patches, CLIP width {shapes.clip_width}, "
        f"DINOv2 width {shapes.dino_width}, LLM width {shapes.llm_width}")
    graphs = {}
    for step, config in enumerate(EXPORTS, start=1):
        log(f"[{step}/{len(EXPORTS) + 1}] {config.model_name}")
        skip = config.skip_reason(paths)
        if target == "gpu-torch":  # no ONNX: the encoders load the checkpoints (export/torch_runtime.py)
            log(f"{config.model_name}: no ONNX export for gpu-torch ({skip or 'served from the checkpoint'})")
            continue
        if skip:
            log(f"{config.model_name}: skipped: {skip}")
            continue
        graphs[config.model_name] = export_vision(config, paths, profile, log=log, force=force)
    log(f"[{len(EXPORTS) + 1}/{len(EXPORTS) + 1}] model repository ({target})")
    specs = repository_specs(profile, target, paths, shapes, graphs)
    if builder is not None:  # gpu-trt: FP16 engines built on this GPU, gated, cached (export/tensorrt_engine.py)
        specs = attach_engines(specs, build_engines(graphs, profile, paths, log=log, force=force))
    root = output or artifacts_dir() / "repositories" / f"{profile.name}-{target}"
    path = write_repository(specs, root)
    log(f"repository ready in {time.perf_counter() - started:.1f} s: {path}")
    return BuiltRepository(path, profile, target, paths, shapes, graphs)
