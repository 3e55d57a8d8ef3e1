"""What the `python -m wellocr.<command>` entry points share: an argument parser that reports a mistake as one
`error:` line, argument types, and running a command's body (logging set up, UserError turned into its exit code).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from wellocr.errors import UserError, run_cli

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


class UserErrorParser(argparse.ArgumentParser):
    """argparse that raises UserError instead of exiting, so every mistake prints one `error:` line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message)


def run_command(body: Callable[[], object], log_level: int = logging.INFO) -> int:
    """Log to stderr at `log_level`, then run the body as `wellocr.errors.run_cli` does (0, or a UserError's code)."""
    logging.basicConfig(level=log_level, format=LOG_FORMAT, stream=sys.stderr)
    return run_cli(body)
