"""Stop requests shared by the SIGTERM handler and the training callbacks (no transformers import here:
train.py installs the handler before Unsloth, which must be imported before transformers)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SIGTERM_GRACE_S = 5.0  # RunPod's notice before SIGKILL


class Preempted(BaseException):
    """SIGTERM arrived outside the training loop (loading, evaluating): nothing to save, exit 75.

    A BaseException, like KeyboardInterrupt: libraries wrap what their `except Exception` catches (transformers'
    lazy imports turn it into a RuntimeError), and a stop that was asked for must stay a stop wherever it lands."""


@dataclass
class StopState:
    """Why training should stop early, shared by the signal handler and the callbacks."""

    reason: str | None = None  # "preempted" | "budget" | None
    signalled_at: float | None = None
    in_training_loop: bool = False
    message: str = ""
    save_seconds: list[float] = field(default_factory=list)

    def request(self, reason: str, message: str = "") -> None:
        if self.reason is None:
            self.reason, self.message = reason, message

    def expected_save_seconds(self) -> float:
        return max(self.save_seconds[-3:], default=2.0)


def install_sigterm_handler(state: StopState) -> Callable[[], None]:
    """Route SIGTERM into `state`; outside the training loop it raises `Preempted` right away."""

    def handler(signum: int, frame: Any) -> None:
        if state.signalled_at is not None:
            return  # a process-group SIGTERM can arrive twice (direct + forwarded by the shell): act once
        state.signalled_at = time.time()
        state.request("preempted", "SIGTERM received (spot preemption or cancel)")
        print("\nwellocr: SIGTERM received; stopping at the next step boundary", flush=True)
        if not state.in_training_loop:
            raise Preempted()

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)
