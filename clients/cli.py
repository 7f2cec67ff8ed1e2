"""``mofserve ask``: one question about one image, in one fusion mode or compared across several.

    mofserve ask --image dog.jpg --question "Which way is the dog facing?" --options "(a) Left (b) Right"
    mofserve ask --image dog.jpg --question "..." --compare clip dinov2 additive interleaved --alpha 0.5
    mofserve ask --image dog.jpg --question "Describe the dog." --stream   # tokens as they come
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import grpc

from .client import ALL_MODES, DEFAULT_MODE, DEFAULT_TARGET, MofServeClient, MofServeError
from .results import AskResult, TokenDelta

STAGES = (("preprocess", "preprocess_ms"), ("encoders", "encoders_ms"), ("clip", "clip_ms"),
          ("dinov2", "dinov2_ms"), ("fusion", "fusion_ms"), ("llm", "llm_ms"), ("total", "total_ms"))
ANSWER_WIDTH = 60


def arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``mofserve ask``."""
    parser.add_argument("--image", required=True, help="image file (JPEG, PNG, WebP, GIF, BMP, TIFF)")
    parser.add_argument("--question", required=True, help="the question about the image")
    parser.add_argument("--options", help='MMVP-style options, e.g. "(a) Open (b) Closed"')
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--mode", default=DEFAULT_MODE, choices=ALL_MODES,
                       help=f"fusion mode (default {DEFAULT_MODE})")
    which.add_argument("--compare", nargs="+", metavar="MODE", choices=ALL_MODES,
                       help="answer with each of these modes (the encoders see the image once)")
    parser.add_argument("--alpha", type=float, help="DINOv2 proportion of the additive mode, in [0, 1]")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float, help="0 = greedy (the default)")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--server", default=DEFAULT_TARGET, help=f"gRPC address (default {DEFAULT_TARGET})")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds (default 300)")
    parser.add_argument("--token", help="bearer token of a server with auth on (default: $MOFSERVE_AUTH_TOKEN; "
                                        "prefer the variable: a command line is visible to other users)")
    parser.add_argument("--ca-cert", help="PEM CA certificate to verify a TLS server with (implies --tls)")
    parser.add_argument("--tls", action="store_true", help="dial TLS, verifying with the system's roots")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--stream", action="store_true",
                        help="print the answer's tokens as they are generated (one mode; not with --compare), "
                             "then the usual table (or JSON)")


def _mode(result: AskResult) -> str:
    return result.mode if result.alpha is None else f"{result.mode}({result.alpha:g})"


def _short(text: str, width: int = ANSWER_WIDTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def format_table(results: Sequence[AskResult]) -> str:
    """A row per answer: mode, chosen option, per-stage milliseconds, then the answer."""
    header = ["mode", "option", *(f"{name} ms" for name, _ in STAGES), "tokens", "finish", "answer"]
    rows = [[_mode(r), r.chosen_option or "-", *(f"{getattr(r.timings, attr):.1f}" for _, attr in STAGES),
             f"{r.usage.prompt_tokens}+{r.usage.completion_tokens}", r.finish_reason or "-",
             _short(r.answer) if len(results) > 1 else r.answer] for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths,
                                                                                           strict=False))]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(lines)


def stream_answer(client: MofServeClient, args: argparse.Namespace, generation: dict, out=None) -> AskResult:
    """Writes the answer's text to ``out`` (default stdout) as it comes; returns the final result."""
    out = out or sys.stdout
    result: AskResult | None = None
    for item in client.ask_stream(args.image, args.question, args.options, mode=args.mode, alpha=args.alpha,
                                  **generation):
        if isinstance(item, TokenDelta):
            out.write(item.text)
            out.flush()
        else:
            result = item
    out.write("\n")
    if result is None:  # the server always ends a stream with the result; a broken one raised already
        raise MofServeError(grpc.StatusCode.UNKNOWN, "ask_stream: the stream ended without a final result")
    return result


def run(args: argparse.Namespace) -> int:
    """``mofserve ask``: answer in one mode (or each of ``--compare``'s), print a table or JSON; 2 on bad flags."""
    generation = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                  "seed": args.seed}
    if getattr(args, "stream", False) and args.compare:
        print("mofserve ask: --stream answers with one mode; leave out --compare", file=sys.stderr)
        return 2
    try:
        with MofServeClient(args.server, timeout=args.timeout, token=args.token, tls=args.tls,
                            root_certificates=args.ca_cert) as client:
            if getattr(args, "stream", False):
                results = [stream_answer(client, args, generation, sys.stderr if args.json else sys.stdout)]
            elif args.compare:
                results = client.compare(args.image, args.question, args.options, modes=args.compare,
                                         alpha=args.alpha, **generation)
            else:
                results = [client.ask(args.image, args.question, args.options, mode=args.mode, alpha=args.alpha,
                                      **generation)]
    except MofServeError as error:
        print(f"mofserve ask: {error}", file=sys.stderr)
        return 1
    if args.json:
        payload = [r.to_dict() for r in results]
        print(json.dumps(payload if args.compare else payload[0], indent=2))
        return 0
    print(format_table(results))
    provenance = results[0].provenance
    versions = ", ".join(f"{k}={v}" for k, v in sorted(provenance.model_versions.items()))
    print(f"profile: {provenance.profile}" + (f"  versions: {versions}" if versions else ""))
    if provenance.notice:
        print(f"NOTE: {provenance.notice}")
    return 0
