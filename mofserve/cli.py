"""The ``mofserve`` command: a thin dispatcher over export, serving, benchmarks and evaluation."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mofserve.core.profiles import PROFILE_NAMES


def _add_profile_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="tiny", choices=PROFILE_NAMES,
                        help="which models: tiny (seeded, default), small (seeded, benchmarks), paper")
    parser.add_argument("--clip", help="CLIP checkpoint folder or HF id in the HF cache (paper profile)")
    parser.add_argument("--dinov2", help="DINOv2 checkpoint folder or HF id in the HF cache (paper profile)")
    parser.add_argument("--llava", help="LLaVA-format checkpoint with mm_projector and dino_mm_projector")


def _profile(args: argparse.Namespace):
    from mofserve.core.profiles import get_profile

    profile = get_profile(args.profile)
    return profile.with_sources(clip=args.clip, dinov2=args.dinov2, llava=args.llava)


def _cmd_export(args: argparse.Namespace) -> int:
    from mofserve.export.pipeline import export_profile

    built = export_profile(_profile(args), target=args.target, force=args.force, output=args.output)
    print(built.path)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mofserve.demo import run_demo

    return run_demo(_profile(args))


def _cmd_bench(args: argparse.Namespace) -> int:
    from mofserve.benchmarks.encoders import main as bench_encoders

    return bench_encoders(_profile(args), batch_sizes=args.batch, repeats=args.repeats, output=args.output)


def _cmd_bench_frontend(args: argparse.Namespace) -> int:
    from mofserve.benchmarks.frontend import main as bench_frontend
    from mofserve.benchmarks.frontend import pool_main

    if args.pool:
        return pool_main(args.pool, output=args.output)
    return bench_frontend(_profile(args), requests=args.requests, modes=args.modes, output=args.output,
                          budget_s=args.budget_s)


def _cmd_bench_load(args: argparse.Namespace) -> int:
    from mofserve.benchmarks.load import main as bench_load

    return bench_load(args)


def _cmd_bench_perf_analyzer(args: argparse.Namespace) -> int:
    from mofserve.benchmarks.perf_analyzer import main as bench_perf_analyzer

    return bench_perf_analyzer(args)


def _cmd_soak(args: argparse.Namespace) -> int:
    from mofserve.benchmarks.soak import main as soak

    return soak(args)


# `mofserve serve` flags of admission control and security (docs/reliability.md); the token itself
# has no flag (a command line is visible to every user of the machine): MOFSERVE_AUTH_TOKEN, TOML or a file
SERVE_LIMIT_AND_SECURITY_FLAGS = ("max_in_flight", "max_queue", "default_deadline_s", "max_deadline_s",
                                  "max_message_bytes", "max_body_bytes", "tls_cert_file", "tls_key_file",
                                  "tls_client_ca_file", "auth_token_file")


def _add_limit_and_security_args(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--max-in-flight", type=int, help="requests executing at once, both transports (default 8)")
    serve.add_argument("--max-queue", type=int, help="requests waiting for a slot (default 32); beyond: "
                                                     "RESOURCE_EXHAUSTED / 429 with retry advice")
    serve.add_argument("--default-deadline-s", type=float, help="deadline of a request that sends none (default 300)")
    serve.add_argument("--max-deadline-s", type=float, help="longer deadlines are clamped to this (default 600)")
    serve.add_argument("--max-message-bytes", type=int, help="largest gRPC request (default max_image_bytes + 1 MiB)")
    serve.add_argument("--max-body-bytes", type=int, help="largest HTTP body (default base64 of max_image_bytes "
                                                          "+ 1 MiB)")
    serve.add_argument("--tls-cert-file", help="PEM certificate chain: TLS on gRPC and HTTP (with --tls-key-file)")
    serve.add_argument("--tls-key-file", help="PEM private key of --tls-cert-file")
    serve.add_argument("--tls-client-ca-file", help="PEM CA: mutual TLS, clients must present a certificate it signed")
    serve.add_argument("--auth-token-file", help="file holding the bearer token every request but health must send "
                                                 "(or MOFSERVE_AUTH_TOKEN)")


def _cmd_serve(args: argparse.Namespace) -> int:
    from mofserve.server.app import serve
    from mofserve.server.config import load_config

    flags = {name: getattr(args, name) for name in ("profile", "host", "grpc_port", "http_port", "clip", "dinov2",
                                                     "llava", "max_restarts", "target")}
    flags.update({name: getattr(args, name) for name in SERVE_LIMIT_AND_SECURITY_FLAGS})
    flags.update({name: getattr(args, name) for name in ("triton_url", "triton_metrics_url", "playground")})
    return serve(load_config(args.config, flags))


def _cmd_triton(args: argparse.Namespace) -> int:
    from mofserve.server.triton_command import run_triton

    return run_triton(_profile(args), target=args.target, host=args.host, http_port=args.http_port,
                      grpc_port=args.grpc_port, metrics_port=args.metrics_port)


def _cmd_ask(args: argparse.Namespace) -> int:
    from mofserve.clients.cli import run_ask

    return run_ask(args)


def _cmd_mine(args: argparse.Namespace) -> int:
    from mofserve.evaluation.mining import run_mine

    return run_mine(args)


def _cmd_eval_mmvp(args: argparse.Namespace) -> int:
    from mofserve.evaluation.mmvp import run_from_args

    return run_from_args(args)


def _cmd_eval_mmvp_vlm(args: argparse.Namespace) -> int:
    from mofserve.evaluation.mmvp_vlm import run_from_args

    return run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mofserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    export = sub.add_parser("export", help="checkpoints -> ONNX (parity-checked) -> Triton model repository")
    _add_profile_args(export)
    export.add_argument("--target", default="cpu", choices=("cpu", "gpu-onnx", "gpu-trt", "gpu-torch"))
    export.add_argument("--force", action="store_true", help="re-export even when a cached export matches")
    export.add_argument("--output", type=Path,
                        help="folder for the repository (default: $MOFSERVE_HOME/repositories/...)")
    export.set_defaults(func=_cmd_export)

    demo = sub.add_parser("demo", help="export, start Triton, run every fusion mode on a drawn image")
    _add_profile_args(demo)
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    enc = bench_sub.add_parser("encoders", help="encoder latency per runtime vs the matmul ceiling")
    _add_profile_args(enc)
    enc.set_defaults(profile="small", func=_cmd_bench)
    enc.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    enc.add_argument("--repeats", type=int, default=5)
    enc.add_argument("--output", type=Path, help="write the JSON report here")
    fe = bench_sub.add_parser("frontend", help="Ask latency: gRPC front-end vs direct ensemble vs in-process; "
                                               "Compare and second-mode cost")
    _add_profile_args(fe)
    fe.set_defaults(profile="small", func=_cmd_bench_frontend)
    fe.add_argument("--requests", type=int, help="timed requests per mode and path (default 20)")
    fe.add_argument("--budget-s", type=float, default=480.0,
                    help="seconds for the timed phases; on a busy machine they stop early (0: no limit)")
    fe.add_argument("--modes", nargs="+", choices=("interleaved", "additive", "clip", "dinov2"),
                    help="fusion modes, the first is Compare's first and the seen-image Ask's A "
                         "(default: interleaved additive clip dinov2)")
    fe.add_argument("--output", type=Path, help="write the JSON report here")
    fe.add_argument("--pool", type=Path, nargs="+", metavar="REPORT",
                    help="run nothing: pool these JSON reports (same profile and modes) and print the tables")
    from mofserve.benchmarks.load import add_load_arguments

    load = bench_sub.add_parser("load", help="load a running front-end (gRPC or HTTP): concurrency and "
                                             "Poisson-rate sweeps, mixed modes, repeated images; "
                                             "JSON + Markdown + PNG report",
                                description="See docs/benchmarks.md (Load).")
    add_load_arguments(load)
    load.set_defaults(func=_cmd_bench_load)
    from mofserve.benchmarks.perf_analyzer import add_perf_analyzer_arguments

    pa = bench_sub.add_parser("perf-analyzer", help="NVIDIA perf_analyzer on the Triton ensembles with real-image "
                                                    "input data (installed into $MOFSERVE_HOME/tools on first use); "
                                                    "JSON + Markdown + PNG report",
                              description="See docs/benchmarks.md (perf_analyzer).")
    add_perf_analyzer_arguments(pa)
    pa.set_defaults(func=_cmd_bench_perf_analyzer)

    serve = sub.add_parser(
        "serve", help="export if needed, start Triton and the gRPC + HTTP front-ends, supervise, stop on SIGTERM",
        description="Settings: defaults < --config FILE (TOML) < MOFSERVE_* environment < flags. "
                    "See docs/api.md for every setting, including the request limits.")
    serve.add_argument("--config", type=Path, help="TOML file with settings (top level or [serve], [limits])")
    serve.add_argument("--profile", choices=PROFILE_NAMES, help="tiny (default), small, paper-shaped or paper")
    serve.add_argument("--host", help="front-end bind address (default 127.0.0.1; Triton stays on loopback)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    serve.add_argument("--http-port", type=int, help="HTTP port (default 8080; 0 picks a free one)")
    serve.add_argument("--clip", help="CLIP checkpoint folder or HF id in the HF cache (paper profile)")
    serve.add_argument("--dinov2", help="DINOv2 checkpoint folder or HF id in the HF cache (paper profile)")
    serve.add_argument("--llava", help="LLaVA-format checkpoint with mm_projector and dino_mm_projector")
    serve.add_argument("--max-restarts", type=int, help="Triton restarts before giving up (default 5)")
    serve.add_argument("--target", choices=("cpu", "gpu-onnx", "gpu-trt", "gpu-torch"),
                       help="model repository target (default cpu; gpu-trt needs engines built on the serving GPU)")
    serve.add_argument("--triton-url", metavar="grpc://HOST:PORT",
                       help="front-end only: use this running Triton (e.g. `mofserve triton` in another pod); "
                            "no export, no Triton child")
    serve.add_argument("--triton-metrics-url", metavar="http://HOST:PORT/metrics",
                       help="with --triton-url: that Triton's metrics page, relayed at /metrics/triton")
    serve.add_argument("--no-playground", dest="playground", action="store_const", const=False,
                       help="no web playground at / of the HTTP port (default: served, behind the same auth)")
    _add_limit_and_security_args(serve)
    serve.set_defaults(func=_cmd_serve)

    triton = sub.add_parser("triton", help="export if needed and run Triton alone in the foreground (the Triton "
                                           "pod of a split deployment; front-ends: serve --triton-url)",
                            description="Model control none; exits with Triton's code when it dies. See "
                                        "docs/deployment.md (Split deployment).")
    _add_profile_args(triton)
    triton.add_argument("--target", default="cpu", choices=("cpu", "gpu-onnx", "gpu-trt", "gpu-torch"))
    triton.add_argument("--host", default="127.0.0.1",
                        help="address Triton binds (default 127.0.0.1; 0.0.0.0 in a pod, behind a NetworkPolicy)")
    triton.add_argument("--http-port", type=int, default=8000, help="Triton HTTP (default 8000; 0: a free port)")
    triton.add_argument("--grpc-port", type=int, default=8001, help="Triton gRPC (default 8001; 0: a free port)")
    triton.add_argument("--metrics-port", type=int, default=8002, help="Triton metrics (default 8002; 0: free)")
    triton.set_defaults(func=_cmd_triton)

    from mofserve.benchmarks.soak import add_soak_arguments

    soak = sub.add_parser("soak", help="serve a profile on free loopback ports, load it for a long time at a fixed "
                                       "concurrency; errors and RSS growth of every process (exit 1 on either)",
                          description="See docs/reliability.md (Load and soak).")
    add_soak_arguments(soak)
    soak.set_defaults(func=_cmd_soak)

    from mofserve.clients.cli import add_ask_arguments

    ask = sub.add_parser("ask", help="ask a running server about an image (gRPC), in one mode or several")
    add_ask_arguments(ask)
    ask.set_defaults(func=_cmd_ask)

    from mofserve.evaluation.mining import add_mine_arguments

    mine = sub.add_parser("mine", help="find CLIP-blind pairs (CLIP cos > 0.95, DINOv2 cos < 0.6) in a folder "
                                       "of images through a running server",
                          description="Embed every image with CLIP and DINOv2 through the gRPC server (cached "
                                      "on disk), search all pairs blockwise and write pairs.csv, failed.csv, "
                                      "summary.json and a contact sheet. See docs/evaluation.md.")
    add_mine_arguments(mine)
    mine.set_defaults(func=_cmd_mine)

    # `mofserve eval <benchmark>`: evaluators of a running server (mofserve.evaluation). Add each
    # benchmark as a subparser of `eval_sub` below (e.g. `eval mmvp-vlm`), each with its own func.
    evaluate = sub.add_parser("eval", help="run a benchmark against a running server (MMVP, ...)")
    eval_sub = evaluate.add_subparsers(dest="benchmark", required=True)
    from mofserve.evaluation.mmvp import add_mmvp_arguments

    mmvp = eval_sub.add_parser("mmvp", help="MMVP: 300 questions / 150 CLIP-blind pairs, per fusion mode",
                               description="Ask MMVP's questions through the gRPC server and score question and "
                                           "pair accuracy per mode. See docs/evaluation.md.")
    add_mmvp_arguments(mmvp)
    mmvp.set_defaults(func=_cmd_eval_mmvp)
    from mofserve.evaluation.mmvp_vlm import add_mmvp_vlm_arguments

    mmvp_vlm = eval_sub.add_parser("mmvp-vlm", help="MMVP-VLM: CLIP alone on 135 pairs x 9 visual patterns",
                                   description="Score the server's CLIP (Embed + EmbedText) on MMVP-VLM with the "
                                               "official rule, per visual pattern. See docs/evaluation.md.")
    add_mmvp_vlm_arguments(mmvp_vlm)
    mmvp_vlm.set_defaults(func=_cmd_eval_mmvp_vlm)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError) as error:
        print(f"mofserve: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
