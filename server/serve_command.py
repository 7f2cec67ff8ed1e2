"""``mofserve serve``'s flags and entry point.

Apart from ``app.py`` so that the CLI can build these flags (and answer ``--help``) without importing
the server's transports, Triton's client and, through export, torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mofserve.core.profiles import PROFILE_NAMES
from mofserve.core.targets import TARGETS

# flags of admission control and security (docs/reliability.md); the token itself has no flag (a
# command line is visible to every user of the machine): MOFSERVE_AUTH_TOKEN, TOML or a file
SERVE_LIMIT_AND_SECURITY_FLAGS = ("max_in_flight", "max_queue", "default_deadline_s", "max_deadline_s",
                                  "max_message_bytes", "max_body_bytes", "tls_cert_file", "tls_key_file",
                                  "tls_client_ca_file", "auth_token_file")
# the flags that override a ServeConfig setting of the same name (the rest of the settings: TOML, MOFSERVE_*)
SERVE_FLAGS = ("profile", "host", "grpc_port", "http_port", "clip", "dinov2", "llava", "max_restarts", "target",
               *SERVE_LIMIT_AND_SECURITY_FLAGS, "triton_url", "triton_metrics_url", "playground")


def _limit_and_security_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-in-flight", type=int, help="requests executing at once, both transports (default 8)")
    parser.add_argument("--max-queue", type=int, help="requests waiting for a slot (default 32); beyond: "
                                                      "RESOURCE_EXHAUSTED / 429 with retry advice")
    parser.add_argument("--default-deadline-s", type=float, help="deadline of a request that sends none (default 300)")
    parser.add_argument("--max-deadline-s", type=float, help="longer deadlines are clamped to this (default 600)")
    parser.add_argument("--max-message-bytes", type=int, help="largest gRPC request (default max_image_bytes + 1 MiB)")
    parser.add_argument("--max-body-bytes", type=int, help="largest HTTP body (default base64 of max_image_bytes "
                                                           "+ 1 MiB)")
    parser.add_argument("--tls-cert-file", help="PEM certificate chain: TLS on gRPC and HTTP (with --tls-key-file)")
    parser.add_argument("--tls-key-file", help="PEM private key of --tls-cert-file")
    parser.add_argument("--tls-client-ca-file", help="PEM CA: mutual TLS, clients must present a certificate it signed")
    parser.add_argument("--auth-token-file", help="file holding the bearer token every request but health must send "
                                                  "(or MOFSERVE_AUTH_TOKEN)")


def arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``mofserve serve``; none has a default here, so that an unset flag leaves the
    TOML file's or the environment's value (defaults < TOML < MOFSERVE_* < flags)."""
    parser.add_argument("--config", type=Path, help="TOML file with settings (top level or [serve], [limits])")
    parser.add_argument("--profile", choices=PROFILE_NAMES, help="tiny (default), small, paper-shaped or paper")
    parser.add_argument("--host", help="front-end bind address (default 127.0.0.1; Triton stays on loopback)")
    parser.add_argument("--grpc-port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    parser.add_argument("--http-port", type=int, help="HTTP port (default 8080; 0 picks a free one)")
    parser.add_argument("--clip", help="CLIP checkpoint folder or HF id in the HF cache (paper profile)")
    parser.add_argument("--dinov2", help="DINOv2 checkpoint folder or HF id in the HF cache (paper profile)")
    parser.add_argument("--llava", help="LLaVA-format checkpoint with mm_projector and dino_mm_projector")
    parser.add_argument("--max-restarts", type=int, help="Triton restarts before giving up (default 5)")
    parser.add_argument("--target", choices=TARGETS,
                        help="model repository target (default cpu; gpu-trt needs engines built on the serving GPU)")
    parser.add_argument("--triton-url", metavar="grpc://HOST:PORT",
                        help="front-end only: use this running Triton (e.g. `mofserve triton` in another pod); "
                             "no export, no Triton child")
    parser.add_argument("--triton-metrics-url", metavar="http://HOST:PORT/metrics",
                        help="with --triton-url: that Triton's metrics page, relayed at /metrics/triton")
    parser.add_argument("--no-playground", dest="playground", action="store_const", const=False,
                        help="no web playground at / of the HTTP port (default: served, behind the same auth)")
    _limit_and_security_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Merge the settings (defaults < TOML < MOFSERVE_* < flags) and serve until SIGTERM/SIGINT."""
    from .app import serve  # lazy: grpc, aiohttp, Triton's client and, through export, torch
    from .config import load_config  # lazy: Triton's client (the engine's limits)

    return serve(load_config(args.config, {name: getattr(args, name) for name in SERVE_FLAGS}))
