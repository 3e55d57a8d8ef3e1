"""Weights & Biases tracking that survives preemption and never stops training.

The W&B run id is stored in run.json the first time and reused by every later attempt (`resume="allow"`), so a
preempted and restarted job is ONE continuous W&B run. Without credentials W&B runs offline (`wandb sync` uploads
later); if W&B itself fails, tracking falls back to offline, then to off, with a warning. The config is logged
with secrets masked.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback

from wellocr.config import Config
from wellocr.redact import redact_data
from wellocr.rundir import RunDir

log = logging.getLogger("wellocr")

# HF Trainer log keys → W&B keys
_RENAME = {
    "loss": "train/loss", "learning_rate": "train/lr", "grad_norm": "train/grad_norm",
    "mean_token_accuracy": "train/token_accuracy", "entropy": "train/entropy", "num_tokens": "train/tokens",
    "epoch": "train/epoch", "eval_loss": "eval/loss", "eval_runtime": "eval/runtime_s",
    "eval_mean_token_accuracy": "eval/token_accuracy",
}


def _wandb_key(key: str) -> str:
    if key in _RENAME or "/" in key:
        return _RENAME.get(key, key)
    for prefix in ("eval", "train"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    return f"train/{key}"


class Tracker:
    def __init__(self, cfg: Config, run: RunDir, mode: str | None = None):
        """`mode`: W&B's mode to try first ("offline" when preflight found no credentials); None: W&B's own."""
        self.cfg, self.run, self.mode = cfg, run, mode
        self.wandb_run: Any = None
        self._warned = False

    @property
    def active(self) -> bool:
        return self.wandb_run is not None

    def start(self, preemptions: int) -> None:
        if not self.cfg.wandb.enabled or os.environ.get("WANDB_MODE", "").lower() == "disabled":
            return
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed: tracking off")
            return
        run_id = self.run.read().get("wandb_run_id")
        if not run_id:
            run_id = wandb.util.generate_id()
            self.run.update(wandb_run_id=run_id)
        kwargs = dict(
            project=self.cfg.wandb.project, entity=self.cfg.wandb.entity, name=self.run.path.name, id=run_id,
            resume="allow", dir=str(self.run.path), config=redact_data(self.cfg.to_dict()),
        )
        for mode in dict.fromkeys((self.mode, "offline")):
            try:
                self.wandb_run = wandb.init(**kwargs, **({"mode": mode} if mode else {}))
                break
            except Exception as exc:  # noqa: BLE001 - W&B must never stop training
                log.warning("W&B init failed (%s)%s", exc, "; retrying offline" if mode is None else "; tracking off")
        if self.wandb_run is not None:
            self.wandb_run.summary["run/preemptions"] = preemptions
            print(f"W&B run {run_id} ({'offline' if self.wandb_run.settings.mode == 'offline' else 'online'}): "
                  f"{getattr(self.wandb_run, 'url', None) or self.run.path / 'wandb'}", flush=True)

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        if self.wandb_run is None:
            return
        try:
            self.wandb_run.log(data, step=step)
        except Exception as exc:  # noqa: BLE001
            if not self._warned:
                log.warning("W&B log failed (%s); training goes on", exc)
                self._warned = True

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int | None = None) -> None:
        """A wandb.Table; PIL images in rows become wandb.Image."""
        if self.wandb_run is None:
            return
        try:
            import wandb
            from PIL import Image

            table = wandb.Table(columns=columns)
            for row in rows:
                table.add_data(*[wandb.Image(v) if isinstance(v, Image.Image) else v for v in row])
            self.wandb_run.log({key: table}, step=step)
        except Exception as exc:  # noqa: BLE001
            log.warning("W&B table %s failed (%s)", key, exc)

    def finish(self, exit_code: int = 0) -> None:
        if self.wandb_run is None:
            return
        try:
            self.wandb_run.finish(exit_code=exit_code)
        except Exception as exc:  # noqa: BLE001
            log.warning("W&B finish failed (%s)", exc)
        self.wandb_run = None


class TrackingCallback(TrainerCallback):
    """Forward the Trainer's logs (plus GPU memory, samples/s and `extra(step)`, e.g. the cost so far) to W&B under
    stable names."""

    def __init__(self, tracker: Tracker, samples_per_step: int, extra: Callable[[int], dict] | None = None):
        self.tracker = tracker
        self.samples_per_step = samples_per_step
        self.extra = extra
        self._last: tuple[float, int] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.tracker.active or not logs:
            return
        data = {_wandb_key(k): v for k, v in logs.items() if isinstance(v, (int, float))}
        now = time.time()
        if self._last is not None and state.global_step > self._last[1]:
            data["train/samples_per_second"] = (
                (state.global_step - self._last[1]) * self.samples_per_step / (now - self._last[0]))
        self._last = (now, state.global_step)
        if self.extra is not None:
            data.update(self.extra(state.global_step))
        import torch

        if torch.cuda.is_available():
            data["gpu/memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
            data["gpu/memory_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
        self.tracker.log(data, step=state.global_step)
