"""Stage 2 of `python -m wellocr.train`: the training recipe, from a bootstrapped process to an evaluated adapter.

Imported only after `wellocr.bootstrap` pointed the compile caches at the run's volume and imported the backend
(Unsloth before transformers/TRL/PEFT), so torch, transformers and TRL are ordinary top-level imports here.

    run(attempt): resume point → ledger and tracker → load → data → trainer → fit (OOM fallback) → finalize

Evaluation shares the GPU with training: the eval-loss pass keeps no logits (`prediction_loss_only`), the
in-training generation pass shrinks its batch on CUDA out-of-memory instead of failing the run, and the memory an
evaluation cached is handed back before training continues; `wellocr.phases` records each phase's peak.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import EarlyStoppingCallback
from trl import SFTConfig

from wellocr.artifacts import eval_dir_name
from wellocr.autobatch import (
    AutoBatchError,
    batch_device_key,
    choose_micro_batch,
    is_oom,
    micro_batch_candidates,
    training_probe,
    worst_case_rows,
)
from wellocr.bootstrap import StartupTimer
from wellocr.callbacks import (
    AgreeToStop,
    CheckpointCallback,
    CostCallback,
    PhaseCallback,
    RehearsalCallback,
    StartupCallback,
    StopCallback,
)
from wellocr.checkpoint import (
    RetentionPolicy,
    checkpoint_step,
    incomplete_reason,
    latest_complete_checkpoint,
    mark_complete,
    remove_incomplete,
)
from wellocr.config import Config
from wellocr.data import Split, enforce_max_length, load_splits, trainer_dataset
from wellocr.distributed import across_ranks, barrier, per_rank_batch, rank_accumulation
from wellocr.errors import UserError
from wellocr.inference import (
    evaluate_model,
    fixed_eval_rows,
    generation_limit,
    generation_metrics,
    worst_samples,
)
from wellocr.ledger import CostLedger, budget_exhausted
from wellocr.model import Backend, load_for_training, resolve_precision
from wellocr.outcome import EXIT_OK, EXIT_PREEMPTED, Outcome, OutOfMemory
from wellocr.phases import PhaseMonitor
from wellocr.preemption import StopState
from wellocr.rundir import PREEMPTED_REASONS, RunDir, hardware
from wellocr.sft import WellocrSFTTrainer
from wellocr.tracking import Tracker, TrackingCallback

log = logging.getLogger("wellocr")

MAX_OOM_ADAPTATIONS = 2


@dataclass
class Data:
    """The scanned splits (train, eval, maybe test), their lazily formatted trainer datasets, and the longest
    sequence kept (the trainer's max_length)."""

    splits: dict[str, Split]
    datasets: dict[str, Any]
    max_length: int


@dataclass
class Attempt:
    """One process's attempt at the run: what stage 1 resolved, handed to the recipe."""

    cfg: Config
    run: RunDir
    number: int
    backend: Backend
    stop: StopState
    timer: StartupTimer
    phases: PhaseMonitor = field(default_factory=PhaseMonitor)
    remote: Any = None  # wellocr.remote.RemoteStore
    resume: Path | None = None  # --resume CHECKPOINT; None: the newest complete checkpoint of the run, if any
    resume_latest: bool = False
    rehearse_preemption: bool = False
    wandb_mode: str | None = None  # what preflight decided (offline without credentials)
    rank: int = 0  # data-parallel ranks (wellocr.distributed): rank 0 writes what is written once
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def precision(self) -> str:
        return resolve_precision(self.cfg.train.precision, self.backend.device)


def run(a: Attempt) -> Outcome:
    """The recipe: resume point → ledger and tracker → load → data → trainer → fit (OOM fallback) → finalize."""
    cfg, run_dir = a.cfg, a.run
    resume_from, start_step = resume_point(a)
    ledger = None
    if a.main:
        run_dir.update_attempt(a.number, start_step=start_step, hardware=hardware(), processes=a.world,
                               precision=a.precision)
        ledger = CostLedger.open(run_dir.cost_file, billed_for(cfg.cost, a), a.number, start_step=start_step)
    over_budget = budget_exhausted(ledger, cfg.cost) if ledger is not None else None
    if across_ranks([int(bool(over_budget))])[0]:
        print(f"wellocr: {over_budget or 'the budget cap is reached'}", flush=True)
        return Outcome("budget", EXIT_OK, start_step)
    tracker = Tracker(cfg, run_dir, a.wandb_mode)
    if a.main:
        tracker.start(sum(x.get("exit_reason") in PREEMPTED_REASONS for x in run_dir.read().get("attempts", [])))
    step = start_step
    try:
        started = time.time()
        model, processor = load_for_training(cfg, a.backend, a.precision)
        a.timer.mark("model_load")
        data = prepare_data(cfg, processor, run_dir)
        a.timer.mark("data")
        callbacks = training_callbacks(a, ledger, resume_from)
        cost = next((c for c in callbacks if isinstance(c, CostCallback)), None)
        probe = probe_trainer_factory(cfg, run_dir, a.backend, a.precision, model, processor, data)
        a.phases.switch("auto_batch")
        sizes = batch_sizes(cfg, run_dir, a.backend, probe, a)
        a.timer.mark("auto_batch")  # the probe runs in the first attempt only
        if a.main:
            callbacks.append(TrackingCallback(tracker, sizes["per_device_train_batch_size"]
                                              * sizes["gradient_accumulation_steps"] * a.world, extra=cost.metrics))
        hook = generation_eval_hook(cfg, a.backend, processor, data, tracker) if a.main else None

        def make_trainer(micro_batch: int, accumulation: int) -> Any:
            return build_trainer(cfg, run_dir, a.backend, a.precision, model, processor, data, micro_batch,
                                 accumulation, callbacks, generation_eval=hook, phases=a.phases)

        trainer, result = train_adapting_to_oom(run_dir, make_trainer, resume_from, sizes)
        step = trainer.state.global_step
        if a.stop.reason is not None:
            return stopped(a, step)
        return finalize(a, trainer, result, processor, data, tracker, ledger, start_step, time.time() - started)
    finally:
        if a.main:
            ledger.heartbeat(step, force=True)
            tracker.finish()
            a.phases.switch(None)
            run_dir.update_attempt(a.number, **a.phases.summary())


def join_process_group(backend: Backend, local_rank: int) -> None:
    """A data-parallel rank joins its peers (torchrun's environment): NCCL on its own GPU, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return
    if backend.device == "cuda":
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group("nccl" if backend.device == "cuda" else "gloo")


def billed_for(cost_cfg: Any, a: Attempt) -> Any:
    """The ledger bills every GPU the ranks use."""
    if a.world <= 1 or a.backend.device != "cuda":
        return cost_cfg
    return cost_cfg.model_copy(update={"gpu_count": max(cost_cfg.gpu_count, a.world)})


def common_resume_point(a: Attempt, resume_from: Path | None, step: int) -> tuple[Path | None, int]:
    """Every rank starts at one step: on several machines each reads its own disk, and node 0 may hold a newer
    checkpoint than the bucket gave the others (its upload cut short): the newest step every rank has wins."""
    high, negated_low = across_ranks([step, -step], op="max")  # max and min in one collective
    low = -negated_low
    if low == high:
        return resume_from, step
    if low == 0:
        print(f"wellocr: not every machine has a checkpoint (this one: step {step}); all start from step 0",
              flush=True)
        return None, 0
    older = a.run.path / f"checkpoint-{low}"
    if incomplete_reason(older) is not None:
        raise UserError(f"the machines' newest checkpoints differ (steps {low} to {high}) and {older} is not "
                        f"complete here ({incomplete_reason(older)}): relaunch so that every machine restores from "
                        "checkpoint.remote")
    print(f"wellocr: resuming from {older.name}, the newest every machine has (this one has step {step})", flush=True)
    return older, low


def resume_point(a: Attempt) -> tuple[Path | None, int]:
    """The checkpoint this attempt continues from (--resume, else the run's newest complete one) and its step."""
    removed = remove_incomplete(a.run.path) if a.main else []
    barrier()
    resume_from = a.resume if a.resume is not None else latest_complete_checkpoint(a.run.path)
    start_step = (checkpoint_step(resume_from) or 0) if resume_from is not None else 0
    resume_from, start_step = common_resume_point(a, resume_from, start_step)
    if resume_from is not None and start_step > a.cfg.train.max_steps:
        raise UserError(f"{resume_from} is at step {start_step}, past train.max_steps {a.cfg.train.max_steps}: "
                        f"to continue the run raise it (--set train.max_steps=N with N > {start_step})")
    if resume_from is not None:
        print(f"resuming from {resume_from.name} (step {start_step})", flush=True)
    elif removed or a.resume_latest:
        print("no complete checkpoint: starting from step 0", flush=True)
    return resume_from, start_step


def training_callbacks(a: Attempt, ledger: CostLedger, resume_from: Path | None) -> list:
    """Checkpoint completeness and retention (+ uploads), the stop requests, the cost ledger and budget, the
    start-up timing, and the rehearsal's one stop (W&B's callback joins once the batch sizes are known)."""
    retention = RetentionPolicy(a.cfg.checkpoint.keep_best, a.cfg.checkpoint.keep_recent)
    protect = {resume_from.name} if resume_from is not None else set()
    callbacks = [
        CheckpointCallback(a.run.path, retention, a.stop, protect, remote=a.remote,
                           marker_extra=lambda: {"cost_usd": ledger.total_usd() if ledger else None}),
        StopCallback(a.stop),
    ]
    if a.main:  # what is written once: ledger, run.json timings, the rehearsal's record
        callbacks += [CostCallback(ledger, a.stop, a.cfg.cost, a.cfg.train.max_steps),
                      StartupCallback(a.run, a.number, a.timer.marks), PhaseCallback(a.phases, a.run, a.number)]
        if a.rehearse_preemption:
            callbacks.append(RehearsalCallback(a.run, a.stop))
    if a.world > 1:
        callbacks.append(AgreeToStop(a.stop))
    return callbacks


def stopped(a: Attempt, step: int) -> Outcome:
    """Training stopped early on a request: SIGTERM (75), the rehearsal's one stop (75), or the budget cap (0)."""
    if a.stop.reason == "budget":
        print(f"wellocr: {a.stop.message}", flush=True)
        a.run.update(status="budget")
        return Outcome("budget", EXIT_OK, step)
    return Outcome("rehearsal-stop" if a.stop.reason == "rehearsal" else "preempted", EXIT_PREEMPTED, step)


def finalize(a: Attempt, trainer: Any, result: Any, processor: Any, data: Data, tracker: Tracker,
             ledger: CostLedger, start_step: int, elapsed: float) -> Outcome:
    """final/ (uploaded in the background), this attempt's numbers, the final evaluation, the cost so far."""
    step = trainer.state.global_step
    final = save_final(trainer, a.run, step, a.main)
    reason = "finished" if step >= a.cfg.train.max_steps else "early-stopped"
    if not a.main:  # the final evaluation, the report and the cost are rank 0's
        return Outcome(reason, EXIT_OK, step)
    a.run.update(status=reason)
    if a.remote is not None:
        a.remote.upload_path(final)  # now, while the final evaluation runs
    metrics = result.metrics if result is not None else {}
    print(f"this attempt: steps {start_step + 1}-{step} in {metrics.get('train_runtime', elapsed):.1f} s, "
          f"{metrics.get('train_steps_per_second', 0):.2f} steps/s, train loss "
          f"{metrics.get('train_loss', float('nan')):.4f}", flush=True)
    print(f"final adapter: {final}", flush=True)
    a.phases.switch("final_eval")
    evaluate_final(a.cfg, a.run, a.backend, trainer.model, processor, data, tracker)
    a.phases.switch(None)
    print(a.phases.describe(), flush=True)
    print(f"cost: ${ledger.total_usd():.4f} over {len(ledger.segments)} attempt(s) "
          f"(python -m wellocr.cost --run {a.run.path})", flush=True)
    return Outcome(reason, EXIT_OK, step)


# ---------------------------------------------------------------- the steps


def prepare_data(cfg: Config, processor: Any, run: RunDir) -> Data:
    """Load and scan every split, drop rows over max_seq_length, and wrap them for the trainer (decoded lazily)."""
    splits = load_splits(cfg.data)
    max_length = 0
    for name in list(splits):
        splits[name], longest = enforce_max_length(splits[name], cfg.data, processor, cfg.train.max_seq_length)
        max_length = max(max_length, longest)
        skipped = len(splits[name].bad_rows)
        print(f"data: {name} {len(splits[name])} rows" + (f" ({skipped} skipped)" if skipped else ""), flush=True)
    datasets = {name: trainer_dataset(split, cfg.data, run.bad_rows_log) for name, split in splits.items()}
    print(f"max sequence length {max_length} tokens (images at most {cfg.data.max_pixels // 1024} visual tokens)",
          flush=True)
    return Data(splits, datasets, max_length)


def sft_config(cfg: Config, run: RunDir, backend: Backend, precision: str, max_length: int,
               micro_batch: int, accumulation: int, probe: bool = False):
    """The run's SFTConfig; `probe`: one step that evaluates, saves and logs nothing (the auto batch probe)."""
    t = cfg.train
    optim = t.optim
    if backend.device != "cuda" and "8bit" in optim:
        log.info("train.optim %s needs CUDA (bitsandbytes); using adamw_torch on CPU", optim)
        optim = "adamw_torch"
    workers = dataloader_workers(cfg.data.dataloader_num_workers)
    settings = dict(
        output_dir=str(run.path),
        run_name=run.path.name,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=micro_batch,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=accumulation,
        warmup_steps=t.warmup_steps,
        optim=optim,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler_type,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=backend.device == "cpu",
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # wellocr.checkpoint.RetentionPolicy decides, after the completeness marker
        metric_for_best_model="eval_loss",
        prediction_loss_only=True,  # eval/cer and eval/wer come from generation: no logits kept (they filled GPUs)
        greater_is_better=False,
        load_best_model_at_end=False,
        restore_callback_states_from_checkpoint=True,
        gradient_checkpointing=False,  # enabled on the model by wellocr.model (Unsloth's or PEFT's way)
        max_length=max_length,
        completion_only_loss=True,
        remove_unused_columns=False,  # the lazy transform needs the raw columns
        dataset_kwargs={"skip_prepare_dataset": True},
        dataloader_num_workers=workers,
        # Workers outlive an epoch: new ones at each epoch's start cost its first step ~1.1 s (2B model, 8 x 1 on the
        # H200: 1.7-2.1 s against 0.72 s), 6% of a run on a 200-row data set.
        dataloader_persistent_workers=workers > 0,
        dataset_num_proc=cfg.data.dataset_num_proc,
        report_to="none",
        disable_tqdm=False,
    )
    if backend.name == "unsloth":
        settings["dataset_text_field"] = ""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a data-parallel rank (wellocr.distributed)
        settings.update(ddp_backend="nccl" if backend.device == "cuda" else "gloo", ddp_find_unused_parameters=False)
    if probe:
        settings.update(max_steps=1, eval_strategy="no", save_strategy="no", logging_strategy="no",
                        dataloader_num_workers=0, dataloader_persistent_workers=False, disable_tqdm=True)
    return SFTConfig(**settings)


def dataloader_workers(requested: int) -> int:
    """The configured worker count, capped at the CPUs this machine has beside the training process (a RunPod
    4090 pod may have as few as 5 vCPUs; more workers than cores only add context switches)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    available = max(0, (cpus or 1) - 1)
    if requested > available:
        log.info("data.dataloader_num_workers %d > %d free CPU(s): using %d", requested, available, available)
    return min(requested, available)


def build_trainer(cfg: Config, run: RunDir, backend: Backend, precision: str, model: Any, processor: Any,
                  data: Data, micro_batch: int, accumulation: int, callbacks: list, probe: bool = False,
                  generation_eval: Any = None, phases: PhaseMonitor | None = None) -> Any:
    args = sft_config(cfg, run, backend, precision, data.max_length, micro_batch, accumulation, probe)
    collator = None
    if backend.name == "unsloth":
        from unsloth.trainer import UnslothVisionDataCollator

        # resize="max" keeps our pixel-budget sizes; Unsloth's default shrinks scans to 512 px wide.
        collator = UnslothVisionDataCollator(model, processor, resize="max", max_seq_length=data.max_length,
                                             completion_only_loss=True)
    if cfg.train.early_stopping_patience > 0 and not probe:
        callbacks = [*callbacks, EarlyStoppingCallback(cfg.train.early_stopping_patience,
                                                       cfg.train.early_stopping_threshold)]
    return WellocrSFTTrainer(
        model=model,
        args=args,
        train_dataset=data.datasets["train"],
        eval_dataset=None if probe else data.datasets["eval"],
        processing_class=processor,
        data_collator=collator,
        callbacks=callbacks,
        generation_eval=generation_eval,
        phases=phases,
    )


def train_adapting_to_oom(run: RunDir, make_trainer, resume_from: Path | None, initial: dict) -> tuple[Any, Any]:
    """Train; on CUDA OOM halve the micro-batch and double accumulation (same effective batch), rebuild and
    resume from the last complete checkpoint, at most MAX_OOM_ADAPTATIONS times; the sizes go into run.json."""
    sizes = run.read().get("adapted_batch") or initial
    for adaptation in range(MAX_OOM_ADAPTATIONS + 1):
        trainer = make_trainer(sizes["per_device_train_batch_size"], sizes["gradient_accumulation_steps"])
        try:
            return trainer, trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except Exception as exc:  # noqa: BLE001 - only OOM is handled, everything else re-raised
            if not is_oom(exc):
                raise
            micro = sizes["per_device_train_batch_size"]
            del trainer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if adaptation == MAX_OOM_ADAPTATIONS or micro == 1:
                raise OutOfMemory(
                    f"CUDA out of memory at micro-batch {micro} after {adaptation} adaptation(s); lower "
                    "data.max_pixels or train.max_seq_length, or use a GPU with more memory"
                ) from exc
            sizes = {"per_device_train_batch_size": micro // 2,
                     "gradient_accumulation_steps": sizes["gradient_accumulation_steps"] * 2}
            run.update(adapted_batch=sizes)
            print(f"wellocr: CUDA out of memory at micro-batch {micro}; retrying with "
                  f"{sizes['per_device_train_batch_size']} x {sizes['gradient_accumulation_steps']} accumulation "
                  f"(same effective batch). {str(exc).strip()[:400]}", flush=True)
            remove_incomplete(run.path)
            resume_from = latest_complete_checkpoint(run.path)
    raise AssertionError("unreachable")


def probe_trainer_factory(cfg: Config, run: RunDir, backend: Backend, precision: str, model: Any, processor: Any,
                          data: Data) -> Any:
    """make(micro): a trainer over the longest training sample x micro that trains one step and saves nothing."""
    @functools.cache  # the longest row, found on the first call only (every candidate probes with it)
    def longest() -> Any:
        return worst_case_rows(data.splits["train"], cfg.data, processor, data.datasets["train"], 1)

    def make(micro_batch: int) -> Any:
        rows = longest().select([0] * micro_batch)
        probe_data = Data({}, {"train": rows}, data.max_length)
        return build_trainer(cfg, run, backend, precision, model, processor, probe_data, micro_batch, 1, [],
                             probe=True)

    return make


def batch_sizes(cfg: Config, run: RunDir, backend: Backend, make_probe_trainer: Any, a: Attempt | None = None,
                ranks: int | None = None) -> dict:
    """Micro-batch and accumulation: the config's, or for `auto` the largest micro-batch that fits (probed once
    with the longest sample, then remembered in run.json with the device it was chosen for, so every restart on
    that kind of device trains with the same sizes; a recovery onto another GPU (a multi-cloud job) chooses again
    for its memory and forgets an out-of-memory halving of the old device — the effective batch stays).
    `make_probe_trainer(micro)`: a trainer over the worst-case rows that trains one step and saves nothing.
    Data-parallel ranks (`a.world` > 1) each take 1/world of the effective batch and do not probe (one rank's
    out-of-memory in the probe would leave the others waiting in a collective): `choose_batch_before_ranks` chose
    in one process for `ranks` ranks before they started; each rank takes the largest divisor of its share up to
    that choice, and the ranks agree on the smallest. The sizes returned are per rank."""
    t = cfg.train
    world, main = (a.world, a.main) if a is not None else (1, True)
    ranks = ranks or world
    if t.per_device_train_batch_size != "auto":
        micro = t.per_device_train_batch_size
        return {"per_device_train_batch_size": micro,
                "gradient_accumulation_steps": rank_accumulation(t.gradient_accumulation_steps, world, micro)}
    effective = per_rank_batch(t.effective_batch_size, ranks)
    device = batch_device_key(backend.device)
    recorded = run.read().get("auto_batch")
    chosen = not (recorded and recorded.get("device", device) == device)
    if not chosen:
        micro = max(d for d in micro_batch_candidates(effective) if d <= recorded["per_device_train_batch_size"])
    elif world > 1 and backend.device == "cuda":
        raise UserError(f"auto batch: no choice recorded for {device} before the ranks started; relaunch with "
                        "python -m wellocr.train, which chooses it first")
    else:
        micro = choose_now(cfg, run, backend, make_probe_trainer, effective, device, recorded if main else None)
    micro = across_ranks([micro], op="min")[0]
    sizes = {"per_device_train_batch_size": micro, "gradient_accumulation_steps": effective // micro}
    if main and (chosen or world > 1):  # a restart on one GPU trains as recorded, silently
        if chosen:
            run.update(auto_batch={**sizes, "device": device})
        on = f" x {ranks} processes" if ranks > 1 else ""
        print(f"auto batch: micro-batch {micro} x {effective // micro} accumulation{on} = {t.effective_batch_size}",
              flush=True)
    return sizes


def choose_now(cfg: Config, run: RunDir, backend: Backend, make_probe_trainer: Any, effective: int, device: str,
               recorded: dict | None) -> int:
    """The largest micro-batch of `effective` that fits: probed on a GPU (one training step each), 2 on CPU."""
    if recorded:
        print(f"auto batch: chosen for {recorded['device']}; this attempt runs on {device}: choosing again",
              flush=True)
        run.update(adapted_batch=None)
    probe = None
    if backend.device == "cuda":
        print("auto batch: one training step on the longest sample per candidate micro-batch", flush=True)
        probe = training_probe(make_probe_trainer)
    try:
        return choose_micro_batch(probe, effective, backend.device)[0]
    except AutoBatchError as exc:
        raise OutOfMemory(str(exc)) from exc
    finally:
        probe = None
        gc.collect()


def choose_batch_before_ranks(cfg: Config, run: RunDir, backend: Backend, ranks: int) -> None:
    """For `auto` with data-parallel ranks, when run.json holds no choice for this kind of device: the micro-batch
    of one rank's share, chosen in this one process (on its first GPU: every GPU of a pod is the same kind) and
    recorded in run.json for the ranks (`python -m wellocr.rank RUN_DIR --choose-batch` checks the record first,
    before the backend is imported)."""
    make = None
    if backend.device == "cuda":  # the probe trains one step per candidate: the model and data as the ranks load them
        precision = resolve_precision(cfg.train.precision, backend.device)
        model, processor = load_for_training(cfg, backend, precision)
        data = prepare_data(cfg, processor, run)
        make = probe_trainer_factory(cfg, run, backend, precision, model, processor, data)
    batch_sizes(cfg, run, backend, make, ranks=ranks)


def save_final(trainer: Any, run: RunDir, step: int, main: bool = True) -> Path:
    """Adapter + processor into final/ (written aside, marked complete, then swapped in; by rank 0 of a
    data-parallel attempt, once every rank is there)."""
    staging = run.path / "final.partial"
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    barrier()
    trainer.save_model(str(staging))
    barrier()
    if not main:
        return run.final_dir
    mark_complete(staging, step)
    old = run.path / "final.old"
    if run.final_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        run.final_dir.rename(old)
    staging.rename(run.final_dir)
    shutil.rmtree(old, ignore_errors=True)
    return run.final_dir


def generation_eval_hook(cfg: Config, backend: Backend, processor: Any, data: Data, tracker: Any):
    """At every evaluation: CER/WER of a fixed eval subset, and its worst samples as a W&B table. Generation stops
    at `generation_limit` of the subset's answers (the final evaluation uses eval.max_new_tokens)."""
    if cfg.eval.generation_samples <= 0:
        return None
    rows = fixed_eval_rows(data.splits["eval"], cfg.eval.generation_samples)
    limit = generation_limit(processor, [r["answer"] for r in rows], cfg.eval.max_new_tokens)
    batch = {"size": cfg.eval.batch_size}  # halved for the rest of the run when it did not fit beside training

    def evaluate(model: Any, step: int) -> dict:
        result = generation_metrics(model, processor, cfg, rows, batch["size"], backend=backend,
                                    max_new_tokens=limit)
        batch["size"] = result["batch_size"]
        columns = ["step", "index", "image", "prediction", "reference", "loss", "cer", "wer"]
        for by in ("loss", "cer"):
            worst = worst_samples(result["records"], cfg.eval.worst_k, by=by)
            tracker.log_table(f"eval/worst_by_{by}", columns,
                              [[step, r["index"], r["image"], r["prediction"], r["reference"], r["loss"], r["cer"],
                                r["wer"]] for r in worst], step=step)
        return {"eval/cer": result["eval/cer"], "eval/wer": result["eval/wer"]}

    return evaluate


def evaluate_final(cfg: Config, run: RunDir, backend: Backend, model: Any, processor: Any, data: Data,
                   tracker: Any) -> dict:
    """Score the final adapter on the eval split (and test, when the data has one) into eval/final[-test]."""
    results = {}
    for split in ("eval", "test"):
        if split not in data.splits:
            continue
        out = run.eval_dir / eval_dir_name("final", split)
        metrics = evaluate_model(model, processor, cfg, data.splits[split], out, "final", run_dir=run.path,
                                 checkpoint_path=run.final_dir, backend=backend)
        results[split] = metrics
        print(f"final {split}: CER {metrics['cer']:.4f}  WER {metrics['wer']:.4f}  "
              f"(normalised {metrics['cer_normalized']:.4f} / {metrics['wer_normalized']:.4f})  → {out}", flush=True)
        tracker.log({f"final/{split}_cer": metrics["cer"], f"final/{split}_wer": metrics["wer"]})
    return results
