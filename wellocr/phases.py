"""Where a training process spends its GPU memory and its time, phase by phase.

A run that fits while it trains can still fail at its first evaluation, so one "peak memory" number is not
enough: the monitor keeps, per phase (auto batch probe, training steps, the eval-loss pass and the generation pass
of the in-training evaluations, the final evaluation), the peak reserved and allocated CUDA memory, the wall
seconds and how often the phase ran, plus the intervals between consecutive training steps with nothing else in
between (the throughput a run keeps; every one is kept, so a slow start or a slow stretch shows), how long each
step waited for its batch from the DataLoader (is the data pipeline the bottleneck?), and how long the first step
after each other phase took (compilation after the probe, a slow step after an evaluation). torch's peak counters
are reset at every switch, so each phase's peak is its own. On CPU only the seconds and the process's peak resident
memory are known.

Imports no transformers (Unsloth must be imported before transformers in a training process).
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from typing import Any

import torch

GIB = 2**30
LABELS = {"auto_batch": "auto batch", "train": "training", "eval_loss": "eval loss", "generation": "generation",
          "final_eval": "final evaluation"}


def release_cached_memory() -> None:
    """Hand the blocks an evaluation cached back to CUDA, so training finds its memory where it left it."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PhaseMonitor:
    """`switch(name)` ends the current phase (its peak memory and seconds recorded) and starts `name`."""

    def __init__(self, cuda: bool | None = None) -> None:
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.phases: dict[str, dict[str, Any]] = {}
        self.current: str | None = None
        self.started = 0.0
        self.step_intervals: list[float] = []
        self.first_steps: list[tuple[str, float]] = []  # (phase before, seconds to the end of the next step)
        self.data_waits: list[float] = []  # seconds each training step waited for its batch
        self._last_step_end: float | None = None
        self._previous: str | None = None

    def switch(self, name: str | None) -> None:
        now = time.perf_counter()
        if self.current is not None:
            entry = self.phases.setdefault(self.current, {"durations": []})
            entry["durations"].append(now - self.started)
            if self.cuda:
                torch.cuda.synchronize()
                entry["peak_reserved_gib"] = max(entry.get("peak_reserved_gib", 0.0),
                                                 torch.cuda.max_memory_reserved() / GIB)
                entry["peak_allocated_gib"] = max(entry.get("peak_allocated_gib", 0.0),
                                                  torch.cuda.max_memory_allocated() / GIB)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._previous = self.current
        self.current, self.started, self._last_step_end = name, time.perf_counter(), None

    def step_end(self) -> None:
        """One optimizer step ended; the interval since the previous one counts when nothing else ran between."""
        now = time.perf_counter()
        if self.current == "train" and self._last_step_end is not None:
            self.step_intervals.append(now - self._last_step_end)
        elif self.current == "train" and self._previous is not None:
            self.first_steps.append((self._previous, round(now - self.started, 2)))
            self._previous = None
        self._last_step_end = now

    def data_wait(self, seconds: float) -> None:
        """A training step waited `seconds` for its batch (the trainer's fetch from the DataLoader)."""
        if self.current == "train":
            self.data_waits.append(seconds)

    def interrupted(self) -> None:
        """Something other than a training step ran (a checkpoint save): the next interval is not a step's."""
        self._last_step_end = None

    def median_step_s(self) -> float | None:
        return statistics.median(self.step_intervals) if self.step_intervals else None

    def summary(self) -> dict[str, Any]:
        """run.json's `phases`: per phase seconds, count, peaks (GiB, rounded); the median step interval."""
        out: dict[str, Any] = {}
        for name, entry in self.phases.items():
            durations = entry["durations"]
            out[name] = {"seconds": round(sum(durations), 2), "count": len(durations),
                         "seconds_each": [round(d, 2) for d in durations],
                         **{k: round(v, 2) for k, v in entry.items() if k != "durations"}}
        median = self.median_step_s()
        waits = statistics.median(self.data_waits) if self.data_waits else None
        return {"phases": out, "median_step_s": round(median, 4) if median else None,
                "timed_steps": len(self.step_intervals), "step_intervals_s": [round(s, 3) for s in self.step_intervals],
                "median_data_wait_s": round(waits, 4) if waits is not None else None,
                "first_step_after": self.first_steps}

    def describe(self) -> str:
        """One line for the log that says what was measured."""
        if not self.cuda:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
            return f"peak process memory (max resident set, CPU run) {rss:.1f} GiB"
        parts = [f"{LABELS.get(name, name)} {e['peak_reserved_gib']:.1f} ({e['peak_allocated_gib']:.1f})"
                 for name, e in self.phases.items() if "peak_reserved_gib" in e]
        return "peak GPU memory per phase, GiB reserved (allocated): " + (" · ".join(parts) or "none recorded")
