"""How an attempt of `python -m wellocr.train` ends: a reason and an exit code, the contract with SkyPilot.

0 finished / early-stopped / budget cap / nothing to do · 2 user error · 69 the hub or a bucket unreachable after
the bounded retries · 70 three retryable exits in a row without progress · 75 SIGTERM, a rehearsal stop or uploads
unfinished (the managed job relaunches these: `recover_on_exit_codes: [75]`) · 76 out of memory after adaptation ·
1 anything else. Only 75 is relaunched; every other non-zero code ends the job (`max_restarts_on_errors: 0`).
"""

from __future__ import annotations

from dataclasses import dataclass

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
