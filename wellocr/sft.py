"""TRL's SFTTrainer as wellocr trains with it: the CPU loss, resumed runs that follow their own config, the
project's model card in every saved adapter and the run directory (not TRL's or PEFT's templates), and progress as
lines where the console is not a terminal.

trl 1.15 (Unsloth's pin) computes the loss with a fused, chunked LM-head kernel written in Triton, which needs a
GPU; on CPU it fails (`'NoneType' object has no attribute 'apply'`). There the trainer falls back to the model's
standard causal-LM loss (transformers' `Trainer.compute_loss`: mean over label tokens, gradient-accumulation
aware). On CUDA it is TRL's (or Unsloth's patched) loss, unchanged.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from transformers import ProgressCallback, Trainer, TrainerCallback
from trl import SFTTrainer

from wellocr.artifacts import load_run_config
from wellocr.callbacks import ProgressLines
from wellocr.card import model_card
from wellocr.checkpoint import checkpoint_step, read_trainer_state, write_text_atomic
from wellocr.data import training_instruction
from wellocr.phases import release_cached_memory


def fused_loss_supported(device_type: str) -> bool:
    return device_type in ("cuda", "xpu")


class ResumeCallback(TrainerCallback):
    """A resumed run follows its own config from the resumed step, not the checkpoint's.

    - Learning rate: the optimizer state in a checkpoint carries the learning rate of the run that wrote it; when
      a resume raises max_steps, that is the old schedule's last value (0 at the old end for a linear decay), and
      the first step would use it. The scheduler is rebuilt for the new max_steps with the checkpoint's step
      count, so its value at that step is the right one: put it into the optimizer before the first step.
    - Intervals: transformers takes logging/eval/save steps from the checkpoint's trainer_state.json; the run's
      config may change them on resume (they do not change the trajectory), so the config's values win.
    """

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if state.global_step == 0:
            return
        for name in ("logging_steps", "eval_steps", "save_steps"):
            if isinstance(getattr(args, name, None), int):
                setattr(state, name, getattr(args, name))
        if optimizer is None or lr_scheduler is None:
            return
        lambdas, bases = getattr(lr_scheduler, "lr_lambdas", None), getattr(lr_scheduler, "base_lrs", None)
        if not lambdas or not bases:
            return
        lrs = [base * fn(lr_scheduler.last_epoch) for base, fn in zip(bases, lambdas)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        lr_scheduler._last_lr = lrs  # what the trainer logs as the current learning rate


class WellocrSFTTrainer(SFTTrainer):
    """`generation_eval(model, step) -> dict` (optional) adds generation-based metrics (eval/cer, eval/wer) to
    every evaluation: the eval loss alone says little about transcription quality. `phases` (a
    wellocr.phases.PhaseMonitor, optional) is told when an evaluation starts and ends, and the memory the
    evaluation cached is handed back before training continues. A resumed run's closing metrics (steps/s,
    samples/s, train loss) are this process's own, not averaged over steps it did not train."""

    start_step = 0
    _instruction: str | None = None  # the prompt the model learns, for the model card (read once)

    def __init__(self, *args, generation_eval=None, phases=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.generation_eval = generation_eval
        self.phases = phases
        self.add_callback(ResumeCallback())
        terminal = getattr(sys.stdout, "isatty", lambda: False)()
        if not terminal and self.pop_callback(ProgressCallback) is not None:
            self.add_callback(ProgressLines())  # a bar in a terminal, lines in a log

    def create_model_card(self, *args, **kwargs):
        """The run directory's README.md (TRL writes its template there at every checkpoint): the project's card."""
        self._write_card(Path(self.args.output_dir), self._run_dir / "final", "final adapter in `final/`")

    def _save(self, output_dir=None, state_dict=None):
        """Every adapter saved (checkpoints, final/) carries the project's card instead of PEFT's template; it is
        written before the completeness marker, which lists it."""
        super()._save(output_dir, state_dict)
        saved = Path(output_dir or self.args.output_dir)
        if checkpoint_step(saved) is not None:
            self._write_card(saved, saved, f"`{saved.name}/`")
        else:  # final/, written aside and renamed into place
            self._write_card(saved, self._run_dir / "final", "`final/`")

    @property
    def _run_dir(self) -> Path:
        return Path(self.args.output_dir)

    def _write_card(self, directory: Path, load_from: Path, source: str) -> None:
        if not self.is_world_process_zero() or not (self._run_dir / "config.yaml").is_file():
            return  # not a wellocr run directory (the auto batch probe saves nothing)
        cfg = load_run_config(self._run_dir)
        if self._instruction is None:
            self._instruction = training_instruction(cfg.data)
        card = model_card(self._run_dir, cfg, source, self.state.global_step, merged=False,
                          base_model=cfg.model.model_name, load_from=str(load_from.absolute()),
                          instruction=self._instruction, history=self.state.log_history)
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(directory / "README.md", card)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self.start_step = 0
        if isinstance(resume_from_checkpoint, (str, Path)):
            self.start_step = (read_trainer_state(Path(resume_from_checkpoint)) or {}).get("global_step", 0)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """Data-parallel ranks on CPU: transformers maps the optimizer state to `args.device`, which is "cpu:N"
        there, and torch.load cannot restore that location; the state is loaded to the CPU instead."""
        device = self.args.device
        if checkpoint is None or device.type != "cpu" or device.index is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        import torch

        load = torch.load

        def load_to_cpu(*args, **kwargs):
            return load(*args, **{**kwargs, "map_location": "cpu"})

        torch.load = load_to_cpu
        try:
            return super()._load_optimizer_and_scheduler(checkpoint)
        finally:
            torch.load = load

    def log(self, logs, *args, **kwargs):
        if "train_runtime" in logs:
            _this_process_only(logs, self.start_step, self.state.global_step, self.state.max_steps)
        return super().log(logs, *args, **kwargs)

    def evaluate(self, *args, **kwargs):
        release_cached_memory()  # what training cached: the evaluation's room, and its own peak in the phase record
        self._phase("eval_loss")
        training = self.model.training
        metrics = super().evaluate(*args, **kwargs)
        if self.generation_eval is not None:
            self._phase("generation")
            if training:
                # transformers' evaluate left eval mode; the generation pass puts back the mode it finds, and under
                # Unsloth that means for_training + gradient checkpointing (else the next step keeps every
                # activation: 48.7 GiB instead of 4.2 at micro-batch 8 on the 2B model).
                self.model.train()
            extra = self.generation_eval(self.model, self.state.global_step)
            if extra:
                self.log(extra)
                metrics.update(extra)
        release_cached_memory()
        self._phase("train")
        return metrics

    def get_batch_samples(self, *args, **kwargs):
        """The step's batches from the DataLoader, timed: the phase record's data wait."""
        started = time.perf_counter()
        batches = super().get_batch_samples(*args, **kwargs)
        if self.phases is not None:
            self.phases.data_wait(time.perf_counter() - started)
        return batches

    def _phase(self, name: str) -> None:
        if self.phases is not None:
            self.phases.switch(name)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if fused_loss_supported(self.args.device.type):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs = {**inputs, "use_cache": False}
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


def _this_process_only(metrics: dict, start_step: int, end_step: int, max_steps: int) -> None:
    """transformers' closing metrics count max_steps samples over this process's runtime and divide this
    process's summed loss by the global step: rescale both to the steps this process trained."""
    trained = end_step - start_step
    runtime = metrics.get("train_runtime") or 0
    if max_steps > 0 and runtime > 0:
        for key in ("train_samples_per_second", "train_steps_per_second"):
            if key in metrics:
                metrics[key] = round(metrics[key] * trained / max_steps, 3)
    if "train_loss" in metrics:
        metrics["train_loss"] = metrics["train_loss"] * end_step / trained if trained > 0 else float("nan")
