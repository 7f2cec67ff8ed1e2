"""The in-process LLM-stage benchmark (``benchmarks/llm_stage.py``): the fit and the extrapolation,
answer comparison, the depth switch, and one brief run of every section on the tiny profile's LM
(report structure only: no time is asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from mofserve.benchmarks import llm_report as R
from mofserve.benchmarks import llm_stage as S


def test_fit_line_and_extrapolate_a_known_line():
    assert S.fit_line([1, 2, 4], [30.0, 50.0, 90.0]) == pytest.approx((10.0, 20.0))
    fit = S.extrapolate({1: 30.0, 2: 50.0, 4: 90.0}, 32)
    assert fit["extrapolated_ms"] == pytest.approx(650.0) and fit["fit_worst_error"] == pytest.approx(0.0, abs=1e-9)
    assert fit["measured_ms"] == {"1": 30.0, "2": 50.0, "4": 90.0}
    assert not fit["through_origin"]
    with pytest.raises(ValueError):
        S.fit_line([2, 2], [1.0, 1.0])
    # noise giving a negative fixed part: the line goes through the origin instead
    noisy = S.extrapolate({1: 10.0, 2: 40.0, 4: 80.0}, 32)
    assert noisy["through_origin"] and noisy["fixed_ms"] == 0.0
    assert noisy["per_layer_ms"] == pytest.approx((10 + 80 + 320) / 21) and noisy["extrapolated_ms"] > 0
    costs = {"own_layers": 2, "prefill": fit, "decode_step": {"1": fit}}
    assert S.scale_factors(costs) == {"prefill": pytest.approx(13.0), "decode_step": {"1": pytest.approx(13.0)}}


def test_first_difference_and_compare_answers():
    assert S.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert S.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert S.first_difference([1, 2], [1, 2, 3]) == 2
    out = S.compare_answers([[1, 2, 3, 4], [5, 6]], [[1, 2, 9, 9], [5, 6]])
    assert out["identical"] == 1 and out["identical_share"] == 0.5 and out["first_difference"] == [2, None]
    assert out["tokens_before_first_difference_share"] == pytest.approx(4 / 6)


def test_depth_cuts_and_cycles_layers_and_puts_them_back(tiny_paths):
    from mofserve.core.language_model import VisualLanguageModel

    vlm = VisualLanguageModel.from_checkpoint(tiny_paths.llava)
    layers = list(vlm.model.model.layers)
    with S.depth(vlm.model, 5) as model:
        assert len(model.model.layers) == 5 and model.config.num_hidden_layers == 5
        assert model.model.layers[len(layers)] is layers[0]
        out = model(inputs_embeds=torch.zeros(1, 4, vlm.hidden_size), use_cache=False, logits_to_keep=1)
        assert out.logits.shape[-1] == vlm.model.config.vocab_size
    assert list(vlm.model.model.layers) == layers and vlm.model.config.num_hidden_layers == len(layers)


def test_every_section_runs_briefly_on_tiny(tiny_paths, tmp_path, capsys):
    out = tmp_path / "llm"
    assert R.main(["--profile", "tiny", "--sequences", "2", "--prompt-tokens", "40", "--new-tokens", "3",
                   "--agreement-profiles", "tiny", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    engines = report["engines"]
    assert len(engines["prompt_tokens"]) == 2 and min(engines["prompt_tokens"]) >= 40  # the text alone may be longer
    for key, _ in R.WAYS:
        run = engines[key]
        assert "error" not in run, run.get("error")
        assert run["sequences"] == 2 and run["output_tokens"] > 0 and run["ttft_ms"]["n"] == 2
        assert run["decode_tokens_per_s"] is None or run["decode_tokens_per_s"] > 0
    assert engines["engine_one_at_a_time"]["decode_concurrency"] == pytest.approx(1.0)
    assert set(engines["engine_batched"]["steps"]) <= {"1", "2"}
    layers = report["layers"]
    assert layers["depths"] == [1, 2, 4] and layers["layers"] == 32 and set(layers["decode_step"]) == {"1", "2"}
    assert set(layers["prefill"]["measured_ms"]) == {"1", "2", "4"}
    joining = report["joining"]
    assert "error" not in joining, joining.get("error")
    assert list(joining["runs"]) == ["0", "256", "512"]
    whole, chunked = joining["runs"]["0"], joining["runs"]["256"]
    assert whole["prefill_forwards"] == joining["joiners"] and whole["itl_p99_vs_whole"] == 1.0
    assert chunked["prefill_forwards"] == joining["joiners"] * -(-joining["joiner_prompt_tokens"] // 256)
    assert chunked["joiner_ttft_ms"]["n"] == joining["joiners"] and chunked["running_itl_ms"]["n"] > 0
    agreement = report["agreement"]["tiny"]
    assert agreement["dtype"] == "bfloat16" and len(agreement["requests"]) == 2
    assert agreement["batched_vs_one_at_a_time"]["requests"] == 2
    md = (out / "report.md").read_text()
    assert "## Engines" in md and "EXTRAPOLATION" in md and "## Greedy agreement" in md and "| 0 (whole) |" in md
    assert md.strip() in capsys.readouterr().out
