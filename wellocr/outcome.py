"""How an attempt of `python -m wellocr.train` ends: a reason and an exit code, the contract with SkyPilot.

0 finished / early-stopped / budget cap / nothing to do · 2 user error · 69 the hub or a bucket unreachable after
the bounded retries · 70 three retryable exits in a row without progress · 75 SIGTERM, a rehearsal stop or uploads
unfinished (the managed job relaunches these: `recover_on_exit_codes: [75]`) · 76 out of memory after adaptation ·
1 anything else. Only 75 is relaunched; every other non-zero code ends the job (`max_restarts_on_errors: 0`).
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass
from typing import Any

from wellocr.errors import UserError
from wellocr.preemption import Preempted, StopState

EXIT_OK, EXIT_ERROR, EXIT_USER, EXIT_UNREACHABLE, EXIT_NO_PROGRESS, EXIT_PREEMPTED, EXIT_OOM = 0, 1, 2, 69, 70, 75, 76


@dataclass
class Outcome:
    reason: str  # finished | early-stopped | budget | preempted | rehearsal-stop | nothing-to-do | preflight-only | ...
    code: int
    step: int | None = None

    @property
    def finished(self) -> bool:
        """The run is complete: its final/ and eval/ exist (and must reach the bucket before exit 0)."""
        return self.code == EXIT_OK and self.reason in ("finished", "early-stopped", "nothing-to-do")


class OutOfMemory(Exception):
    """CUDA OOM even at the smallest micro-batch adaptation allows: exit 76."""


def guarded(body: Any, stop: StopState) -> Outcome:
    """The attempt's outcome whatever happened in it: the exit-code contract with SkyPilot."""
    try:
        return body()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return Outcome("unreachable" if exc.exit_code == EXIT_UNREACHABLE else "user-error", exc.exit_code)
    except Preempted:
        return Outcome("preempted", EXIT_PREEMPTED)
    except OutOfMemory as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return Outcome("out-of-memory", EXIT_OOM)
    except Exception:  # noqa: BLE001 - the traceback goes to the attempt log, the code to SkyPilot
        if stop.reason == "preempted":  # SIGTERM surfaced as another error (a library wrapped it)
            return Outcome("preempted", EXIT_PREEMPTED)
        traceback.print_exc()
        return Outcome("crashed", EXIT_ERROR)
