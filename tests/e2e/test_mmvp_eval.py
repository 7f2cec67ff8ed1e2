"""``mofserve eval mmvp`` end to end: the evaluator (through the CLI, as a user runs it) against the
real gRPC front-end on the session's Triton (tiny profile), on a synthetic 8-row MMVP folder in the
official layout with one unreadable image.

The front-end runs on ``loop_thread``'s loop, as in ``mofserve serve``; the evaluator runs its own
asyncio client from this thread. Requests are counted with the front-end's own metrics.
"""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest

from mofserve.cli import main
from tests.unit.test_mmvp_eval import NOTICE, write_mmvp

pytestmark = pytest.mark.integration


def grpc_requests(metrics) -> Counter:
    """Requests the gRPC front-end answered so far, by RPC name."""
    counts: Counter = Counter()
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "mofserve_requests_total" and sample.labels["transport"] == "grpc":
                counts[sample.labels["method"]] += sample.value
    return counts


def asked(metrics, before: Counter) -> dict[str, float]:
    now = grpc_requests(metrics)
    return {method: now[method] - before[method] for method in ("Ask", "Compare")}


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_mmvp_eval_writes_every_output_and_a_rerun_resumes_without_asking_again(served, metrics, tmp_path, capsys):
    data = write_mmvp(tmp_path / "MMVP", bad_images=(8,))
    out = tmp_path / "results"
    argv = ["eval", "mmvp", "--data", str(data), "--mode", "clip", "--mode", "additive", "--alpha", "0.5",
            "--server", served.target, "--out", str(out), "--concurrency", "3", "--max-new-tokens", "8",
            "--timeout", "60", "--fix-labels", "--no-progress"]

    # first run: one Compare per readable image (7), both modes in it
    before = grpc_requests(metrics)
    assert main(argv) == 0
    assert asked(metrics, before) == {"Ask": 0, "Compare": 7}
    printed = capsys.readouterr()
    assert "| clip |" in printed.out and "| additive:0.5 |" in printed.out
    assert "WARNING: RANDOM WEIGHTS" in printed.err

    for name in ("answers.jsonl", "answers.csv", "report.json", "report.md"):
        assert (out / name).is_file(), name
    records = jsonl(out / "answers.jsonl")
    assert len(records) == 14 and {(r["index"], r["mode_key"]) for r in records} == {
        (i, m) for i in range(1, 8) for m in ("clip", "additive:0.5")}
    for r in records:
        assert r["error"] is None and isinstance(r["answer"], str)
        assert r["chosen_option"] in {"a", "b"} and len(r["option_scores"]) == 2
        assert r["provenance"]["random_weights"] and r["timings"]["llm_ms"] > 0
        assert r["alpha"] == (0.5 if r["mode"] == "additive" else None)

    rows = list(csv.DictReader((out / "answers.csv").open(encoding="utf-8")))
    assert len(rows) == 16 and [(r["index"], r["mode"]) for r in rows[:2]] == [("1", "clip"), ("1", "additive:0.5")]
    for r in rows:
        if r["index"] == "8":
            assert r["error"].startswith("MMVP Images/8.jpg: cannot decode the image")
            assert r["generated_correct"] == r["likelihood_correct"] == "" and r["answer"] == ""
        else:
            assert r["error"] == "" and r["parsed_letter"] in {"a", "b", ""} and r["likelihood_letter"] in {"a", "b"}
            assert r["generated_correct"] == str(int(r["parsed_letter"] == r["correct_letter"]))
            assert r["likelihood_correct"] == str(int(r["likelihood_letter"] == r["correct_letter"]))
            assert r["fixed_correct"] == r["correct"]  # rows 99/100, 279/280 are not in this dataset

    report = json.loads((out / "report.json").read_text())
    assert report["random_weights"] is True and report["warnings"][0].startswith("RANDOM WEIGHTS")
    assert NOTICE in report["warnings"][0]
    assert report["server"]["provenance"]["profile"] == "tiny" and report["server"]["target"] == served.target
    assert report["dataset"]["questions"] == 8 and report["dataset"]["pairs"] == 4
    assert [m["key"] for m in report["modes"]] == ["clip", "additive:0.5"] and report["modes"][1]["alpha"] == 0.5
    assert report["labels"]["sets"] == ["raw", "fixed"]
    assert report["labels"]["fixes"]["changes"] == [] and len(report["labels"]["fixes"]["skipped"]) == 2
    assert report["machine"]["logical_cpus"] and report["settings"]["max_new_tokens"] == 8
    assert report["run"]["requests"] == 7 and report["run"]["reused_answers"] == 0
    for key in ("clip", "additive:0.5"):
        scores = report["scores"]["raw"][key]
        mine = [r for r in rows if r["mode"] == key]
        for rule in ("generated", "likelihood"):
            s = scores[rule]
            right = {int(r["index"]) for r in mine if r[f"{rule}_correct"] == "1"}
            assert s["questions"] == 8 and s["questions_correct"] == len(right)
            assert s["failed"] == [8] and s["failed_pairs"] == [[7, 8]] and s["pairs"] == 4
            assert s["pairs_correct"] == sum({2 * p - 1, 2 * p} <= right for p in range(1, 5))
            assert s["pair_accuracy"] == 100.0 * s["pairs_correct"] / 4
        assert scores["answered"] == 7 and scores["errors"][0]["index"] == 8
        assert report["scores"]["fixed"][key] == scores
    md = (out / "report.md").read_text()
    assert "> **WARNING: RANDOM WEIGHTS" in md and "| Human | 95.7 |" in md and "| LLaVA-1.5 | 24.7 |" in md

    # second run, same --out: everything is answered, nothing is asked, the same scores come out
    before = grpc_requests(metrics)
    assert main(argv) == 0
    assert asked(metrics, before) == {"Ask": 0, "Compare": 0}
    assert len(jsonl(out / "answers.jsonl")) == 14
    again = json.loads((out / "report.json").read_text())
    assert again["run"]["requests"] == 0 and again["run"]["reused_answers"] == 14
    assert again["scores"] == report["scores"]
    assert "resuming" in capsys.readouterr().err

    # a third mode on the same --out: only it is asked (one Ask per readable image)
    before = grpc_requests(metrics)
    assert main([*argv, "--mode", "interleaved"]) == 0
    assert asked(metrics, before) == {"Ask": 7, "Compare": 0}
    final = json.loads((out / "report.json").read_text())
    assert [m["key"] for m in final["modes"]] == ["clip", "additive:0.5", "interleaved"]
    assert final["scores"]["raw"]["clip"] == report["scores"]["raw"]["clip"]
    assert len(jsonl(out / "answers.jsonl")) == 21
