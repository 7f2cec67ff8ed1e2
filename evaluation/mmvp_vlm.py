"""``mofserve eval mmvp-vlm``: MMVP-VLM, the CLIP-only variant of MMVP (Tong et al., CVPR 2024).

    mofserve eval mmvp-vlm --data ~/MMVP_VLM --server 127.0.0.1:50051 --out results/mmvp-vlm

The dataset and how it is read from disk: ``mmvp_vlm_dataset.py``.

Scoring, exactly the official script's: the text of question q is ``"a photo of " + statement``;
for each pair, the CLIP image embeddings of its two images (``Embed``) and the CLIP text
embeddings of its two texts (``EmbedText``); each text's logits over the two images are
``logit_scale * cosine`` and a softmax over the two gives its probability for the first image; a
text picks image 1 when that probability is > 0.5, else image 2 (so an exact tie picks image 2, as
``pred = "img1" if score > 0.5 else "img2"``); the pair counts only when the text of ``2k-1`` picks
image ``2k-1`` AND the text of ``2k`` picks image ``2k``. Scores: pair accuracy per visual pattern,
in percent, and their average (the paper's table). ``logit_scale`` (the CLIP checkpoint's
``exp(logit_scale)``, 100 for OpenAI's) comes from the server's ``EmbedText`` answer; it does not
change which image a text picks, only the probabilities reported.

Bad input: the dataset's own errors are ``mmvp_vlm_dataset``'s (``DatasetError``). A pair with a
problem of its own (a missing, empty or undecodable image, an empty statement, a question without
its partner, partners of different patterns, a server error) is not skipped: it counts as wrong,
and its error (naming the file and row) is listed in the report.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mofserve.clients import DEFAULT_TARGET, AsyncMofServeClient, MofServeError
from mofserve.core.machine import machine_info
from mofserve.core.reports import markdown_table, now_iso, number, timestamped_dir, write_csv, write_json, write_text

from .datasets import display_path
from .mmvp import check_client_settings, positive_int
from .mmvp_vlm_dataset import PATTERNS, TEXT_PROMPT, VLMPair, load_mmvp_vlm

# The paper's MMVP-VLM averages (%) (../shared/PAPER.md); per-pattern numbers are not reproduced here.
REFERENCE_AVERAGE = {"OpenAI ViT-L/14": 19.3, "SigLIP SO/14": 37.8, "DFN H/14": 39.3}
DEFAULT_LOGIT_SCALE = 100.0  # OpenAI's trained exp(logit_scale); used only when the server does not say
REPORT_JSON, REPORT_MD, PAIRS_CSV = "report.json", "report.md", "pairs.csv"
RANDOM_WEIGHTS_WARNING = ("RANDOM WEIGHTS: the server runs seeded random weights ({notice}); these scores measure "
                          "nothing about vision and must not be compared with the paper's")
SCORING = ("text = 'a photo of ' + statement; per pair, each text's softmax over the pair's two images of "
           "logit_scale * cosine(text, image); a text picks image 1 when its probability is > 0.5 (else image 2); "
           "the pair counts only when both texts pick their own image (scripts/evaluate_vlm.py)")


# ---- scoring --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairScore:
    probabilities: tuple[float, float]  # P(image 1) for text 1 and for text 2
    picks: tuple[int, int]  # the image (1 or 2) each text picks
    correct: bool  # text 1 picks image 1 and text 2 picks image 2


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)


def score_pair(image_embeds: np.ndarray, text_embeds: np.ndarray, logit_scale: float) -> PairScore:
    """The official rule on one pair: ``image_embeds`` and ``text_embeds`` are ``[2, E]`` (row i
    belongs to question 2k-1+i); see the module doc."""
    images, texts = _unit(image_embeds), _unit(text_embeds)
    if images.shape != (2, images.shape[-1]) or texts.shape != images.shape:
        raise ValueError(f"score_pair: expected two image and two text embeddings of one width, got "
                         f"{images.shape} and {texts.shape}")
    logits = logit_scale * texts @ images.T  # [text, image]
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    first = (float(probs[0, 0]), float(probs[1, 0]))
    picks = (1 if first[0] > 0.5 else 2, 1 if first[1] > 0.5 else 2)
    return PairScore(first, picks, picks == (1, 2))


def summarise(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per visual pattern (in the paper's order, only those present): pairs, correct, failed and
    pair accuracy (%); ``average``: the mean of the per-pattern accuracies (the paper's Average);
    ``overall``: correct pairs / all pairs. A failed pair counts as wrong."""
    per_pattern: dict[str, dict[str, Any]] = {}
    for pattern in PATTERNS:
        rows = [r for r in results if r["pattern"] == pattern]
        if rows:
            correct = sum(bool(r["correct"]) for r in rows)
            per_pattern[pattern] = {"pairs": len(rows), "correct": correct,
                                    "failed": sum(r["error"] is not None for r in rows),
                                    "accuracy": 100.0 * correct / len(rows)}
    total, correct = len(results), sum(bool(r["correct"]) for r in results)
    accuracies = [v["accuracy"] for v in per_pattern.values()]
    return {"per_pattern": per_pattern, "average": sum(accuracies) / len(accuracies) if accuracies else None,
            "pairs": total, "correct": correct, "failed": sum(r["error"] is not None for r in results),
            "overall": 100.0 * correct / total if total else None,
            "patterns_missing": [p for p in PATTERNS if p not in per_pattern]}


# ---- the run -------------------------------------------------------------------------------------------


@dataclass
class VLMConfig:
    data: Path
    server: str = DEFAULT_TARGET
    out: Path | None = None
    concurrency: int = 4
    timeout: float = 300.0
    logit_scale: float | None = None  # None: the server's
    progress: bool = True

    def __post_init__(self) -> None:
        check_client_settings(self.concurrency, self.timeout)
        if self.logit_scale is not None and not self.logit_scale > 0:
            raise ValueError(f"--logit-scale: must be positive, got {self.logit_scale}")


@dataclass
class VLMRun:
    out: Path
    report: dict[str, Any]
    paths: dict[str, Path]


def _pair_record(pair: VLMPair, root: Path) -> dict[str, Any]:
    return {"pair": pair.pair, "pattern": pair.pattern, "qid1": pair.qids[0], "qid2": pair.qids[1],
            "line1": pair.lines[0], "line2": pair.lines[1], "text1": pair.texts[0], "text2": pair.texts[1],
            "image1": display_path(pair.images[0], root) if pair.images[0] else None,
            "image2": display_path(pair.images[1], root) if pair.images[1] else None,
            "p_image1_text1": None, "p_image1_text2": None, "pick1": None, "pick2": None, "correct": False,
            "error": pair.error}


async def _embed_pair(client: AsyncMofServeClient, pair: VLMPair, timeout: float) -> tuple[np.ndarray, np.ndarray,
                                                                                              float | None]:
    images = [path.read_bytes() for path in pair.images if path is not None]
    embedded, texts = await asyncio.gather(client.embed(images, timeout=timeout),
                                           client.embed_text(list(pair.texts), timeout=timeout))
    return embedded.clip, texts.embeddings, texts.logit_scale


async def run_mmvp_vlm_async(config: VLMConfig, log=None) -> VLMRun:
    log = log or (lambda message: print(message, file=sys.stderr))
    started = time.perf_counter()
    dataset = load_mmvp_vlm(config.data)
    out = Path(config.out) if config.out else timestamped_dir("mmvp-vlm")
    out.mkdir(parents=True, exist_ok=True)
    records = {p.pair: _pair_record(p, dataset.root) for p in dataset.pairs}
    bad = [p for p in dataset.pairs if p.error]
    if bad:
        log(f"mofserve eval mmvp-vlm: {len(bad)} pair(s) cannot be scored (counted as wrong), e.g. {bad[0].error}")
    scales: set[float] = set()
    warnings: list[str] = []
    async with AsyncMofServeClient(config.server, timeout=config.timeout) as client:
        info = await client.server_info(timeout=min(config.timeout, 30.0))
        if info.provenance.random_weights:
            warnings.append(RANDOM_WEIGHTS_WARNING.format(notice=info.provenance.notice
                                                          or f"profile {info.provenance.profile}"))
            log("mofserve eval mmvp-vlm: WARNING: " + warnings[-1])
        semaphore = asyncio.Semaphore(config.concurrency)
        done = 0

        async def one(pair: VLMPair) -> None:
            nonlocal done
            record = records[pair.pair]
            async with semaphore:
                try:
                    images, texts, server_scale = await _embed_pair(client, pair, config.timeout)
                except MofServeError as error:
                    record["error"] = f"server: {error} (pair {pair.pair}: qid {pair.qids[0]}, {pair.qids[1]})"
                    return
                except OSError as error:
                    record["error"] = f"cannot read an image of pair {pair.pair} ({error})"
                    return
            if server_scale is not None:
                scales.add(server_scale)
            scale = config.logit_scale or server_scale or DEFAULT_LOGIT_SCALE
            result = score_pair(images, texts, scale)
            record.update(p_image1_text1=result.probabilities[0], p_image1_text2=result.probabilities[1],
                          pick1=result.picks[0], pick2=result.picks[1], correct=result.correct)
            done += 1
            if config.progress and done % 25 == 0:
                log(f"mofserve eval mmvp-vlm: {done} pair(s) scored")

        await asyncio.gather(*(one(p) for p in dataset.pairs if p.error is None))

    if config.logit_scale is not None:
        scale, source = config.logit_scale, "--logit-scale"
    elif scales:
        scale, source = next(iter(scales)), "server (EmbedText.logit_scale: the CLIP checkpoint's exp(logit_scale))"
    else:
        scale, source = DEFAULT_LOGIT_SCALE, "default (OpenAI's 100; the server did not say)"
        warnings.append("the server reported no logit scale; probabilities use OpenAI CLIP's 100 (the picks, and so "
                        "the scores, do not depend on it)")
    results = [records[p.pair] for p in dataset.pairs]
    failures = [{"pair": r["pair"], "qid1": r["qid1"], "qid2": r["qid2"], "pattern": r["pattern"],
                 "error": r["error"]} for r in results if r["error"]]
    if failures:
        log(f"mofserve eval mmvp-vlm: {len(failures)} pair(s) failed and count as wrong (listed in the report)")
    summary = summarise(results)
    if summary["patterns_missing"]:
        warnings.append(f"{len(summary['patterns_missing'])} of the 9 visual patterns have no pairs in this dataset "
                        f"({', '.join(summary['patterns_missing'])}); the average is over the others")
    report = {
        "benchmark": "MMVP-VLM", "created": now_iso(), "warnings": warnings,
        "server": {"target": config.server, "version": info.version, "provenance": asdict(info.provenance)},
        "dataset": {"path": str(dataset.root), "questions_csv": str(dataset.questions_csv),
                    "images_dir": str(dataset.images_dir), "questions": dataset.questions,
                    "pairs": len(dataset.pairs)},
        "scoring": {"rule": SCORING, "text_prompt": TEXT_PROMPT + "{statement}", "logit_scale": scale,
                    "logit_scale_source": source, "image_embedding": "Embed: CLIP image_embeds (CLIP_EMBEDS)",
                    "text_embedding": "EmbedText: CLIP text_embeds (TEXT_EMBEDS)"},
        "results": summary,
        "reference": {"source": "Tong et al., Eyes Wide Shut? (CVPR 2024), MMVP-VLM average pair accuracy (%)",
                      "average": REFERENCE_AVERAGE},
        "failures": failures,
        "pairs": results,
        "run": {"concurrency": config.concurrency, "timeout_s": config.timeout,
                "wall_s": time.perf_counter() - started, "out": str(out)},
        "machine": machine_info(),
    }
    paths = {"report_json": out / REPORT_JSON, "report_md": out / REPORT_MD, "pairs_csv": out / PAIRS_CSV}
    write_json(paths["report_json"], report)
    write_text(paths["report_md"], render_markdown(report))
    write_csv(paths["pairs_csv"], list(results[0]) if results else [], results)
    return VLMRun(out, report, paths)


def run_mmvp_vlm(config: VLMConfig, log=None) -> VLMRun:
    return asyncio.run(run_mmvp_vlm_async(config, log))


# ---- the report ----------------------------------------------------------------------------------------


def _model_label(report: Mapping[str, Any]) -> str:
    prov = report["server"]["provenance"]
    return f"mofserve CLIP ({prov['profile']}{', random weights' if prov['random_weights'] else ''})"


def score_table(report: Mapping[str, Any]) -> str:
    """The paper's table: pair accuracy (%) per visual pattern and the average, this server first,
    then the paper's reference averages."""
    results = report["results"]
    ours = [_model_label(report), *(number(results["per_pattern"][p]["accuracy"]) if p in results["per_pattern"]
                                    else "-" for p in PATTERNS), number(results["average"])]
    references = [[f"{name} (paper)", *("-" for _ in PATTERNS), number(value)]
                  for name, value in report["reference"]["average"].items()]
    return markdown_table(["model", *PATTERNS, "Average"], [ours, *references])


def render_markdown(report: Mapping[str, Any]) -> str:
    ds, server, scoring, results = report["dataset"], report["server"], report["scoring"], report["results"]
    prov = server["provenance"]
    out = [f"# MMVP-VLM results ({report['created']})", ""]
    for warning in report["warnings"]:
        out += [f"> **WARNING: {warning}**" if warning.startswith("RANDOM") else f"> **Note:** {warning}", ""]
    out += [f"- server: `{server['target']}`, mofserve {server['version']}, profile `{prov['profile']}`"
            f"{' (random weights)' if prov['random_weights'] else ''}",
            f"- dataset: `{ds['path']}`: {ds['questions']} statements, {ds['pairs']} pairs",
            f"- text: `{scoring['text_prompt']}`; logit scale {scoring['logit_scale']:g} "
            f"({scoring['logit_scale_source']})", ""]
    out += ["## Pair accuracy (%) per visual pattern", "",
            "A pair counts only when both texts pick their own image; a failed pair counts as wrong. "
            "The paper gives per-pattern numbers only in its figure; its averages are shown.", "",
            score_table(report), ""]
    rows = [[p, v["pairs"], v["correct"], v["failed"], number(v["accuracy"])]
            for p, v in results["per_pattern"].items()]
    rows.append(["all", results["pairs"], results["correct"], results["failed"], number(results["overall"])])
    out += ["## Counts", "", markdown_table(["visual pattern", "pairs", "correct", "failed", "accuracy (%)"], rows), ""]
    out += ["## Scoring", "", scoring["rule"] + ".", ""]
    if report["failures"]:
        out += [f"## Failed pairs ({len(report['failures'])})", ""]
        out += [markdown_table(["pair", "qids", "pattern", "error"],
                               [[f["pair"], f"{f['qid1']}, {f['qid2']}", f["pattern"], f["error"]]
                                for f in report["failures"][:100]], "llll")]
        if len(report["failures"]) > 100:
            out.append(f"\n... and {len(report['failures']) - 100} more ({PAIRS_CSV}, column error)")
        out.append("")
    out.append(f"Run: {report['run']['wall_s']:.1f} s, {report['run']['concurrency']} pair(s) in flight.")
    return "\n".join(out) + "\n"


# ---- command line --------------------------------------------------------------------------------------


def arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``mofserve eval mmvp-vlm``."""
    parser.add_argument("--data", type=Path, required=True,
                        help="MMVP-VLM folder: Questions.csv (Question ID,Type,Statement) and "
                             "'MLLM_VLM Images/<Type>/<qid>.jpg'")
    parser.add_argument("--server", default=DEFAULT_TARGET, help=f"gRPC address (default {DEFAULT_TARGET})")
    parser.add_argument("--out", type=Path, help="output folder (default results/mmvp-vlm-<timestamp>)")
    parser.add_argument("--concurrency", type=positive_int, default=4, help="pairs in flight (default 4)")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline per request, seconds (default 300)")
    parser.add_argument("--logit-scale", type=float,
                        help="CLIP's exp(logit_scale) for the reported probabilities (default: the server's, from "
                             "the checkpoint; it never changes a pick)")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    """``mofserve eval mmvp-vlm``: score the server's CLIP and write the report the flags describe."""
    config = VLMConfig(data=args.data, server=args.server, out=args.out, concurrency=args.concurrency,
                       timeout=args.timeout, logit_scale=args.logit_scale, progress=not args.no_progress)
    try:
        result = run_mmvp_vlm(config)
    except MofServeError as error:
        print(f"mofserve eval mmvp-vlm: server {config.server}: {error}", file=sys.stderr)
        return 1
    print(score_table(result.report))
    for warning in result.report["warnings"]:
        print(f"{'WARNING' if warning.startswith('RANDOM') else 'note'}: {warning}", file=sys.stderr)
    print(f"wrote {result.paths['report_md']}, {result.paths['report_json']}, {result.paths['pairs_csv']}")
    return 0
