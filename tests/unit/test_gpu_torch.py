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
from mofserve.core.feature_cache import FeatureCache, TensorKeys, lookup_or_run
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


def test_gpu_torch_configs_parse_with_tritons_schema_and_keep_tensors_on_the_gpu(gpu_torch_specs, tiny_paths,
                                                                                 tiny_profile):
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
        # the cpu target's feature cache bound (per instance; here in device memory) and timing output
        assert params["feature_cache_bytes"] == str(tiny_profile.serving.feature_cache_mb << 20)
        assert [o.name for o in config.output if T.is_timing(o.name)] == [T.ENCODER_TIMINGS[name]]
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
    # every python-backend stage emits its timing on both targets, the encoders included
    for name, spec in cpu_specs.items():
        timings = lambda c: [(o.name, tuple(o.dims)) for o in c.output if T.is_timing(o.name)]  # noqa: E731
        assert timings(spec.config) == timings(gpu_torch_specs[name].config), name
    for name in (T.CLIP_VISION, T.DINOV2_VISION, T.CLIP_TEXT):
        assert (cpu_specs[name].config.parameters["feature_cache_bytes"]
                == gpu_torch_specs[name].config.parameters["feature_cache_bytes"])


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


def test_gate_passes_bf16_and_prints_its_min_cosine(tiny_profile, tiny_paths, caplog):
    caplog.set_level("INFO", logger="mofserve.export.torch_runtime")
    encoder = TorchEncoder.load(CLIP_VISION_EXPORT, tiny_paths, tiny_profile, device="cpu", dtype="bf16")
    assert encoder.dtype == torch.bfloat16 and encoder.gate.dtype == "bf16"
    assert GATE.min_cosine <= encoder.gate.min_cosine < 1.0  # bf16 is not exact, and passes
    assert f"min cosine {encoder.gate.min_cosine:.6f}" in caplog.text


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


# ---- the feature cache on the gpu-torch target: keys on the device, the shared lookup / run / fill ----

def test_device_keys_follow_the_content_bit_for_bit_and_name_dtype_and_shape():
    keys = TensorKeys(seed=1)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32))
    x[2] = x[0]
    k = keys(x)
    assert k[0] == k[2] and len(set(k)) == 2  # the same pixels, the same key; another image, another
    assert keys(x.clone()) == k and TensorKeys(seed=1)(x) == k  # deterministic for a process's weights
    flipped = x.clone()
    flipped.view(torch.int32)[0, 1, 2, 3] ^= 1  # one bit of one pixel
    assert keys(flipped)[0] != k[0] and keys(flipped)[1:] == k[1:]
    assert keys(-x.abs())[0] != keys(x.abs())[0]  # the sign bit counts
    assert keys(x.reshape(3, 3, 4, 16))[0] != k[0]  # same bytes, another shape
    assert keys(x.double())[0] != k[0]
    ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73, [49406, 320, 1126, 49407] + [49407] * 73])
    assert len(set(keys(ids))) == 2 and keys(ids[:1]) == keys(ids)[:1]  # int64 token ids too
    assert TensorKeys(seed=2)(x)[0] != k[0]  # another process, other (secret) weights


def test_device_keys_stay_exact_for_a_paper_sized_image():
    """Every lane is an integer sum below 2^53, so the fp64 product is exact in any order: the lanes
    equal an int64 computation of the same sums."""
    words = 3 * 336 * 336 * 2
    bits, lanes = TensorKeys.lanes(words)
    assert bits * lanes >= 128 and (1 << 16) * ((1 << bits) - 1) * words < 1 << 53
    keys = TensorKeys(seed=3)
    row = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 336, 336)).astype(np.float32))
    got = np.frombuffer(keys(row)[0][-8 * lanes:], dtype=np.int64)
    weights = keys._weights_for(torch.device("cpu"), words).to(torch.int64)
    want = (row.reshape(1, -1).view(torch.int16).to(torch.int64)[0, :, None] * weights).sum(0).numpy()
    np.testing.assert_array_equal(got, want)


def _outputs(rows: list[int], calls: list) -> dict[str, torch.Tensor]:
    calls.append(list(rows))
    values = torch.tensor([float(r) for r in rows])
    return {"A": values[:, None].repeat(1, 4), "B": values}


def test_lookup_or_run_answers_seen_rows_runs_the_rest_once_and_caches_whole_device_entries():
    cache, calls, counted = FeatureCache(1 << 20), [], []
    keys = [b"a", b"b", b"a"]  # the same image twice in one batch runs once
    got = lookup_or_run(cache, 3, lambda: keys, lambda rows: _outputs(rows, calls),
                        counted=lambda h, m: counted.append((h, m)))
    assert calls == [[0, 1]] and counted == [(1, 2)] and (got.hits, got.runs) == (1, 2)
    assert [float(o["B"]) for o in got.outputs] == [0.0, 1.0, 0.0] and len(cache) == 2
    assert all(ms > 0 for ms in got.elapsed_ms)
    again = lookup_or_run(cache, 2, lambda: [b"b", b"c"], lambda rows: _outputs(rows, calls))
    assert calls[-1] == [1] and (again.hits, again.runs) == (1, 1)
    assert float(again.outputs[0]["B"]) == 1.0 and set(again.outputs[0]) == {"A", "B"}  # whole
    assert again.elapsed_ms[0] < again.elapsed_ms[1]  # a hit reports its lookup only
    entry = cache.get(b"b")
    assert entry["A"].shape == (4,) and entry["A"]._base is None  # a compact clone, not a view of the batch


def test_a_failed_run_stores_nothing_and_counts_its_misses():
    cache, calls, counted = FeatureCache(1 << 20), [], []

    def failing(rows):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        lookup_or_run(cache, 2, lambda: [b"x", b"y"], failing, counted=lambda h, m: counted.append((h, m)))
    assert len(cache) == 0 and counted == [(0, 2)]
    got = lookup_or_run(cache, 2, lambda: [b"x", b"y"], lambda rows: _outputs(rows, calls))
    assert calls == [[0, 1]] and got.runs == 2 and len(cache) == 2  # run again, then cached


def test_a_disabled_cache_runs_every_row_without_computing_keys():
    calls = []

    def no_keys():
        raise AssertionError("keys computed with the cache off")

    got = lookup_or_run(FeatureCache(0), 2, no_keys, lambda rows: _outputs(rows, calls))
    assert calls == [[0, 1]] and got.runs == 2


def test_the_cache_bound_counts_device_tensor_bytes():
    cache = FeatureCache(100)
    cache.put(b"a", {"A": torch.zeros(12, dtype=torch.float32)})  # 48 bytes
    cache.put(b"b", {"A": torch.zeros(24, dtype=torch.bfloat16)})  # 48 bytes
    cache.put(b"c", {"A": torch.zeros(12, dtype=torch.float32)})  # evicts a
    assert cache.get(b"a") is None and cache.size_bytes == 96 and cache.evictions == 1


def test_the_encoder_hands_the_cache_its_serving_dtype_which_widens_to_the_fp32_outputs(tiny_profile, tiny_paths):
    encoder = TorchEncoder.load(CLIP_VISION_EXPORT, tiny_paths, tiny_profile, device="cpu", dtype="bf16", gate=None)
    batch = torch.from_numpy(synthetic_batches(tiny_profile.image_size)["synthetic[3]"])
    kept, served = encoder(batch, out_dtype=None), encoder(batch)
    for k, s in zip(kept, served, strict=True):
        assert k.dtype == torch.bfloat16 and s.dtype == torch.float32
        assert torch.equal(k.float(), s)  # a hit (the kept bf16, widened) is bit-identical to a miss


def test_token_ids_outside_the_vocabulary_are_refused_naming_input_ids(tiny_profile, tiny_paths):
    encoder = TorchEncoder.load(CLIP_TEXT_EXPORT, tiny_paths, tiny_profile, device="cpu", gate=None)
    vocab = encoder.vocab_size
    assert vocab and vocab > 0
    encoder.check_ids(torch.tensor([[0, vocab - 1]]))
    for bad, shown in (([[0, vocab]], vocab), ([[-1, 2]], -1)):
        with pytest.raises(ValueError, match=rf"input_ids: token ids must lie in \[0, {vocab}\), got {shown}"):
            encoder.check_ids(torch.tensor(bad))
    vision = TorchEncoder(torch.nn.Identity(), "x", "X", ("Y",), device=torch.device("cpu"), dtype=torch.float32)
    assert vision.vocab_size is None
    vision.check_ids(torch.full((1, 3), 1e9))  # pixels: nothing to check


# ---- served: the gpu-torch repository on CPU instances of the real tritonserver ----

SERVED = (T.PREPROCESS, T.CLIP_VISION, T.DINOV2_VISION, T.fuse_model("clip"), T.tokens_model("clip"), T.EMBED,
          T.LLM, T.vqa_model("clip"), T.TOKENIZE_TEXT, T.CLIP_TEXT, T.EMBED_TEXT)


@pytest.fixture(scope="module")
def torch_triton(tiny_profile, tiny_paths, tmp_path_factory):
    """The gpu-torch repository (the models these tests use), every instance on the CPU (as the GPU
    check's dry run serves it), one real tritonserver."""
    from mofserve.server.launcher import TritonServer

    shapes = read_shapes(tiny_paths, tiny_profile)
    specs = [s for s in repository_specs(tiny_profile, "gpu-torch", tiny_paths, shapes, {}) if s.name in SERVED]
    for spec in specs:
        for group in spec.config.instance_group:
            group.kind = mc.ModelInstanceGroup.KIND_CPU
    folder = tmp_path_factory.mktemp("gpu-torch")
    server = TritonServer(write_repository(specs, folder / "repository"), response_cache_bytes=0,
                          log_file=folder / "tritonserver.log")
    server.start(timeout=300)
    try:
        yield server
    finally:
        server.stop(timeout=20)


def _cache_counts(server, model: str) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    counts = {"hit": 0.0, "miss": 0.0}
    for line in text.splitlines():
        if line.startswith("mofserve_encoder_cache_total{") and f'model="{model}"' in line:
            counts["hit" if 'result="hit"' in line else "miss"] = float(line.rsplit(" ", 1)[1])
    return counts


def _delta(before: dict, after: dict) -> tuple[float, float]:
    return after["hit"] - before["hit"], after["miss"] - before["miss"]


def _png(seed: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _images(grpcclient, images: list[bytes]):
    tensor = grpcclient.InferInput(T.IMAGE, [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[b] for b in images], dtype=np.object_))
    return tensor


@pytest.mark.integration
def test_served_gpu_torch_encoders_answer_a_seen_image_from_the_cache_with_their_timing(torch_triton):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(torch_triton.grpc_url)
    image, other = _png(1), _png(2)
    before = _cache_counts(torch_triton, T.CLIP_VISION)
    first = client.infer(T.tokens_model("clip"), [_images(grpcclient, [image])])
    after_first = _cache_counts(torch_triton, T.CLIP_VISION)
    assert _delta(before, after_first) == (0, 1)
    cold_ms = float(first.as_numpy(T.TIMING_CLIP)[0, 0])
    assert cold_ms > 0 and first.as_numpy(T.TIMING_FUSION) is not None
    again = client.infer(T.tokens_model("clip"), [_images(grpcclient, [image])])
    after_again = _cache_counts(torch_triton, T.CLIP_VISION)
    assert _delta(after_first, after_again) == (1, 0)  # the same image: a hit, the encoder not run
    warm_ms = float(again.as_numpy(T.TIMING_CLIP)[0, 0])
    assert 0 <= warm_ms < cold_ms  # the lookup only
    np.testing.assert_array_equal(again.as_numpy(T.VISUAL_TOKENS), first.as_numpy(T.VISUAL_TOKENS))
    np.testing.assert_array_equal(again.as_numpy(T.CLIP_EMBEDS), first.as_numpy(T.CLIP_EMBEDS))
    # cached entries are whole: embed reads CLIP_EMBEDS from the entry tokens_clip left; DINOv2 runs
    clip0, dino0 = _cache_counts(torch_triton, T.CLIP_VISION), _cache_counts(torch_triton, T.DINOV2_VISION)
    embed = client.infer(T.EMBED, [_images(grpcclient, [image])])
    assert _delta(clip0, _cache_counts(torch_triton, T.CLIP_VISION)) == (1, 0)
    assert _delta(dino0, _cache_counts(torch_triton, T.DINOV2_VISION)) == (0, 1)
    np.testing.assert_array_equal(embed.as_numpy(T.CLIP_EMBEDS), first.as_numpy(T.CLIP_EMBEDS))
    assert float(embed.as_numpy(T.TIMING_DINOV2)[0, 0]) > float(embed.as_numpy(T.TIMING_CLIP)[0, 0])
    # another image misses; the same image twice in one request runs once
    clip1 = _cache_counts(torch_triton, T.CLIP_VISION)
    pair = client.infer(T.tokens_model("clip"), [_images(grpcclient, [other, other])])
    assert _delta(clip1, _cache_counts(torch_triton, T.CLIP_VISION)) == (1, 1)
    tokens = pair.as_numpy(T.VISUAL_TOKENS)
    np.testing.assert_array_equal(tokens[0], tokens[1])
    assert not np.array_equal(tokens[0], first.as_numpy(T.VISUAL_TOKENS)[0])
    assert pair.as_numpy(T.TIMING_CLIP).shape == (2, 1)


@pytest.mark.integration
def test_served_gpu_torch_cache_entries_are_whole_whatever_the_request_asked_for(torch_triton):
    """Triton's response cache would replay a partial response; the feature cache must not."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(torch_triton.grpc_url)
    pixels = grpcclient.InferInput(T.PIXEL_VALUES, [1, 3, 224, 224], "FP32")
    pixels.set_data_from_numpy(np.full((1, 3, 224, 224), 0.321, np.float32))
    before = _cache_counts(torch_triton, T.CLIP_VISION)
    part = client.infer(T.CLIP_VISION, [pixels], outputs=[grpcclient.InferRequestedOutput(T.CLIP_EMBEDS)])
    whole = client.infer(T.CLIP_VISION, [pixels])
    assert _delta(before, _cache_counts(torch_triton, T.CLIP_VISION)) == (1, 1)
    assert whole.as_numpy(T.CLIP_FEATURES).shape == (1, 256, 32)
    np.testing.assert_array_equal(whole.as_numpy(T.CLIP_EMBEDS), part.as_numpy(T.CLIP_EMBEDS))


@pytest.mark.integration
def test_served_gpu_torch_text_tower_caches_and_refuses_bad_ids_every_time(torch_triton):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(torch_triton.grpc_url)
    text = grpcclient.InferInput(T.TEXT, [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"a photo of a dog facing left"]], dtype=np.object_))
    before = _cache_counts(torch_triton, T.CLIP_TEXT)
    first = client.infer(T.EMBED_TEXT, [text])
    again = client.infer(T.EMBED_TEXT, [text])
    assert _delta(before, _cache_counts(torch_triton, T.CLIP_TEXT)) == (1, 1)
    np.testing.assert_array_equal(first.as_numpy(T.TEXT_EMBEDS), again.as_numpy(T.TEXT_EMBEDS))
    assert 0 <= float(again.as_numpy(T.TIMING_CLIP_TEXT)[0, 0]) < float(first.as_numpy(T.TIMING_CLIP_TEXT)[0, 0])
    # a failure is never stored, so never replayed as a success: the same bad request fails each time
    ids = grpcclient.InferInput(T.INPUT_IDS, [1, 77], "INT64")
    ids.set_data_from_numpy(np.full((1, 77), 10**6, np.int64))
    failed = _cache_counts(torch_triton, T.CLIP_TEXT)
    for _ in range(2):
        with pytest.raises(InferenceServerException, match=r"input_ids: token ids must lie in \[0, \d+\)") as error:
            client.infer(T.CLIP_TEXT, [ids])
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert _delta(failed, _cache_counts(torch_triton, T.CLIP_TEXT)) == (0, 0)
    assert client.infer(T.EMBED_TEXT, [text]).as_numpy(T.TEXT_EMBEDS) is not None  # still serving


@pytest.mark.integration
def test_served_gpu_torch_encoder_timings_reach_the_streaming_llm(torch_triton):
    """vqa_clip streams from the decoupled llm, which echoes the upstream stages' timings: the
    gpu-torch CLIP encoder's now among them (NaN only for a stage the mode does not run)."""
    import queue

    import tritonclient.grpc as grpcclient

    def upstream(image: bytes) -> np.ndarray:
        results: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(torch_triton.grpc_url)
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        question = grpcclient.InferInput(T.QUESTION, [1, 1], "BYTES")
        question.set_data_from_numpy(np.array([[b"Which way is the dog facing?"]], dtype=np.object_))
        tokens = grpcclient.InferInput(T.MAX_NEW_TOKENS, [1, 1], "INT32")
        tokens.set_data_from_numpy(np.array([[2]], dtype=np.int32))
        client.async_stream_infer(T.vqa_model("clip"), [_images(grpcclient, [image]), question, tokens],
                                  enable_empty_final_response=True)
        timings = None
        try:
            while True:
                result, error = results.get(timeout=120)
                assert error is None, error
                response = result.get_response()
                if any(o.name == T.UPSTREAM_TIMINGS for o in response.outputs):
                    timings = result.as_numpy(T.UPSTREAM_TIMINGS)[0]
                if response.parameters["triton_final_response"].bool_param:
                    break
        finally:
            client.stop_stream()
            client.close()
        assert timings is not None
        return timings

    image = _png(3)
    cold, warm = upstream(image), upstream(image)
    stages = dict(zip(T.UPSTREAM_STAGES, range(len(T.UPSTREAM_STAGES)), strict=True))
    for timings in (cold, warm):
        assert np.isfinite(timings[stages[T.TIMING_CLIP]]) and np.isnan(timings[stages[T.TIMING_DINOV2]])
        assert np.isfinite(timings[stages[T.TIMING_PREPROCESS]]) and np.isfinite(timings[stages[T.TIMING_FUSION]])
    assert 0 <= warm[stages[T.TIMING_CLIP]] < cold[stages[T.TIMING_CLIP]]  # the second time from the cache
