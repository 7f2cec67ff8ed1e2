import numpy as np
import pytest
import torch

from mofserve.core.checkpoints import load_clip_vision, load_dinov2
from mofserve.core.runtime import OnnxRunner
from mofserve.export import onnx_export
from mofserve.export.configs import CLIP_VISION_EXPORT, DINOV2_VISION_EXPORT, ClipVisionFeatures, Dinov2Features
from mofserve.export.parity import ParityError, check_parity


def test_clip_wrapper_emits_penultimate_layer_patches_and_image_embeds(tiny_paths):
    model = load_clip_vision(tiny_paths.clip)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        features, embeds = ClipVisionFeatures(model)(x)
        out = model(pixel_values=x, output_hidden_states=True)
    assert features.shape == (2, 256, 32)
    torch.testing.assert_close(features, out.hidden_states[-2][:, 1:])
    torch.testing.assert_close(embeds, out.image_embeds)


def test_dinov2_wrapper_emits_prenorm_patches_with_frozen_position_embeddings(tiny_paths):
    """Baking the interpolated position embeddings in must equal HF's run-time bicubic interpolation."""
    reference = load_dinov2(tiny_paths.dinov2)
    assert reference.config.image_size != 224  # the tiny profile interpolates, like dinov2-large at 336
    wrapper = Dinov2Features(load_dinov2(tiny_paths.dinov2), 224)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        features, cls = wrapper(x)
        out = reference(pixel_values=x, output_hidden_states=True)
    torch.testing.assert_close(features, out.hidden_states[-1][:, 1:])
    torch.testing.assert_close(cls, out.pooler_output)
    # the features are taken BEFORE the final LayerNorm
    assert not torch.allclose(features, out.last_hidden_state[:, 1:])


def test_dinov2_imagenet_option_renormalises_inside_the_graph(tiny_paths):
    from mofserve.core.profiles import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

    wrapper = Dinov2Features(load_dinov2(tiny_paths.dinov2), 224, renormalise=True)
    reference = load_dinov2(tiny_paths.dinov2)
    raw = torch.rand(1, 3, 224, 224)
    clip_in = (raw - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    net_in = (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        got, _ = wrapper(clip_in)
        want = reference(pixel_values=net_in, output_hidden_states=True).hidden_states[-1][:, 1:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_export_is_cached_by_digest_and_redone_when_settings_change(tiny_profile, tiny_paths, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("MOFSERVE_HOME", str(tmp_path))
    lines: list[str] = []
    first = onnx_export.export_vision(DINOV2_VISION_EXPORT, tiny_paths, tiny_profile, log=lines.append)
    assert not first.cached and any("parity" in line for line in lines)
    again = onnx_export.export_vision(DINOV2_VISION_EXPORT, tiny_paths, tiny_profile, log=lines.append)
    assert again.cached and again.folder == first.folder
    from dataclasses import replace

    other = onnx_export.export_digest(DINOV2_VISION_EXPORT, tiny_paths,
                                      replace(tiny_profile, dino_normalisation="imagenet"))
    assert other != first.digest
    parity = first.manifest["parity"]
    assert parity["min_cosine"] >= 0.9999 and {c["inputs"] for c in parity["checks"]} == {"random[2]", "photos[3]"}


def test_large_graphs_keep_weights_in_external_data_next_to_the_graph(tiny_profile, tiny_paths, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("MOFSERVE_HOME", str(tmp_path))
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    graph = onnx_export.export_vision(CLIP_VISION_EXPORT, tiny_paths, tiny_profile, log=lambda _: None)
    assert [p.name for p in graph.files] == ["model.onnx", "model.onnx.data"]
    assert graph.graph.stat().st_size < graph.files[1].stat().st_size
    out = OnnxRunner(graph.graph).run({"PIXEL_VALUES": np.zeros((3, 3, 224, 224), np.float32)})
    assert out["CLIP_FEATURES"].shape == (3, 256, 32)


def test_parity_check_fails_when_the_graph_drifts(tiny_profile, tiny_paths, tmp_path, monkeypatch):
    monkeypatch.setenv("MOFSERVE_HOME", str(tmp_path))
    graph = onnx_export.export_vision(CLIP_VISION_EXPORT, tiny_paths, tiny_profile, log=lambda _: None)
    module = ClipVisionFeatures(load_clip_vision(tiny_paths.clip))
    with torch.no_grad():
        module.model.visual_projection.weight.mul_(1.01)
    batches = {"random[1]": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    with pytest.raises(ParityError, match="CLIP_EMBEDS"):
        check_parity(module, OnnxRunner(graph.graph), "PIXEL_VALUES", ("CLIP_FEATURES", "CLIP_EMBEDS"), batches)


def test_openvino_bf16_serving_runtime_is_gated_on_feature_cosine(tiny_profile, tiny_paths, tmp_path, monkeypatch):
    from dataclasses import replace

    monkeypatch.setenv("MOFSERVE_HOME", str(tmp_path))
    profile = replace(tiny_profile, serving=replace(tiny_profile.serving, runtime="openvino"))
    lines: list[str] = []
    graph = onnx_export.export_vision(CLIP_VISION_EXPORT, tiny_paths, profile, log=lines.append)
    serving = graph.manifest["serving_parity"]
    assert serving is not None and serving["min_cosine"] >= 0.999  # 1.0 where the CPU lacks bf16
    assert any(line.strip().startswith("clip_vision:   bf16") for line in lines)
    assert graph.digest != onnx_export.export_digest(CLIP_VISION_EXPORT, tiny_paths, tiny_profile)
    bf16 = OnnxRunner(graph.graph, runtime="openvino", precision="bf16")
    pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    assert bf16.run({"PIXEL_VALUES": pixels})["CLIP_FEATURES"].shape == (2, 256, 32)
