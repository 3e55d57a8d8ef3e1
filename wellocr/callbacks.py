"""Trainer callbacks: what wellocr adds to the HF training loop to survive spot preemption.

- `CheckpointCallback`: marks each checkpoint complete once written, applies retention, and makes sure the
  last step is always checkpointed (so a finished run can be extended and `--resume-latest` can tell it is done).
- `StartupCallback`: how long this process took from its start to its first optimizer step (imports, model
  load, data, compilation, resume): the restart overhead every preemption costs, kept in run.json's attempt,
  split by phase, with torch.compile's cache hits and misses (did the caches on the volume work?).
- `StopCallback`: turns a SIGTERM (RunPod gives 5 s before SIGKILL) or a stop request (budget cap) into a clean
  stop at the next step boundary, with a save when it fits in the time left.
- `PhaseCallback`: tells a wellocr.phases.PhaseMonitor when training starts and each step ends (per-phase peak
  memory and the step intervals the run keeps).
- `CostCallback`: keeps the run's cost ledger (wellocr.ledger) alive, puts cost into the logs and requests that
  stop when the budget cap is reached.
- `ProgressLines`: the training progress as one line per logging step where the console is not a terminal.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from wellocr.checkpoint import RetentionPolicy, mark_complete
from wellocr.distributed import across_ranks, barrier
from wellocr.ledger import WARN_FRACTION, CostLedger, budget_exhausted, process_start_time
from wellocr.phases import PhaseMonitor
from wellocr.preemption import SIGTERM_GRACE_S, StopState
from wellocr.rundir import RunDir

log = logging.getLogger("wellocr")


class PhaseCallback(TrainerCallback):
    """Training is the phase between evaluations; a checkpoint save is not part of a step's interval. The
    numbers so far go into run.json's attempt at every save, so a run stopped early keeps them."""

    def __init__(self, monitor: PhaseMonitor, run: RunDir | None = None, attempt: int = 0):
        self.monitor, self.run, self.attempt = monitor, run, attempt

    def on_train_begin(self, args, state, control, **kwargs):
        self.monitor.switch("train")

    def on_step_end(self, args, state, control, **kwargs):
        self.monitor.step_end()

    def on_save(self, args, state, control, **kwargs):
        self.monitor.interrupted()
        if self.run is not None:
            self.run.update_attempt(self.attempt, **self.monitor.summary())


class StartupCallback(TrainerCallback):
    """Records, once per process, the seconds from process start to the end of the first optimizer step, split at
    `marks` (phase name -> wall-clock time it ended, in order), with torch.compile's cache hits and misses: whether
    a restarted pod found the compile caches on the volume."""

    def __init__(self, run: Any, attempt: int, marks: dict[str, float] | None = None, started_at: float | None = None):
        self.run, self.attempt, self.marks = run, attempt, marks if marks is not None else {}  # filled as phases end
        self.started_at = started_at if started_at is not None else process_start_time()[0]
        self.done = False

    def on_step_end(self, args, state, control, **kwargs):
        if not self.done:
            self.done = True
            now = time.time()
            phases, last = {}, self.started_at
            for name, at in self.marks.items():
                phases[f"{name}_s"], last = round(at - last, 2), at
            phases["to_first_step_s"] = round(now - last, 2)
            cache = compile_cache_counts()
            self.run.update_attempt(self.attempt, first_step=state.global_step,
                                    first_step_s=round(now - self.started_at, 2), startup=phases,
                                    **({"compile_cache": cache} if cache else {}))
            split = ", ".join(f"{name[:-2].replace('_', ' ')} {seconds:.1f} s" for name, seconds in phases.items())
            cached = (f"; compile cache hits/misses: graphs {cache['fx_graph_hits']}/{cache['fx_graph_misses']}, "
                      f"autograd {cache['autograd_hits']}/{cache['autograd_misses']} "
                      f"({cache['autograd_bypasses']} bypassed)") if cache else ""
            print(f"wellocr: first optimizer step of this process (step {state.global_step}) ended "
                  f"{now - self.started_at:.1f} s after the process started ({split}{cached})", flush=True)
        return control


def compile_cache_counts(counters: Any = None) -> dict[str, int]:
    """torch.compile's inductor and AOTAutograd cache hits, misses and bypasses in this process; {} when nothing
    compiled."""
    if counters is None:
        if "torch._dynamo" not in sys.modules:
            return {}
        counters = sys.modules["torch._dynamo"].utils.counters
    counts = {"fx_graph_hits": counters["inductor"]["fxgraph_cache_hit"],
              "fx_graph_misses": counters["inductor"]["fxgraph_cache_miss"],
              "autograd_hits": counters["aot_autograd"]["autograd_cache_hit"],
              "autograd_misses": counters["aot_autograd"]["autograd_cache_miss"],
              "autograd_bypasses": counters["aot_autograd"]["autograd_cache_bypass"]}  # never cached: re-traced
    return counts if any(counts.values()) else {}


class StopCallback(TrainerCallback):
    def __init__(self, state: StopState, grace_seconds: float = SIGTERM_GRACE_S):
        self.state = state
        self.grace_seconds = grace_seconds

    def on_train_begin(self, args, state, control, **kwargs):
        self.state.in_training_loop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.state.in_training_loop = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.state.reason is None:
            return control
        control.should_training_stop = True
        control.should_evaluate = False
        if self.state.reason == "preempted" and self.state.signalled_at is not None:
            left = self.grace_seconds - (time.time() - self.state.signalled_at)
            control.should_save = left > self.state.expected_save_seconds()
            if not control.should_save:
                print(f"wellocr: {left:.1f} s left before SIGKILL, not enough to save; "
                      "resuming from the last checkpoint", flush=True)
        else:
            control.should_save = True
        return control


class CheckpointCallback(TrainerCallback):
    """Completeness marker + retention after every save; always save the final step."""

    def __init__(self, run_dir: Path, retention: RetentionPolicy, stop: StopState,
                 protect: set[str] | None = None, marker_extra: Callable[[], dict] | None = None,
                 remote: Any = None):
        self.run_dir = run_dir
        self.remote = remote  # wellocr.remote.RemoteStore or None
        self.retention = retention
        self.stop = stop
        self.protect = set(protect or ())
        self.marker_extra = marker_extra or dict
        self._save_started: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = True
        if control.should_save:
            self._save_started = time.time()
        return control

    def on_save(self, args, state, control, **kwargs):
        barrier()  # data-parallel ranks: every rank has written its part (its RNG state) of the checkpoint
        if not state.is_world_process_zero:
            return control
        path = self.run_dir / f"checkpoint-{state.global_step}"
        if not path.is_dir():
            return control
        extra = {"best_eval_loss": state.best_metric, **self.marker_extra()}
        mark_complete(path, state.global_step, extra)
        if self._save_started is not None:
            self.stop.save_seconds.append(time.time() - self._save_started)
        deleted = self.retention.apply(self.run_dir, protect=self.protect)
        if self.remote is not None:
            self.remote.upload_checkpoint(path)  # in the background; its marker goes up last
            for name in deleted:
                self.remote.delete_checkpoint(name)
            self.remote.apply_retention(self.retention, self.protect)  # also what earlier machines left
            for path in RunDir(self.run_dir).run_files():
                self.remote.upload_path(path)
            self.remote.upload_compile_cache()  # when it changed: the next pod starts warm
        return control


class AgreeToStop(TrainerCallback):
    """Data-parallel ranks stop together: at each step end (and after each save, where the rehearsal stops) the
    ranks combine "stop" and "save" (any rank's request counts), so a SIGTERM seen by one rank first, or rank 0's
    budget cap, ends every rank at the same step boundary with one checkpoint. Added last; nothing in one process."""

    def __init__(self, stop: StopState):
        self.stop = stop

    def on_step_end(self, args, state, control, **kwargs):
        return self._agree(control, save=True)

    def on_save(self, args, state, control, **kwargs):
        return self._agree(control, save=False)

    def _agree(self, control, save: bool):
        requested, end, save_now = (bool(v) for v in across_ranks(
            [int(self.stop.reason is not None), int(control.should_training_stop), int(save and control.should_save)]))
        if requested and self.stop.reason is None:  # a SIGTERM, the budget or the rehearsal on another rank
            self.stop.request("peer", "another rank stopped")
        if requested or end:
            control.should_training_stop = True
        if requested:
            control.should_evaluate = False
        if save and save_now:
            control.should_save = True
        return control


class RehearsalCallback(TrainerCallback):
    """`--rehearse-preemption`: stop once, right after the run's first complete checkpoint, with the exit a
    preemption gives (75), so that a real job shows its recovery (relaunch, restore, resume) for a few cents.
    run.json remembers the stop, so the relaunched attempt trains to the end."""

    def __init__(self, run: Any, stop: StopState):
        self.run, self.stop = run, stop

    def on_save(self, args, state, control, **kwargs):
        if self.run.read().get("rehearsal") or state.global_step >= state.max_steps:
            return control
        self.run.update(rehearsal={"stopped_after": f"checkpoint-{state.global_step}", "step": state.global_step,
                                   "at": time.time()})
        print(f"wellocr: rehearsal: stopping after checkpoint-{state.global_step} with exit 75, as a preemption "
              "would; the job's recovery resumes from it", flush=True)
        self.stop.request("rehearsal")
        control.should_training_stop = True
        return control


class CostCallback(TrainerCallback):
    """Heartbeat the ledger at every log, warn at 90% of the cap and stop at 100%. `metrics(step)` gives the cost
    so far for W&B (wellocr.tracking.TrackingCallback asks for it), so the console logs stay the trainer's own and
    the callbacks' order does not matter."""

    def __init__(self, ledger: CostLedger, stop_state: Any, cost_cfg: Any, max_steps: int,
                 clock: Callable[[], float] = time.time):
        self.ledger = ledger
        self.stop_state = stop_state
        self.cost_cfg = cost_cfg
        self.max_steps = max_steps
        self.clock = clock
        self.warned = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.ledger.heartbeat(state.global_step, now=self.clock())
        self._check_budget(self.ledger.total_usd())
        return control

    def metrics(self, step: int) -> dict[str, float]:
        """cost/usd so far, and from step 1 on cost/usd_per_step and cost/projected_usd (at max_steps)."""
        spent = self.ledger.total_usd()
        out = {"cost/usd": round(spent, 6)}
        if step > 0:
            out["cost/usd_per_step"] = spent / step
            out["cost/projected_usd"] = spent / step * max(self.max_steps, step)
        return out

    def on_train_end(self, args, state, control, **kwargs):
        self.ledger.heartbeat(state.global_step, now=self.clock(), force=True)
        return control

    def _check_budget(self, spent: float) -> None:
        cap = self.cost_cfg.budget_cap
        if cap <= 0:
            return
        if spent >= cap:
            message = budget_exhausted(self.ledger, self.cost_cfg)
            if message and self.stop_state.reason is None:
                self.ledger.flush(self.clock())
                self.stop_state.request("budget", message)
        elif spent >= WARN_FRACTION * cap and not self.warned:
            self.warned = True
            print(f"wellocr: warning: ${spent:.2f} spent, {spent / cap:.0%} of cost.budget_cap ${cap:.2f}; "
                  "training stops (with a checkpoint) at the cap", flush=True)


class ProgressLines(TrainerCallback):
    """Training progress as plain lines, one per logging step (step, elapsed, time left, then the logged values),
    in place of transformers' progress bar where stdout is not a terminal: in `sky jobs logs` or a pipe the bar
    is one endless line of carriage returns. The trainer (wellocr.sft) picks this or the bar."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.started, self.first_step = clock(), 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step = self.clock(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return control
        print(progress_line(state.global_step, state.max_steps, self.clock() - self.started,
                            state.global_step - self.first_step, logs or {}), flush=True)
        return control


def progress_line(step: int, max_steps: int, elapsed: float, trained: int, logs: dict) -> str:
    """`step 4/8 (50%), 12 s, ~12 s left: loss 6.25, grad_norm 0.61, learning_rate 0.0017, epoch 0.5`."""
    head = f"step {step}/{max_steps}" + (f" ({step / max_steps:.0%})" if max_steps > 0 else "")
    head += f", {_duration(elapsed)}"
    if 0 < trained and step < max_steps:
        head += f", ~{_duration(elapsed / trained * (max_steps - step))} left"
    values = ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                       for key, value in logs.items() if key != "total_flos")
    return f"{head}: {values}" if values else head


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"
