"""MMVP-VLM: the official scoring rule on hand-made embeddings, and reading the dataset folder."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mofserve.evaluation.datasets import DatasetError
from mofserve.evaluation.mmvp_vlm import (
    render_markdown,
    score_pair,
    score_table,
    summarise,
)
from mofserve.evaluation.mmvp_vlm_dataset import PATTERNS, TEXT_PROMPT, load_mmvp_vlm, pattern_of


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_dataset(root: Path, types: dict[str, int], header: str = "Question ID,Type,Statement",
                  images_dir: str = "MLLM_VLM Images", folder_names: dict[str, str] | None = None) -> Path:
    """``types``: CSV Type -> number of pairs; qids run on across types as in the official file."""
    root.mkdir(parents=True, exist_ok=True)
    lines, qid = [header], 0
    for qtype, pairs in types.items():
        folder = root / images_dir / (folder_names or {}).get(qtype, qtype)
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(2 * pairs):
            qid += 1
            lines.append(f'{qid},{qtype},"the thing number {qid}, seen {"left" if qid % 2 else "right"}"')
            (folder / f"{qid}.jpg").write_bytes(jpeg((qid * 20 % 256, 40, 90)))
    (root / "Questions.csv").write_text("\n".join(lines) + "\n")
    return root


# ---- scoring ----------------------------------------------------------------------------------------


def test_each_text_picks_by_softmax_over_the_pair_and_both_must_pick_their_own_image():
    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    images = np.stack([a, b])
    right = score_pair(images, np.stack([a + 0.1 * b, b + 0.1 * a]), logit_scale=100.0)
    assert right.picks == (1, 2) and right.correct
    # text 1 scores (1 - 0.1) * 100 / |t| more for image 1: softmax over the two images
    p = 1 / (1 + np.exp(-100 * 0.9 / np.linalg.norm([1, 0.1])))
    assert right.probabilities[0] == pytest.approx(p) and right.probabilities[1] == pytest.approx(1 - p)
    both_first = score_pair(images, np.stack([a, a + 0.01 * b]), 100.0)
    assert both_first.picks == (1, 1) and not both_first.correct
    swapped = score_pair(images, np.stack([b, a]), 100.0)
    assert swapped.picks == (2, 1) and not swapped.correct


def test_cosine_not_dot_product_and_the_scale_changes_probabilities_not_picks():
    images = np.array([[10.0, 0.0], [0.6, 0.8]])  # image 1 has a large norm: a dot product would favour it
    texts = np.array([[1.0, 0.2], [0.5, 0.9]])
    for scale in (1.0, 14.3, 100.0):
        result = score_pair(images, texts, scale)
        assert result.picks == (1, 2) and result.correct
    assert score_pair(images, texts, 100.0).probabilities[0] > score_pair(images, texts, 1.0).probabilities[0]


def test_an_exact_tie_picks_image_two_as_the_official_script():
    images = np.array([[1.0, 0.0], [1.0, 0.0]])
    tie = score_pair(images, np.array([[1.0, 0.0], [0.0, 1.0]]), 100.0)
    assert tie.probabilities == (0.5, 0.5) and tie.picks == (2, 2) and not tie.correct


def test_summary_is_pair_accuracy_per_pattern_and_their_mean():
    def row(pattern, correct, error=None):
        return {"pattern": pattern, "correct": correct, "error": error}

    results = [row(PATTERNS[0], True), row(PATTERNS[0], False), row(PATTERNS[0], True), row(PATTERNS[0], True),
               row(PATTERNS[7], True), row(PATTERNS[7], False, error="server: boom")]
    summary = summarise(results)
    assert list(summary["per_pattern"]) == [PATTERNS[0], PATTERNS[7]]  # the paper's order, present ones only
    assert summary["per_pattern"][PATTERNS[0]] == {"pairs": 4, "correct": 3, "failed": 0, "accuracy": 75.0}
    assert summary["per_pattern"][PATTERNS[7]] == {"pairs": 2, "correct": 1, "failed": 1, "accuracy": 50.0}
    assert summary["average"] == pytest.approx(62.5)  # mean over patterns, not over pairs
    assert summary["overall"] == pytest.approx(100 * 4 / 6)
    assert (summary["pairs"], summary["correct"], summary["failed"]) == (6, 4, 1)
    assert len(summary["patterns_missing"]) == 7


def test_the_table_has_the_nine_patterns_the_average_and_the_papers_references():
    report = {"server": {"provenance": {"profile": "tiny", "random_weights": True}},
              "results": summarise([{"pattern": PATTERNS[2], "correct": True, "error": None}]),
              "reference": {"average": {"OpenAI ViT-L/14": 19.3, "SigLIP SO/14": 37.8, "DFN H/14": 39.3}}}
    lines = score_table(report).splitlines()
    assert lines[0].split(" | ")[1:10] == list(PATTERNS) and lines[0].endswith("| Average |")
    assert "| 100.0 |" in lines[2] and lines[2].count("| - ") == 8
    assert lines[3].startswith("| OpenAI ViT-L/14 (paper)") and lines[3].endswith("| 19.3 |")
    assert lines[5].endswith("| 39.3 |")


@pytest.mark.parametrize(("name", "pattern"), [
    ("Orientation", PATTERNS[0]), ("Camera Perspective", PATTERNS[8]), ("Camera_Perspective", PATTERNS[8]),
    ("Structural Character", PATTERNS[6]), ("Text", "Texts"), ("Spatial", PATTERNS[4]),
    ("Viewpoint and Perspective", PATTERNS[8]), ("color and appearance", PATTERNS[5]), ("Weather", None),
])
def test_released_and_paper_names_map_to_the_nine_patterns(name, pattern):
    assert pattern_of(name) == pattern


# ---- the dataset -------------------------------------------------------------------------------------


def test_the_released_layout_reads_into_pairs(tmp_path):
    root = write_dataset(tmp_path / "MMVP_VLM", {"Orientation": 2, "Camera Perspective": 1})
    dataset = load_mmvp_vlm(root)
    assert dataset.questions == 6 and [p.pair for p in dataset.pairs] == [1, 2, 3]
    first = dataset.pairs[0]
    assert first.pattern == "Orientation and Direction" and first.qids == (1, 2) and first.error is None
    assert first.images[0] == root / "MLLM_VLM Images" / "Orientation" / "1.jpg"
    assert first.texts[0] == TEXT_PROMPT + "the thing number 1, seen left"
    assert dataset.pairs[2].pattern == "Viewpoint and Perspective"


def test_other_folder_names_and_headers_are_accepted(tmp_path):
    # the README's folder name, pattern folders named by alias, the paper's column names
    root = write_dataset(tmp_path / "d", {"Camera Perspective": 1, "Texts": 1}, header="qid,qtype,statement",
                         images_dir="MMVP_VLM_Images", folder_names={"Camera Perspective": "Camera_Perspective",
                                                                     "Texts": "Text"})
    dataset = load_mmvp_vlm(root)
    assert [p.error for p in dataset.pairs] == [None, None]
    assert dataset.pairs[0].images[1] == root / "MMVP_VLM_Images" / "Camera_Perspective" / "2.jpg"


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda root: (root / "Questions.csv").unlink(), r"Questions\.csv: not found"),
    (lambda root: (root / "Questions.csv").write_text("Index,Question,Options\n1,q,o\n"),
     r"Questions\.csv line 1: missing column\(s\) qtype .*statement"),
    (lambda root: (root / "Questions.csv").write_text("Question ID,Type,Statement\nx,Orientation,s\n"),
     r"Questions\.csv line 2: Question ID must be a positive integer, got 'x'"),
    (lambda root: (root / "Questions.csv").write_text("Question ID,Type,Statement\n1,Orientation,a\n"
                                                      "2,Orientation,b\n1,Orientation,c\n"),
     r"Questions\.csv line 4: qid 1 appears twice \(first on line 2\)"),
    (lambda root: (root / "Questions.csv").write_text("Question ID,Type,Statement\n1,Weather,a\n2,Weather,b\n"),
     r"Questions\.csv line 2 \(qid 1\): Type 'Weather' names none of the nine visual patterns"),
    (lambda root: (root / "Questions.csv").write_text("Question ID,Type,Statement\n"),
     r"Questions\.csv: no questions below the header"),
])
def test_structural_problems_raise_naming_the_file_and_line(tmp_path, mutate, message):
    root = write_dataset(tmp_path / "d", {"Orientation": 1})
    mutate(root)
    with pytest.raises(DatasetError, match=message):
        load_mmvp_vlm(root)


def test_no_image_folder_or_no_folder_at_all_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        load_mmvp_vlm(tmp_path / "absent")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "Questions.csv").write_text("Question ID,Type,Statement\n1,Orientation,a\n")
    with pytest.raises(DatasetError, match="no image folder; expected 'MLLM_VLM Images/'"):
        load_mmvp_vlm(tmp_path / "d")


def test_a_pair_with_a_problem_is_kept_with_an_error_naming_the_file_and_row(tmp_path):
    root = write_dataset(tmp_path / "d", {"Orientation": 2, "Texts": 1})
    (root / "MLLM_VLM Images" / "Orientation" / "3.jpg").unlink()
    (root / "MLLM_VLM Images" / "Texts" / "6.jpg").write_bytes(b"not a jpeg")
    csv = root / "Questions.csv"
    csv.write_text(csv.read_text().replace('2,Orientation,"the thing number 2, seen right"', "2,Orientation,")
                   + "7,Texts,a lonely statement\n")
    (root / "MLLM_VLM Images" / "Texts" / "7.jpg").write_bytes(jpeg((1, 2, 3)))
    pairs = {p.pair: p for p in load_mmvp_vlm(root).pairs}
    assert len(pairs) == 4
    assert pairs[1].error == "Questions.csv line 3 (qid 2): empty statement"
    assert pairs[2].error == ("MLLM_VLM Images/Orientation/3.jpg: image not found "
                              "(for Questions.csv line 4 (qid 3))")
    assert pairs[3].error.startswith("MLLM_VLM Images/Texts/6.jpg: cannot decode the image")
    assert "(for Questions.csv line 7 (qid 6))" in pairs[3].error
    assert pairs[4].error == "Questions.csv line 8 (qid 7): its pair partner qid 8 is not in Questions.csv"
    assert pairs[4].pattern == "Texts"


def test_partners_of_different_patterns_fail_their_pair(tmp_path):
    root = write_dataset(tmp_path / "d", {"Orientation": 1, "Texts": 1})
    csv = root / "Questions.csv"
    csv.write_text(csv.read_text().replace("2,Orientation", "2,Texts"))
    (root / "MLLM_VLM Images" / "Texts" / "2.jpg").write_bytes(jpeg((9, 9, 9)))
    pair = load_mmvp_vlm(root).pairs[0]
    assert "a pair of different visual patterns ('Orientation', 'Texts')" in pair.error


def test_markdown_report_lists_failures_and_warnings():
    results = [{"pattern": PATTERNS[0], "correct": False, "error": "x.jpg: image not found"}]
    report = {"created": "now", "warnings": ["RANDOM WEIGHTS: seeded"],
              "server": {"target": "t", "version": "0", "provenance": {"profile": "tiny", "random_weights": True}},
              "dataset": {"path": "d", "questions": 2, "pairs": 1},
              "scoring": {"text_prompt": "a photo of {statement}", "logit_scale": 14.28, "logit_scale_source": "server",
                          "rule": "rule"},
              "results": summarise(results), "reference": {"average": {"OpenAI ViT-L/14": 19.3}},
              "failures": [{"pair": 1, "qid1": 1, "qid2": 2, "pattern": PATTERNS[0],
                            "error": "x.jpg: image not found"}],
              "run": {"wall_s": 1.0, "concurrency": 4}}
    text = render_markdown(report)
    assert "> **WARNING: RANDOM WEIGHTS: seeded**" in text and "## Failed pairs (1)" in text
    assert "x.jpg: image not found" in text and "logit scale 14.28 (server)" in text
