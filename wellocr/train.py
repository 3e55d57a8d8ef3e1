"""`python -m wellocr.train` — QLoRA SFT of Qwen3-VL on well-log headers, built to survive spot preemption.

    python -m wellocr.train [--config PATH] [--set section.key=value ...]
                            [--resume-latest | --resume CHECKPOINT_DIR] [--preflight-only]

The recipe: config → preflight → model → data → trainer → train → save → evaluate → report.
`--resume-latest` is what SkyPilot re-runs after a preemption: it continues from the newest complete checkpoint
of the run, starts fresh when there is none, and does nothing (exit 0) when the run is already done.

Exit codes: 0 finished / early-stopped / budget cap / nothing to do · 2 user error · 69 the hub or a bucket
unreachable after the bounded retries (not retried) · 70 three retryable exits in a row without progress (not
retried) · 75 SIGTERM or uploads unfinished (retryable) · 76 out of memory after adaptation (not retryable) ·
1 anything else (traceback in logs/attempt-<n>.log).
"""

from __future__ import annotations

if __name__ == "__main__":  # a stop asked for while the modules below load is a stop too: exit 75, not 143
    import signal

    def _stop_while_loading(*_):
        raise SystemExit(75)

    signal.signal(signal.SIGTERM, _stop_while_loading)

import argparse
import functools
import gc
import logging
import os
import resource
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from wellocr.preemption import Preempted, StopState, install_sigterm_handler
from wellocr.checkpoint import (
    RetentionPolicy, checkpoint_step, incomplete_reason, latest_complete_checkpoint, mark_complete,
    read_marker, remove_incomplete,
)
from wellocr.config import (
    Config, config_from_dict, find_config_path, load_config, parse_overrides, apply_values,
    save_config, trajectory_differences, validate,
)
from wellocr.errors import UserError
from wellocr.model import (
    Backend, compile_cache_dir, import_backend, load_for_training, resolve_precision, select_backend, use_compile_cache,
)
from wellocr.preflight import run_preflight
from wellocr.remote import RemoteStore
from wellocr.rundir import PREEMPTED_REASONS, ManagedJob, RunDir, RunLock, resolve_run_name

log = logging.getLogger("wellocr")

EXIT_OK, EXIT_ERROR, EXIT_USER, EXIT_UNREACHABLE, EXIT_NO_PROGRESS, EXIT_PREEMPTED, EXIT_OOM = 0, 1, 2, 69, 70, 75, 76
MAX_OOM_ADAPTATIONS = 2
MAX_RETRIES_WITHOUT_PROGRESS = 3  # retryable exits in a row with no new step and no upload: then exit 70


class OutOfMemory(Exception):
    """CUDA OOM even at the smallest micro-batch adaptation allows."""


@dataclass
class Outcome:
    reason: str  # finished | early-stopped | budget | preempted | nothing-to-do | preflight-only | ...
    code: int
    step: int | None = None


# ---------------------------------------------------------------- config and run directory


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m wellocr.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="experiment YAML (default: $WELLOCR_CONFIG)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.max_steps=20 (repeatable)")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume-latest", action="store_true",
                        help="continue this run from its newest complete checkpoint (fresh start if none)")
    resume.add_argument("--resume", metavar="CHECKPOINT_DIR", help="continue from this checkpoint")
    parser.add_argument("--preflight-only", action="store_true", help="run the preflight checks and exit")
    parser.add_argument("--rehearse-preemption", action="store_true",
                        help="stop once right after the first checkpoint with exit 75 (as a preemption would), "
                             "then, relaunched, finish and print a PASS/FAIL verdict of the recovery")
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> tuple[Config, RunDir, str, Any]:
    """The run's config and directory. On resume the run's saved config.yaml is the config; requested values
    may change only what does not alter the training trajectory (steps, intervals, budget, W&B, ...)."""
    if args.resume:
        checkpoint = Path(args.resume)
        if RunDir(checkpoint).exists() or (checkpoint / "config.yaml").is_file():
            newest = latest_complete_checkpoint(checkpoint, quiet=True)
            hint = f"--resume {newest}" if newest is not None else "a checkpoint-<step> directory"
            raise UserError(f"--resume {checkpoint}: this is a run directory, not a checkpoint; pass {hint}, or "
                            "--resume-latest with the run's config to continue from its newest complete checkpoint")
        if incomplete_reason(checkpoint) is not None:
            raise UserError(f"--resume {checkpoint}: not a complete checkpoint ({incomplete_reason(checkpoint)})")
        run = RunDir(checkpoint.parent)
        if not run.config_file.is_file():
            raise UserError(f"--resume {checkpoint}: {run.config_file} is missing")
        saved = _saved_config(run)
        requested = _requested_config(args, fallback=saved)
        cfg = _merge_resumed(saved, requested, run)
        print(f"resuming run directory {run.path} from {checkpoint.name}", flush=True)
        return cfg, run, "--resume", RemoteStore.from_config(cfg.checkpoint, run.path.name)
    config_path = find_config_path(args.config)
    requested = load_config(config_path, args.set)
    make_output_dir(requested.run.output_dir)
    name, how = resolve_run_name(requested, config_path, resume=args.resume_latest)
    run, remote = open_run(requested, name, args.resume_latest)
    job = ManagedJob.from_env(os.environ) if how == "managed job" else None
    earlier = job.earlier_job(run.read()) if job is not None else None
    if earlier:
        print(f"run directory {run.path} is not this job's: {earlier}; this job's run is {job.later_run_name}",
              flush=True)
        name = job.later_run_name
        run, remote = open_run(requested, name, args.resume_latest)
    elif remote is not None and not run.config_file.is_file() and remote.has_progress():
        raise UserError(f"run {name} already exists at {requested.checkpoint.remote}; continue it with "
                        "--resume-latest or set run.run_name to start a new run")
    if run.config_file.is_file():
        if not has_progress(run, remote):
            # A start that failed before its first checkpoint (a wrong data path, say) must not block the
            # corrected one: nothing was trained, so the new config replaces the old.
            print(f"run directory {run.path} never reached a checkpoint: starting it again with this config",
                  flush=True)
            return requested, run, how, remote
        if not args.resume_latest:
            raise UserError(f"run directory {run.path} already exists; continue it with --resume-latest or set "
                            "run.run_name to start a new run")
        print(f"resuming run directory {run.path}", flush=True)
        return _merge_resumed(_saved_config(run), requested, run), run, how, remote
    return requested, run, how, remote


def open_run(cfg: Config, name: str, resume: bool) -> tuple[RunDir, Any]:
    """The run directory and its remote store; on resume, brought up to date from the store first (a fresh
    machine has an empty disk: config, run.json with the W&B id, the ledger and the newest complete checkpoint
    come before anything is decided; failing here beats restarting from step 0)."""
    run = RunDir(Path(cfg.run.output_dir) / name)
    remote = RemoteStore.from_config(cfg.checkpoint, name)
    if remote is not None and resume:
        remote.restore(run.path)
    return run, remote


def make_output_dir(output_dir: str) -> None:
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"run.output_dir: cannot create {output_dir} ({exc.strerror or exc}); choose a writable "
                        "directory, e.g. --set run.output_dir=runs") from None


def has_progress(run: RunDir, remote: Any) -> bool:
    """Whether the run trained anything worth keeping: a complete checkpoint or final/, here or in the remote."""
    if latest_complete_checkpoint(run.path, quiet=True) is not None or incomplete_reason(run.final_dir) is None:
        return True
    return remote is not None and remote.has_progress()


def _saved_config(run: RunDir) -> Config:
    return config_from_dict(yaml.safe_load(run.config_file.read_text()), str(run.config_file))


def _requested_config(args: argparse.Namespace, fallback: Config) -> Config:
    """The --config/$WELLOCR_CONFIG file with --set, or without one the run's saved config with --set."""
    try:
        path = find_config_path(args.config)
    except UserError:
        cfg = config_from_dict(fallback.to_dict(), "config.yaml")
        apply_values(cfg, parse_overrides(args.set), "--set", {})
        validate(cfg, {}, "--set")
        return cfg
    return load_config(path, args.set)


def _merge_resumed(saved: Config, requested: Config, run: RunDir) -> Config:
    """The requested config, once it agrees with the saved one on every trajectory key.

    The saved copy has secrets masked, so the comparison is made on the masked request; the merged config keeps
    the real values (and the requested mutable keys: steps, intervals, budget, W&B)."""
    from wellocr.redact import redact_data

    masked = config_from_dict(redact_data(requested.to_dict()), "the requested config")
    changed = trajectory_differences(saved, masked)
    if changed:
        raise UserError(
            f"resuming run {run.path} changes {', '.join(changed)} (they would change the training trajectory); "
            f"keep the run's values (see {run.config_file}) or start a new run with another run.run_name"
        )
    return requested


def print_summary(cfg: Config, run: RunDir, backend: Backend) -> None:
    t = cfg.train
    if t.per_device_train_batch_size == "auto":
        batch = f"auto (largest micro-batch that fits) x accumulation = {t.effective_batch_size}"
    else:
        batch = (f"{t.per_device_train_batch_size} x {t.gradient_accumulation_steps} accumulation = "
                 f"{t.per_device_train_batch_size * t.gradient_accumulation_steps}")
    rows = [
        ("run", f"{run.path.name}"), ("model", cfg.model.model_name),
        ("steps", f"{t.max_steps} (eval every {t.eval_steps}, save every {t.save_steps})"),
        ("batch", batch),
        ("lr", f"{t.learning_rate:g} ({t.lr_scheduler_type}, warmup {t.warmup_steps})"),
        ("lora", f"r={cfg.lora.r} alpha={cfg.lora.lora_alpha}"), ("data", cfg.data.dataset_name),
        ("output", str(run.path)), ("backend", str(backend)),
    ]
    print("wellocr training run", flush=True)
    for key, value in rows:
        print(f"  {key:<8} {value}", flush=True)


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id (`org/name`): absolute, relative with ./ ../ ~, or several levels deep."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def ensure_local_assets(cfg: Config) -> None:
    """Build the offline tiny model / synthetic data the config asks for, when absent (before preflight); a
    missing local path that is not to be built is an error naming it."""
    for key, name, build in (("model.model_name", cfg.model.model_name, cfg.model.build_tiny_if_missing),
                             ("data.dataset_name", cfg.data.dataset_name, cfg.data.build_synthetic_if_missing)):
        if looks_like_path(name) and not build and not Path(name).expanduser().exists():
            raise UserError(f"{key}: {name} does not exist (the offline tiny model and synthetic data are built "
                            "only at the path the config file itself names); check the path")
    if cfg.model.build_tiny_if_missing and not Path(cfg.model.model_name).exists():
        from wellocr.tiny import build_tiny_model

        print(f"building the tiny offline model at {cfg.model.model_name}", flush=True)
        build_tiny_model(cfg.model.model_name, seed=0)
    if cfg.data.build_synthetic_if_missing and not Path(cfg.data.dataset_name).exists():
        from wellocr.synth import write_dataset

        print(f"writing a synthetic data set at {cfg.data.dataset_name}", flush=True)
        write_dataset(cfg.data.dataset_name, train=cfg.data.synthetic_train, eval=cfg.data.synthetic_eval,
                      seed=cfg.train.seed, width=cfg.data.synthetic_width)


def run_is_done(cfg: Config, run: RunDir) -> str | None:
    """Why there is nothing left to do (final adapter complete and max_steps reached or early-stopped)."""
    if incomplete_reason(run.final_dir) is not None:
        return None
    step = (read_marker(run.final_dir) or {}).get("step", 0)
    if step >= cfg.train.max_steps:
        return f"finished at step {step}"
    if run.read().get("status") == "early-stopped":
        return f"early-stopped at step {step}"
    return None


# ---------------------------------------------------------------- data and trainer


def prepare_data(cfg: Config, processor: Any, run: RunDir) -> tuple[dict, int]:
    from wellocr.data import enforce_max_length, load_splits, trainer_dataset

    splits = load_splits(cfg.data)
    max_length = 0
    for name in list(splits):
        splits[name], longest = enforce_max_length(splits[name], cfg.data, processor, cfg.train.max_seq_length)
        max_length = max(max_length, longest)
        skipped = len(splits[name].bad_rows)
        print(f"data: {name} {len(splits[name])} rows" + (f" ({skipped} skipped)" if skipped else ""), flush=True)
    datasets = {name: trainer_dataset(split, cfg.data, run.bad_rows_log) for name, split in splits.items()}
    return {"splits": splits, "datasets": datasets}, max_length


def sft_config(cfg: Config, run: RunDir, backend: Backend, precision: str, max_length: int,
               micro_batch: int, accumulation: int, probe: bool = False):
    """The run's SFTConfig; `probe`: one step that evaluates, saves and logs nothing (the auto batch probe)."""
    from trl import SFTConfig

    t = cfg.train
    optim = t.optim
    if backend.device != "cuda" and "8bit" in optim:
        log.info("train.optim %s needs CUDA (bitsandbytes); using adamw_torch on CPU", optim)
        optim = "adamw_torch"
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
        greater_is_better=False,
        load_best_model_at_end=False,
        restore_callback_states_from_checkpoint=True,
        gradient_checkpointing=False,  # enabled on the model by wellocr.model (Unsloth's or PEFT's way)
        max_length=max_length,
        completion_only_loss=True,
        remove_unused_columns=False,  # the lazy transform needs the raw columns
        dataset_kwargs={"skip_prepare_dataset": True},
        dataloader_num_workers=dataloader_workers(cfg.data.dataloader_num_workers),
        dataset_num_proc=cfg.data.dataset_num_proc,
        report_to="none",
        disable_tqdm=False,
    )
    if backend.name == "unsloth":
        settings["dataset_text_field"] = ""
    if probe:
        settings.update(max_steps=1, eval_strategy="no", save_strategy="no", logging_strategy="no",
                        dataloader_num_workers=0, disable_tqdm=True)
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
                  data: dict, max_length: int, micro_batch: int, accumulation: int, callbacks: list,
                  probe: bool = False) -> Any:
    from transformers import EarlyStoppingCallback

    from wellocr.sft import WellocrSFTTrainer

    args = sft_config(cfg, run, backend, precision, max_length, micro_batch, accumulation, probe)
    collator = None
    if backend.name == "unsloth":
        from unsloth.trainer import UnslothVisionDataCollator

        # resize="max" keeps our pixel-budget sizes; Unsloth's default shrinks scans to 512 px wide.
        collator = UnslothVisionDataCollator(model, processor, resize="max", max_seq_length=max_length,
                                             completion_only_loss=True)
    if cfg.train.early_stopping_patience > 0 and not probe:
        callbacks = [*callbacks, EarlyStoppingCallback(cfg.train.early_stopping_patience,
                                                       cfg.train.early_stopping_threshold)]
    return WellocrSFTTrainer(
        model=model,
        args=args,
        train_dataset=data["datasets"]["train"],
        eval_dataset=None if probe else data["datasets"]["eval"],
        processing_class=processor,
        data_collator=collator,
        callbacks=callbacks,
    )


def is_cuda_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "CUDA out of memory" in str(exc)


def train_adapting_to_oom(run: RunDir, make_trainer, resume_from: Path | None, initial: dict) -> tuple[Any, Any]:
    """Train; on CUDA OOM halve the micro-batch and double accumulation (same effective batch), rebuild and
    resume from the last complete checkpoint, at most MAX_OOM_ADAPTATIONS times; the sizes go into run.json."""
    import torch

    sizes = run.read().get("adapted_batch") or initial
    for adaptation in range(MAX_OOM_ADAPTATIONS + 1):
        trainer = make_trainer(sizes["per_device_train_batch_size"], sizes["gradient_accumulation_steps"])
        try:
            return trainer, trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except Exception as exc:  # noqa: BLE001 - only OOM is handled, everything else re-raised
            if not is_cuda_oom(exc):
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
                  "(same effective batch)", flush=True)
            remove_incomplete(run.path)
            resume_from = latest_complete_checkpoint(run.path)
    raise AssertionError("unreachable")


def probe_trainer_factory(cfg: Config, run: RunDir, backend: Backend, precision: str, model: Any, processor: Any,
                          data: dict, max_length: int) -> Any:
    """make(micro): a trainer over the longest training sample x micro that trains one step and saves nothing."""
    from wellocr.autobatch import worst_case_rows

    @functools.cache  # the longest row, found on the first call only (every candidate probes with it)
    def longest() -> Any:
        return worst_case_rows(data["splits"]["train"], cfg.data, processor, data["datasets"]["train"], 1)

    def make(micro_batch: int) -> Any:
        rows = longest().select([0] * micro_batch)
        return build_trainer(cfg, run, backend, precision, model, processor, {"datasets": {"train": rows}},
                             max_length, micro_batch, 1, [], probe=True)

    return make


def batch_sizes(cfg: Config, run: RunDir, backend: Backend, make_probe_trainer: Any) -> dict:
    """Micro-batch and accumulation: the config's, or for `auto` the largest micro-batch that fits (probed once
    with the longest sample, then remembered in run.json so every restart trains with the same sizes).
    `make_probe_trainer(micro)`: a trainer over the worst-case rows that trains one step and saves nothing."""
    t = cfg.train
    if t.per_device_train_batch_size != "auto":
        return {"per_device_train_batch_size": t.per_device_train_batch_size,
                "gradient_accumulation_steps": t.gradient_accumulation_steps}
    recorded = run.read().get("auto_batch")
    if recorded:
        return recorded
    from wellocr.autobatch import AutoBatchError, choose_micro_batch, training_probe

    probe = None
    if backend.device == "cuda":
        print("auto batch: one training step on the longest sample per candidate micro-batch", flush=True)
        probe = training_probe(make_probe_trainer)
    try:
        micro, accumulation = choose_micro_batch(probe, t.effective_batch_size, backend.device)
    except AutoBatchError as exc:
        raise OutOfMemory(str(exc)) from exc
    finally:
        probe = None
        gc.collect()
    sizes = {"per_device_train_batch_size": micro, "gradient_accumulation_steps": accumulation}
    run.update(auto_batch=sizes)
    print(f"auto batch: micro-batch {micro} x {accumulation} accumulation = {t.effective_batch_size}", flush=True)
    return sizes


def save_final(trainer: Any, run: RunDir, step: int) -> Path:
    """Adapter + processor into final/ (written aside, marked complete, then swapped in)."""
    staging = run.path / "final.partial"
    shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(str(staging))
    mark_complete(staging, step)
    old = run.path / "final.old"
    if run.final_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        run.final_dir.rename(old)
    staging.rename(run.final_dir)
    shutil.rmtree(old, ignore_errors=True)
    return run.final_dir


def peak_memory_gb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_reserved() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---------------------------------------------------------------- the recipe


def generation_eval_hook(cfg: Config, processor: Any, data: dict, tracker: Any):
    """At every evaluation: CER/WER of a fixed eval subset, and its worst samples as a W&B table."""
    from wellocr.evaluate import fixed_eval_rows, generation_metrics, worst_samples

    if cfg.eval.generation_samples <= 0:
        return None
    rows = fixed_eval_rows(data["splits"]["eval"], cfg.eval.generation_samples)

    def evaluate(model: Any, step: int) -> dict:
        result = generation_metrics(model, processor, cfg, rows, cfg.eval.batch_size)
        columns = ["step", "index", "image", "prediction", "reference", "loss", "cer", "wer"]
        for by in ("loss", "cer"):
            worst = worst_samples(result["records"], cfg.eval.worst_k, by=by)
            tracker.log_table(f"eval/worst_by_{by}", columns,
                              [[step, r["index"], r["image"], r["prediction"], r["reference"], r["loss"], r["cer"],
                                r["wer"]] for r in worst], step=step)
        return {"eval/cer": result["eval/cer"], "eval/wer": result["eval/wer"]}

    return evaluate


def evaluate_final(cfg: Config, run: RunDir, model: Any, processor: Any, data: dict, tracker: Any) -> dict:
    """Score the final adapter on the eval split (and test, when the data has one) into eval/final[-test]."""
    from wellocr.evaluate import eval_dir_name, evaluate_model

    results = {}
    for split in ("eval", "test"):
        if split not in data["splits"]:
            continue
        out = run.eval_dir / eval_dir_name("final", split)
        metrics = evaluate_model(model, processor, cfg, data["splits"][split], out, "final", run_dir=run.path,
                                 checkpoint_path=run.final_dir)
        results[split] = metrics
        print(f"final {split}: CER {metrics['cer']:.4f}  WER {metrics['wer']:.4f}  "
              f"(normalised {metrics['cer_normalized']:.4f} / {metrics['wer_normalized']:.4f})  → {out}", flush=True)
        tracker.log({f"final/{split}_cer": metrics["cer"], f"final/{split}_wer": metrics["wer"]})
    return results


def train(cfg: Config, run: RunDir, args: argparse.Namespace, stop: StopState, attempt: int,
          remote: Any = None) -> Outcome:
    compile_cache = compile_cache_dir(cfg)
    if remote is not None:  # a new pod: the caches a previous one compiled, from object storage
        remote.restore_compile_cache(compile_cache)
    use_compile_cache(compile_cache)  # before torch is imported: Python's bytecode may go there too
    backend = select_backend(cfg.model)
    print_summary(cfg, run, backend)
    ensure_local_assets(cfg)

    run_preflight(cfg, run.path)
    if args.preflight_only:
        return Outcome("preflight-only", EXIT_OK)

    import_backend(backend)  # Unsloth before transformers/TRL/PEFT
    startup_marks = {"imports": time.time()}
    from wellocr.callbacks import CheckpointCallback, RehearsalCallback, StartupCallback, StopCallback
    from wellocr.cost import CostCallback, CostLedger, budget_exhausted
    from wellocr.tracking import Tracker, TrackingCallback

    precision = resolve_precision(cfg.train.precision, backend.device)
    removed = remove_incomplete(run.path)
    resume_from = Path(args.resume) if args.resume else latest_complete_checkpoint(run.path)
    start_step = checkpoint_step(resume_from) or 0 if resume_from is not None else 0
    if resume_from is not None and start_step > cfg.train.max_steps:
        raise UserError(f"{resume_from} is at step {start_step}, past train.max_steps {cfg.train.max_steps}: to "
                        f"continue the run raise it (--set train.max_steps=N with N > {start_step})")
    if resume_from is not None:
        print(f"resuming from {resume_from.name} (step {start_step})", flush=True)
    elif removed or args.resume_latest:
        print("no complete checkpoint: starting from step 0", flush=True)

    run.update_attempt(attempt, start_step=start_step)
    ledger = CostLedger.open(run.cost_file, cfg.cost, attempt, start_step=start_step)
    over_budget = budget_exhausted(ledger, cfg.cost)
    if over_budget:
        print(f"wellocr: {over_budget}", flush=True)
        return Outcome("budget", EXIT_OK, start_step)
    tracker = Tracker(cfg, run)
    preemptions = sum(a.get("exit_reason") in PREEMPTED_REASONS for a in run.read().get("attempts", []))
    tracker.start(preemptions)
    step = start_step
    try:
        started = time.time()
        model, processor = load_for_training(cfg, backend, precision)
        startup_marks["model_load"] = time.time()
        data, max_length = prepare_data(cfg, processor, run)
        startup_marks["data"] = time.time()
        print(f"max sequence length {max_length} tokens (images at most {cfg.data.max_pixels // 1024} visual "
              "tokens)", flush=True)

        retention = RetentionPolicy(cfg.checkpoint.keep_best, cfg.checkpoint.keep_recent)
        protect = {resume_from.name} if resume_from is not None else set()
        callbacks = [  # order matters: cost adds its keys to the logs the tracker then sends
            CheckpointCallback(run.path, retention, stop, protect, marker_extra=lambda: {"cost_usd": ledger.total_usd()},
                               remote=remote),
            StopCallback(stop),
            CostCallback(ledger, stop, cfg.cost, cfg.train.max_steps),
            StartupCallback(run, attempt, startup_marks),
        ]
        if args.rehearse_preemption:
            callbacks.append(RehearsalCallback(run, stop))
        generation_eval = generation_eval_hook(cfg, processor, data, tracker)

        def make_trainer(micro_batch: int, accumulation: int) -> Any:
            trainer = build_trainer(cfg, run, backend, precision, model, processor, data, max_length,
                                    micro_batch, accumulation, callbacks)
            trainer.generation_eval = generation_eval
            return trainer

        probe_trainers = probe_trainer_factory(cfg, run, backend, precision, model, processor, data, max_length)
        sizes = batch_sizes(cfg, run, backend, probe_trainers)
        startup_marks["auto_batch"] = time.time()  # the probe runs in the first attempt only
        samples_per_step = sizes["per_device_train_batch_size"] * sizes["gradient_accumulation_steps"]
        callbacks.append(TrackingCallback(tracker, samples_per_step))
        trainer, result = train_adapting_to_oom(run, make_trainer, resume_from, sizes)
        step = trainer.state.global_step
        if stop.reason == "preempted":
            return Outcome("preempted", EXIT_PREEMPTED, step)
        if stop.reason == "rehearsal":
            return Outcome("rehearsal-stop", EXIT_PREEMPTED, step)
        if stop.reason == "budget":
            print(f"wellocr: {stop.message}", flush=True)
            run.update(status="budget")
            return Outcome("budget", EXIT_OK, step)

        final = save_final(trainer, run, step)
        reason = "finished" if step >= cfg.train.max_steps else "early-stopped"
        run.update(status=reason)
        if remote is not None:
            remote.upload_path(final)  # now, in the background, while the final evaluation runs
        elapsed = time.time() - started
        metrics = result.metrics if result is not None else {}
        print(f"this attempt: steps {start_step + 1}-{step} in {metrics.get('train_runtime', elapsed):.1f} s, "
              f"{metrics.get('train_steps_per_second', 0):.2f} steps/s, train loss "
              f"{metrics.get('train_loss', float('nan')):.4f}, peak memory {peak_memory_gb(backend.device):.1f} GB",
              flush=True)
        print(f"final adapter: {final}", flush=True)
        evaluate_final(cfg, run, trainer.model, processor, data, tracker)
        print(f"cost: ${ledger.total_usd():.4f} over {len(ledger.segments)} attempt(s) "
              f"(python -m wellocr.cost --run {run.path})", flush=True)
        return Outcome(reason, EXIT_OK, step)
    finally:
        ledger.heartbeat(step, force=True)
        tracker.finish()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    stop = StopState()
    restore_handler = install_sigterm_handler(stop)
    lock = run = remote = None
    try:
        refuse_an_empty_remote()
        cfg, run, how, remote = resolve_config(args)
        try:
            run.create(run.path.name, how)
        except OSError as exc:
            raise UserError(f"run.output_dir: cannot create {run.path}: {exc.strerror or exc}") from None
        lock = RunLock(run.path)
        lock.acquire()
        job = ManagedJob.from_env(os.environ)
        if job is not None:
            job.record(run)
        save_config(cfg, run.config_file)
        if remote is not None:
            remote.upload_path(run.config_file)
        done = run_is_done(cfg, run)
        if done and not args.preflight_only:
            print(f"wellocr: run {run.path} is already done ({done}); nothing to do", flush=True)
            if remote is None:
                return _release(lock, restore_handler, EXIT_OK)
        attempt = run.start_attempt(sys.argv if argv is None else ["python", "-m", "wellocr.train", *argv])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return _release(lock, restore_handler, exc.exit_code)
    except Preempted:
        return _release(lock, restore_handler, EXIT_PREEMPTED)
    except RuntimeError as exc:  # the remote store failed to restore: never silently restart from step 0
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return _release(lock, restore_handler, EXIT_ERROR)

    outcome = Outcome("crashed", EXIT_ERROR)
    log_path = None
    try:
        with run.console_log(attempt) as log_path:
            try:
                outcome = attempt_outcome(cfg, run, args, stop, attempt, remote, done)
            except UserError as exc:
                print(f"error: {exc}", file=sys.stderr, flush=True)
                outcome = Outcome("unreachable" if exc.exit_code == EXIT_UNREACHABLE else "user-error", exc.exit_code)
            except Preempted:
                outcome = Outcome("preempted", EXIT_PREEMPTED)
            except OutOfMemory as exc:
                print(f"error: {exc}", file=sys.stderr, flush=True)
                outcome = Outcome("out-of-memory", EXIT_OOM)
            except Exception:  # noqa: BLE001 - the traceback goes to the attempt log, the code to SkyPilot
                if stop.reason == "preempted":  # SIGTERM surfaced as another error (a library wrapped it)
                    outcome = Outcome("preempted", EXIT_PREEMPTED)
                else:
                    traceback.print_exc()
                    outcome = Outcome("crashed", EXIT_ERROR)
            print(f"exit: {outcome.reason} (code {outcome.code})", flush=True)
    except Preempted:  # SIGTERM between the attempt log closing and here
        outcome = Outcome("preempted", EXIT_PREEMPTED)
    finally:
        run.end_attempt(attempt, exit_reason=outcome.reason, exit_code=outcome.code, step=outcome.step)
        if remote is not None:
            outcome = sync_remote(cfg, run, remote, outcome, log_path)
            run.update_attempt(attempt, exit_reason=outcome.reason, exit_code=outcome.code,
                               uploaded_files=remote.uploaded)
        print_cost_report(run, outcome)
        if args.rehearse_preemption and outcome.code != EXIT_PREEMPTED:
            print(rehearsal_verdict(run, remote, outcome), flush=True)
        _release(lock, restore_handler, outcome.code)
    return outcome.code


def refuse_an_empty_remote() -> None:
    """The object-storage job declares WELLOCR_REMOTE; given empty, every preemption would restart from step 0."""
    if os.environ.get("WELLOCR_REMOTE", None) == "":
        raise UserError("WELLOCR_REMOTE is empty: give the bucket the checkpoints survive in "
                        "(--env WELLOCR_REMOTE=s3://bucket/prefix), or WELLOCR_REMOTE=none to run without one "
                        "(a preemption then restarts from step 0)")


def attempt_outcome(cfg: Config, run: RunDir, args: argparse.Namespace, stop: StopState, attempt: int,
                    remote: Any, done: str | None) -> Outcome:
    """Train, unless the run is done (then only its uploads are finished) or stuck in retries."""
    stuck = retries_without_progress(run.read().get("attempts", [])[:-1])
    if stuck:
        print(f"error: {stuck}", file=sys.stderr, flush=True)
        return Outcome("no-progress", EXIT_NO_PROGRESS)
    if done and not args.preflight_only:
        step = (read_marker(run.final_dir) or {}).get("step")
        run.update_attempt(attempt, start_step=step)
        return Outcome("nothing-to-do", EXIT_OK, step)
    return train(cfg, run, args, stop, attempt, remote)


def retries_without_progress(attempts: list[dict], limit: int = MAX_RETRIES_WITHOUT_PROGRESS) -> str | None:
    """Why to stop retrying: the last `limit` attempts all exited retryable (75, other than a SIGTERM
    preemption, which SkyPilot recovers without limit) with no new step and no file uploaded."""
    recent = attempts[-limit:]
    if len(recent) < limit:
        return None
    for a in recent:
        stalled = a.get("step") is not None and a.get("step") == a.get("start_step") and not a.get("uploaded_files")
        if a.get("exit_code") != EXIT_PREEMPTED or a.get("exit_reason") == "preempted" or not stalled:
            return None
    return (f"the last {limit} attempts exited {EXIT_PREEMPTED} ({recent[-1].get('exit_reason')}) without a new "
            f"step or a file uploaded; stopping (exit {EXIT_NO_PROGRESS}, not retried): check checkpoint.remote, "
            "its credentials and the network, then launch again")


def sync_remote(cfg: Config, run: RunDir, remote: Any, outcome: Outcome, log_path: Path | None) -> Outcome:
    """Upload what the attempt leaves and wait for it; a finished run is done only once the store holds its
    final/ and eval/ as they are here (read back), else exit 75 so the job retries."""
    finished = outcome.code == EXIT_OK and outcome.reason in ("finished", "early-stopped", "nothing-to-do")
    if finished:
        for path in (run.final_dir, run.eval_dir):
            if path.exists():
                remote.upload_path(path)
    for path in (run.config_file, run.run_json, run.cost_file):
        if path.is_file():
            remote.upload_path(path)
    if log_path is not None:
        remote.upload_path(log_path, f"logs/{log_path.name}")
    # RunPod kills 5 s after SIGTERM; otherwise wait for the uploads (checkpoints, final, eval)
    all_done = remote.close(2.0 if outcome.reason == "preempted" else cfg.checkpoint.upload_timeout_s)
    if not finished:
        return outcome
    missing = remote.missing(run.path)
    if all_done and not missing:
        print(f"remote: final/ and eval/ verified at {remote.where}", flush=True)
        return outcome
    print(f"error: uploads to checkpoint.remote did not finish ({', '.join(missing[:4]) or 'still pending'}); "
          "exiting 75 so the job retries (the run is complete locally)", file=sys.stderr, flush=True)
    return Outcome("upload-incomplete", EXIT_PREEMPTED, outcome.step)


def rehearsal_verdict(run: RunDir, remote: Any, outcome: Outcome) -> str:
    """PASS when the run stopped once after a checkpoint, was relaunched, resumed from that checkpoint, finished,
    and (with a remote) the store holds final/ and eval/; with what it cost and how long the recovery took."""
    info = run.read()
    stop, attempts = info.get("rehearsal") or {}, info.get("attempts", [])
    stopped = next((a for a in attempts if a.get("exit_reason") == "rehearsal-stop"), None)
    resumed = next((a for a in attempts if stopped and a["attempt"] > stopped["attempt"]
                    and a.get("start_step") == stop.get("step")), None)
    problems = []
    if stopped is None:
        problems.append("the run never stopped after a checkpoint")
    elif resumed is None:
        problems.append(f"no attempt resumed from {stop.get('stopped_after')}")
    if outcome.reason not in ("finished", "early-stopped", "nothing-to-do") or outcome.code != EXIT_OK:
        problems.append(f"the last attempt ended {outcome.reason} (exit {outcome.code})")
    if remote is None:
        problems.append("no checkpoint.remote: nothing was read back from a bucket")
    from wellocr.cost import read_ledger, segment_usd

    cost = sum(segment_usd(seg) for seg in read_ledger(run.cost_file)["segments"])
    if problems:
        return f"rehearsal: FAIL: {'; '.join(problems)} (cost so far ${cost:.2f})"
    recovery = resumed["started_at"] + resumed.get("first_step_s", 0) - stopped["ended_at"]
    return (f"rehearsal: PASS: stopped after {stop['stopped_after']}, relaunched and resumed from it "
            f"{recovery:.0f} s later (stop to first resumed step), finished at step {outcome.step}, final/ and "
            f"eval/ read back from {remote.where}; cost ${cost:.2f} over {len(attempts)} attempts")


def print_cost_report(run: RunDir, outcome: Outcome) -> None:
    """The closing cost report of every attempt that trained (it is what `sky jobs logs` ends with)."""
    if not run.cost_file.is_file():
        return
    from wellocr.cost import cost_report, format_report

    try:
        print(format_report(cost_report(run.path)), flush=True)
    except Exception as exc:  # noqa: BLE001 - a report must never change the exit code
        log.warning("cost report unavailable: %s", exc)
    print(f"wellocr: trainer exit code {outcome.code} ({outcome.reason})", flush=True)


def _release(lock: Any, restore_handler: Any, code: int) -> int:
    if lock is not None:
        lock.release()
    restore_handler()
    return code


if __name__ == "__main__":
    sys.exit(main())
