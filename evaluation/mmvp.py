"""``mofserve eval mmvp``: the MMVP benchmark (Tong et al., CVPR 2024) against a running server.

    mofserve eval mmvp --data ~/MMVP --mode clip --mode interleaved --mode additive --alpha 0.5

Each row of ``Questions.csv`` is asked about its image through the gRPC client (one ``Ask`` per
row, or one ``Compare`` for several modes, so the encoders see the image once), ``--concurrency``
requests at a time, each with a deadline of ``--timeout`` seconds, greedy decoding (no sampling
parameter is sent). The server builds the official prompt, LLaVA-1.5's ``llava_v1`` template
around ``Question + " " + Options``, from the question and the options sent as they are written.

Grading (both are reported, per mode):
- **generated**: the generated answer is mapped to an option with
  ``mofserve.core.conversation.answer_to_letter`` (an option marker, a leading letter, "the answer
  is X", or the option's text) and is right when that is the correct option: the reproducible
  letter-or-text matching of Cambrian and lmms-eval;
- **likelihood**: the server's ``chosen_option`` (the option label with the highest mean
  log-probability as the assistant's reply) is the correct option;
- **judge** (only with ``--judge-url``): the official grader's yes/no question to an LLM.

Scores: question accuracy and pair accuracy (pair p = Index 2p-1 and 2p, right only when both
are; 150 pairs on the full set), in percent; an item that failed (bad dataset row, unreadable
image, server error) counts as wrong and is listed. ``--fix-labels`` also scores with the known
label errors fixed (see ``datasets.LABEL_FIX_PAIRS``), beside the released labels.

Resume: every answer is appended to ``<out>/answers.jsonl`` as it arrives; a rerun with the same
``--out`` asks only what has no answer yet (failed requests are retried; an answer is reused only
for the same question, options, image bytes, mode, alpha and ``--max-new-tokens``, and only from a
server with the same profile and model versions).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mofserve.clients import DEFAULT_TARGET, AsyncMofServeClient, MofServeError
from mofserve.clients.results import ServerInfo
from mofserve.core.reports import now_iso, timestamped_dir, write_csv, write_json, write_text

from .checkpoint import JsonlCheckpoint
from .datasets import MMVPItem, load_mmvp
from .judge import JUDGE_SYSTEM, JUDGE_TEMPERATURE, JudgeClient, judge_question, parse_judge_reply
from .mmvp_report import (
    RANDOM_WEIGHTS_WARNING,
    answer_columns,
    answer_rows,
    build_report,
    render_markdown,
    summary_lines,
)
from .mmvp_scoring import (
    ModeSpec,
    answer_record,
    check_provenance,
    is_answer,
    judge_work,
    mode_specs,
    parse_mode,
    pending_work,
    provenance_dict,
    select_judgements,
    select_records,
)
from .progress import progress_bar

ANSWERS_JSONL = "answers.jsonl"
JUDGEMENTS_JSONL = "judgements.jsonl"
ANSWERS_CSV = "answers.csv"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"

BOTH_ENCODERS = ("additive", "interleaved")  # modes that need CLIP and DINOv2 features


# ---- asking -------------------------------------------------------------------------------------------


def compare_order(specs: Sequence[ModeSpec]) -> list[ModeSpec]:
    """A mode that runs both encoders first: Compare runs its first mode alone and the others from
    the encoders' feature cache, so each encoder then sees the image once."""
    return sorted(specs, key=lambda s: s.mode not in BOTH_ENCODERS)


async def ask_item(client: AsyncMofServeClient, item: MMVPItem, specs: Sequence[ModeSpec], *,
                   max_new_tokens: int | None, timeout: float, provenance: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Ask one item in ``specs`` (Ask for one mode, Compare for several); never raises."""
    try:
        image = item.image.read_bytes()
        if len(specs) == 1:
            spec = specs[0]
            results = [await client.ask(image, item.question, item.options, mode=spec.mode, alpha=spec.alpha,
                                        max_new_tokens=max_new_tokens, timeout=timeout)]
        else:
            specs = compare_order(specs)
            results = await client.compare(image, item.question, item.options, modes=[s.selection for s in specs],
                                           max_new_tokens=max_new_tokens, timeout=timeout)
        if len(results) != len(specs):
            raise RuntimeError(f"the server answered {len(results)} modes for {len(specs)} asked")
    except MofServeError as error:
        message = f"{error.code.name}: {error.message}"
        return [answer_record(item, s, max_new_tokens, provenance, error=message) for s in specs]
    except Exception as error:  # a failed item is recorded, the run goes on
        message = f"{type(error).__name__}: {error}"
        return [answer_record(item, s, max_new_tokens, provenance, error=message) for s in specs]
    return [answer_record(item, s, max_new_tokens, provenance, result=r) for s, r in zip(specs, results, strict=True)]


async def ask_all(client: AsyncMofServeClient, work: Sequence[tuple[MMVPItem, list[ModeSpec]]],
                  checkpoint: JsonlCheckpoint, *, concurrency: int, timeout: float, max_new_tokens: int | None,
                  provenance: Mapping[str, Any], progress: bool = True) -> dict[str, int]:
    """Ask every (item, modes) of ``work``, at most ``concurrency`` at a time, appending each
    answer to ``checkpoint`` as it arrives. Returns request and failure counts."""
    semaphore = asyncio.Semaphore(concurrency)
    counts = {"requests": 0, "failed_requests": 0}
    bar = progress_bar(total=len(work), desc="MMVP", unit="q", enabled=progress and bool(work))

    async def one(item: MMVPItem, specs: list[ModeSpec]) -> None:
        async with semaphore:
            records = await ask_item(client, item, specs, max_new_tokens=max_new_tokens, timeout=timeout,
                                     provenance=provenance)
        counts["requests"] += 1
        counts["failed_requests"] += bool(records[0]["error"])
        for record in records:
            checkpoint.append(record)
        bar.update(1)

    try:
        await asyncio.gather(*(one(item, specs) for item, specs in work))
    finally:
        bar.close()
    return counts


async def judge_all(judge: JudgeClient, work: Sequence[tuple[MMVPItem, ModeSpec, str]],
                    checkpoint: JsonlCheckpoint, *, concurrency: int, progress: bool = True) -> int:
    semaphore = asyncio.Semaphore(concurrency)
    bar = progress_bar(total=len(work), desc="judge", unit="q", enabled=progress and bool(work))

    async def one(item: MMVPItem, spec: ModeSpec, answer: str) -> None:
        reply, error = None, None
        async with semaphore:
            try:
                reply = await judge.reply(item.prompt, item.correct, answer)
            except Exception as exc:  # recorded; the item counts as failed under the judge rule
                error = f"{type(exc).__name__}: {exc}"
        checkpoint.append({"index": item.index, "mode_key": spec.key, "correct": item.correct, "answer": answer,
                           "model": judge.model, "reply": reply, "verdict": parse_judge_reply(reply),
                           "error": error, "at": now_iso()})
        bar.update(1)

    try:
        await asyncio.gather(*(one(*entry) for entry in work))
    finally:
        bar.close()
    return len(work)


# ---- the run --------------------------------------------------------------------------------------


@dataclass
class MMVPConfig:
    data: Path
    specs: list[ModeSpec]
    server: str = DEFAULT_TARGET
    out: Path | None = None
    concurrency: int = 4
    timeout: float = 300.0
    max_new_tokens: int | None = None
    fix_labels: bool = False
    limit: int | None = None
    judge_url: str | None = None
    judge_model: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        check_client_settings(self.concurrency, self.timeout)
        if bool(self.judge_url) != bool(self.judge_model):
            raise ValueError("--judge-url and --judge-model go together")


@dataclass
class MMVPRun:
    out: Path
    report: dict[str, Any]
    paths: dict[str, Path]


def check_server(info: ServerInfo, specs: Sequence[ModeSpec], max_new_tokens: int | None, server: str) -> None:
    """Refuse, before asking anything, what the server would refuse for every item."""
    unknown = [s.key for s in specs if s.mode not in info.modes]
    if unknown:
        raise ValueError(f"--mode: the server at {server} does not serve {', '.join(unknown)} "
                         f"(it serves {', '.join(info.modes)})")
    most = info.limits.get("max_compare_modes")
    if most and len(specs) > most:
        raise ValueError(f"--mode: {len(specs)} modes, but the server at {server} compares at most {most} at once")
    limit = info.limits.get("max_new_tokens")
    if max_new_tokens and limit and max_new_tokens > limit:
        raise ValueError(f"--max-new-tokens: {max_new_tokens} is over the server's limit of {limit}")


async def run_mmvp_async(config: MMVPConfig, log=None) -> MMVPRun:
    log = log or (lambda message: print(message, file=sys.stderr))
    started = time.perf_counter()
    dataset = load_mmvp(config.data, config.limit)
    label_sets: dict[str, Sequence[MMVPItem]] = {"raw": dataset.items}
    fixes = None
    if config.fix_labels:
        label_sets["fixed"], fixes = dataset.label_fixed()
    out = Path(config.out) if config.out else timestamped_dir("mmvp")
    out.mkdir(parents=True, exist_ok=True)
    bad_items = sum(item.error is not None for item in dataset.items)
    if bad_items:
        log(f"mofserve eval mmvp: {bad_items} item(s) cannot be asked (counted as failed), e.g. "
            f"{next(i.error for i in dataset.items if i.error)}")

    async with AsyncMofServeClient(config.server, timeout=config.timeout) as client:
        info = await client.server_info(timeout=min(config.timeout, 30.0))
        check_server(info, config.specs, config.max_new_tokens, config.server)
        provenance = provenance_dict(info.provenance)
        if info.provenance.random_weights:
            log("mofserve eval mmvp: WARNING: " + RANDOM_WEIGHTS_WARNING.format(
                notice=info.provenance.notice or f"profile {info.provenance.profile}"))
        with JsonlCheckpoint(out / ANSWERS_JSONL) as checkpoint:
            previous = checkpoint.load()
            if checkpoint.bad_lines:
                log(f"mofserve eval mmvp: {checkpoint.path}: skipped unreadable line(s) {checkpoint.bad_lines}")
            check_provenance(previous, provenance, checkpoint.path)
            chosen = select_records(previous, dataset.items, config.specs, config.max_new_tokens)
            reused = sum(is_answer(r) for r in chosen.values())
            work = pending_work(dataset.items, config.specs, chosen)
            if reused:
                log(f"mofserve eval mmvp: resuming {out}: {reused} answer(s) done, {len(work)} question(s) to ask")
            counts = await ask_all(client, work, checkpoint, concurrency=config.concurrency, timeout=config.timeout,
                                   max_new_tokens=config.max_new_tokens, provenance=provenance,
                                   progress=config.progress)
            answers = select_records(checkpoint.load(), dataset.items, config.specs, config.max_new_tokens)

    judgements = None
    judged = 0
    if config.judge_url:
        judge = JudgeClient(config.judge_url, config.judge_model, timeout=config.timeout)
        try:
            with JsonlCheckpoint(out / JUDGEMENTS_JSONL) as checkpoint:
                previous = select_judgements(checkpoint.load(), config.judge_model)
                work = judge_work(label_sets, config.specs, answers, previous)
                judged = await judge_all(judge, work, checkpoint, concurrency=config.concurrency,
                                         progress=config.progress)
                judgements = select_judgements(checkpoint.load(), config.judge_model)
        finally:
            await judge.close()

    settings = {
        "modes": [s.key for s in config.specs], "alpha": next((s.alpha for s in config.specs if s.alpha is not None),
                                                               None),
        "concurrency": config.concurrency, "timeout_s": config.timeout, "max_new_tokens": config.max_new_tokens,
        "decoding": "greedy (the server's default: no sampling parameter sent)",
        "prompt": "llava_v1 template around Question + ' ' + Options, built by the server",
        "limit": config.limit, "fix_labels": config.fix_labels,
        "judge": None if not config.judge_url else {"url": config.judge_url, "model": config.judge_model,
                                                    "system": JUDGE_SYSTEM, "temperature": JUDGE_TEMPERATURE,
                                                    "question": judge_question("{prompt}", "{correct}",
                                                                               "{response}")},
    }
    run = {**counts, "reused_answers": reused, "judged": judged, "wall_s": time.perf_counter() - started,
           "out": str(out)}
    report = build_report(dataset=dataset, label_sets=label_sets, fixes=fixes, specs=config.specs, answers=answers,
                          judgements=judgements, server=config.server, server_info=info, settings=settings, run=run)
    paths = {"answers_csv": out / ANSWERS_CSV, "report_json": out / REPORT_JSON, "report_md": out / REPORT_MD,
             "answers_jsonl": out / ANSWERS_JSONL}
    write_csv(paths["answers_csv"], answer_columns(), answer_rows(label_sets, config.specs, answers, judgements))
    write_json(paths["report_json"], report)
    write_text(paths["report_md"], render_markdown(report))
    return MMVPRun(out, report, paths)


def run_mmvp(config: MMVPConfig, log=None) -> MMVPRun:
    return asyncio.run(run_mmvp_async(config, log))


# ---- command line ------------------------------------------------------------------------------------


def check_client_settings(concurrency: int, timeout: float) -> None:
    """The settings every evaluator's client loop shares, checked before any request is sent."""
    if concurrency < 1:
        raise ValueError(f"--concurrency: must be at least 1, got {concurrency}")
    if not timeout > 0:
        raise ValueError(f"--timeout: must be positive, got {timeout}")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _mode_arg(text: str) -> ModeSpec:
    try:
        return parse_mode(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``mofserve eval mmvp``."""
    parser.add_argument("--data", type=Path, required=True,
                        help="MMVP folder: 'MMVP Images/1.jpg..300.jpg' and Questions.csv")
    parser.add_argument("--mode", dest="modes", type=_mode_arg, action="append", required=True, metavar="MODE",
                        help="clip, dinov2, additive, interleaved or additive:ALPHA; repeat for several "
                             "(asked together with Compare: the encoders run once per image)")
    parser.add_argument("--alpha", type=float, help="DINOv2 proportion for --mode additive, in [0, 1] "
                                                    "(default: the server's)")
    parser.add_argument("--server", default=DEFAULT_TARGET, help=f"gRPC address (default {DEFAULT_TARGET})")
    parser.add_argument("--out", type=Path, help="output folder (default results/mmvp-<timestamp>); "
                                                 "rerun with the same folder to resume")
    parser.add_argument("--concurrency", type=positive_int, default=4, help="requests in flight (default 4)")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline per request, seconds (default 300)")
    parser.add_argument("--max-new-tokens", type=positive_int, help="answer length limit (default: the server's)")
    parser.add_argument("--fix-labels", action="store_true",
                        help="also score with the known label errors fixed (Correct Answer of Index 99<->100 and "
                             "279<->280 swapped); both raw and fixed scores are reported")
    parser.add_argument("--limit", type=positive_int, help="only the first N rows of Questions.csv")
    parser.add_argument("--judge-url", help="OpenAI-compatible base URL of an optional LLM judge "
                                            "(key from OPENAI_API_KEY)")
    parser.add_argument("--judge-model", help="the judge's model name (with --judge-url)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    """``mofserve eval mmvp``: ask, score and write the report the flags describe."""
    config = MMVPConfig(data=args.data, specs=mode_specs(args.modes, args.alpha), server=args.server, out=args.out,
                        concurrency=args.concurrency, timeout=args.timeout, max_new_tokens=args.max_new_tokens,
                        fix_labels=args.fix_labels, limit=args.limit, judge_url=args.judge_url,
                        judge_model=args.judge_model, progress=not args.no_progress)
    try:
        result = run_mmvp(config)
    except MofServeError as error:
        print(f"mofserve eval mmvp: server {config.server}: {error}", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(result.report)))
    for warning in result.report["warnings"]:
        print(f"{'WARNING' if warning.startswith('RANDOM') else 'note'}: {warning}", file=sys.stderr)
    print(f"wrote {result.paths['report_md']}, {result.paths['report_json']}, {result.paths['answers_csv']}")
    return 0
