"""EmbedText over gRPC and ``mofserve eval mmvp-vlm`` end to end, on the session's Triton (tiny
profile) through an in-process gRPC front-end."""

from __future__ import annotations

import csv
import json
import math

import grpc
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, CLIPTextModelWithProjection

from mofserve.cli import main
from mofserve.clients import AsyncMofServeClient, MofServeClient, MofServeError
from mofserve.evaluation.mmvp_vlm import VLMConfig, run_mmvp_vlm, score_pair
from mofserve.evaluation.mmvp_vlm_dataset import PATTERNS
from mofserve.v1 import mofserve_pb2 as pb
from mofserve.v1 import mofserve_pb2_grpc as pb_grpc
from tests.reference import min_row_cosine
from tests.unit.test_mmvp_vlm import write_dataset

pytestmark = pytest.mark.integration

TEXTS = ["a photo of the dog facing left", "a photo of the dog facing right", "a photo of a café"]


@pytest.fixture(scope="module")
def client(served):
    with MofServeClient(served.target, timeout=60) as c:
        yield c


def test_embed_text_equals_the_in_process_text_model_and_carries_the_logit_scale(client, tiny_paths):
    result = client.embed_text(TEXTS)
    tokenizer = AutoTokenizer.from_pretrained(tiny_paths.clip)
    model = CLIPTextModelWithProjection.from_pretrained(tiny_paths.clip).eval()
    with torch.inference_mode():
        want = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).text_embeds.numpy()
    assert result.embeddings.shape == (3, 24) and min_row_cosine(result.embeddings, want) >= 0.9999
    assert math.isclose(result.logit_scale, 1 / 0.07, rel_tol=1e-4)  # the seeded CLIP's exp(logit_scale)
    assert result.provenance.random_weights and result.provenance.profile == "tiny"
    assert result.total_ms > 0


def test_embed_text_over_raw_stubs_and_the_async_client(served, loop_thread):
    with grpc.insecure_channel(served.target) as channel:
        response = pb_grpc.MofServeStub(channel).EmbedText(pb.EmbedTextRequest(texts=TEXTS[:2]), timeout=60)
    assert len(response.embeddings) == 2 and response.HasField("logit_scale")
    first = response.embeddings[0]
    assert list(first.shape) == [24] and first.dtype == "float32" and len(first.data) == 24 * 4

    async def call():
        async with AsyncMofServeClient(served.target, timeout=60) as c:
            return await c.embed_text(TEXTS[:2])

    result = loop_thread.run(call())
    np.testing.assert_allclose(result.embeddings[0], np.frombuffer(first.data, "<f4"), rtol=1e-6)


def test_more_texts_than_a_batch_come_back_in_order_each_as_if_alone(client):
    texts = [f"a photo of {n} dogs facing left" for n in range(19)]  # the tiny batch is 8: three chunks
    together = client.embed_text(texts).embeddings
    alone = np.concatenate([client.embed_text([t]).embeddings for t in texts[::6]])
    assert together.shape == (19, 24)
    np.testing.assert_allclose(together[::6], alone, rtol=1e-5, atol=1e-6)


def test_text_and_image_embeddings_are_comparable(client):
    """EmbedText lives in Embed's CLIP space: the evaluator's scores come from these two RPCs."""
    from mofserve.core.samples import sample_photos

    images = client.embed(sample_photos()[:2]).clip
    texts = client.embed_text(TEXTS[:2])
    assert images.shape[1] == texts.embeddings.shape[1]
    assert score_pair(images, texts.embeddings, texts.logit_scale).picks[0] in (1, 2)


@pytest.mark.parametrize(("texts", "message"), [
    ([], "texts: give at least one text"), (["ok", ""], "texts[1]: empty"),
    (["x" * 2001], "texts[0]: 2001 characters exceeds the limit"),
])
def test_bad_texts_are_invalid_argument_naming_the_field(client, texts, message):
    with pytest.raises(MofServeError) as error:
        client.embed_text(texts)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and error.value.message.startswith(message)
    assert client.embed_text(["still serving"]).embeddings.shape == (1, 24)


def test_server_info_reports_the_text_limits(client, engine):
    limits = client.server_info().limits
    assert limits["max_embed_texts"] == engine.limits.max_embed_texts == 64
    assert limits["max_text_chars"] == engine.limits.max_text_chars


def test_eval_mmvp_vlm_end_to_end_on_a_synthetic_dataset(served, tmp_path):
    data = write_dataset(tmp_path / "MMVP_VLM", {"Orientation": 2, "Camera Perspective": 2})
    run = run_mmvp_vlm(VLMConfig(data=data, server=served.target, out=tmp_path / "out", progress=False),
                       log=lambda message: None)
    report = run.report
    assert set(run.paths) == {"report_json", "report_md", "pairs_csv"} and all(p.is_file() for p in run.paths.values())
    assert json.loads(run.paths["report_json"].read_text())["results"] == report["results"]
    results = report["results"]
    assert list(results["per_pattern"]) == ["Orientation and Direction", "Viewpoint and Perspective"]
    for counts in results["per_pattern"].values():
        assert counts["pairs"] == 2 and counts["failed"] == 0 and 0 <= counts["correct"] <= 2
        assert counts["accuracy"] == 50.0 * counts["correct"]
    assert (results["pairs"], results["failed"]) == (4, 0)
    assert results["average"] == pytest.approx(np.mean([c["accuracy"] for c in results["per_pattern"].values()]))
    assert len(results["patterns_missing"]) == 7
    assert math.isclose(report["scoring"]["logit_scale"], 1 / 0.07, rel_tol=1e-4)
    assert report["scoring"]["logit_scale_source"].startswith("server")
    assert report["warnings"][0].startswith("RANDOM WEIGHTS")
    assert report["server"]["provenance"]["random_weights"] is True
    pairs = report["pairs"]
    assert [(p["qid1"], p["qid2"]) for p in pairs] == [(1, 2), (3, 4), (5, 6), (7, 8)]
    for p in pairs:
        assert p["error"] is None and p["pick1"] in (1, 2) and p["pick2"] in (1, 2)
        assert p["correct"] == ((p["pick1"], p["pick2"]) == (1, 2))
        assert p["pick1"] == (1 if p["p_image1_text1"] > 0.5 else 2)
        assert p["text1"] == f"a photo of the thing number {p['qid1']}, seen left"
    assert report["reference"]["average"] == {"OpenAI ViT-L/14": 19.3, "SigLIP SO/14": 37.8, "DFN H/14": 39.3}
    markdown = run.paths["report_md"].read_text()
    assert all(pattern in markdown for pattern in PATTERNS) and "| OpenAI ViT-L/14 (paper)" in markdown
    with run.paths["pairs_csv"].open() as handle:
        assert len(list(csv.DictReader(handle))) == 4


def test_eval_mmvp_vlm_recomputes_the_official_rule_from_the_rpcs(served, client, tmp_path):
    data = write_dataset(tmp_path / "d", {"Texts": 1})
    report = run_mmvp_vlm(VLMConfig(data=data, server=served.target, out=tmp_path / "out", progress=False),
                          log=lambda message: None).report
    pair = report["pairs"][0]
    images = client.embed([(data / "MLLM_VLM Images" / "Texts" / f"{q}.jpg").read_bytes() for q in (1, 2)]).clip
    texts = client.embed_text([pair["text1"], pair["text2"]])
    expected = score_pair(images, texts.embeddings, texts.logit_scale)
    assert (pair["pick1"], pair["pick2"]) == expected.picks and pair["correct"] == expected.correct
    assert pair["p_image1_text1"] == pytest.approx(expected.probabilities[0], abs=1e-6)


def test_eval_mmvp_vlm_cli_reports_failed_pairs_and_dataset_errors(served, tmp_path, capsys):
    data = write_dataset(tmp_path / "d", {"Orientation": 1, "State": 1})
    (data / "MLLM_VLM Images" / "State" / "4.jpg").unlink()
    out = tmp_path / "out"
    assert main(["eval", "mmvp-vlm", "--data", str(data), "--server", served.target, "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "| Average |" in printed.out and "WARNING: RANDOM WEIGHTS" in printed.err
    report = json.loads((out / "report.json").read_text())
    assert report["results"]["per_pattern"]["State and Condition"] == {"pairs": 1, "correct": 0, "failed": 1,
                                                                       "accuracy": 0.0}
    assert report["failures"] == [{"pair": 2, "qid1": 3, "qid2": 4, "pattern": "State and Condition",
                                   "error": "MLLM_VLM Images/State/4.jpg: image not found "
                                            "(for Questions.csv line 5 (qid 4))"}]
    assert "## Failed pairs (1)" in (out / "report.md").read_text()
    (data / "Questions.csv").unlink()
    assert main(["eval", "mmvp-vlm", "--data", str(data), "--server", served.target]) == 2
    assert "Questions.csv: not found" in capsys.readouterr().err
