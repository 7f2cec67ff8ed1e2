"""Writes a Triton model repository for a target from one source of truth.

Targets share model names, tensor names, shapes and ensembles; they differ only in how the
encoders and the fusion run, and in the per-stage timings (``TIMING_*_MS``) that only
python-backend models emit (the native gpu-onnx / gpu-trt encoders have no timing and no feature
cache):

- ``cpu``: every model is a python-backend model (``model_repository/<source>/model.py``); the
  encoders (the two vision towers and CLIP's text tower ``clip_text``) run their ONNX graph with
  ONNX Runtime or OpenVINO inside it.
- ``gpu-onnx``: the encoders use Triton's native ``onnxruntime_onnx`` platform with the
  TensorRT execution provider in FP16, ``KIND_GPU``; python models run on the GPU.
- ``gpu-trt``: the encoders are ``tensorrt_plan`` engines built on the serving GPU.
- ``gpu-torch``: no ONNX; the encoders (``model_repository/torch_encoder``) and the fusion
  (``torch_fuse``) are PyTorch modules on the GPU in bf16, loaded from the checkpoints
  (``export.torch_runtime``), tensors handed over by DLPack; a machine with only PyTorch serves it.

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
from mofserve.core.checkpoints import CheckpointPaths, ModelShapes, read_config, read_logit_scale
from mofserve.core.preprocessing import DEFAULT_LIMITS
from mofserve.core.profiles import Profile
from mofserve.core.targets import ENCODER_MODELS, TARGETS, mode_encoders
from mofserve.core.tensors import FusionMode

from .fingerprint import settings_digest
from .onnx_export import ExportedGraph
from .torch_runtime import encoder_parameters

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
    _io(c.output, T.TIMING_PREPROCESS, _FP32, [1])
    _params(c, image_size=size, aspect=profile.aspect, max_bytes=DEFAULT_LIMITS.max_bytes,
            max_pixels=DEFAULT_LIMITS.max_pixels)
    return ModelSpec(c, source="preprocess")


def tokenize_text_spec(profile: Profile, shapes: ModelShapes, paths: CheckpointPaths, target: str) -> ModelSpec:
    """text -> CLIP token ids with the CLIP checkpoint's own tokenizer (CPU work on every target)."""
    c = mc.ModelConfig(name=T.TOKENIZE_TEXT)
    _python_on(c, gpu=False)
    _batched(c, profile, mc.ModelInstanceGroup.KIND_CPU, 1)
    _io(c.input, T.TEXT, _STRING, [1])
    _io(c.output, T.INPUT_IDS, mc.TYPE_INT64, [shapes.text_context_length])
    _io(c.output, T.TIMING_TOKENIZE, _FP32, [1])
    _params(c, tokenizer=paths.clip, context_length=shapes.text_context_length)
    return ModelSpec(c, source="tokenize_text")


def torch_encoder_spec(name: str, shapes: ModelShapes, profile: Profile, paths: CheckpointPaths) -> ModelSpec:
    """gpu-torch: the encoder as a PyTorch module on the GPU (``model_repository/torch_encoder``),
    loaded from the checkpoint, gated against fp32 at start-up, padded to batch buckets. Like the
    cpu target's encoders it has the feature cache (on the device, ``feature_cache_mb`` per
    instance) and emits its timing."""
    c = mc.ModelConfig(name=name)
    _encoder_io(c, name, shapes)
    _io(c.output, T.ENCODER_TIMINGS[name], _FP32, [1])
    kind = _python_on(c, gpu=True)
    serving = profile.serving
    buckets = sorted({1, *serving.preferred_batch_sizes, serving.max_batch_size})
    _params(c, **encoder_parameters(name, profile, paths, buckets=buckets), threads=serving.intra_op_threads,
            feature_cache_bytes=serving.feature_cache_mb << 20)
    _batched(c, profile, kind, serving.encoder_instances)
    return ModelSpec(c, source="torch_encoder")


def _encoder_io(c: mc.ModelConfig, name: str, shapes: ModelShapes) -> None:
    """An encoder's inputs and outputs (the tensor contract), the same on every target."""
    size = shapes.image_size
    if name == T.CLIP_TEXT:  # CLIP's text tower: token ids -> text embedding (same space as CLIP_EMBEDS)
        _io(c.input, T.INPUT_IDS, mc.TYPE_INT64, [shapes.text_context_length])
        _io(c.output, T.TEXT_EMBEDS, _FP32, [shapes.clip_embed_dim])
    elif name == T.CLIP_VISION:
        _io(c.input, T.PIXEL_VALUES, _FP32, [3, size, size])
        _io(c.output, T.CLIP_FEATURES, _FP32, [shapes.num_patches, shapes.clip_width])
        _io(c.output, T.CLIP_EMBEDS, _FP32, [shapes.clip_embed_dim])
    else:
        _io(c.input, T.PIXEL_VALUES, _FP32, [3, size, size])
        _io(c.output, T.DINO_FEATURES, _FP32, [shapes.num_patches, shapes.dino_width])
        _io(c.output, T.DINO_CLS, _FP32, [shapes.dino_width])


def encoder_spec(graph: ExportedGraph, shapes: ModelShapes, profile: Profile, target: str) -> ModelSpec:
    name = graph.model_name
    c = mc.ModelConfig(name=name)
    _encoder_io(c, name, shapes)
    serving = profile.serving
    if target == "cpu":
        _io(c.output, T.ENCODER_TIMINGS[name], _FP32, [1])  # native backends (gpu-onnx, gpu-trt) have none
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
    # (python backend) failed responses; the cpu (and gpu-torch) encoders cache features inside the
    # model instead. The native gpu-onnx / gpu-trt encoders have no cache and no timing: why, in
    # docs/architecture.md ("Why the encoders cache features themselves").
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
    _io(c.output, T.TIMING_FUSION, _FP32, [1])
    _params(c, mode=mode.value, llava=paths.llava, default_alpha=profile.default_alpha,
            threads=profile.serving.intra_op_threads)
    # gpu targets: the projectors run on the GPU on the encoders' device tensors (DLPack in and out);
    # `fuse` reads numpy, which a GPU tensor handed over with FORCE_CPU_ONLY_INPUT_TENSORS off is not
    return ModelSpec(c, source="fuse" if target == "cpu" else "torch_fuse")


def llm_spec(shapes: ModelShapes, profile: Profile, paths: CheckpointPaths, target: str) -> ModelSpec:
    """visual tokens [N, H] (N differs by mode) + question -> a stream of tokens (model_repository/llm).

    Decoupled: each request gets a response per generated token and a final one (core.tensors
    says what each carries), and ``execute`` returns at once, handing the request to the
    in-flight batching engine (core.llm_engine): requests need no dynamic batcher to share decode
    steps. One instance per device: the engine owns its batch, and a CANCEL request must reach
    the instance that runs the sequence."""
    c = mc.ModelConfig(name=T.LLM)
    kind = _python_on(c, gpu=target != "cpu")
    serving = profile.serving
    c.max_batch_size = serving.max_batch_size  # the ensembles' batch axis; one row per request
    c.instance_group.add(kind=kind, count=1)
    c.model_transaction_policy.decoupled = True
    # optional so that a CANCEL request can name a sequence alone; the vqa ensembles always send them
    _io(c.input, T.VISUAL_TOKENS, _FP32, [-1, shapes.llm_width], optional=True)
    _io(c.input, T.QUESTION, _STRING, [1], optional=True)
    _io(c.input, T.OPTIONS, _STRING, [1], optional=True)
    _io(c.input, T.MAX_NEW_TOKENS, mc.TYPE_INT32, [1], optional=True)
    _io(c.input, T.TEMPERATURE, _FP32, [1], optional=True)
    _io(c.input, T.TOP_P, _FP32, [1], optional=True)
    _io(c.input, T.SEED, mc.TYPE_INT64, [1], optional=True)
    _io(c.input, T.REQUEST_ID, _STRING, [1], optional=True)
    _io(c.input, T.CANCEL, mc.TYPE_BOOL, [1], optional=True)
    for name in T.UPSTREAM_STAGES:  # read where the ensemble ran the stage, echoed as UPSTREAM_TIMINGS
        _io(c.input, name, _FP32, [1], optional=True)
    for name in (T.TEXT_DELTA, T.ANSWER, T.CHOSEN_OPTION, T.FINISH_REASON, T.ERROR_CODE, T.ERROR_MESSAGE,
                 T.ERROR_FIELD):
        _io(c.output, name, _STRING, [1])
    _io(c.output, T.OPTION_SCORES, _FP32, [-1])
    _io(c.output, T.UPSTREAM_TIMINGS, _FP32, [len(T.UPSTREAM_STAGES)])
    _io(c.output, T.PROMPT_TOKENS, mc.TYPE_INT32, [1])
    _io(c.output, T.COMPLETION_TOKENS, mc.TYPE_INT32, [1])
    for name in (T.TIMING_LLM, T.TIMING_LLM_QUEUE, T.TIMING_PREFILL, T.TIMING_DECODE):
        _io(c.output, name, _FP32, [1])
    _params(c, llava=paths.llava, max_new_tokens=serving.max_new_tokens,
            max_new_tokens_limit=serving.max_new_tokens_limit, threads=serving.llm_threads,
            dtype=serving.llm_dtype, max_sequences=serving.llm_max_sequences,
            kv_cache_mb=serving.llm_kv_cache_mb, prefill_chunk=serving.llm_prefill_chunk,
            random_weights=str(profile.random_weights).lower(),
            profile=profile.name)
    return ModelSpec(c, source="llm")


def ensemble(name: str, steps: list[mc.ModelConfig], profile: Profile) -> mc.ModelConfig:
    """Chain ``steps`` into an ensemble, wiring tensors by name.

    A step input that an earlier step produces reads that output; any other step input is an
    input of the ensemble (optional where the model's is). Every output of every step is mapped
    (a cached encoder entry is whole), and since Triton rejects an ensemble tensor that nothing
    consumes, each output that no later step reads is an output of the ensemble: the last
    step's first, then the others in step order (timings, pooled embeddings...). A client that
    asks for some outputs gets only those on the wire.
    """
    c = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=profile.serving.max_batch_size)
    produced: dict[str, mc.ModelOutput] = {}
    consumed: set[str] = set()
    inputs: dict[str, mc.ModelInput] = {}
    wiring: list[tuple[str, dict[str, str]]] = []
    for model in steps:
        reads = {}
        for i in model.input:
            if i.name in produced:
                consumed.add(i.name)
            elif T.is_timing(i.name):
                continue  # a stage's timing is read where a step produced it, never asked of the client
            elif i.name not in inputs:
                inputs[i.name] = i
            reads[i.name] = i.name
        for o in model.output:
            if o.name in produced or o.name in inputs:
                raise ValueError(f"ensemble {name}: tensor {o.name} is produced twice")
            produced[o.name] = o
        wiring.append((model.name, reads))
    # A decoupled last step streams: Triton then requires every ensemble output to come from it,
    # so the earlier steps map only what a later step reads (llm echoes their timings).
    streaming = steps[-1].model_transaction_policy.decoupled
    last = [o.name for o in steps[-1].output]
    for model, (model_name, reads) in zip(steps, wiring, strict=True):
        writes = [o.name for o in model.output
                  if not streaming or model is steps[-1] or o.name in consumed]
        _step(c, model_name, reads, {n: n for n in writes})
    c.input.extend(inputs.values())
    for output_name in [*last, *(n for n in produced if n not in last and not streaming)]:
        if output_name not in consumed:
            o = produced[output_name]
            c.output.add(name=o.name, data_type=o.data_type, dims=o.dims)
    return c


def _step(ensemble: mc.ModelConfig, model: str, inputs: dict[str, str], outputs: dict[str, str]) -> None:
    step = ensemble.ensemble_scheduling.step.add(model_name=model, model_version=-1)
    for key, value in inputs.items():
        step.input_map[key] = value
    for key, value in outputs.items():
        step.output_map[key] = value


def _encoders(mode: FusionMode) -> tuple[str, ...]:
    """The encoder models a fusion mode needs (ensembles cannot branch: each runs only these)."""
    return tuple(ENCODER_MODELS[e] for e in mode_encoders(mode))


def tokens_spec(mode: FusionMode, models: dict[str, mc.ModelConfig], profile: Profile) -> ModelSpec:
    """image bytes (+ ALPHA) -> visual tokens (+ the timings and pooled embeddings of what it ran)."""
    steps = [models[T.PREPROCESS], *(models[e] for e in _encoders(mode)), models[T.fuse_model(mode)]]
    return ModelSpec(ensemble(T.tokens_model(mode), steps, profile))


def vqa_spec(mode: FusionMode, models: dict[str, mc.ModelConfig], profile: Profile) -> ModelSpec:
    """image bytes + question (+ options, ALPHA, sampling) -> answer; the visual tokens stay inside."""
    steps = [models[T.PREPROCESS], *(models[e] for e in _encoders(mode)), models[T.fuse_model(mode)],
             models[T.LLM]]
    config = ensemble(T.vqa_model(mode), steps, profile)
    # llm's QUESTION is optional only so that a CANCEL request (sent to llm itself) can go without;
    # through the ensemble a question is required and a cancel cannot be sent
    kept = [i for i in config.input if i.name != T.CANCEL]
    del config.input[:]
    config.input.extend(kept)
    for i in config.input:
        if i.name == T.QUESTION:
            i.optional = False
    del config.ensemble_scheduling.step[-1].input_map[T.CANCEL]
    return ModelSpec(config)


def embed_spec(models: dict[str, mc.ModelConfig], profile: Profile) -> ModelSpec:
    """image bytes -> pooled CLIP image embedding and DINOv2 CLS (similarity, CLIP-blind mining);
    the patch features of both encoders are available too, for apps that fuse on their own."""
    steps = [models[T.PREPROCESS], models[T.CLIP_VISION], models[T.DINOV2_VISION]]
    return ModelSpec(ensemble(T.EMBED, steps, profile))


def embed_text_spec(models: dict[str, mc.ModelConfig], profile: Profile, logit_scale: float) -> ModelSpec:
    """text -> CLIP text embedding (the space of ``CLIP_EMBEDS``), for MMVP-VLM and zero-shot use.
    The ``logit_scale`` parameter is the checkpoint's ``exp(logit_scale)``: CLIP's logits are
    ``logit_scale * cosine(text, image)``; the front-end reads it from this config."""
    c = ensemble(T.EMBED_TEXT, [models[T.TOKENIZE_TEXT], models[T.CLIP_TEXT]], profile)
    _params(c, **{T.LOGIT_SCALE_PARAMETER: repr(float(logit_scale))})
    return ModelSpec(c)


def repository_specs(profile: Profile, target: str, paths: CheckpointPaths, shapes: ModelShapes,
                     graphs: dict[str, ExportedGraph]) -> list[ModelSpec]:
    if target not in TARGETS:
        raise ValueError(f"target: unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    def encoder(name: str) -> ModelSpec:  # gpu-torch loads checkpoints: no ONNX graphs
        if target == "gpu-torch":
            return torch_encoder_spec(name, shapes, profile, paths)
        return encoder_spec(graphs[name], shapes, profile, target)

    specs = [preprocess_spec(profile, target)]
    specs += [encoder(name) for name in (T.CLIP_VISION, T.DINOV2_VISION)]
    specs += [fuse_spec(mode, shapes, profile, paths, target) for mode in FusionMode]
    specs.append(llm_spec(shapes, profile, paths, target))
    models = {s.name: s.config for s in specs}
    specs += [tokens_spec(mode, models, profile) for mode in FusionMode]
    specs += [vqa_spec(mode, models, profile) for mode in FusionMode]
    specs.append(embed_spec(models, profile))
    # absent for a vision-only CLIP checkpoint (export.configs.TextExportConfig)
    has_text = "text_config" in read_config(paths.clip) if target == "gpu-torch" else T.CLIP_TEXT in graphs
    if has_text:
        text = [tokenize_text_spec(profile, shapes, paths, target), encoder(T.CLIP_TEXT)]
        models.update((s.name, s.config) for s in text)
        specs += [*text, embed_text_spec(models, profile, read_logit_scale(paths.clip))]
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
