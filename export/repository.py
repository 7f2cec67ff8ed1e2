"""Writes a Triton model repository for a target from one source of truth.

Targets share model names, tensor names, shapes and ensembles; they differ only in how the
encoders and the fusion run:

- ``cpu``: every model is a python-backend model (``model_repository/<source>/model.py``); the
  encoders run their ONNX graph with ONNX Runtime or OpenVINO inside it.
- ``gpu-onnx``: the encoders use Triton's native ``onnxruntime_onnx`` platform with the
  TensorRT execution provider in FP16, ``KIND_GPU``; python models run on the GPU.
- ``gpu-trt``: the encoders are ``tensorrt_plan`` engines built on the serving GPU.

Configs are protobuf ``ModelConfig`` messages (Triton's own schema, from tritonclient) printed
as text, so that a typo in a field name is an error here rather than at server start.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from mofserve.core import tensors as T
from mofserve.core.checkpoints import CheckpointPaths, ModelShapes
from mofserve.core.preprocessing import DEFAULT_LIMITS
from mofserve.core.profiles import Profile
from mofserve.core.tensors import FusionMode

from .fingerprint import settings_digest
from .onnx_export import ExportedGraph

TARGETS = ("cpu", "gpu-onnx", "gpu-trt")
REPOSITORY_FORMAT = 1
_FP32, _STRING = mc.TYPE_FP32, mc.TYPE_STRING


@dataclass(frozen=True)
class ModelSpec:
    """One model of the repository: its config and the files of its version folder."""

    config: mc.ModelConfig
    source: str | None = None  # folder under model_repository/ holding model.py (python backend)
    files: tuple[Path, ...] = ()  # weights to place in the version folder

    @property
    def name(self) -> str:
        return self.config.name


def _io(message, name: str, dtype: int, dims: Iterable[int], optional: bool = False):
    entry = message.add()
    entry.name, entry.data_type = name, dtype
    entry.dims.extend(dims)
    if optional:
        entry.optional = True
    return entry


def _params(config: mc.ModelConfig, **values: object) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = str(value)


def _batched(config: mc.ModelConfig, profile: Profile, kind: int, count: int, dynamic: bool = True) -> None:
    config.max_batch_size = profile.serving.max_batch_size
    config.instance_group.add(kind=kind, count=count)
    if dynamic:
        config.dynamic_batching.preferred_batch_size.extend(
            b for b in profile.serving.preferred_batch_sizes if b <= config.max_batch_size)
        config.dynamic_batching.max_queue_delay_microseconds = profile.serving.max_queue_delay_us


def _python_on(config: mc.ModelConfig, gpu: bool) -> int:
    config.backend = "python"
    if gpu:
        # keep tensors on the device between models (DLPack) instead of copying to host
        _params(config, FORCE_CPU_ONLY_INPUT_TENSORS="no")
        return mc.ModelInstanceGroup.KIND_GPU
    return mc.ModelInstanceGroup.KIND_CPU


def preprocess_spec(profile: Profile, target: str) -> ModelSpec:
    c = mc.ModelConfig(name=T.PREPROCESS)
    _python_on(c, gpu=False)  # decoding is CPU work on every target
    _batched(c, profile, mc.ModelInstanceGroup.KIND_CPU, profile.serving.preprocess_instances)
    _io(c.input, T.IMAGE, _STRING, [1])
    size = profile.image_size
    _io(c.output, T.PIXEL_VALUES, _FP32, [3, size, size])
    _params(c, image_size=size, aspect=profile.aspect, max_bytes=DEFAULT_LIMITS.max_bytes,
            max_pixels=DEFAULT_LIMITS.max_pixels)
    return ModelSpec(c, source="preprocess")


def encoder_spec(graph: ExportedGraph, shapes: ModelShapes, profile: Profile, target: str) -> ModelSpec:
    name = graph.model_name
    c = mc.ModelConfig(name=name)
    size = shapes.image_size
    _io(c.input, T.PIXEL_VALUES, _FP32, [3, size, size])
    if name == T.CLIP_VISION:
        _io(c.output, T.CLIP_FEATURES, _FP32, [shapes.num_patches, shapes.clip_width])
        _io(c.output, T.CLIP_EMBEDS, _FP32, [shapes.clip_embed_dim])
    else:
        _io(c.output, T.DINO_FEATURES, _FP32, [shapes.num_patches, shapes.dino_width])
        _io(c.output, T.DINO_CLS, _FP32, [shapes.dino_width])
    serving = profile.serving
    if target == "cpu":
        kind = _python_on(c, gpu=False)
        _params(c, onnx_file="model.onnx", runtime=serving.runtime, threads=serving.intra_op_threads,
                precision="bf16" if serving.runtime == "openvino" else "fp32",
                feature_cache_bytes=serving.feature_cache_mb << 20)
        source, files = "vision_encoder", tuple(graph.files)
    elif target == "gpu-onnx":
        c.platform, kind = "onnxruntime_onnx", mc.ModelInstanceGroup.KIND_GPU
        accel = c.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accel.parameters["precision_mode"] = "FP16"
        accel.parameters["max_workspace_size_bytes"] = str(4 << 30)
        accel.parameters["trt_engine_cache_enable"] = "1"
        accel.parameters["trt_engine_cache_path"] = "/engine-cache"
        source, files = None, tuple(graph.files)
    else:
        c.platform, kind = "tensorrt_plan", mc.ModelInstanceGroup.KIND_GPU
        c.default_model_filename = "model.plan"
        source, files = None, ()  # engines are built on the serving GPU (mofserve export --target gpu-trt)
    _batched(c, profile, kind, serving.encoder_instances)
    # No `response_cache` here: Triton 2.51's cache keys on inputs only and replays partial or
    # (python backend) failed responses; the cpu target caches features inside the model instead.
    return ModelSpec(c, source=source, files=files)


def fuse_spec(mode: FusionMode, shapes: ModelShapes, profile: Profile, paths: CheckpointPaths,
              target: str) -> ModelSpec:
    c = mc.ModelConfig(name=T.fuse_model(mode))
    kind = _python_on(c, gpu=target != "cpu")
    _batched(c, profile, kind, 1)
    if mode is not FusionMode.DINOV2:
        _io(c.input, T.CLIP_FEATURES, _FP32, [shapes.num_patches, shapes.clip_width])
    if mode is not FusionMode.CLIP:
        _io(c.input, T.DINO_FEATURES, _FP32, [shapes.num_patches, shapes.dino_width])
    if mode is FusionMode.ADDITIVE:
        _io(c.input, T.ALPHA, _FP32, [1], optional=True)
    _io(c.output, T.VISUAL_TOKENS, _FP32, [T.token_count(mode, shapes.num_patches), shapes.llm_width])
    _params(c, mode=mode.value, llava=paths.llava, default_alpha=profile.default_alpha,
            threads=profile.serving.intra_op_threads)
    return ModelSpec(c, source="fuse")


def _step(ensemble: mc.ModelConfig, model: str, inputs: dict[str, str], outputs: dict[str, str]) -> None:
    step = ensemble.ensemble_scheduling.step.add(model_name=model, model_version=-1)
    for key, value in inputs.items():
        step.input_map[key] = value
    for key, value in outputs.items():
        step.output_map[key] = value


# Triton rejects an ensemble tensor that nothing consumes, so the encoder outputs that no step
# reads become outputs of the ensemble (a client that asks only for VISUAL_TOKENS does not get
# them on the wire).
_ENCODER_OUTPUTS = {
    T.CLIP_VISION: (T.CLIP_FEATURES, T.CLIP_EMBEDS),
    T.DINOV2_VISION: (T.DINO_FEATURES, T.DINO_CLS),
}


def _output_dims(name: str, shapes: ModelShapes) -> list[int]:
    return {T.CLIP_FEATURES: [shapes.num_patches, shapes.clip_width], T.CLIP_EMBEDS: [shapes.clip_embed_dim],
            T.DINO_FEATURES: [shapes.num_patches, shapes.dino_width], T.DINO_CLS: [shapes.dino_width]}[name]


def _encoder_ensemble(name: str, encoders: tuple[str, ...], shapes: ModelShapes, profile: Profile,
                      consumed: tuple[str, ...] = ()) -> mc.ModelConfig:
    """An ensemble whose steps are preprocess and ``encoders``; unconsumed encoder outputs are outputs."""
    c = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=profile.serving.max_batch_size)
    _io(c.input, T.IMAGE, _STRING, [1])
    _step(c, T.PREPROCESS, {T.IMAGE: T.IMAGE}, {T.PIXEL_VALUES: "pixels"})
    for encoder in encoders:
        outputs = _ENCODER_OUTPUTS[encoder]
        _step(c, encoder, {T.PIXEL_VALUES: "pixels"}, {o: o for o in outputs})
        for output in outputs:
            if output not in consumed:
                _io(c.output, output, _FP32, _output_dims(output, shapes))
    return c


def tokens_spec(mode: FusionMode, shapes: ModelShapes, profile: Profile) -> ModelSpec:
    """image bytes -> visual tokens (+ the pooled embeddings of the encoders it ran)."""
    encoders = tuple(e for e, used in ((T.CLIP_VISION, mode is not FusionMode.DINOV2),
                                       (T.DINOV2_VISION, mode is not FusionMode.CLIP)) if used)
    fuse_inputs = [_ENCODER_OUTPUTS[e][0] for e in encoders]
    c = _encoder_ensemble(T.tokens_model(mode), encoders, shapes, profile, consumed=tuple(fuse_inputs))
    if mode is FusionMode.ADDITIVE:
        _io(c.input, T.ALPHA, _FP32, [1], optional=True)
        fuse_inputs.append(T.ALPHA)
    c.output.insert(0, mc.ModelOutput(name=T.VISUAL_TOKENS, data_type=_FP32,
                                      dims=[T.token_count(mode, shapes.num_patches), shapes.llm_width]))
    _step(c, T.fuse_model(mode), {n: n for n in fuse_inputs}, {T.VISUAL_TOKENS: T.VISUAL_TOKENS})
    return ModelSpec(c)


def embed_spec(shapes: ModelShapes, profile: Profile) -> ModelSpec:
    """image bytes -> pooled CLIP image embedding and DINOv2 CLS (similarity, CLIP-blind mining);
    the patch features of both encoders are available too, for apps that fuse on their own."""
    return ModelSpec(_encoder_ensemble(T.EMBED, (T.CLIP_VISION, T.DINOV2_VISION), shapes, profile))


def repository_specs(profile: Profile, target: str, paths: CheckpointPaths, shapes: ModelShapes,
                     graphs: dict[str, ExportedGraph]) -> list[ModelSpec]:
    if target not in TARGETS:
        raise ValueError(f"target: unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    specs = [preprocess_spec(profile, target)]
    specs += [encoder_spec(graphs[name], shapes, profile, target) for name in (T.CLIP_VISION, T.DINOV2_VISION)]
    specs += [fuse_spec(mode, shapes, profile, paths, target) for mode in FusionMode]
    specs += [tokens_spec(mode, shapes, profile) for mode in FusionMode]
    specs.append(embed_spec(shapes, profile))
    return specs


def config_text(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def model_sources() -> Path:
    """The folder holding the python-backend model sources (``model_repository/`` in the repo)."""
    return Path(str(resources.files("mofserve.model_repository")))


def _place(src: Path, dst: Path) -> None:
    """Hard-link a weight file into the repository (no copy of gigabytes), else copy it."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_repository(specs: list[ModelSpec], root: Path) -> Path:
    """Write the repository to ``root/<digest>`` (immutable: a running server keeps its copy)."""
    sources = model_sources()
    digest = settings_digest(REPOSITORY_FORMAT, [config_text(s.config) for s in specs],
                             [str(f) for s in specs for f in s.files],
                             [(sources / s.source / "model.py").read_text() for s in specs if s.source])[:16]
    final = root / digest
    if (final / ".complete").is_file():
        return final
    staging = root / f".{digest}.{os.getpid()}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    for spec in specs:
        model_dir = staging / spec.name
        version = model_dir / "1"
        version.mkdir(parents=True)
        (model_dir / "config.pbtxt").write_text(config_text(spec.config))
        if spec.source:
            shutil.copy2(sources / spec.source / "model.py", version / "model.py")
        for f in spec.files:
            _place(f, version / f.name)
    (staging / ".complete").write_text(digest)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    return final
