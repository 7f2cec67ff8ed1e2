"""Encoders -> ONNX with a dynamic batch axis, checked and cached: the vision towers at a fixed
resolution, CLIP's text tower at its fixed context (77 token ids).

An export lands in ``<artifacts>/onnx/<model>-<digest>/`` where the digest covers the source
checkpoint's bytes, the settings, the exporter code and the torch/transformers versions, so a
second ``mofserve export`` with nothing changed reuses it. Large graphs keep their weights in
``model.onnx.data`` beside ``model.onnx`` (ONNX external data); the two always travel together.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mofserve.core.checkpoints import CheckpointPaths
from mofserve.core.disk_space import room_for, tensor_bytes
from mofserve.core.preprocessing import preprocess_bytes
from mofserve.core.profiles import Profile, artifacts_dir
from mofserve.core.runtime import OnnxRunner
from mofserve.core.samples import sample_photos
from mofserve.core.text import load_clip_tokenizer, tokenize

from . import configs as configs_module
from .configs import ExportConfig, TextExportConfig
from .fingerprint import folder_digest, settings_digest
from .parity import BF16, check_parity, summarise

OPSET = 17
EXPORTER_VERSION = 1
EXTERNAL_DATA_THRESHOLD = 256 << 20  # bytes of weights above which they go to model.onnx.data
GRAPH_FILE, DATA_FILE, MANIFEST_FILE = "model.onnx", "model.onnx.data", "export.json"

Log = Callable[[str], None]


_logger = logging.getLogger(__name__)


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


def export_digest(config: ExportConfig, paths: CheckpointPaths, profile: Profile) -> str:
    import transformers

    source = folder_digest(config.checkpoint(paths), artifacts_dir() / "hash-memo.json")
    return settings_digest(EXPORTER_VERSION, OPSET, torch.__version__, transformers.__version__,
                           config.settings(profile), source, _code_digest())[:16]


def parity_batches(profile: Profile, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors (batch 2) and real photos through the serving preprocessing (batch 3)."""

    rng = np.random.default_rng(seed)
    size = profile.image_size
    random = rng.standard_normal((2, 3, size, size)).astype(np.float32)
    photos = np.stack([preprocess_bytes(b, size, aspect=profile.aspect) for b in sample_photos()[:3]])
    return {"random[2]": random, "photos[3]": photos.astype(np.float32)}


# Sentences for the text tower's parity: MMVP-VLM-like statements, punctuation, non-ASCII, and one
# longer than the context (truncated to 77 ids, ending with <|endoftext|>).
PARITY_SENTENCES = (
    "a photo of the dog facing left",
    "a photo of a butterfly with its wings closed, seen from above!",
    "a photo of 3 red apples (and 1 green one) on a café table",
    "a photo of " + " ".join(["a very long description of the scene"] * 20),
)


def text_parity_batches(module: torch.nn.Module, paths: CheckpointPaths, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids for the text tower: fully random ids (batch 2: any id anywhere, the pooled position is
    wherever the graph's argmax lands), tokenizer-shaped random ids (batch 3: start, random tokens, end,
    then padding with end-of-text repeated, so the FIRST maximum must win) and real sentences through
    the checkpoint's tokenizer (batch 4)."""
    config = module.model.config
    length, vocab = int(config.max_position_embeddings), int(config.vocab_size)
    tokenizer = load_clip_tokenizer(paths.clip)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    rng = np.random.default_rng(seed)
    random = rng.integers(0, vocab, (2, length), dtype=np.int64)
    shaped = np.full((3, length), eos, dtype=np.int64)
    for row, words in enumerate((1, 9, length - 2)):
        shaped[row, 0] = bos
        shaped[row, 1:1 + words] = rng.integers(0, min(bos, eos), words)
    return {"random[2]": random, "padded[3]": shaped,
            "sentences[4]": tokenize(tokenizer, PARITY_SENTENCES, length)}


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


def export_vision(config: ExportConfig, paths: CheckpointPaths, profile: Profile,
                  log: Log = _logger.info, force: bool = False) -> ExportedGraph:
    """Export one encoder (a vision tower or CLIP's text tower; the name predates the text tower)."""
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
    text = isinstance(config, TextExportConfig)
    example = config.example(module, profile)
    shape = f"{example.shape[-1]} token ids" if text else f"{profile.image_size}px"
    folder.parent.mkdir(parents=True, exist_ok=True)
    weights = tensor_bytes(module.state_dict().values())  # fp32, as the graph stores them
    with (room_for(folder.parent, weights, f"the ONNX graph of {config.model_name}"),
          tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{config.model_name}-") as tmp):
        tmp_dir = Path(tmp)
        traced, staged = tmp_dir / "traced" / GRAPH_FILE, tmp_dir / "staged"
        traced.parent.mkdir()
        staged.mkdir()
        log(f"{config.model_name}: tracing to ONNX (opset {OPSET}, {shape}, dynamic batch)")
        dynamic = {name: {0: "batch"} for name in (config.input_name, *config.output_names)}
        with torch.inference_mode(), warnings.catch_warnings():
            # tracing a fixed-size graph: transformers' shape checks become constants, as intended
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # the text tower gathers its pooled row at argmax(ids) >= 0: the negative-index caveat is moot
            warnings.filterwarnings("ignore", message="Exporting aten::index operator")
            torch.onnx.export(module, (example,), str(traced), input_names=[config.input_name],
                              output_names=list(config.output_names), dynamic_axes=dynamic,
                              opset_version=OPSET, dynamo=False, do_constant_folding=True)
        _save_graph(traced, staged)
        log(f"{config.model_name}: parity check against PyTorch (random and real "
            f"{'sentences' if text else 'photos'})")
        runner = OnnxRunner(staged / GRAPH_FILE)
        batches = text_parity_batches(module, paths) if text else parity_batches(profile)
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
