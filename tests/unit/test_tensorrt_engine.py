"""TensorRT engine export (export/tensorrt_engine.py, export/mixed_precision.py): everything that
needs neither TensorRT nor a GPU runs here on the real tiny ONNX exports (which nodes stay FP32, the
mixed-precision graph computed in FP16 by ONNX's reference evaluator, the accuracy gate, profile
shapes, cache keys, the missing-TensorRT error); building and running a real engine needs
`tensorrt` and a CUDA device and skips without them.
"""

from __future__ import annotations

import io
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from mofserve.core import tensors as T
from mofserve.core.checkpoints import read_shapes
from mofserve.export import mixed_precision as mp
from mofserve.export import tensorrt_engine as te
from mofserve.export.onnx_export import ExportedGraph
from mofserve.export.parity import ParityError, row_cosines
from mofserve.export.repository import repository_specs, write_repository

ENCODERS = (T.CLIP_VISION, T.DINOV2_VISION, T.CLIP_TEXT)


@pytest.fixture(scope="module")
def tiny_graphs(tiny_repository) -> dict[str, ExportedGraph]:
    return tiny_repository.graphs


def _load(graph: ExportedGraph) -> onnx.ModelProto:
    model = onnx.load(str(graph.graph))
    mp.name_nodes(model)
    return model


def _ort(model: onnx.ModelProto):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(names, dict(feeds)), strict=True))


def _fp16(model: onnx.ModelProto):
    """The mixed graph run by ONNX's reference evaluator, which computes FP16 nodes in numpy FP16 (ONNX
    Runtime's CPU provider would cast FP16 ops without a CPU kernel back to FP32 and hide overflows)."""
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(model)
    names = [o.name for o in model.graph.output]

    def run(feeds):
        with np.errstate(over="ignore", invalid="ignore"):
            return dict(zip(names, evaluator.run(names, dict(feeds)), strict=True))

    return run


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *graph.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant":
            types[node.output[0]] = node.attribute[0].t.data_type
    return types


# ---- which nodes stay FP32 ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ENCODERS)
def test_tiny_exports_keep_exactly_their_layernorm_and_softmax_nodes_in_fp32(tiny_graphs, name):
    model = _load(tiny_graphs[name])
    expected = {n.name for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax")}
    # the opset-17 exports carry LayerNorm as one node: no decomposed chain, nothing else kept
    assert mp.decomposed_layer_norms(model) == []
    assert mp.fp32_nodes(model) == expected
    ops = {n.op_type for n in model.graph.node if n.name in expected}
    assert ops == {"LayerNormalization", "Softmax"}
    # two blocks: per block two LayerNorms and one Softmax, plus the towers' own pre/post norms
    assert sum(n.op_type == "Softmax" for n in model.graph.node if n.name in expected) == 2


def _decomposed_norms_graph() -> onnx.ModelProto:
    """A real torch export at opset 16, where LayerNorm is spelled out, plus an RMSNorm (rsqrt)."""

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.ln, self.b = torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)

        def forward(self, x):
            h = self.a(x)
            rms = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            return self.b(self.ln(h)), rms

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(Block().eval(), (torch.zeros(1, 5, 8),), buffer, opset_version=16, dynamo=False,
                          input_names=["x"], output_names=["y", "rms"], dynamic_axes={"x": {0: "batch"}})
    model = onnx.load_from_string(buffer.getvalue())
    mp.name_nodes(model)
    return model


def test_a_decomposed_layer_norm_and_an_rms_norm_are_kept_fp32_without_their_neighbours():
    model = _decomposed_norms_graph()
    chains = mp.decomposed_layer_norms(model)
    ops = sorted(tuple(next(n.op_type for n in model.graph.node if n.name == name) for name in chain)
                 for chain in chains)
    assert ops == [("Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul"),
                   ("ReduceMean", "Sub", "Pow", "ReduceMean", "Add", "Sqrt", "Div")]
    keep = mp.fp32_nodes(model)
    by_name = {n.name: n for n in model.graph.node}
    # the Linear layers and the LayerNorm's affine (x * gamma + beta) stay FP16 work
    assert {by_name[n].op_type for n in set(by_name) - keep} >= {"MatMul", "Add", "Mul"}
    assert all(by_name[n].op_type != "MatMul" for n in keep)
    assert not any(by_name[n].input[-1] in ("ln.weight", "ln.bias") for n in keep)


# ---- mixed precision graph (strong typing) -------------------------------------------------------


@pytest.mark.parametrize("name", ENCODERS)
def test_mixed_precision_graph_is_fp16_except_the_kept_nodes_and_keeps_its_io_types(tiny_graphs, name):
    model = _load(tiny_graphs[name])
    keep = mp.fp32_nodes(model)
    mixed = mp.to_mixed_precision(model, keep)
    onnx.checker.check_model(mixed)
    types = _types(mixed)  # strict shape inference: every node type-checks
    io = lambda m: [(v.name, v.type.tensor_type.elem_type) for v in [*m.graph.input, *m.graph.output]]  # noqa: E731
    assert io(mixed) == io(model)
    for node in mixed.graph.node:
        floats = {types[i] for i in node.input if i and types.get(i) in (TensorProto.FLOAT, TensorProto.FLOAT16)}
        if node.name in keep:
            assert floats == {TensorProto.FLOAT}, node.name
        elif node.op_type in ("MatMul", "Conv", "Gemm"):
            assert floats == {TensorProto.FLOAT16}, node.name
    weights = [t for t in mixed.graph.initializer if len(t.dims) >= 2]
    assert weights and all(t.data_type == TensorProto.FLOAT16 for t in weights)


@pytest.mark.parametrize("name", ENCODERS)
def test_mixed_precision_graph_passes_the_gate_against_fp32(tiny_graphs, tiny_profile, tiny_paths, name):
    graph = tiny_graphs[name]
    model = _load(graph)
    mixed = mp.to_mixed_precision(model, mp.fp32_nodes(model))
    batches = te.gate_batches(graph, tiny_profile, tiny_paths)
    assert len(batches) >= 2
    outputs = [o.name for o in model.graph.output]
    results = te.accuracy_gate(_fp16(mixed), _ort(model), outputs, batches, model.graph.input[0].name)
    assert len(results) == len(outputs) * len(batches)
    assert min(r.min_cosine for r in results) >= te.TRT_FP16.min_cosine
    assert max(r.max_abs_diff for r in results) > 0, "the FP16 graph computed nothing in FP16"


def test_the_gate_rejects_an_all_fp16_graph_whose_layer_norm_overflows():
    """Activations of a few hundred square beyond FP16's 65504 inside a decomposed LayerNorm: all-FP16
    overflows and the gate must fail; the same graph with the LayerNorm kept FP32 passes."""
    model = _decomposed_norms_graph()
    x = np.random.default_rng(0).standard_normal((3, 5, 8)).astype(np.float32) * 400
    reference = _ort(model)
    kept = mp.to_mixed_precision(model, mp.fp32_nodes(model))
    results = te.accuracy_gate(_fp16(kept), reference, ["y"], {"large[3]": x}, "x")
    assert results[0].min_cosine >= 0.999
    naive = mp.to_mixed_precision(model, set())
    with pytest.raises(ParityError, match=r"min cosine 0\.999.*\n.*y .*FAIL"):
        te.accuracy_gate(_fp16(naive), reference, ["y"], {"large[3]": x}, "x")


def test_fp32_min_constants_are_clipped_to_fp16_range_not_overflowed():
    values = np.array([np.finfo(np.float32).min, -1.0, np.inf, 70000.0], dtype=np.float32)
    half = mp._as_float(values, half=True)
    assert half.dtype == np.float16
    assert half.tolist() == [-65504.0, -1.0, np.inf, 65504.0]


def test_tiny_mixed_graph_tokens_agree_row_by_row_with_fp32(tiny_graphs, tiny_profile, tiny_paths):
    graph = tiny_graphs[T.DINOV2_VISION]
    model = _load(graph)
    mixed = mp.to_mixed_precision(model, mp.fp32_nodes(model))
    batch = te.gate_batches(graph, tiny_profile, tiny_paths)["photos[3]"]
    want = _ort(model)({T.PIXEL_VALUES: batch})[T.DINO_FEATURES]
    got = _fp16(mixed)({T.PIXEL_VALUES: batch})[T.DINO_FEATURES]
    assert got.dtype == np.float32 and got.shape == want.shape
    assert row_cosines(want, got).min() >= 0.999 and not np.array_equal(want, got)


# ---- mapping TensorRT layers to ONNX nodes (weak typing) ----------------------------------------


def test_layers_map_to_onnx_nodes_by_metadata_then_name_then_prefix():
    nodes = ["/enc/ln1/LayerNormalization", "/enc/attn/Softmax", "/enc/attn/MatMul", "/enc/attn/MatMul_1"]
    assert te.onnx_node_of_layer("(Unnamed Layer* 7) [Shuffle]", "[ONNX Layer: /enc/attn/Softmax]",
                                 nodes) == "/enc/attn/Softmax"
    assert te.onnx_node_of_layer("/enc/attn/MatMul_1", "", nodes) == "/enc/attn/MatMul_1"  # exact beats prefix
    assert te.onnx_node_of_layer("/enc/ln1/LayerNormalization_2", "", nodes) == "/enc/ln1/LayerNormalization"
    assert te.onnx_node_of_layer("/enc/attn/MatMul_1_3", "", nodes) == "/enc/attn/MatMul_1"  # longest prefix
    assert te.onnx_node_of_layer("ONNXTRT_ShapeTensorFromDims", "", nodes) is None
    assert te.onnx_node_of_layer("/enc/attn/MatMulX", "", nodes) is None


# ---- profiles, cache keys, settings -------------------------------------------------------------


def test_profile_shapes_span_batch_one_to_max_and_tune_for_the_largest_preferred_batch():
    shapes = te.profile_shapes([3, 224, 224], 8, (4, 8))
    assert (shapes.min, shapes.opt, shapes.max) == ((1, 3, 224, 224), (8, 3, 224, 224), (8, 3, 224, 224))
    assert te.profile_shapes([77], 8, (4, 16)).opt == (4, 77)
    assert te.profile_shapes([77], 6).opt == (6, 77)
    with pytest.raises(ValueError, match="max_batch_size"):
        te.profile_shapes([3, 224, 224], 0)
    with pytest.raises(ValueError, match=r"dims.*fixed"):
        te.profile_shapes([3, -1, 224], 8)


@pytest.mark.parametrize("name", ENCODERS)
def test_engine_profiles_match_the_gpu_trt_repository_configs(tiny_graphs, tiny_profile, tiny_paths, name):
    shapes = read_shapes(tiny_paths, tiny_profile)
    specs = {s.name: s for s in repository_specs(tiny_profile, "gpu-trt", tiny_paths, shapes, tiny_graphs)}
    config = specs[name].config
    profiles = te.engine_shapes(tiny_graphs[name], tiny_profile)
    assert set(profiles) == {i.name for i in config.input}
    for i in config.input:
        p = profiles[i.name]
        assert p.min == (1, *i.dims) and p.max == (config.max_batch_size, *i.dims)


def test_cache_key_changes_with_gpu_trt_version_graph_and_settings_and_only_then():
    settings = te.EngineSettings()
    shapes = {"PIXEL_VALUES": te.profile_shapes([3, 224, 224], 8, (4, 8))}
    base = ("NVIDIA H100 80GB HBM3", "10.13.3.9", "a" * 64, settings, shapes)
    key = te.engine_cache_key(*base)
    assert key == te.engine_cache_key(*base) == te.engine_cache_key(*base[:3], te.EngineSettings(), dict(shapes))
    variants = [
        ("NVIDIA H200", *base[1:]),
        (base[0], "10.13.2.6", *base[2:]),
        (*base[:2], "b" * 64, *base[3:]),
        (*base[:3], replace(settings, typing="strong"), shapes),
        (*base[:3], replace(settings, workspace_bytes=2 << 30), shapes),
        (*base[:3], replace(settings, min_cosine=0.9995), shapes),
        (*base[:4], {"PIXEL_VALUES": te.profile_shapes([3, 224, 224], 16, (4, 8))}),
    ]
    keys = {te.engine_cache_key(*v) for v in variants}
    assert len(keys) == len(variants) and key not in keys


def test_graph_digest_follows_the_graph_bytes_not_the_folder(tiny_graphs, tmp_path):
    graph = tiny_graphs[T.CLIP_VISION]
    copy = tmp_path / "renamed"
    shutil.copytree(graph.folder, copy)
    moved = ExportedGraph(graph.model_name, copy, "other-digest", graph.manifest, cached=True)
    assert te.graph_digest(moved) == te.graph_digest(graph)
    model = onnx.load(str(copy / "model.onnx"))
    weight = next(t for t in model.graph.initializer if len(t.dims) >= 2)
    array = onnx.numpy_helper.to_array(weight).copy()
    array.flat[0] += 1.0
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    onnx.save(model, str(copy / "model.onnx"))
    assert te.graph_digest(moved) != te.graph_digest(graph)


def test_settings_are_validated_with_the_field_named():
    with pytest.raises(ValueError, match="typing: expected one of auto, weak, strong"):
        te.EngineSettings(typing="fp8")
    with pytest.raises(ValueError, match="precision: only fp16"):
        te.EngineSettings(precision="int8")


def test_timing_cache_sits_beside_the_engines_per_gpu_and_version(monkeypatch, tmp_path):
    monkeypatch.setenv("MOFSERVE_HOME", str(tmp_path))
    path = te.timing_cache_path("NVIDIA H100 80GB HBM3", "10.13.3.9")
    assert path.parent == te.engines_dir() == tmp_path / "engines"
    assert path.name == "timing-nvidia-h100-80gb-hbm3-trt10.13.3.9.cache"
    assert path != te.timing_cache_path("NVIDIA H200", "10.13.3.9")


# ---- repository wiring and the missing-TensorRT error -------------------------------------------


def test_engines_are_placed_as_model_plan_in_the_encoders_version_folders(tiny_graphs, tiny_profile, tiny_paths,
                                                                          tmp_path):
    shapes = read_shapes(tiny_paths, tiny_profile)
    specs = repository_specs(tiny_profile, "gpu-trt", tiny_paths, shapes, tiny_graphs)
    with pytest.raises(ValueError, match="gpu-trt: no engine was built for clip_vision"):
        te.attach_engines(specs, {})
    engines = {}
    for name in ENCODERS:
        folder = tmp_path / "engines" / f"{name}-key"
        folder.mkdir(parents=True)
        (folder / te.PLAN_FILE).write_bytes(f"plan of {name}".encode())
        engines[name] = te.BuiltEngine(name, folder, "key", {}, cached=False)
    root = write_repository(te.attach_engines(specs, engines), tmp_path / "repo")
    for name in ENCODERS:
        assert (root / name / "1" / "model.plan").read_bytes() == f"plan of {name}".encode()
    assert not list((root / T.LLM / "1").glob("*.plan"))


def _tensorrt_ready() -> bool:
    try:
        te.require_tensorrt()
    except te.TensorRTUnavailableError:
        return False
    return True


@pytest.mark.skipif(_tensorrt_ready(), reason="tensorrt and a CUDA device are present: no error to check")
def test_gpu_trt_without_tensorrt_or_gpu_says_what_is_missing_and_what_to_use_instead(tiny_profile, capsys):
    from mofserve.cli import main
    from mofserve.export.pipeline import export_profile

    with pytest.raises(te.TensorRTUnavailableError, match=r"(`tensorrt`|CUDA device).*--target gpu-onnx.*gpu-torch"):
        te.require_tensorrt()
    logged = []
    with pytest.raises(te.TensorRTUnavailableError):  # before any export work
        export_profile(tiny_profile, target="gpu-trt", log=logged.append)
    assert logged == []
    assert main(["export", "--target", "gpu-trt"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("mofserve: error: --target gpu-trt") and "--target gpu-onnx" in error


@pytest.mark.skipif(not _tensorrt_ready(), reason="needs the `tensorrt` package and a CUDA device (the project's "
                                                  "Docker image; benchmarks/gpu_check_trt.sh)")
def test_tiny_engines_build_pass_the_gate_and_are_cached(tiny_graphs, tiny_profile, tiny_paths):
    logged = []
    built = te.build_engines(tiny_graphs, tiny_profile, tiny_paths, log=logged.append, force=True)
    assert set(built) == set(ENCODERS)
    for engine in built.values():
        assert engine.plan.stat().st_size > 0 and engine.manifest["gate"]["min_cosine"] >= 0.999
    assert any("accuracy gate passed, min cosine" in line for line in logged)
    again = te.build_engines(tiny_graphs, tiny_profile, tiny_paths, log=logged.append)
    assert all(e.cached and e.key == built[n].key for n, e in again.items())


@pytest.mark.skipif(_tensorrt_ready(), reason="tensorrt and a CUDA device are present: the check would run")
def test_gpu_check_trt_script_stops_at_once_naming_what_is_missing(tmp_path):
    import subprocess

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([str(root / "benchmarks" / "gpu_check_trt.sh"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "cannot run the TensorRT check; missing:" in result.stderr
    assert "`tensorrt`" in result.stderr or "CUDA GPU" in result.stderr
    assert not list((tmp_path / "out").glob("gpu_check_trt.*")), "nothing measured, nothing written"
