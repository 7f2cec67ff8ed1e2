"""The ``mofserve`` command table: one shape for every command, lazy imports, one log format."""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys

import pytest

from mofserve.cli import COMMANDS, GROUPS, build_parser, main
from mofserve.core.logs import configure_logging


@pytest.fixture(autouse=True)
def _no_handler_left():
    """A test's level and handler stay in that test."""
    yield
    logger = logging.getLogger("mofserve")
    logger.handlers.clear()
    logger.setLevel(logging.NOTSET)


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_every_command_module_has_arguments_and_run(path):
    module = importlib.import_module(COMMANDS[path].module)
    assert callable(module.arguments) and callable(module.run)
    assert len(path) == 1 or path[0] in GROUPS


def test_a_parsed_command_runs_its_module():
    args = build_parser(["export"]).parse_args(["export", "--target", "gpu-torch"])
    assert args.func.__module__ == "mofserve.export.command" and args.target == "gpu-torch"


def test_help_of_a_light_command_imports_no_torch_and_no_server():
    probe = ("import sys\nfrom mofserve.cli import main\ntry:\n    main(['ask', '--help'])\nexcept SystemExit:\n"
             "    pass\nprint(sorted(m for m in ('torch', 'transformers', 'mofserve.server.app', "
             "'mofserve.export.pipeline', 'mofserve.evaluation.mmvp') if m in sys.modules), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert "--image" in done.stdout and done.stderr.strip() == "[]"


def test_one_log_format_on_stderr_and_the_level_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("MOFSERVE_LOG_LEVEL", "warning")
    configure_logging()
    logger = logging.getLogger("mofserve.server.app")
    logger.info("hidden")
    logger.warning("shown")
    configure_logging(verbose=True)
    logger.debug("debug too")
    captured = capsys.readouterr()
    assert captured.err == "[mofserve.server.app] shown\n[mofserve.server.app] debug too\n" and captured.out == ""


def test_a_bad_log_level_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("MOFSERVE_LOG_LEVEL", "loud")
    assert main(["triton", "--grpc-port", "1"]) == 2
    assert "MOFSERVE_LOG_LEVEL" in capsys.readouterr().err
