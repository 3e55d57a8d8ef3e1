"""`python -m wellocr.rank RUN_DIR` — one rank of a data-parallel attempt; `python -m wellocr.train` starts N of
them through torchrun when `train.processes` or `train.nodes` is > 1 (see wellocr.distributed), never a user.

Each rank reads the run's saved config and the launcher's request, points the caches at the run's volume, imports
the backend, joins the process group (NCCL on GPUs, each rank on its own; gloo on CPU) and runs stage 2. Each
machine's first rank records its outcome in that machine's run.json for the launcher (torchrun turns any failed
rank into its own exit 1); a rank exits 0 after a normal end or a stop, and 1 otherwise, so that torchrun stops the
ranks still waiting for it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from wellocr import bootstrap
from wellocr.config import Config, config_from_dict
from wellocr.distributed import read_request
from wellocr.model import Backend
from wellocr.outcome import EXIT_OK, EXIT_PREEMPTED, Outcome, guarded
from wellocr.preemption import StopState, install_sigterm_handler
from wellocr.rundir import RunDir


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run = RunDir(Path(argv[0]))
    request = read_request(run.path)
    if argv[1:] == ["--choose-batch"]:
        return choose_batch(run, request)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local > 0:  # each machine's first rank speaks on its console; the others keep their own log
        run.logs_dir.mkdir(parents=True, exist_ok=True)
        sys.stdout = sys.stderr = open(run.logs_dir / f"attempt-{request['attempt']}-rank{rank}.log", "a", buffering=1)
    stop, cfg, timer, backend = start(run)
    remote = None
    if rank == 0:
        from wellocr.remote import RemoteStore

        remote = RemoteStore.from_config(cfg.checkpoint, run.path.name)

    def attempt():
        bootstrap.import_backend(backend, timer)
        from wellocr import training

        training.join_process_group(backend, local)
        return training.run(training.Attempt(
            cfg, run, request["attempt"], backend, stop, timer, remote=remote,
            resume=Path(request["resume"]) if request.get("resume") else None,
            resume_latest=request.get("resume_latest", False),
            rehearse_preemption=request.get("rehearse_preemption", False),
            wandb_mode=request.get("wandb_mode"), rank=rank, world=world))

    outcome = guarded(attempt, stop)
    if remote is not None:
        remote.close(2.0 if outcome.reason == "preempted" else cfg.checkpoint.upload_timeout_s)
    if local == 0:  # the machine's launcher reads it (on node 0: global rank 0's, the run's outcome)
        record_outcome(run, request["attempt"], outcome)
    return 0 if outcome.code in (EXIT_OK, EXIT_PREEMPTED) else 1  # a failed rank: torchrun stops the others


def start(run: RunDir) -> tuple[StopState, Config, bootstrap.StartupTimer, Backend]:
    """What every process of an attempt does first: SIGTERM handled, the run's saved config, the caches set."""
    stop = StopState()
    install_sigterm_handler(stop)
    cfg = config_from_dict(run.read_config_data() or {}, str(run.config_file))
    timer = bootstrap.StartupTimer()
    return stop, cfg, timer, bootstrap.prepare(cfg, None)


def choose_batch(run: RunDir, request: dict) -> int:
    """`--choose-batch`: one process, before the ranks start, chooses the auto micro-batch of one rank's share
    (`training.choose_batch_before_ranks`); a failure (76: not even 1 fits) is recorded like a rank's outcome."""
    stop, cfg, timer, backend = start(run)
    from wellocr.autobatch import batch_device_key, cap_process_memory  # torch only: Unsloth is not needed yet

    cap_process_memory()
    device = batch_device_key(backend.device)
    if (run.read().get("auto_batch") or {}).get("device") == device:  # a restart on the same kind of GPU
        print(f"auto batch: the micro-batch chosen for {device} earlier in this run", flush=True)
        return EXIT_OK

    def choose():
        bootstrap.import_backend(backend, timer)
        from wellocr import training

        training.choose_batch_before_ranks(cfg, run, backend, request["ranks"])
        return Outcome("batch-chosen", EXIT_OK)

    outcome = guarded(choose, stop)
    if outcome.code != EXIT_OK:  # the attempt ends here: the launcher reads why, as from a rank
        record_outcome(run, request["attempt"], outcome)
    return outcome.code


def record_outcome(run: RunDir, attempt: int, outcome: Outcome) -> None:
    run.update_attempt(attempt, rank_outcome={"reason": outcome.reason, "code": outcome.code, "step": outcome.step})


if __name__ == "__main__":
    sys.exit(main())
