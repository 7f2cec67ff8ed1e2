"""TensorRT engines for the ``gpu-trt`` target: ONNX graph -> FP16 engine -> accuracy gate -> cache.

Why each step is here:

- **FP16 with the fragile layers in FP32.** Normalisations, softmax and the chains of decomposed
  LayerNorms stay FP32; which nodes and why is :mod:`mofserve.export.mixed_precision`
  (:func:`~mofserve.export.mixed_precision.fp32_nodes`). TensorRT 10 does this with weak typing
  (``BuilderFlag.FP16`` + ``OBEY_PRECISION_CONSTRAINTS`` and a per-layer precision, layers mapped
  back to ONNX nodes by :func:`onnx_node_of_layer`); TensorRT 11 removed those flags and builds
  strongly typed networks only, so there the graph itself is rewritten to mixed precision first
  (:func:`~mofserve.export.mixed_precision.to_mixed_precision`). ``typing="auto"`` picks whichever
  the installed TensorRT has.
- **Dynamic batch.** One optimisation profile: batch 1 .. ``max_batch_size`` of the profile (Triton's
  ``max_batch_size``), tuned for the largest preferred batch size (:func:`profile_shapes`).
- **Accuracy gate.** Every engine runs a random batch and real photos (real sentences for CLIP's text
  tower) against ONNX Runtime FP32 on the CPU, on the same inputs; the min token cosine is printed
  and the build fails below 0.999 (:data:`TRT_FP16`).
- **Cache.** An engine only runs on the GPU model and TensorRT version that built it, so the cache
  key is GPU name + TensorRT version + digest of the ONNX graph bytes + build settings
  (:func:`engine_cache_key`); engines live in ``$MOFSERVE_HOME/engines/<model>-<key>/model.plan``
  with a timing cache per GPU and TensorRT version beside them.

Everything that needs neither TensorRT nor a GPU (node selection and the mixed-precision rewrite in
:mod:`mofserve.export.mixed_precision`, profile shapes, cache keys, the missing-TensorRT error) is
plain Python over the ONNX graph and is tested on the CPU machines; ``tensorrt`` is imported only
inside the functions that build or run engines.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from mofserve.core import tensors as T
from mofserve.core.checkpoints import CheckpointPaths
from mofserve.core.profiles import Profile, artifacts_dir
from mofserve.core.runtime import OnnxRunner
from mofserve.core.text import load_clip_tokenizer, tokenize

from .fingerprint import file_digest, settings_digest
from .mixed_precision import fp32_nodes, name_nodes, to_mixed_precision
from .onnx_export import PARITY_SENTENCES, ExportedGraph, Log, parity_batches
from .parity import OutputParity, ParityError, Tolerance, compare, summarise

_logger = logging.getLogger(__name__)

ENGINE_BUILDER_VERSION = 1  # bump when a change here or in mixed_precision.py changes the engines built
PLAN_FILE, ENGINE_MANIFEST = "model.plan", "engine.json"
TRT_FP16 = Tolerance("trt-fp16", min_cosine=0.999)  # the gate: min cosine vs ONNX Runtime FP32

TYPINGS = ("auto", "weak", "strong")


class TensorRTUnavailableError(ValueError):
    """``--target gpu-trt`` on a machine without the ``tensorrt`` package or a CUDA device: a target this
    machine cannot build, so a ValueError (the CLI prints it as one line naming what is missing)."""


# ---- mapping TensorRT layers back to ONNX nodes (weakly typed builds: TensorRT 10) -------------

_METADATA_NODE = re.compile(r"\[ONNX Layer: ([^\]]+)\]")


def onnx_node_of_layer(layer_name: str, metadata: str, node_names: Iterable[str]) -> str | None:
    """The ONNX node a TensorRT layer came from, or None.

    TensorRT 10's ONNX parser records ``[ONNX Layer: <node>]`` in ``ILayer.metadata``; it also names
    a node's first layer after the node and further layers ``<node>_<k>`` or ``<node> <what>``.
    Metadata wins, then an exact name, then the longest node name that prefixes the layer's name.
    """
    names = set(node_names)
    for found in _METADATA_NODE.findall(metadata or ""):
        if found in names:
            return found
    if layer_name in names:
        return layer_name
    best = None
    for name in names:
        if len(layer_name) > len(name) and layer_name.startswith(name) and layer_name[len(name)] in "_ :/.[(" \
                and (best is None or len(name) > len(best)):
            best = name
    return best


# ---- build settings, profiles, cache keys ------------------------------------------------------


@dataclass(frozen=True)
class EngineSettings:
    """Everything besides the graph, the GPU and TensorRT that changes an engine (part of its key)."""

    precision: str = "fp16"
    typing: str = "auto"  # "weak": BuilderFlag.FP16 + OBEY_PRECISION_CONSTRAINTS (TRT 10); "strong": mixed ONNX
    workspace_bytes: int = 4 << 30
    optimization_level: int = 3
    min_cosine: float = TRT_FP16.min_cosine

    def __post_init__(self) -> None:
        if self.typing not in TYPINGS:
            raise ValueError(f"typing: expected one of {', '.join(TYPINGS)}, got {self.typing!r}")
        if self.precision != "fp16":
            raise ValueError(f"precision: only fp16 engines are built, got {self.precision!r}")


@dataclass(frozen=True)
class ProfileShapes:
    """One TensorRT optimisation profile for an input: (min, opt, max) shapes."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def profile_shapes(dims: Sequence[int], max_batch_size: int, preferred: Sequence[int] = ()) -> ProfileShapes:
    """Batch 1 .. ``max_batch_size`` on the batch axis, tuned for the largest preferred batch size
    that fits (else the maximum); ``dims`` are the per-item dims (Triton's, without the batch axis)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size: must be >= 1 for a dynamic batch profile, got {max_batch_size}")
    if any(d < 1 for d in dims):
        raise ValueError(f"dims: the non-batch dims of an engine input must be fixed, got {list(dims)}")
    fitting = [b for b in preferred if 1 <= b <= max_batch_size]
    opt = max(fitting) if fitting else max_batch_size
    dims = tuple(int(d) for d in dims)
    return ProfileShapes((1, *dims), (opt, *dims), (max_batch_size, *dims))


def graph_digest(graph: ExportedGraph) -> str:
    """Digest of the ONNX graph bytes (graph file and external data), not of its folder's name."""
    memo = artifacts_dir() / "hash-memo.json"
    table: dict[str, str] = {}
    if memo.is_file():
        try:
            table = json.loads(memo.read_text())
        except json.JSONDecodeError:
            table = {}
    return settings_digest([(f.name, file_digest(f, table)) for f in graph.files])


def engine_cache_key(gpu_name: str, trt_version: str, graph_bytes_digest: str, settings: EngineSettings,
                     shapes: Mapping[str, ProfileShapes]) -> str:
    """The key of a cached engine: GPU name + TensorRT version + ONNX graph digest + build settings."""
    return settings_digest(ENGINE_BUILDER_VERSION, gpu_name, trt_version, graph_bytes_digest, asdict(settings),
                           {name: asdict(s) for name, s in sorted(shapes.items())})[:16]


def engines_dir() -> Path:
    return artifacts_dir() / "engines"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def timing_cache_path(gpu_name: str, trt_version: str) -> Path:
    """One timing cache per GPU model and TensorRT version, beside the engines (speeds up rebuilds)."""
    return engines_dir() / f"timing-{_slug(gpu_name)}-trt{_slug(trt_version)}.cache"


# ---- TensorRT and the GPU ----------------------------------------------------------------------


@dataclass(frozen=True)
class GpuBuilder:
    """What an engine is built for: the tensorrt module, its version, the GPU's name."""

    trt: object
    trt_version: str
    gpu_name: str

    @property
    def major(self) -> int:
        return int(self.trt_version.split(".")[0])

    def typing_for(self, settings: EngineSettings) -> str:
        """The typing a build uses: "weak" needs TensorRT's FP16 builder flag, gone in TensorRT 11."""
        has_weak = hasattr(self.trt.BuilderFlag, "FP16") and hasattr(self.trt.BuilderFlag,
                                                                      "OBEY_PRECISION_CONSTRAINTS")
        if settings.typing == "weak" and not has_weak:
            raise TensorRTUnavailableError(f"typing: TensorRT {self.trt_version} has no weakly typed FP16 build "
                                           "(removed in TensorRT 11); use typing='strong' or 'auto'")
        if settings.typing == "auto":
            return "weak" if has_weak else "strong"
        return settings.typing


def require_tensorrt() -> GpuBuilder:
    """The ``tensorrt`` module and the CUDA device engines are built on, or a clear error."""
    alternatives = ("use --target gpu-onnx (Triton's ONNX Runtime backend with the TensorRT execution "
                    "provider builds its engines itself) or --target gpu-torch, or run inside the project's "
                    "Docker image (NGC tritonserver, which has TensorRT)")
    try:
        import tensorrt as trt
    except ImportError as error:
        raise TensorRTUnavailableError(f"--target gpu-trt needs the `tensorrt` Python package, which is not "
                                       f"installed ({error}); {alternatives}") from None
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailableError(f"--target gpu-trt builds engines on the serving GPU, and torch "
                                       f"{torch.__version__} sees no CUDA device (a CPU build of torch, no "
                                       f"GPU, or CUDA_VISIBLE_DEVICES empty); {alternatives}")
    return GpuBuilder(trt, str(trt.__version__), torch.cuda.get_device_name(0))


_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64", "BOOL": "bool",
                 "INT8": "int8", "UINT8": "uint8", "BF16": "bfloat16"}


class EngineRunner:
    """Runs a serialized engine on the GPU with torch CUDA tensors as its buffers (accuracy gate)."""

    def __init__(self, builder: GpuBuilder, plan: bytes) -> None:
        trt = builder.trt
        self.trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine it just built")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    def _torch_dtype(self, name: str):
        import torch

        dtype = self.engine.get_tensor_dtype(name)
        return getattr(torch, _TORCH_DTYPES[str(dtype).split(".")[-1].upper()])

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        keep = []
        for name in self.inputs:
            tensor = torch.from_numpy(np.ascontiguousarray(inputs[name])).to("cuda", self._torch_dtype(name))
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            results[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
            self.context.set_tensor_address(name, results[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        stream.synchronize()
        return {name: t.float().cpu().numpy() for name, t in results.items()}


def _pin_fp32_layers(builder: GpuBuilder, network, keep: set[str], node_names: set[str]) -> int:
    """Weak typing: normalisation and softmax layers, and every layer of a kept ONNX node, in FP32."""
    trt = builder.trt
    fp32_types = {getattr(trt.LayerType, t) for t in ("NORMALIZATION", "SOFTMAX") if hasattr(trt.LayerType, t)}
    floats = {trt.float32, trt.float16}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        node = onnx_node_of_layer(layer.name, getattr(layer, "metadata", "") or "", node_names)
        if layer.type not in fp32_types and node not in keep:
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in floats:
                layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def build_engine(builder: GpuBuilder, graph_path: Path, shapes: Mapping[str, ProfileShapes],
                 settings: EngineSettings, log: Log = _logger.info) -> tuple[bytes, dict]:
    """Parse, type and build one engine; returns the plan and what was kept in FP32."""
    import onnx

    trt = builder.trt
    model = onnx.load(str(graph_path), load_external_data=True)
    name_nodes(model)
    keep = fp32_nodes(model)
    node_names = {n.name for n in model.graph.node}
    typing = builder.typing_for(settings)
    logger = trt.Logger(trt.Logger.WARNING)
    trt_builder = trt.Builder(logger)
    flags = 0
    if typing == "strong":
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif builder.major < 10 and hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)  # implicit in TensorRT 10+
    network = trt_builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with tempfile.TemporaryDirectory(dir=engines_dir(), prefix=".parse-") as tmp:
        source = model if typing == "weak" else to_mixed_precision(model, keep)
        path = Path(tmp) / "model.onnx"
        large = source.ByteSize() > (1 << 30)
        onnx.save_model(source, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        if not parser.parse_from_file(str(path)):
            errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT's ONNX parser rejected {graph_path}:\n{errors}")
    config = trt_builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.builder_optimization_level = settings.optimization_level
    pinned = 0
    if typing == "weak":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = _pin_fp32_layers(builder, network, keep, node_names)
    profile = trt_builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in shapes:
            raise ValueError(f"{graph_path}: input {name!r} has no optimisation profile")
        s = shapes[name]
        profile.set_shape(name, s.min, s.opt, s.max)
    config.add_optimization_profile(profile)
    timing_path = timing_cache_path(builder.gpu_name, builder.trt_version)
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=True)
    plan = trt_builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {graph_path} (see its log above)")
    _atomic_write(timing_path, bytes(config.get_timing_cache().serialize()))
    info = {"typing": typing, "fp32_nodes": len(keep), "fp32_layers_pinned": pinned,
            "fp32_op_types": sorted({n.op_type for n in model.graph.node if n.name in keep})}
    return bytes(plan), info


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


# ---- accuracy gate -----------------------------------------------------------------------------


def gate_batches(graph: ExportedGraph, profile: Profile, paths: CheckpointPaths,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the accuracy gate: a random batch and real photos for the vision towers (the export
    parity's inputs), tokenizer-shaped random ids and real sentences for CLIP's text tower."""
    if graph.model_name != T.CLIP_TEXT:
        return parity_batches(profile, seed)
    tokenizer = load_clip_tokenizer(paths.clip)
    length = _input_dims(graph)[T.INPUT_IDS][0]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    rng = np.random.default_rng(seed)
    shaped = np.full((3, length), eos, dtype=np.int64)
    for row, words in enumerate((1, 9, length - 2)):
        shaped[row, 0] = bos
        shaped[row, 1:1 + words] = rng.integers(0, min(bos, eos), words)
    return {"padded[3]": shaped, "sentences[4]": tokenize(tokenizer, PARITY_SENTENCES, length)}


def accuracy_gate(run_engine, reference, output_names: Sequence[str], batches: Mapping[str, np.ndarray],
                  input_name: str, tolerance: Tolerance = TRT_FP16) -> list[OutputParity]:
    """Min token cosine of every output of the engine against the FP32 reference on the same inputs;
    raises ParityError below the tolerance. ``run_engine`` / ``reference``: name -> array callables."""
    results = []
    for label, batch in batches.items():
        want = reference({input_name: batch})
        got = run_engine({input_name: batch})
        results += [compare(name, label, want[name], got[name], tolerance) for name in output_names]
    failed = [r for r in results if not r.ok]
    if failed:
        raise ParityError(f"TensorRT FP16 engine below the accuracy gate (min cosine {tolerance.min_cosine} "
                          f"against ONNX Runtime FP32):\n" + "\n".join(r.line() for r in failed))
    return results


# ---- engines for a repository ------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltEngine:
    model_name: str
    folder: Path
    key: str
    manifest: dict
    cached: bool

    @property
    def plan(self) -> Path:
        return self.folder / PLAN_FILE


def _input_dims(graph: ExportedGraph) -> dict[str, list[int]]:
    """Per-item dims (batch axis dropped) of each graph input, from the ONNX graph itself."""
    import onnx

    model = onnx.load(str(graph.graph), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    dims = {}
    for info in model.graph.input:
        if info.name in initializers:
            continue
        shape = info.type.tensor_type.shape.dim
        dims[info.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in shape[1:]]
    return dims


def engine_shapes(graph: ExportedGraph, profile: Profile) -> dict[str, ProfileShapes]:
    serving = profile.serving
    return {name: profile_shapes(dims, serving.max_batch_size, serving.preferred_batch_sizes)
            for name, dims in _input_dims(graph).items()}


def build_engines(graphs: Mapping[str, ExportedGraph], profile: Profile, paths: CheckpointPaths,
                  settings: EngineSettings = EngineSettings(), log: Log = _logger.info,
                  force: bool = False) -> dict[str, BuiltEngine]:
    """An FP16 engine per exported graph, gated against ONNX Runtime FP32 and cached."""
    builder = require_tensorrt()
    log(f"TensorRT {builder.trt_version} on {builder.gpu_name}: FP16 engines "
        f"({builder.typing_for(settings)} typing), normalisations and softmax in FP32")
    built = {}
    for name, graph in graphs.items():
        shapes = engine_shapes(graph, profile)
        key = engine_cache_key(builder.gpu_name, builder.trt_version, graph_digest(graph), settings, shapes)
        folder = engines_dir() / f"{name}-{key}"
        manifest_path = folder / ENGINE_MANIFEST
        if manifest_path.is_file() and (folder / PLAN_FILE).is_file() and not force:
            manifest = json.loads(manifest_path.read_text())
            log(f"{name}: cached engine {folder.name} (gate min cosine {manifest['gate']['min_cosine']:.6f})")
            built[name] = BuiltEngine(name, folder, key, manifest, cached=True)
            continue
        engines_dir().mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        log(f"{name}: building (batch {shapes[next(iter(shapes))].min[0]}..{profile.serving.max_batch_size})")
        plan, info = build_engine(builder, graph.graph, shapes, settings, log)
        log(f"{name}: built in {time.perf_counter() - started:.1f} s; {info['fp32_nodes']} ONNX nodes kept FP32 "
            f"({', '.join(info['fp32_op_types']) or 'none'}); accuracy gate against ONNX Runtime FP32")
        engine = EngineRunner(builder, plan)
        reference = OnnxRunner(graph.graph)
        input_name = graph.manifest.get("input") or engine.inputs[0]
        outputs = [o for o in engine.outputs]
        results = accuracy_gate(engine.run, reference.run, outputs, gate_batches(graph, profile, paths),
                                input_name, replace(TRT_FP16, min_cosine=settings.min_cosine))
        for r in results:
            log(f"{name}:   {r.line()}")
        gate = summarise(results)
        log(f"{name}: accuracy gate passed, min cosine {gate['min_cosine']:.6f} (>= {settings.min_cosine})")
        manifest = {"model": name, "key": key, "gpu": builder.gpu_name, "tensorrt": builder.trt_version,
                    "onnx": str(graph.graph), "onnx_digest": graph.digest, "settings": asdict(settings),
                    "shapes": {n: asdict(s) for n, s in shapes.items()}, "build": info, "gate": gate,
                    "seconds": round(time.perf_counter() - started, 2)}
        with tempfile.TemporaryDirectory(dir=engines_dir(), prefix=f".{name}-") as tmp:
            staged = Path(tmp) / "engine"
            staged.mkdir()
            (staged / PLAN_FILE).write_bytes(plan)
            (staged / ENGINE_MANIFEST).write_text(json.dumps(manifest, indent=2))
            if folder.exists():
                shutil.rmtree(folder)
            staged.rename(folder)
        built[name] = BuiltEngine(name, folder, key, manifest, cached=False)
    return built


def attach_engines(specs: list, engines: Mapping[str, BuiltEngine]) -> list:
    """The repository's model specs with each encoder's ``model.plan`` placed in its version folder."""
    missing = [s.name for s in specs if s.config.platform == "tensorrt_plan" and s.name not in engines]
    if missing:
        raise ValueError(f"gpu-trt: no engine was built for {', '.join(missing)}")
    return [replace(s, files=(engines[s.name].plan,)) if s.name in engines else s for s in specs]
