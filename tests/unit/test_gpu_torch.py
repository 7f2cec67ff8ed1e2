"""The gpu-torch target: configs (Triton's schema), the PyTorch encoder path against the ONNX
path, batch buckets and the accuracy gate. What needs CUDA is skipped where there is none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from mofserve.core import tensors as T
from mofserve.core.checkpoints import read_shapes
from mofserve.core.fusion import alpha_column
from mofserve.core.runtime import OnnxRunner
from mofserve.export.configs import CLIP_TEXT_EXPORT, CLIP_VISION_EXPORT, DINOV2_VISION_EXPORT, VISION_EXPORTS
from mofserve.export.onnx_export import ExportedGraph, export_vision, parity_batches
from mofserve.export.parity import row_cosines
from mofserve.export.repository import config_text, repository_specs, write_repository
from mofserve.export.torch_runtime import (
    GATE,
    AccuracyGateError,
    TorchEncoder,
    bucket_for,
    chunks,
    gate_batches,
    load_from_parameters,
    parse_buckets,
    resolve_device,
    serving_dtype,
    synthetic_batches,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


@pytest.fixture(scope="module")
def gpu_torch_specs(tiny_profile, tiny_paths):
    shapes = read_shapes(tiny_paths, tiny_profile)
    return {s.name: s for s in repository_specs(tiny_profile, "gpu-torch", tiny_paths, shapes, {})}


@pytest.fixture(scope="module")
def cpu_specs(tiny_profile, tiny_paths, tmp_path_factory):
    folder = tmp_path_factory.mktemp("graphs")
    graphs = {}
    for name in (T.CLIP_VISION, T.DINOV2_VISION, T.CLIP_TEXT):
        (folder / name).mkdir()
        (folder / name / "model.onnx").write_bytes(b"graph")
        graphs[name] = ExportedGraph(name, folder / name, "digest", {}, cached=True)
    shapes = read_shapes(tiny_paths, tiny_profile)
    return {s.name: s for s in repository_specs(tiny_profile, "cpu", tiny_paths, shapes, graphs)}


def test_gpu_torch_configs_parse_with_tritons_schema_and_keep_tensors_on_the_gpu(gpu_torch_specs, tiny_paths):
    for spec in gpu_torch_specs.values():
        assert text_format.Parse(config_text(spec.config), mc.ModelConfig()) == spec.config
    for name in (T.CLIP_VISION, T.DINOV2_VISION, T.CLIP_TEXT):
        spec = gpu_torch_specs[name]
        config = spec.config
        assert spec.source == "torch_encoder" and not spec.files  # no ONNX: the checkpoint is loaded
        assert config.backend == "python" and not config.platform
        assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
        assert config.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert params["model"] == name and params["dtype"] == "auto" and params["compile"] == "none"
        assert params["clip"] == str(tiny_paths.clip) and params["dinov2"] == str(tiny_paths.dinov2)
        assert params["buckets"] == "1,4,8"  # 1, the preferred sizes and max_batch_size
    for mode in T.FusionMode:
        spec = gpu_torch_specs[T.fuse_model(mode)]
        assert spec.source == "torch_fuse"
        assert [g.kind for g in spec.config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
        assert spec.config.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    # decoding and tokenising stay CPU work, as on every target
    for name in (T.PREPROCESS, T.TOKENIZE_TEXT):
        assert gpu_torch_specs[name].config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU


@pytest.mark.parametrize("target", ["gpu-onnx", "gpu-trt", "gpu-torch"])
def test_every_gpu_target_fuses_with_the_torch_model_that_reads_device_tensors(target, tiny_profile, tiny_paths,
                                                                                cpu_specs):
    graphs = {}
    for name in (T.CLIP_VISION, T.DINOV2_VISION, T.CLIP_TEXT):
        folder = Path(cpu_specs[name].files[0]).parent
        graphs[name] = ExportedGraph(name, folder, "digest", {}, cached=True)
    shapes = read_shapes(tiny_paths, tiny_profile)
    specs = {s.name: s for s in repository_specs(tiny_profile, target, tiny_paths, shapes, graphs)}
    assert {specs[T.fuse_model(m)].source for m in T.FusionMode} == {"torch_fuse"}
    assert {cpu_specs[T.fuse_model(m)].source for m in T.FusionMode} == {"fuse"}


def _contract(config: mc.ModelConfig) -> tuple[list, list]:
    return ([(i.name, i.data_type, tuple(i.dims), i.optional) for i in config.input if not T.is_timing(i.name)],
            [(o.name, o.data_type, tuple(o.dims)) for o in config.output if not T.is_timing(o.name)])


def test_gpu_torch_serves_the_same_models_ensembles_and_tensor_names_as_cpu(gpu_torch_specs, cpu_specs):
    assert set(gpu_torch_specs) == set(cpu_specs)
    for name, spec in cpu_specs.items():
        assert _contract(spec.config) == _contract(gpu_torch_specs[name].config), name
        steps = [s.model_name for s in spec.config.ensemble_scheduling.step]
        assert steps == [s.model_name for s in gpu_torch_specs[name].config.ensemble_scheduling.step], name
    # the fusion keeps its timing; the torch encoders, like the other gpu targets', emit none
    assert T.TIMING_FUSION in {o.name for o in gpu_torch_specs["fuse_interleaved"].config.output}
    assert not any(T.is_timing(o.name) for o in gpu_torch_specs[T.CLIP_VISION].config.output)


def test_written_gpu_torch_repository_holds_the_torch_sources_and_no_onnx(gpu_torch_specs, tmp_path: Path):
    path = write_repository(list(gpu_torch_specs.values()), tmp_path)
    assert (path / "clip_vision" / "1" / "model.py").read_text().startswith('"""Triton python-backend model of the '
                                                                            "``gpu-torch`` target")
    assert "torch.from_dlpack" in (path / "fuse_additive" / "1" / "model.py").read_text()
    assert not list(path.rglob("*.onnx"))


def test_export_command_accepts_the_gpu_torch_target():
    from mofserve.cli import build_parser

    assert build_parser().parse_args(["export", "--target", "gpu-torch"]).target == "gpu-torch"
    assert build_parser().parse_args(["serve", "--target", "gpu-torch"]).target == "gpu-torch"


@pytest.mark.parametrize("config", VISION_EXPORTS, ids=lambda c: c.model_name)
def test_torch_path_in_fp32_on_cpu_matches_the_onnx_path_on_the_same_images(config, tiny_profile, tiny_paths,
                                                                             gpu_torch_specs):
    params = {k: v.string_value for k, v in gpu_torch_specs[config.model_name].config.parameters.items()}
    encoder = load_from_parameters(params, device="cpu")  # what the Triton model loads
    assert encoder.dtype == torch.float32 and encoder.gate is not None and encoder.gate.ok
    runner = OnnxRunner(export_vision(config, tiny_paths, tiny_profile).graph)
    for label, batch in parity_batches(tiny_profile).items():  # random tensors and real photos
        ours = encoder(torch.from_numpy(batch))
        theirs = runner.run({config.input_name: batch})
        for name, got in zip(config.output_names, ours, strict=True):
            ref = theirs[name]
            assert got.shape == ref.shape and got.dtype == torch.float32
            assert row_cosines(ref, got.numpy()).min() >= 0.9999, (name, label)
            assert np.abs(ref - got.numpy()).max() <= 1e-3 * np.abs(ref).max() + 1e-4, (name, label)


def test_text_tower_in_torch_matches_its_onnx_graph(tiny_profile, tiny_paths):
    encoder = TorchEncoder.load(CLIP_TEXT_EXPORT, tiny_paths, tiny_profile, device="cpu")
    runner = OnnxRunner(export_vision(CLIP_TEXT_EXPORT, tiny_paths, tiny_profile).graph)
    ids = gate_batches(CLIP_TEXT_EXPORT, encoder.module, tiny_paths, tiny_profile)["sentences[4]"]
    (got,) = encoder(torch.from_numpy(ids))
    assert row_cosines(runner.run({T.INPUT_IDS: ids})[T.TEXT_EMBEDS], got.numpy()).min() >= 0.9999


def test_batches_pad_up_to_the_smallest_bucket_and_chunk_beyond_the_largest():
    assert parse_buckets("8,1,4,4") == (1, 4, 8) and parse_buckets("") == ()
    assert [bucket_for(n, (1, 4, 8)) for n in (1, 2, 4, 5, 8, 9)] == [1, 4, 4, 8, 8, 9]
    assert chunks(19, (1, 8)) == [(0, 8), (8, 16), (16, 19)] and chunks(3, ()) == [(0, 3)]
    with pytest.raises(ValueError, match="buckets"):
        parse_buckets("0,4")


def test_padded_and_chunked_batches_give_each_row_its_own_features(tiny_profile, tiny_paths):
    module = DINOV2_VISION_EXPORT.build_module(tiny_paths, tiny_profile)
    plain = TorchEncoder(module, T.DINOV2_VISION, T.PIXEL_VALUES, DINOV2_VISION_EXPORT.output_names,
                         device=torch.device("cpu"), dtype=torch.float32)
    bucketed = TorchEncoder(DINOV2_VISION_EXPORT.build_module(tiny_paths, tiny_profile), T.DINOV2_VISION,
                            T.PIXEL_VALUES, DINOV2_VISION_EXPORT.output_names, device=torch.device("cpu"),
                            dtype=torch.float32, buckets=(2, 4))
    batch = torch.from_numpy(synthetic_batches(tiny_profile.image_size)["synthetic[3]"]).repeat(2, 1, 1, 1)[:5]
    for a, b in zip(plain(batch), bucketed(batch), strict=True):  # 5 rows: a chunk of 4, then 1 padded to 2
        assert a.shape == b.shape and a.shape[0] == 5
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gate_passes_bf16_and_prints_its_min_cosine(tiny_profile, tiny_paths, capsys):
    encoder = TorchEncoder.load(CLIP_VISION_EXPORT, tiny_paths, tiny_profile, device="cpu", dtype="bf16")
    assert encoder.dtype == torch.bfloat16 and encoder.gate.dtype == "bf16"
    assert GATE.min_cosine <= encoder.gate.min_cosine < 1.0  # bf16 is not exact, and passes
    assert f"min cosine {encoder.gate.min_cosine:.6f}" in capsys.readouterr().err


def test_gate_refuses_an_encoder_whose_weights_drift_from_fp32(tiny_profile, tiny_paths):
    config = CLIP_VISION_EXPORT
    module = config.build_module(tiny_paths, tiny_profile)
    batches = gate_batches(config, module, tiny_paths, tiny_profile)
    with torch.inference_mode():
        references = {k: [t.numpy() for t in module(torch.from_numpy(b))] for k, b in batches.items()}
        # a real fault: every weight rounded through fp8 (3 mantissa bits), as a broken cast would do
        for p in module.parameters():
            p.copy_(p.to(torch.float8_e4m3fn).float())
    encoder = TorchEncoder(module, config.model_name, config.input_name, config.output_names,
                           device=torch.device("cpu"), dtype=torch.float32)
    gate_error = r"clip_vision: refuses to serve in fp32.*min cosine -?\d\.\d+ < 0\.999"
    with pytest.raises(AccuracyGateError, match=gate_error):
        encoder.check_gate(batches, references)
    assert encoder.gate is not None and not encoder.gate.ok


def test_dtype_and_device_choices_are_checked_by_name():
    assert serving_dtype(torch.device("cpu")) == torch.float32
    assert serving_dtype(torch.device("cpu"), "fp16") == torch.float16
    with pytest.raises(ValueError, match="dtype: expected one of auto, fp32, bf16, fp16"):
        serving_dtype(torch.device("cpu"), "int8")
    with pytest.raises(ValueError, match="compile: expected one of"):
        TorchEncoder(torch.nn.Identity(), "x", "X", ("Y",), device=torch.device("cpu"), dtype=torch.float32,
                     compile_mode="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda' asked for"):
            resolve_device("cuda")


def test_alpha_column_gives_one_checked_alpha_per_row():
    assert alpha_column(None, 3, 0.75) == [0.75] * 3
    assert alpha_column([0.2], 2, 0.75) == [0.2, 0.2]
    assert alpha_column([0.1, 0.9], 2, 0.75) == [0.1, 0.9]
    with pytest.raises(ValueError, match="alpha: must be within"):
        alpha_column([1.5], 1, 0.75)
    with pytest.raises(ValueError, match=r"alpha: expected one value per batch row \(3\)"):
        alpha_column([0.1, 0.2], 3, 0.75)


@CUDA
def test_auto_dtype_on_cuda_is_bf16_where_the_card_has_it():
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert serving_dtype(torch.device("cuda")) == expected


@CUDA
def test_encoders_pass_the_gate_on_cuda_in_the_serving_dtype(tiny_profile, tiny_paths, gpu_torch_specs):
    for name in (T.CLIP_VISION, T.DINOV2_VISION, T.CLIP_TEXT):
        params = {k: v.string_value for k, v in gpu_torch_specs[name].config.parameters.items()}
        encoder = load_from_parameters(params, device="cuda")
        assert encoder.device.type == "cuda" and encoder.gate.ok and encoder.gate.min_cosine >= GATE.min_cosine
        outputs = encoder(encoder.example(3))
        assert all(o.device.type == "cuda" and o.dtype == torch.float32 and o.shape[0] == 3 for o in outputs)
