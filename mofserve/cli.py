"""The ``mofserve`` command: a thin dispatcher over export, serving, benchmarks and evaluation."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from mofserve.core.disk_space import EXIT_NO_SPACE, InsufficientDiskSpaceError
from mofserve.core.logs import LOG_LEVEL_ENV, configure_logging


@dataclass(frozen=True)
class Command:
    """One ``mofserve`` command: the module that owns it (``arguments(parser)`` adds its flags,
    ``run(args)`` runs it and returns the exit code), and the texts of its ``--help``."""

    module: str
    help: str
    description: str | None = None


@dataclass(frozen=True)
class Group:
    """A command whose subcommands are commands (``bench``, ``eval``); ``dest`` names the chosen one."""

    help: str
    dest: str


GROUPS = {
    "bench": Group("benchmarks", dest="bench"),
    "eval": Group("run a benchmark against a running server (MMVP, ...)", dest="benchmark"),
}

# The one table of commands, in `mofserve --help`'s order. A new command is a module with
# `arguments` and `run` and a row here; a row under a group is a subcommand of it.
COMMANDS: dict[tuple[str, ...], Command] = {
    ("export",): Command("mofserve.export.command",
                         "checkpoints -> ONNX (parity-checked) -> Triton model repository"),
    ("demo",): Command("mofserve.demo", "export, start Triton, run every fusion mode on a drawn image"),
    ("bench", "encoders"): Command("mofserve.benchmarks.encoders",
                                   "encoder latency per runtime vs the matmul ceiling"),
    ("bench", "frontend"): Command("mofserve.benchmarks.frontend",
                                   "Ask latency: gRPC front-end vs direct ensemble vs in-process; "
                                   "Compare and second-mode cost"),
    ("bench", "load"): Command("mofserve.benchmarks.load",
                               "load a running front-end (gRPC or HTTP): concurrency and Poisson-rate sweeps, "
                               "mixed modes, repeated images; JSON + Markdown + PNG report",
                               "See docs/benchmarks.md (Load)."),
    ("bench", "perf-analyzer"): Command("mofserve.benchmarks.perf_analyzer",
                                        "NVIDIA perf_analyzer on the Triton ensembles with real-image input data "
                                        "(installed into $MOFSERVE_HOME/tools on first use); JSON + Markdown + "
                                        "PNG report",
                                        "See docs/benchmarks.md (perf_analyzer)."),
    ("serve",): Command("mofserve.server.serve_command",
                        "export if needed, start Triton and the gRPC + HTTP front-ends, supervise, stop on SIGTERM",
                        "Settings: defaults < --config FILE (TOML) < MOFSERVE_* environment < flags. "
                        "See docs/api.md for every setting, including the request limits."),
    ("triton",): Command("mofserve.server.triton_command",
                         "export if needed and run Triton alone in the foreground (the Triton pod of a split "
                         "deployment; front-ends: serve --triton-url)",
                         "Model control none; exits with Triton's code when it dies. See docs/deployment.md "
                         "(Split deployment)."),
    ("soak",): Command("mofserve.benchmarks.soak",
                       "serve a profile on free loopback ports, load it for a long time at a fixed concurrency; "
                       "errors and RSS growth of every process (exit 1 on either)",
                       "See docs/reliability.md (Load and soak)."),
    ("ask",): Command("mofserve.clients.cli",
                      "ask a running server about an image (gRPC), in one mode or several"),
    ("mine",): Command("mofserve.evaluation.mining",
                       "find CLIP-blind pairs (CLIP cos > 0.95, DINOv2 cos < 0.6) in a folder of images through "
                       "a running server",
                       "Embed every image with CLIP and DINOv2 through the gRPC server (cached on disk), search "
                       "all pairs blockwise and write pairs.csv, failed.csv, summary.json and a contact sheet. "
                       "See docs/evaluation.md."),
    ("eval", "mmvp"): Command("mofserve.evaluation.mmvp",
                              "MMVP: 300 questions / 150 CLIP-blind pairs, per fusion mode",
                              "Ask MMVP's questions through the gRPC server and score question and pair accuracy "
                              "per mode. See docs/evaluation.md."),
    ("eval", "mmvp-vlm"): Command("mofserve.evaluation.mmvp_vlm",
                                  "MMVP-VLM: CLIP alone on 135 pairs x 9 visual patterns",
                                  "Score the server's CLIP (Embed + EmbedText) on MMVP-VLM with the official rule, "
                                  "per visual pattern. See docs/evaluation.md."),
}

def _chosen(path: tuple[str, ...], argv: Sequence[str] | None) -> bool:
    """Whether ``argv`` names the command at ``path`` (None: build every command, as tests do).

    The top-level parser has no option that takes a value, so the words that do not start with a
    dash begin with the command's path."""
    if argv is None:
        return True
    words = [arg for arg in argv if not arg.startswith("-")]
    return tuple(words[:len(path)]) == path


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``mofserve`` parser. With ``argv``, only the command it names gets its flags (the others
    only their help line), so that only that command's module is imported: ``mofserve ask --help``
    must not wait for torch, the server or the exporters."""
    parser = argparse.ArgumentParser(prog="mofserve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help=f"debug logging on stderr (default: ${LOG_LEVEL_ENV}, else INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, command in COMMANDS.items():
        where = sub
        if len(path) > 1:
            if path[0] not in groups:
                group = GROUPS[path[0]]
                groups[path[0]] = sub.add_parser(path[0], help=group.help).add_subparsers(dest=group.dest,
                                                                                        required=True)
            where = groups[path[0]]
        kwargs = {"description": command.description} if command.description else {}
        command_parser = where.add_parser(path[-1], help=command.help, **kwargs)
        if _chosen(path, argv):
            # lazy: a command's module is imported only when that command is parsed (see the docstring)
            module = importlib.import_module(command.module)
            module.arguments(command_parser)
            command_parser.set_defaults(func=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        configure_logging(args.verbose)
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except InsufficientDiskSpaceError as error:  # its own exit code: a full disk is not a usage error
        print(f"mofserve: error: {error.strerror}", file=sys.stderr)
        return EXIT_NO_SPACE
    except (FileNotFoundError, ValueError) as error:
        print(f"mofserve: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
