"""Vision towers -> ONNX at a fixed resolution with a dynamic batch axis, checked and cached.

An export lands in ``<artifacts>/onnx/<model>-<digest>/`` where the digest covers the source
checkpoint's bytes, the settings, the exporter code and the torch/transformers versions, so a
second ``mofserve export`` with nothing changed reuses it. Large graphs keep their weights in
``model.onnx.data`` beside ``model.onnx`` (ONNX external data); the two always travel together.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mofserve.core.checkpoints import CheckpointPaths
from mofserve.core.profiles import Profile, artifacts_dir
from mofserve.core.runtime import OnnxRunner

from . import configs as configs_module
from .configs import VisionExportConfig
from .fingerprint import folder_digest, settings_digest
from .parity import BF16, check_parity, summarise

OPSET = 17
EXPORTER_VERSION = 1
EXTERNAL_DATA_THRESHOLD = 256 << 20  # bytes of weights above which they go to model.onnx.data
GRAPH_FILE, DATA_FILE, MANIFEST_FILE = "model.onnx", "model.onnx.data", "export.json"

Log = Callable[[str], None]


def stderr_log(message: str) -> None:
    print(f"[export] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ExportedGraph:
    model_name: str
    folder: Path
    digest: str
    manifest: dict
    cached: bool

    @property
    def graph(self) -> Path:
        return self.folder / GRAPH_FILE

    @property
    def files(self) -> list[Path]:
        """The graph and, when present, its external-data file."""
        return [p for p in (self.folder / GRAPH_FILE, self.folder / DATA_FILE) if p.is_file()]


def _code_digest() -> str:
    sources = [Path(configs_module.__file__), Path(__file__)]
    return settings_digest(*(p.read_text() for p in sources))


def export_digest(config: VisionExportConfig, paths: CheckpointPaths, profile: Profile) -> str:
    import transformers

    source = folder_digest(config.checkpoint(paths), artifacts_dir() / "hash-memo.json")
    return settings_digest(EXPORTER_VERSION, OPSET, torch.__version__, transformers.__version__,
                           config.settings(profile), source, _code_digest())[:16]


def parity_batches(profile: Profile, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors (batch 2) and real photos through the serving preprocessing (batch 3)."""
    from mofserve.core.preprocessing import preprocess_bytes
    from mofserve.core.samples import sample_photos

    rng = np.random.default_rng(seed)
    size = profile.image_size
    random = rng.standard_normal((2, 3, size, size)).astype(np.float32)
    photos = np.stack([preprocess_bytes(b, size, aspect=profile.aspect) for b in sample_photos()[:3]])
    return {"random[2]": random, "photos[3]": photos.astype(np.float32)}


def _save_graph(tmp_graph: Path, final_dir: Path) -> None:
    """Re-save the traced graph into final_dir, moving large weights to one external-data file."""
    import onnx

    proto = onnx.load(str(tmp_graph), load_external_data=True)
    weights = sum(t.ByteSize() for t in proto.graph.initializer)
    target = final_dir / GRAPH_FILE
    if weights > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(proto, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(proto, str(target))


def export_vision(config: VisionExportConfig, paths: CheckpointPaths, profile: Profile,
                  log: Log = stderr_log, force: bool = False) -> ExportedGraph:
    digest = export_digest(config, paths, profile)
    folder = artifacts_dir() / "onnx" / f"{config.model_name}-{digest}"
    manifest_path = folder / MANIFEST_FILE
    if manifest_path.is_file() and not force:
        manifest = json.loads(manifest_path.read_text())
        log(f"{config.model_name}: cached export {folder.name} (parity min cosine "
            f"{manifest['parity']['min_cosine']:.7f}, max abs diff {manifest['parity']['max_abs_diff']:.2e})")
        return ExportedGraph(config.model_name, folder, digest, manifest, cached=True)

    started = time.perf_counter()
    log(f"{config.model_name}: loading {config.checkpoint(paths)}")
    module = config.build_module(paths, profile)
    size = profile.image_size
    example = torch.zeros(1, 3, size, size)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{config.model_name}-") as tmp:
        tmp_dir = Path(tmp)
        traced, staged = tmp_dir / "traced" / GRAPH_FILE, tmp_dir / "staged"
        traced.parent.mkdir()
        staged.mkdir()
        log(f"{config.model_name}: tracing to ONNX (opset {OPSET}, {size}px, dynamic batch)")
        dynamic = {name: {0: "batch"} for name in (config.input_name, *config.output_names)}
        with torch.inference_mode(), warnings.catch_warnings():
            # tracing a fixed-size graph: transformers' shape checks become constants, as intended
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(module, (example,), str(traced), input_names=[config.input_name],
                              output_names=list(config.output_names), dynamic_axes=dynamic,
                              opset_version=OPSET, dynamo=False, do_constant_folding=True)
        _save_graph(traced, staged)
        log(f"{config.model_name}: parity check against PyTorch (random and real photos)")
        runner = OnnxRunner(staged / GRAPH_FILE)
        batches = parity_batches(profile)
        results = check_parity(module, runner, config.input_name, config.output_names, batches)
        for r in results:
            log(f"{config.model_name}:   {r.line()}")
        serving_results = []
        if profile.serving.runtime == "openvino":
            # the graph as it will be served: OpenVINO with a bf16 precision hint
            log(f"{config.model_name}: parity of the serving runtime (OpenVINO bf16) against PyTorch fp32")
            served = OnnxRunner(staged / GRAPH_FILE, runtime="openvino", precision="bf16")
            serving_results = check_parity(module, served, config.input_name, config.output_names,
                                           batches, tolerance=BF16)
            for r in serving_results:
                log(f"{config.model_name}:   {r.line()}")
        manifest = {
            "model": config.model_name, "digest": digest, "profile": profile.name,
            "checkpoint": str(config.checkpoint(paths)), "settings": config.settings(profile),
            "opset": OPSET, "input": config.input_name, "outputs": list(config.output_names),
            "parity": summarise(results),
            "serving_parity": summarise(serving_results) if serving_results else None,
            "seconds": round(time.perf_counter() - started, 2),
            "torch": torch.__version__,
        }
        (staged / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        staged.rename(folder)
    log(f"{config.model_name}: exported in {manifest['seconds']} s -> {folder}")
    return ExportedGraph(config.model_name, folder, digest, manifest, cached=False)
