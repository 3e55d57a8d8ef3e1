"""The one exception type for mistakes a user can fix.

Entry points catch `UserError`, print its one-line message (no traceback) and exit with its code (2; 69 for a
service that stayed unreachable).
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A bad config, file, data row or environment that the user can fix; the message names it and the fix."""

    exit_code = 2


class Unreachable(UserError):
    """A service (the hub, a bucket) stayed unreachable through the bounded retries at start. Exit 69
    (EX_UNAVAILABLE): not in the managed job's recover_on_exit_codes, so SkyPilot does not relaunch a paid pod
    over and over for it."""

    exit_code = 69


def run_cli(body: Callable[[], object]) -> int:
    """Run a CLI's body: 0 when it returns, `error: <message>` on stderr and 2 on a UserError."""
    try:
        body()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0
