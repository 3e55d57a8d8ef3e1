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
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wellocr import bootstrap
from wellocr.checkpoint import incomplete_reason, latest_complete_checkpoint, read_marker
from wellocr.config import (
    Config,
    apply_values,
    config_from_dict,
    find_config_path,
    load_config,
    parse_overrides,
    save_config,
    trajectory_differences,
    validate,
)
from wellocr.distributed import Cluster
from wellocr.errors import UserError
from wellocr.model import Backend
from wellocr.outcome import (
    EXIT_ERROR,
    EXIT_NO_PROGRESS,
    EXIT_OK,
    EXIT_OOM,
    EXIT_PREEMPTED,
    EXIT_UNREACHABLE,
    EXIT_USER,
    Outcome,
    guarded,
)
from wellocr.preemption import Preempted, StopState, install_sigterm_handler
from wellocr.preflight import check_gpu, run_preflight
from wellocr.remote import RemoteRestoreError, RemoteStore
from wellocr.rundir import ManagedJob, RunDir, RunLock, resolve_run_name

__all__ = ["EXIT_OK", "EXIT_ERROR", "EXIT_USER", "EXIT_UNREACHABLE", "EXIT_NO_PROGRESS", "EXIT_PREEMPTED", "EXIT_OOM",
           "Outcome", "main", "parse_args"]

log = logging.getLogger("wellocr")

MAX_RETRIES_WITHOUT_PROGRESS = 3  # retryable exits in a row with no new step and no upload: then exit 70


# ---------------------------------------------------------------- config and run directory


@dataclass(frozen=True)
class Request:
    """What the command line asks: the config (file and --set), which checkpoint to continue from, and the modes."""

    config: str | None
    set: list[str]
    resume: str | None  # --resume CHECKPOINT_DIR
    resume_latest: bool
    preflight_only: bool
    rehearse_preemption: bool


def parse_args(argv: list[str] | None) -> Request:
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
    return Request(**vars(parser.parse_args(argv)))


def resolve_config(args: Request) -> tuple[Config, RunDir, str, Any]:
    """The run's config and directory. On resume the run's saved config.yaml is the config; requested values
    may change only what does not alter the training trajectory (steps, intervals, budget, W&B, ...)."""
    if args.resume:
        checkpoint = Path(args.resume)
        if RunDir(checkpoint).exists() or RunDir(checkpoint).config_file.is_file():
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
    return config_from_dict(run.read_config_data(), str(run.config_file))


def _requested_config(args: Request, fallback: Config) -> Config:
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
        from wellocr.synthetic import write_dataset

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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    stop = StopState()
    restore_handler = install_sigterm_handler(stop)
    try:
        claim = claim_run(args, sys.argv if argv is None else ["python", "-m", "wellocr.train", *argv])
    except (UserError, RemoteRestoreError) as exc:  # a remote that cannot be read: never restart from step 0
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return _release(None, restore_handler, exc.exit_code if isinstance(exc, UserError) else EXIT_ERROR)
    except Preempted:
        return _release(None, restore_handler, EXIT_PREEMPTED)
    if claim.attempt is None:  # done, and no bucket to finish
        return _release(claim.lock, restore_handler, EXIT_OK)
    outcome = Outcome("crashed", EXIT_ERROR)
    try:
        with claim.run.console_log(claim.attempt):
            outcome = guarded(lambda: attempt_outcome(claim, args, stop), stop)
            print(f"exit: {outcome.reason} (code {outcome.code})", flush=True)
    except Preempted:  # SIGTERM between the attempt log closing and here
        outcome = Outcome("preempted", EXIT_PREEMPTED)
    finally:
        outcome = close_attempt(claim, outcome, args)
        _release(claim.lock, restore_handler, outcome.code)
    return outcome.code


@dataclass
class Claim:
    """The run this process works on: config, directory (locked), remote store, and its attempt number (None
    when the run is done and has no bucket to finish)."""

    cfg: Config
    run: RunDir
    remote: Any
    lock: RunLock
    done: str | None
    attempt: int | None
    cluster: Cluster = Cluster()


def claim_run(args: Request, command: list[str]) -> Claim:
    """Config and run directory resolved, the directory locked, the config saved, the attempt recorded."""
    refuse_an_empty_remote()
    cfg, run, how, remote = resolve_config(args)
    cluster = Cluster.from_env(cfg.train.nodes, os.environ)
    try:
        run.create(run.path.name, how)
    except OSError as exc:
        raise UserError(f"run.output_dir: cannot create {run.path}: {exc.strerror or exc}") from None
    lock = RunLock(run.path)
    lock.acquire()
    try:
        job = ManagedJob.from_env(os.environ)
        if job is not None:
            job.record(run)
        save_config(cfg, run.config_file)
        if remote is not None and cluster.head:
            remote.upload_path(run.config_file)
        done = run_is_done(cfg, run)
        if done and not args.preflight_only:
            print(f"wellocr: run {run.path} is already done ({done}); nothing to do", flush=True)
            if remote is None or not cluster.head:
                return Claim(cfg, run, remote, lock, done, None, cluster)
        return Claim(cfg, run, remote, lock, done, run.start_attempt(command), cluster)
    except BaseException:
        lock.release()
        raise


def close_attempt(claim: Claim, outcome: Outcome, args: Request) -> Outcome:
    """Record the attempt's end, finish the uploads (a finished run: read back), print the cost report and, for a
    rehearsal, its verdict. Returns the outcome the process exits with."""
    run, remote = claim.run, claim.remote
    run.end_attempt(claim.attempt, exit_reason=outcome.reason, exit_code=outcome.code, step=outcome.step)
    if not claim.cluster.head:  # uploads, the ledger and the report are node 0's
        print(f"node {claim.cluster.rank} of {claim.cluster.nodes}: done; the run's checkpoints, ledger and cost "
              "report are on node 0", flush=True)
        return outcome
    if remote is not None:
        log_path = run.logs_dir / f"attempt-{claim.attempt}.log"
        outcome = sync_remote(claim.cfg, run, remote, outcome, log_path if log_path.is_file() else None)
        run.update_attempt(claim.attempt, exit_reason=outcome.reason, exit_code=outcome.code,
                           uploaded_files=remote.uploaded)
    print_cost_report(run, outcome)
    if args.rehearse_preemption and outcome.code != EXIT_PREEMPTED:
        print(rehearsal_verdict(run, remote, outcome), flush=True)
    return outcome


def refuse_an_empty_remote() -> None:
    """The object-storage job declares WELLOCR_REMOTE; given empty, every preemption would restart from step 0."""
    if os.environ.get("WELLOCR_REMOTE", None) == "":
        raise UserError("WELLOCR_REMOTE is empty: give the bucket the checkpoints survive in "
                        "(--env WELLOCR_REMOTE=s3://bucket/prefix), or WELLOCR_REMOTE=none to run without one "
                        "(a preemption then restarts from step 0)")


def attempt_outcome(claim: Claim, args: Request, stop: StopState) -> Outcome:
    """Train, unless the run is done (then only its uploads are finished) or stuck in retries."""
    run = claim.run
    stuck = retries_without_progress(run.read().get("attempts", [])[:-1])
    if stuck:
        print(f"error: {stuck}", file=sys.stderr, flush=True)
        return Outcome("no-progress", EXIT_NO_PROGRESS)
    if claim.done and not args.preflight_only:
        step = (read_marker(run.final_dir) or {}).get("step")
        run.update_attempt(claim.attempt, start_step=step)
        return Outcome("nothing-to-do", EXIT_OK, step)
    return train(claim.cfg, run, args, stop, claim.attempt, claim.remote, claim.cluster)


def train(cfg: Config, run: RunDir, args: Request, stop: StopState, attempt: int, remote: Any,
          cluster: Cluster) -> Outcome:
    """Stage 1 hands over to stage 2: caches and backend (bootstrap), assets, preflight, then the recipe."""
    timer = bootstrap.StartupTimer()
    backend = bootstrap.prepare(cfg, remote)  # the compile caches are set: torch may be imported from here on
    print_summary(cfg, run, backend)
    ensure_local_assets(cfg)
    report = run_preflight(cfg, run.path)
    check_gpu(cfg, report.model_config, report)
    if args.preflight_only:
        return Outcome("preflight-only", EXIT_OK)
    if cfg.train.processes > 1 or cluster.nodes > 1:  # data-parallel: the ranks run stage 2 under torchrun
        from wellocr import distributed

        return distributed.launch(run, cfg.train.processes, {
            "attempt": attempt, "resume": args.resume, "resume_latest": args.resume_latest,
            "rehearse_preemption": args.rehearse_preemption, "wandb_mode": report.wandb_mode,
            "choose_batch": cfg.train.per_device_train_batch_size == "auto"}, stop, cluster)
    bootstrap.import_backend(backend, timer)  # Unsloth before transformers/TRL/PEFT
    from wellocr import training  # stage 2: ordinary top-level imports of torch, transformers, TRL

    return training.run(training.Attempt(
        cfg, run, attempt, backend, stop, timer, remote=remote, resume=Path(args.resume) if args.resume else None,
        resume_latest=args.resume_latest, rehearse_preemption=args.rehearse_preemption, wandb_mode=report.wandb_mode,
    ))


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
    for path in run.run_files():
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
    from wellocr.ledger import read_ledger, segment_usd

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
    from wellocr.ledger import cost_report, format_report

    try:
        print(format_report(cost_report(run.path)), flush=True)
    except Exception as exc:  # noqa: BLE001 - a report must never change the exit code
        log.warning("cost report unavailable: %s", exc)
    print(f"wellocr: trainer exit code {outcome.code} ({outcome.reason})", flush=True)


def _release(lock: RunLock | None, restore_handler: Any, code: int) -> int:
    if lock is not None:
        lock.release()
    restore_handler()
    return code


if __name__ == "__main__":
    sys.exit(main())
