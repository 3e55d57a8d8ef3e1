"""The one exception type for mistakes a user can fix.

Entry points catch `UserError`, print its one-line message (no traceback) and exit with code 2.
"""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A bad config, file, data row or environment that the user can fix; the message names it and the fix."""


def run_cli(body: Callable[[], object]) -> int:
    """Run a CLI's body: 0 when it returns, `error: <message>` on stderr and 2 on a UserError."""
    try:
        body()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
