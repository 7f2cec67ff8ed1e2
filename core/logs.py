"""The one log format of every ``mofserve`` entry point: ``[logger name] message`` on stderr.

Modules log through ``logging.getLogger(__name__)`` and configure nothing; an entry point (the
``mofserve`` command's ``main``, a benchmark's ``python -m``) calls :func:`configure_logging` once.
Stdout is left to results and the ``READY ...`` lines that scripts and tests read.
"""

from __future__ import annotations

import logging
import os
import sys

LOG_FORMAT = "[%(name)s] %(message)s"
LOG_LEVEL_ENV = "MOFSERVE_LOG_LEVEL"


class _StderrHandler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment (a redirect, a test's capture), not to the one
    there was when logging was configured, which may be closed by then."""

    @property
    def stream(self) -> object:  # what StreamHandler.emit writes to
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(verbose: bool = False) -> None:
    """Send the ``mofserve.*`` loggers to stderr in the one format, at ``$MOFSERVE_LOG_LEVEL``
    (default INFO) or DEBUG with ``verbose``; calling it again replaces, never adds, the handler."""
    level = "DEBUG" if verbose else os.environ.get(LOG_LEVEL_ENV, "INFO").upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ValueError(f"{LOG_LEVEL_ENV}: expected DEBUG, INFO, WARNING or ERROR, got {level!r}")
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger = logging.getLogger("mofserve")  # the project's loggers only: a library's stay as it set them
    logger.handlers[:] = [handler]
    logger.setLevel(level)
