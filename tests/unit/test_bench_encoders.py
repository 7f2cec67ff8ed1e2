"""Pure helpers of ``mofserve bench encoders``: FLOP counts, stats, ceilings, table, recommendation.

No model is built or exported here; configs are plain objects.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from mofserve.benchmarks import encoders as bench
from mofserve.benchmarks import encoders_report as report
from mofserve.benchmarks.flops import (
    VitShape,
    swiglu_hidden,
    vit_flops,
    vit_macs,
    vit_macs_breakdown,
    vit_shape_from_config,
)


def _vit(image: int, patch: int, width: int, layers: int, mlp: int, **kw) -> VitShape:
    return VitShape(image_size=image, patch_size=patch, hidden_size=width, num_layers=layers,
                    intermediate_size=mlp, **kw)


def test_vit_flops_match_known_vit_b16_figure():
    # timm / open_clip: ViT-B/16 at 224px is 17.6 GMACs per image.
    shape = _vit(224, 16, 768, 12, 3072)
    assert shape.tokens == 197
    assert vit_macs(shape) / 1e9 == pytest.approx(17.56, rel=0.01)
    assert vit_flops(shape) / 1e9 == pytest.approx(35.1, rel=0.01)


def test_vit_flops_match_known_vit_l14_336_figure():
    # open_clip's profile: ViT-L/14-336 image tower ~191 GMACs = ~382 GFLOPs (projection included).
    shape = _vit(336, 14, 1024, 24, 4096, projection_dim=768)
    assert shape.tokens == 577
    assert vit_flops(shape) / 1e9 == pytest.approx(382, rel=0.01)


def test_vit_flops_breakdown_is_exact_for_a_small_shape():
    shape = _vit(28, 14, 8, 2, 32, projection_dim=4)  # 4 patches + CLS = 5 tokens
    parts = vit_macs_breakdown(shape)
    assert parts == {
        "patch_embed": 4 * 3 * 14 * 14 * 8,
        "qkv": 2 * 3 * 5 * 8 * 8,
        "attn_scores": 2 * 5 * 5 * 8,
        "attn_values": 2 * 5 * 5 * 8,
        "attn_proj": 2 * 5 * 8 * 8,
        "mlp": 2 * 2 * 5 * 8 * 32,
        "projection": 8 * 4,
    }
    assert vit_flops(shape) == 2 * sum(parts.values())


def test_small_profile_encoders_are_46_gflops():
    # The small profile's ViT-B/14 at 224px: 256 patches + CLS.
    assert vit_flops(_vit(224, 14, 768, 12, 3072)) / 1e9 == pytest.approx(46.3, abs=0.05)


def test_shape_from_clip_vision_config():
    clip = SimpleNamespace(vision_config=SimpleNamespace(hidden_size=1024, intermediate_size=4096,
                                                         num_hidden_layers=24, patch_size=14, projection_dim=768,
                                                         num_channels=3))
    shape = vit_shape_from_config(clip, 336)
    assert (shape.tokens, shape.intermediate_size, shape.projection_dim, shape.swiglu) == (577, 4096, 768, False)


def test_shape_from_dinov2_config_counts_registers_and_mlp_ratio():
    dino = {"hidden_size": 1024, "mlp_ratio": 4, "num_hidden_layers": 24, "patch_size": 14,
            "num_register_tokens": 4}
    shape = vit_shape_from_config(dino, 224)
    assert shape.intermediate_size == 4096
    assert shape.extra_tokens == 5 and shape.tokens == 256 + 5
    assert shape.projection_dim == 0


def test_shape_from_dinov2_giant_uses_swiglu_width():
    giant = {"hidden_size": 1536, "mlp_ratio": 4, "num_hidden_layers": 40, "patch_size": 14,
             "use_swiglu_ffn": True}
    shape = vit_shape_from_config(giant, 224)
    assert shape.swiglu and shape.intermediate_size == swiglu_hidden(1536, 4) == 4096
    assert vit_macs_breakdown(shape)["mlp"] == 40 * 3 * shape.tokens * 1536 * 4096


def test_shape_from_real_transformers_configs():
    from transformers import CLIPVisionConfig, Dinov2Config

    clip = vit_shape_from_config(CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                  num_attention_heads=12, patch_size=14, projection_dim=512), 224)
    dino = vit_shape_from_config(Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                              mlp_ratio=4, patch_size=14), 224)
    assert clip.intermediate_size == dino.intermediate_size == 3072
    assert clip.tokens == dino.tokens == 257
    assert vit_flops(clip) - vit_flops(dino) == 2 * 768 * 512  # CLIP's projection


def test_share_uses_matching_precision_ceiling():
    ceilings = {"fp32": 100.0, "bf16": 400.0}
    # 10 GFLOPs in 100 ms = 100 GFLOP/s
    assert bench.gflops_per_second(10e9, 100.0) == pytest.approx(100.0)
    assert bench.share_of_ceiling(10e9, 100.0, "fp32", ceilings) == pytest.approx(1.0)
    assert bench.share_of_ceiling(10e9, 100.0, "bf16", ceilings) == pytest.approx(0.25)
    assert bench.ceiling_for("bf16", ceilings) == 400.0
    with pytest.raises(ValueError):
        bench.ceiling_for("fp16", ceilings)
    with pytest.raises(KeyError):
        bench.ceiling_for("bf16", {"fp32": 1.0})


def test_measurement_scores_each_runtime_against_its_precision():
    ceilings = {"fp32": 100.0, "bf16": 400.0}
    fp32 = bench.measurement(bench.RuntimeSpec("onnxruntime", "fp32"), "clip", 8, [0.8, 1.6, 1.2], 10e9,
                             ceilings, 1.0, 1.0)
    bf16 = bench.measurement(bench.RuntimeSpec("openvino", "bf16"), "clip", 8, [0.8, 1.6, 1.2], 10e9,
                             ceilings, 0.9999, 0.9998)
    assert (fp32.min_ms, fp32.median_ms, fp32.runs) == pytest.approx((100.0, 150.0, 3))
    assert fp32.share_of_ceiling == pytest.approx(1.0)
    assert fp32.times_ms == pytest.approx((100.0, 200.0, 150.0))
    assert bf16.share_of_ceiling == pytest.approx(0.25)
    assert bf16.runtime == "openvino-bf16"


def test_per_image_stats_and_matmul_rate():
    stats = bench.per_image_stats([0.4, 0.8, 0.2, 0.6], batch=2)
    assert stats == {"median_ms": pytest.approx(250.0), "min_ms": pytest.approx(100.0), "runs": 4}
    with pytest.raises(ValueError):
        bench.per_image_stats([], 1)
    assert bench.matmul_gflops(1000, 0.01) == pytest.approx(200.0)


def test_repeats_shrink_with_batch_but_keep_a_floor():
    assert bench.repeats_for_batch(5, 1) == 5
    assert bench.repeats_for_batch(5, 8) == 3
    assert bench.repeats_for_batch(5, 64) == 3
    assert bench.repeats_for_batch(2, 8) == 2
    assert bench.repeats_for_batch(20, 8) == 10
    with pytest.raises(ValueError):
        bench.repeats_for_batch(0, 1)


def test_best_ceilings_keep_the_best_per_size():
    merged = bench.best_ceilings({"fp32": {1024: 80.0, 4096: 150.0}}, {"fp32": {1024: 90.0, 4096: 140.0},
                                                                      "bf16": {4096: 400.0}})
    assert merged == {"fp32": {1024: 90.0, 4096: 150.0}, "bf16": {4096: 400.0}}
    assert bench.ceiling_summary(merged) == {"fp32": 150.0, "bf16": 400.0}


def test_min_row_cosine_takes_the_worst_token():
    ref = np.ones((2, 3, 4), dtype=np.float32)
    got = ref.copy()
    got[1, 2] = [1.0, 1.0, 1.0, -1.0]  # cos = 0.5 for that one token
    assert bench.min_row_cosine(ref, ref) == pytest.approx(1.0)
    assert bench.min_row_cosine(ref, got) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        bench.min_row_cosine(ref, got[:1])


def test_photo_batch_cycles_photos():
    photos = [np.full((3, 2, 2), i, dtype=np.float32) for i in range(3)]
    batch = bench.photo_batch(photos, 5)
    assert batch.shape == (5, 3, 2, 2) and batch.dtype == np.float32
    assert [int(b[0, 0, 0]) for b in batch] == [0, 1, 2, 0, 1]


def _m(runtime: str, encoder: str, batch: int, ms: float, cos: float = 1.0) -> report.Measurement:
    precision = runtime.rsplit("-", 1)[1]
    return report.Measurement(runtime, precision, encoder, batch, 3, ms, ms * 0.9, 1.0, 0.5, cos, cos)


def _results() -> list[report.Measurement]:
    rows = []
    for batch, scale in ((1, 1.0), (8, 0.8)):
        for runtime, ms, cos in (("pytorch-fp32", 400, 1.0), ("pytorch-bf16", 150, 0.9999),
                                 ("onnxruntime-fp32", 300, 1.0), ("openvino-fp32", 280, 1.0),
                                 ("openvino-bf16", 160, 0.9999)):
            for encoder in ("clip", "dinov2"):
                rows.append(_m(runtime, encoder, batch, ms * scale, cos))
    return rows


def test_the_reference_runtime_is_the_first_measured():
    assert bench.RUNTIME_SPECS[0].label == report.REFERENCE


def test_recommend_picks_fastest_acceptable_and_servable():
    results = _results()
    overall = report.recommend(results)
    assert overall["runtime"] == "pytorch-bf16"
    assert overall["per_batch"][1] == {"runtime": "pytorch-bf16", "median_ms": pytest.approx(300.0)}
    servable = report.recommend(results, candidates=report.SERVABLE.values())
    assert servable["runtime"] == "openvino-bf16"
    assert set(servable["total_median_ms"]) == {"onnxruntime-fp32", "openvino-bf16"}


def test_recommend_rejects_a_runtime_below_the_cosine_floor_at_any_batch():
    results = [m if not (m.runtime == "openvino-bf16" and m.batch == 8 and m.encoder == "dinov2")
               else _m("openvino-bf16", "dinov2", 8, m.median_ms, cos=0.998) for m in _results()]
    servable = report.recommend(results, candidates=report.SERVABLE.values())
    assert servable["runtime"] == "onnxruntime-fp32"
    assert "openvino-bf16" in servable["rejected"]
    assert servable["per_batch"][1]["runtime"] == "openvino-bf16"  # still fine at batch 1
    assert servable["per_batch"][8]["runtime"] == "onnxruntime-fp32"


def test_recommend_requires_both_encoders():
    results = [m for m in _results() if not (m.runtime == "pytorch-bf16" and m.encoder == "dinov2")]
    assert report.recommend(results)["runtime"] == "openvino-bf16"


def test_tables_and_recommendation_line():
    results = _results()
    table = report.format_table(results)
    lines = table.splitlines()
    assert len(lines) == 2 + len(results)
    assert lines[0].startswith("| runtime | encoder | batch | ms/image median")
    assert "| openvino-bf16 | dinov2 | 8 | 128.0 | 115.2 | 1.0 | 50.0% | 0.999900 | 0.999900 |" in lines
    combined = report.format_combined_table(results)
    assert "| onnxruntime-fp32 | 1 | 600.0 | 1.33x | 1.000000 |" in combined
    line = report.format_recommendation(results)
    assert line.startswith("Recommendation:") and "ServingSpec.runtime = 'openvino'" in line


def test_flops_and_load_lines():
    shape = {"image_size": 224, "patch_size": 14, "hidden_size": 768, "num_layers": 12, "intermediate_size": 3072}
    line = report.format_flops({"clip": {"flops_per_image": 46.3e9, "shape": shape}})
    assert line == "FLOPs per image (matmuls, 2 per MAC): clip 46.30 GFLOPs (257 tokens)"
    assert report.format_load([1.0, 2.5], 4) == "1-min load average at start / after each encoder: 1.0 / 2.5 on 4 CPUs"
    assert report.format_load([1.0, 5.1], 4).endswith("(other processes were competing: numbers are noisy)")
