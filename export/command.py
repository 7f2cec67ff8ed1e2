"""``mofserve export``: checkpoints -> ONNX (parity-checked) -> a Triton model repository.

Its own module, apart from ``pipeline.py``, so that the CLI can build this command's flags without
importing torch (``pipeline`` does, at its top).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mofserve.core.profiles import add_profile_arguments, profile_from_args
from mofserve.core.targets import TARGETS


def arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``mofserve export``."""
    add_profile_arguments(parser)
    parser.add_argument("--target", default="cpu", choices=TARGETS)
    parser.add_argument("--force", action="store_true", help="re-export even when a cached export matches")
    parser.add_argument("--output", type=Path,
                        help="folder for the repository (default: $MOFSERVE_HOME/repositories/...)")


def run(args: argparse.Namespace) -> int:
    """Export the profile for the target and print the repository's folder (what scripts read)."""
    # lazy: it imports torch (seconds), which the CLI's argument checks should not wait for
    from .pipeline import export_profile

    built = export_profile(profile_from_args(args), target=args.target, force=args.force, output=args.output)
    print(built.path)
    return 0
